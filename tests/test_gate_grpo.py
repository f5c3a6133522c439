"""Gate-GRPO through `MoEGRPOTrainer`, checked against a reference written from `docs/design.md` §2.

The reference shares no code with the package's routing path (it asks the controller only where the routers are): its
own router hooks dispatch a trace's recorded sets (qwen3-MoE's mixing weights: softmax over all experts, renormalized
over the set), the selection law is `softmax(z + m)` with the modality mask `m`, the set probability is the closed
form for K = 2, and the clipped objective and TRL's normalizations are written out. Everything runs in float64 with
fixed, known advantages, so the checks do not depend on whether a tiny random model's rollouts happen to differ in
reward.

Off-policy batches are made the way reused generations are: `num_iterations=2` scores the old gate log-probabilities
right after generation, then the routers move (as an optimizer step would) before the loss is computed.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import digit_share, group_rows, make_config, spread_reward

from trl_moe_grpo import MoEGRPOTrainer
from trl_moe_grpo.testing import tiny_moe_model

# Group-relative advantages of the 4 rollouts of each prompt (they sum to 0, as GRPO's do), all non-zero and unequal.
GROUP_ADVANTAGES = torch.tensor([1.0, -0.5, 0.75, -1.25])
# Experts that rollouts of text tokens may not draw, per layer (the tiny model has 2 MoE layers of 8 experts).
BANNED = {0: [0, 3], 1: [5, 6]}


def float64_model(seed: int = 2):
    model = tiny_moe_model("qwen3_moe", seed=seed).double()
    model.set_experts_implementation("eager")  # transformers' grouped_mm kernel has no float64
    return model


def gate_trainer(tmp_path, tokenizer, dataset, masks: bool = False, seed: int = 2, **overrides) -> MoEGRPOTrainer:
    """A float64 trainer whose loss is Gate-GRPO alone (no token loss, no balance loss), ready for `_compute_loss`."""
    values = {"token_loss_coef": 0.0, "num_iterations": 2, **overrides}
    trainer = MoEGRPOTrainer(
        float64_model(seed),
        digit_share,
        args=make_config(tmp_path, **values),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert trainer.routing.top_k == 2 and trainer.balance_loss_coef == 0
    if masks:
        trainer.routing.set_expert_masks(expert_masks(trainer))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def expert_masks(trainer) -> torch.Tensor:
    """`[layers, 2, experts]`: `BANNED` experts masked for text tokens (the tiny model's only modality)."""
    masks = torch.ones(trainer.routing.num_layers, 2, trainer.routing.num_experts, dtype=torch.bool)
    for layer, experts in BANNED.items():
        masks[layer, 0, experts] = False
    return masks


def rollouts(trainer, dataset) -> dict:
    """A generation batch of 2 prompts x 4 rollouts, with `GROUP_ADVANTAGES` as its advantages."""
    with trainer._routing_step():
        batch = trainer._generate_and_score_completions(group_rows(dataset, 2, 4))
    return {**batch, "advantages": GROUP_ADVANTAGES.repeat(2).to(batch["advantages"])}


def router_weights(trainer) -> list[torch.nn.Parameter]:
    return [adapter.router.weight for adapter in trainer.routing.adapters]


@torch.no_grad()
def move_routers(trainer, std: float = 0.1, seed: int = 11) -> None:
    """What an optimizer step between generation and loss does to the old/new ratio: the routers change."""
    generator = torch.Generator().manual_seed(seed)
    for weight in router_weights(trainer):
        weight.add_(std * torch.randn(weight.shape, generator=generator, dtype=weight.dtype))


def trainer_loss(trainer, batch, backward: bool = False) -> torch.Tensor:
    trainer.model.zero_grad(set_to_none=True)
    with trainer._routing_step():
        loss = trainer._compute_loss(trainer.model, batch)
        if backward:
            loss.backward()
    return loss.detach()


# ---------------------------------------------------------------------------------------------- the reference


class RouterProbe:
    """Forward hooks on every router, installed after the controller's, so they see what the experts receive.

    Keeps each layer's logits, the stock top-K and the ids finally dispatched. With `routes`, dispatches the recorded
    set of every token that has one, with the mixing weights of qwen3-MoE's router computed here (the controller's
    replay is not used).
    """

    def __init__(self, trainer, routes: torch.Tensor | None = None, retain_grad: bool = False):
        self.routers = [adapter.router for adapter in trainer.routing.adapters]
        self.routes, self.retain_grad = routes, retain_grad
        self.logits: list[torch.Tensor | None] = [None] * len(self.routers)
        self.stock_top_k: list[torch.Tensor | None] = [None] * len(self.routers)
        self.dispatched: list[torch.Tensor | None] = [None] * len(self.routers)

    def _hook(self, layer, module, args, output):
        logits, weights, indices = output
        if self.logits[layer] is None:  # the forward's call, not a checkpoint recompute
            self.logits[layer] = logits
            self.stock_top_k[layer] = logits.detach().topk(indices.shape[-1], dim=-1).indices
            if self.retain_grad and logits.requires_grad:
                logits.retain_grad()
        if self.routes is not None:
            recorded = self.routes[:, :, layer].reshape(-1, indices.shape[-1]).long().to(indices.device)
            valid = recorded[:, :1] >= 0
            chosen = torch.where(valid, recorded, indices)
            mixing = torch.softmax(logits, dim=-1).gather(-1, chosen)
            mixing = (mixing / mixing.sum(-1, keepdim=True)).to(weights.dtype)
            indices, weights = chosen, torch.where(valid, mixing, weights)
            output = (logits, weights, indices)
        self.dispatched[layer] = indices.detach()
        return output if self.routes is not None else None

    @contextlib.contextmanager
    def installed(self):
        handles = [
            r.register_forward_hook(lambda m, a, o, i=i: self._hook(i, m, a, o)) for i, r in enumerate(self.routers)
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def token_ids(batch) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    return input_ids, torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)


def reference_forward(trainer, batch, dispatch: bool = True) -> RouterProbe:
    """The model's forward on the batch with the trace's sets dispatched (or, `dispatch=False`, the stock top-K)."""
    input_ids, attention_mask = token_ids(batch)
    probe = RouterProbe(trainer, batch["routed_experts"] if dispatch else None)
    with probe.installed():
        probe.output = trainer.model(input_ids=input_ids, attention_mask=attention_mask)
    return probe


def gate_positions(batch, completion_only: bool = False) -> torch.Tensor:
    """`[batch, tokens]` bool: non-padding tokens with a recorded route, in rows that have a completion."""
    _, attention_mask = token_ids(batch)
    mask = (batch["routed_experts"][..., 0, 0] >= 0) & attention_mask.bool()
    mask &= batch["completion_mask"].bool().any(dim=1, keepdim=True)
    if completion_only:
        mask[:, : batch["prompt_ids"].size(1)] = False
    return mask


def reference_set_log_probs(
    logits: list[torch.Tensor], batch, positions: torch.Tensor, masks: torch.Tensor | None, method: str = "set"
) -> torch.Tensor:
    """`[layers, positions]` float64 log-probability of each recorded set under `softmax(z + m)`, K = 2."""
    routes = batch["routed_experts"].flatten(0, 1)[positions.reshape(-1)].long()  # [positions, layers, 2]
    out = []
    for layer, z in enumerate(logits):
        z = z.double()[positions.reshape(-1)]
        if masks is not None:  # every token of the tiny LM is a text token
            z = z.masked_fill(~masks[layer, 0], float("-inf"))
        log_p = torch.log_softmax(z, dim=-1)
        first, second = log_p.gather(-1, routes[:, layer]).unbind(-1)
        if method == "ordered":  # p_a * p_b / (1 - p_a)
            out.append(first + second - torch.log1p(-first.exp()))
        else:  # p_a p_b (1 / (1 - p_a) + 1 / (1 - p_b))
            out.append(first + second + torch.log(1 / (1 - first.exp()) + 1 / (1 - second.exp())))
    return torch.stack(out)


def reference_gate_loss(
    set_log_probs: torch.Tensor,
    old_set_log_probs: torch.Tensor,
    batch,
    positions: torch.Tensor,
    trainer,
    frozen: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Gate-GRPO (`docs/design.md` §2): per decision `-min(r A, clip(r) A)`, mean over layers, TRL's normalization.

    `frozen`: `(unclipped, clipped)` from `clip_branches` at some parameters: each decision keeps the branch of the
    min it had there (`r A`, or the constant `clip(r) A`). Near those parameters this is the loss without the kinks
    where a ratio crosses a clip bound, so finite differences resolve the derivative there however close a ratio is.
    """
    advantages = batch["advantages"].double()[:, None].expand(positions.shape)[positions]
    ratio = torch.exp(set_log_probs - old_set_log_probs)
    clipped = ratio.clamp(1 - trainer.epsilon_low, 1 + trainer.epsilon_high)
    if frozen is None:
        per_decision = -torch.minimum(ratio * advantages, clipped * advantages)
    else:
        unclipped, clipped = frozen
        per_decision = -torch.where(unclipped, ratio, clipped) * advantages
    per_position = per_decision.mean(0)
    if trainer.loss_type == "dapo":
        return per_position.sum() / positions.sum()
    if trainer.loss_type == "grpo":
        per_row = torch.zeros(positions.shape[0], dtype=per_position.dtype)
        per_row = per_row.index_add(0, positions.nonzero()[:, 0], per_position)
        return (per_row / positions.sum(1).clamp(min=1)).mean()
    raise NotImplementedError(trainer.loss_type)


class Reference:
    """The reference Gate-GRPO loss of one batch as a function of the model's current parameters."""

    def __init__(self, trainer, batch, masks: bool = False):
        args = trainer.args
        self.trainer, self.batch = trainer, batch
        self.masks = expert_masks(trainer) if masks else None
        self.positions = gate_positions(batch, completion_only=args.gate_loss_positions == "completion")
        self.dispatch = args.routing_replay
        self.method = args.gate_set_logprob

    def set_log_probs(self, method: str | None = None) -> torch.Tensor:
        probe = reference_forward(self.trainer, self.batch, self.dispatch)
        return reference_set_log_probs(probe.logits, self.batch, self.positions, self.masks, method or self.method)

    def loss(self, old_set_log_probs: torch.Tensor | None = None, method: str | None = None, frozen=None):
        current = self.set_log_probs(method)
        old = current.detach() if old_set_log_probs is None else old_set_log_probs
        return self.trainer.args.gate_loss_coef * reference_gate_loss(
            current, old, self.batch, self.positions, self.trainer, frozen
        )

    @torch.no_grad()
    def clip_branches(self, old_set_log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(unclipped, clipped)` at the current parameters: where `r A` is the min, and the value of `clip(r)`."""
        advantages = self.batch["advantages"].double()[:, None].expand(self.positions.shape)[self.positions]
        ratio = torch.exp(self.set_log_probs() - old_set_log_probs)
        clipped = ratio.clamp(1 - self.trainer.epsilon_low, 1 + self.trainer.epsilon_high)
        return ratio * advantages <= clipped * advantages, clipped


def off_policy_batch(trainer, dataset, masks: bool) -> tuple[dict, Reference, torch.Tensor]:
    """Rollouts, their old set log-probs from the reference at the generating parameters, then moved routers."""
    batch = rollouts(trainer, dataset)
    assert "old_gate_logps" in batch, "num_iterations > 1: the trainer scores the old gate log-probs"
    reference = Reference(trainer, batch, masks)
    with torch.no_grad():
        old = reference.set_log_probs()
    move_routers(trainer)
    return batch, reference, old


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"loss_type": "grpo"},
        {"gate_set_logprob": "ordered"},
        {"gate_loss_positions": "completion"},
        {"routing_replay": False},
        {"rollout_routing": "noise"},
        {"gate_loss_coef": 0.5},
    ],
    ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()) or "defaults",
)
def test_off_policy_gate_loss_equals_the_reference(tmp_path, tokenizer, dataset, options):
    """Generations reused (old gate log-probs from before the routers moved), modality masks on, fixed advantages:
    the trainer's loss is the reference Gate-GRPO loss of each option, and the option changes it."""
    trainer = gate_trainer(tmp_path, tokenizer, dataset, masks=True, **options)
    batch, reference, old = off_policy_batch(trainer, dataset, masks=True)
    with torch.no_grad():
        expected = reference.loss(old)
        ratio = torch.exp(reference.set_log_probs() - old)
    # Both sides of the clip range occur, so the check covers the clipped and the unclipped branch.
    assert (ratio > 1.2).any() and (ratio < 0.8).any() and ((ratio > 0.8) & (ratio < 1.2)).any()
    tolerance = 1e-5 * abs(expected.item()) + 1e-7
    assert trainer_loss(trainer, batch).item() == pytest.approx(expected.item(), abs=tolerance)

    # The masks and the set law have an effect: the reference without masks, or with the other law, differs.
    with torch.no_grad():
        assert abs(Reference(trainer, batch, masks=False).loss(old).item() - expected.item()) > 50 * tolerance
        other = "ordered" if trainer.args.gate_set_logprob == "set" else "set"
        assert abs(reference.loss(old, method=other).item() - expected.item()) > 50 * tolerance


def test_off_policy_gate_gradient_matches_finite_differences(tmp_path, tokenizer, dataset):
    """The trainer's gradient of its Gate-GRPO loss, along random directions (the routers; every parameter), equals
    central finite differences of the reference loss in float64: off-policy, with masks and fixed advantages. Each
    decision keeps the branch of the clipped min it has at the parameters (`Reference.clip_branches`), so a ratio a
    hair from a clip bound does not put a kink between the two evaluation points.

    The model's RMSNorm and attention softmax run in float32 whatever its dtype, which bounds how well finite
    differences resolve a derivative (h = 1e-4 leaves ~1e-5 relative on the routers). The embedding row of the pad
    token, which this random model writes into completions, is left out: autograd gives `padding_idx` no gradient."""
    trainer = gate_trainer(tmp_path, tokenizer, dataset, masks=True)
    batch, reference, old = off_policy_batch(trainer, dataset, masks=True)
    trainer_loss(trainer, batch, backward=True)
    named = [(name, p) for name, p in trainer.model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    routers = {id(w) for w in router_weights(trainer)}
    padding_idx = trainer.model.get_input_embeddings().padding_idx
    generator = torch.Generator().manual_seed(0)
    frozen = reference.clip_branches(old)
    h = 1e-4
    for scope, rel in (("routers", 1e-4), ("routers", 1e-4), ("all", 1e-3)):
        direction = []
        for p in params:
            d = torch.randn(p.shape, generator=generator, dtype=p.dtype) * (scope == "all" or id(p) in routers)
            if p is trainer.model.get_input_embeddings().weight and padding_idx is not None:
                d[padding_idx] = 0
            direction.append(d)
        analytic = sum((g * d).sum() for g, d in zip(grads, direction)).item()
        values = []
        for step in (h, -h):
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.add_(step * d)
                values.append(reference.loss(old, frozen=frozen).item())
                for p, d in zip(params, direction):
                    p.sub_(step * d)
        numeric = (values[0] - values[1]) / (2 * h)
        assert abs(numeric) > 1e-2, "the direction must carry gradient for the check to bite"
        assert analytic == pytest.approx(numeric, rel=rel), (
            f"{scope}: trainer {analytic}, finite differences {numeric}"
        )

    # Closer (to the float32 of the set probabilities): the reference's own gradient, by autograd, on every parameter.
    trainer.model.zero_grad(set_to_none=True)
    reference.loss(old).backward()
    for (name, p), got in zip(named, grads):
        expected = torch.zeros_like(p) if p.grad is None else p.grad
        error = (got - expected).abs().max().item()
        assert error <= 1e-5 * expected.abs().max().item() + 1e-12, f"{name}: the gradients differ by {error}"


def test_masked_selection_law(tmp_path, tokenizer, dataset):
    """With modality masks, rollouts never draw a masked expert, and Gate-GRPO's set probabilities are those of the
    masked distribution: on-policy, the trainer's router gradient is the masked reference's, not the unmasked one's."""
    trainer = gate_trainer(tmp_path, tokenizer, dataset, masks=True, num_iterations=1)
    batch = rollouts(trainer, dataset)
    recorded = batch["routed_experts"]
    for layer, experts in BANNED.items():
        assert not torch.isin(recorded[:, :, layer].long(), torch.tensor(experts)).any()

    trainer_loss(trainer, batch, backward=True)
    got = torch.cat([w.grad.reshape(-1) for w in router_weights(trainer)])

    def reference_grad(masks: bool) -> torch.Tensor:
        trainer.model.zero_grad(set_to_none=True)
        Reference(trainer, batch, masks).loss().backward()
        return torch.cat([w.grad.reshape(-1) for w in router_weights(trainer)])

    masked, unmasked = reference_grad(True), reference_grad(False)
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-8)
    assert (masked - unmasked).abs().max() > 100 * (got - masked).abs().max() + 1e-6


def test_a_gate_only_step_raises_the_advantage_weighted_set_log_probs(tmp_path, tokenizer, dataset):
    """One optimizer step of `train()` with the token loss off: sum over rollouts of A times the change in the log
    probability of each recorded set (positions and layers) is positive, i.e. the step follows the advantages."""

    class FixedAdvantages(MoEGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            output["advantages"] = GROUP_ADVANTAGES.repeat(output["advantages"].numel() // 4).to(output["advantages"])
            self.batch = output
            with torch.no_grad():
                self.before = Reference(self, output).set_log_probs()
            return output

    trainer = FixedAdvantages(
        float64_model(),
        digit_share,
        args=make_config(tmp_path, max_steps=1, token_loss_coef=0.0, learning_rate=1e-3, weight_decay=0.0),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    batch = trainer.batch
    with torch.no_grad():
        after = Reference(trainer, batch).set_log_probs()
    positions = gate_positions(batch)
    advantages = batch["advantages"].double()[:, None].expand(positions.shape)[positions]
    change = (advantages * (after - trainer.before)).sum().item()
    assert change > 0, f"the advantage-weighted change of the chosen sets' log-probs is {change}"


def last_layer_logit_grads(trainer, batch) -> torch.Tensor:
    """`[batch, tokens, experts]` gradient of the trainer's loss w.r.t. the last MoE layer's router logits."""
    probe = RouterProbe(trainer, retain_grad=True)
    with probe.installed():
        trainer_loss(trainer, batch, backward=True)
    return probe.logits[-1].grad.reshape(*batch["routed_experts"].shape[:2], -1)


@pytest.mark.parametrize("positions", ["all", "completion"])
def test_gate_loss_positions(tmp_path, tokenizer, dataset, positions):
    """The last layer's prompt routing (which no later gate term sees) gets a gate gradient only under "all"."""
    trainer = gate_trainer(tmp_path, tokenizer, dataset, num_iterations=1, gate_loss_positions=positions)
    batch = rollouts(trainer, dataset)
    grads = last_layer_logit_grads(trainer, batch).abs().sum(-1)
    width = batch["prompt_ids"].size(1)
    assert grads[:, width:].max() > 1e-6
    if positions == "completion":
        assert grads[:, :width].max() == 0
    else:
        assert (grads[:, :width] > 1e-8).sum() >= batch["prompt_mask"].sum() // 2


@pytest.mark.parametrize("replay", [True, False])
def test_routing_replay(tmp_path, tokenizer, dataset, replay):
    """`routing_replay=True`: every layer's experts receive the recorded sets. `False`: they receive the live top-K,
    which differs from the recorded sets, while the loss still scores the recorded sets (reference, on-policy grad)."""
    trainer = gate_trainer(tmp_path, tokenizer, dataset, num_iterations=1, routing_replay=replay)
    batch = rollouts(trainer, dataset)
    probe = RouterProbe(trainer)
    with probe.installed():
        trainer_loss(trainer, batch, backward=True)
    got = torch.cat([w.grad.reshape(-1) for w in router_weights(trainer)])
    routes = batch["routed_experts"].flatten(0, 1).long()
    valid = routes[:, 0, 0] >= 0
    for layer in range(trainer.routing.num_layers):
        dispatched, recorded = probe.dispatched[layer][valid], routes[valid, layer]
        same = (dispatched.sort(-1).values == recorded.sort(-1).values).all(-1)
        if replay:
            assert same.all(), f"layer {layer} did not dispatch the recorded sets"
        else:
            assert torch.equal(probe.dispatched[layer], probe.stock_top_k[layer]) and not same.all()

    trainer.model.zero_grad(set_to_none=True)
    Reference(trainer, batch).loss().backward()
    expected = torch.cat([w.grad.reshape(-1) for w in router_weights(trainer)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("std", [1e-6, 1.0])
def test_noise_rollouts_are_noisy_top_k(tmp_path, tokenizer, dataset, std):
    """`rollout_routing="noise"`: each recorded set is the top-K of the gate scores plus Gaussian noise of
    `routing_noise_std`: the stock top-K when the noise is negligible, other sets at std 1."""
    trainer = gate_trainer(
        tmp_path, tokenizer, dataset, num_iterations=1, rollout_routing="noise", routing_noise_std=std
    )
    batch = rollouts(trainer, dataset)
    with torch.no_grad():
        probe = reference_forward(trainer, batch)
    routes = batch["routed_experts"].flatten(0, 1).long()
    valid = routes[:, 0, 0] >= 0
    same = torch.stack(
        [
            (probe.stock_top_k[layer][valid].sort(-1).values == routes[valid, layer].sort(-1).values).all(-1)
            for layer in range(trainer.routing.num_layers)
        ]
    )
    if std < 1e-3:
        assert same.all()
    else:
        assert not same.all()


@pytest.mark.parametrize("greedy", [True, False])
def test_greedy_decoding(tmp_path, tokenizer, dataset, greedy):
    """Under sampled routing, `greedy_decoding=True` writes each completion token as the argmax of the model's
    logits under the rollout's routing; `False` samples tokens, and some differ from the argmax."""
    trainer = gate_trainer(tmp_path, tokenizer, dataset, num_iterations=1, greedy_decoding=greedy)
    batch = rollouts(trainer, dataset)
    with torch.no_grad():
        logits = reference_forward(trainer, batch).output.logits
    width = batch["prompt_ids"].size(1)
    predicted = logits[:, width - 1 : -1].argmax(-1)
    scored = batch["completion_mask"].bool()
    agree = (predicted == batch["completion_ids"])[scored]
    if greedy:
        assert agree.all()
    else:
        assert not agree.all()


def test_loss_coefficients_scale_their_terms(tmp_path, tokenizer, dataset):
    """`gate_loss_coef` and `token_loss_coef` multiply their terms: the loss is linear in each."""
    trainer = gate_trainer(tmp_path, tokenizer, dataset, token_loss_coef=1.0)
    batch = rollouts(trainer, dataset)
    move_routers(trainer)  # off-policy: with every completion as long, on-policy losses are both 0 (A sums to 0)

    def loss(token: float, gate: float) -> float:
        trainer.args.token_loss_coef, trainer.args.gate_loss_coef = token, gate
        return trainer_loss(trainer, batch).item()

    token_only, gate_only = loss(1.0, 0.0), loss(0.0, 1.0)
    assert abs(token_only) > 1e-6 and abs(gate_only) > 1e-6 and abs(token_only - gate_only) > 1e-6
    assert loss(0.5, 2.0) == pytest.approx(0.5 * token_only + 2.0 * gate_only, rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------------------------------------- the rest of the table


@pytest.mark.parametrize("greedy_eval", [True, False])
def test_greedy_eval(tmp_path, tokenizer, dataset, greedy_eval):
    """Evaluation routes with the stock top-K and, under `greedy_eval=True`, writes each token as the argmax of the
    stock model's logits, even where training samples tokens (`rollout_routing="topk"`); `False` samples them."""
    trainer = gate_trainer(tmp_path, tokenizer, dataset, rollout_routing="topk", greedy_eval=greedy_eval)
    assert trainer.generation_config.do_sample  # training rollouts sample tokens
    trainer.model.eval()
    with trainer._routing_step():
        batch = trainer._generate_and_score_completions(group_rows(dataset, 2, 4))
    with torch.no_grad():
        probe = reference_forward(trainer, batch, dispatch=False)
    routes = batch["routed_experts"].flatten(0, 1).long()
    valid = routes[:, 0, 0] >= 0
    for layer in range(trainer.routing.num_layers):
        assert torch.equal(routes[valid, layer], probe.stock_top_k[layer][valid])
    width = batch["prompt_ids"].size(1)
    predicted = probe.output.logits[:, width - 1 : -1].argmax(-1)
    agree = (predicted == batch["completion_ids"])[batch["completion_mask"].bool()]
    assert agree.all() if greedy_eval else not agree.all()


@pytest.mark.parametrize("column", ["task", "kind"])
def test_task_column_splits_the_evaluation_reward(tmp_path, tokenizer, dataset, column):
    """`task_column` names the column whose values split the evaluation reward: each task's logged rewards are
    exactly its rows' rewards."""
    trainer = MoEGRPOTrainer(
        float64_model(),
        spread_reward,
        args=make_config(tmp_path, task_column=column),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.model.eval()
    rows = [{**row, "task": "ab"[i // 4], "kind": "xy"[i % 2]} for i, row in enumerate(group_rows(dataset, 2, 4))]
    with trainer._routing_step():
        trainer._generate_and_score_completions(rows)
    logged = {k: v for k, v in trainer._metrics["eval"].items() if k.startswith("reward_by_task/")}
    expected = {}
    for i, row in enumerate(rows):
        expected.setdefault(f"reward_by_task/{row[column]}", []).append(float(i % 2))
    assert logged == expected


def test_router_learning_rate_moves_the_routers_by_their_own_rate(tmp_path, tokenizer, dataset):
    """One Adam step moves each weight by at most its learning rate (about that much where it has a gradient): the
    routers by `router_learning_rate`, the rest by `learning_rate`."""
    trainer = MoEGRPOTrainer(
        float64_model(),
        spread_reward,
        args=make_config(
            tmp_path,
            max_steps=1,
            learning_rate=1e-5,
            router_learning_rate=1e-2,
            weight_decay=0.0,
            lr_scheduler_type="constant",
        ),  # fmt: skip
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    routers = {id(w) for w in trainer.routing.router_parameters()}
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in trainer.model.named_parameters()}
    router_moves = [moved[name] for name, p in trainer.model.named_parameters() if id(p) in routers]
    other_moves = [moved[name] for name, p in trainer.model.named_parameters() if id(p) not in routers]
    assert router_moves and all(1e-2 * 0.9 < m <= 1e-2 * (1 + 1e-6) for m in router_moves)
    assert max(other_moves) <= 1e-5 * (1 + 1e-6) and max(other_moves) > 1e-5 * 0.9
