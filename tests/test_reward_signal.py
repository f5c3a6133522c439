"""The levers that give routing rewards a learning signal (`MoEGRPOConfig`): the reward-spread metric, the rollout
routing temperature, zero-spread groups left out of the normalizers, the router entropy bonus and the routers' own
learning-rate warm-up. Each is tested for its effect, on tiny models."""

import itertools
import json
import math

import pytest
import torch
from conftest import digit_share, make_config
from test_trainer import group_rows, router_weights, with_reward_spread

from trl_moe_grpo import MoEGRPOError, MoEGRPOTrainer
from trl_moe_grpo.losses import set_log_prob
from trl_moe_grpo.routing import RoutingController
from trl_moe_grpo.routing.sampling import tempered_log_probs
from trl_moe_grpo.testing import tiny_moe_model
from trl_moe_grpo.trainer.grpo_trainer import ROUTING_FILE

GROUP = 4


def alternating_spread(completions, **kwargs):
    """Even groups (of `GROUP` rollouts, in batch order) all get reward 1; odd groups get 0, 1, 2, 3: half the groups
    carry spread whatever the model writes."""
    return [float(i % GROUP) if (i // GROUP) % 2 else 1.0 for i in range(len(completions))]


def build(tmp_path, tokenizer, dataset, reward=alternating_spread, seed=2, **overrides):
    trainer = MoEGRPOTrainer(
        tiny_moe_model("qwen3_moe", seed=seed),
        reward,
        args=make_config(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def generate(trainer, dataset, num_prompts=2):
    with trainer._routing_step():
        return trainer._generate_and_score_completions(group_rows(dataset, num_prompts, GROUP))


# ---------------------------------------------------------------------------------- reward spread share


def test_reward_spread_share_counts_the_groups_whose_rewards_differ(tmp_path, tokenizer, dataset):
    trainer = build(tmp_path, tokenizer, dataset)
    generate(trainer, dataset, num_prompts=4)
    metrics = trainer._metrics["train"]
    assert metrics["routing/reward_spread_share"] == [0.5]
    # Under TRL's per-group scaling, TRL's share of rows whose group std is zero is the complement.
    assert metrics["frac_reward_zero_std"][-1] == pytest.approx(0.5)


def test_reward_spread_leaves_out_unscorable_rollouts(tmp_path, tokenizer, dataset):
    """A group with a single scorable rollout (the others None) has no spread: its advantages are all zero."""

    def one_scorable(completions, **kwargs):
        return [float(i) if i % GROUP == 0 or i >= GROUP else None for i in range(len(completions))]

    trainer = build(tmp_path, tokenizer, dataset, reward=one_scorable)
    generate(trainer, dataset)
    assert trainer._metrics["train"]["routing/reward_spread_share"] == [0.5]
    assert trainer._reward_spread_rows.tolist() == [False] * GROUP + [True] * GROUP


# ---------------------------------------------------------------------------------- rollout routing temperature


def _tolerance(prob: float, draws: int) -> float:
    """Five binomial standard deviations, plus a little room for float32 probabilities."""
    return 5 * math.sqrt(prob * (1 - prob) / draws) + 1e-4


@pytest.mark.parametrize(("temperature", "masked"), [(0.5, False), (2.0, False), (2.0, True)])
def test_tempered_rollouts_draw_sets_with_the_tempered_law(temperature, masked):
    """Sampled routing at temperature T, through the controller's hooks on a real model: the frequencies of the
    expert sets of layer 0 (whose input no routing precedes, so every copy of a prompt sees the same logits) match
    the law `softmax(log p / T)` that Gate-GRPO scores (`p` renormalized over the experts a modality mask allows),
    and not the untempered one."""
    model = tiny_moe_model("qwen3_moe", seed=0)
    controller = RoutingController(model)
    prompt = torch.tensor([[5, 17, 3]])
    draws = 20_000
    with torch.no_grad():
        with controller.capture() as captured:
            model(input_ids=prompt)
        log_p = captured.selection_probs[0][0, :, 0].log()  # [tokens, experts] of layer 0
        if masked:  # text tokens may not draw experts 2 and 6 (the trainer's `_selection_log_probs` law)
            masks = torch.ones(controller.num_layers, 2, controller.num_experts, dtype=torch.bool)
            masks[:, 0, [2, 6]] = False
            controller.set_expert_masks(masks)
            log_p = log_p.masked_fill(~masks[0, 0], float("-inf")).log_softmax(-1)
        torch.manual_seed(1234)
        with controller.rollout("sample", temperature=temperature) as recording:
            model(input_ids=prompt.expand(draws, -1))
    routes = recording.steps[0][:, :, 0].long()  # [draws, tokens, top_k]
    n, k = controller.num_experts, controller.top_k
    subsets = list(itertools.combinations(range(n), k))
    experts = torch.tensor(subsets)

    untempered_misses = 0
    for token in range(prompt.shape[1]):
        sets = routes[:, token].sort(-1).values
        codes = sets[:, 0] * n + sets[:, 1]
        counts = torch.bincount(codes, minlength=n * n).double() / draws
        tempered = set_log_prob(tempered_log_probs(log_p[token], temperature).expand(len(subsets), -1), experts).exp()
        plain = set_log_prob(log_p[token].expand(len(subsets), -1), experts).exp()
        tempered, plain = tempered.nan_to_num(0.0), plain.nan_to_num(0.0)  # sets with a masked expert: probability 0
        assert tempered.sum().item() == pytest.approx(1.0, abs=1e-5)
        for (a, b), prob, plain_prob in zip(subsets, tempered.tolist(), plain.tolist()):
            freq = counts[a * n + b].item()
            assert abs(freq - prob) <= _tolerance(prob, draws), (token, (a, b), freq, prob)
            untempered_misses += abs(freq - plain_prob) > _tolerance(plain_prob, draws)
    assert untempered_misses > 0, "the test must tell the tempered law from the untempered one"


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_tempered_set_log_prob_gradient_matches_finite_differences(temperature):
    """d/dz of log q_T(S), q_T = softmax(log softmax(z) / T), the set log-probability Gate-GRPO differentiates."""
    logits = torch.randn(8, generator=torch.Generator().manual_seed(3))
    experts = torch.tensor([5, 1])

    def set_lp(z: torch.Tensor) -> torch.Tensor:
        return set_log_prob(tempered_log_probs(torch.log_softmax(z, -1), temperature), experts)

    z = logits.clone().requires_grad_(True)
    set_lp(z).backward()
    step = 1e-2
    numeric = torch.stack(
        [(set_lp(logits + step * e) - set_lp(logits - step * e)) / (2 * step) for e in torch.eye(len(logits))]
    )
    torch.testing.assert_close(z.grad, numeric, rtol=0, atol=2e-3)
    # The tempered gradient is not the untempered one: the temperature is inside the differentiated law.
    z_plain = logits.clone().requires_grad_(True)
    set_log_prob(torch.log_softmax(z_plain, -1), experts).backward()
    assert (z.grad - z_plain.grad).abs().max() > 0.05


def test_tempered_gate_loss_scores_the_tempered_law_and_is_on_policy(tmp_path, tokenizer, dataset):
    """Gate-GRPO's ratio uses the temperature for the behaviour (old) and the current policy: reused generations
    (num_iterations=2) give a first-step ratio of 1 (within 1e-5, clip ratio 0), the scored log-probability is the
    tempered set law, and one optimizer step per generation gives a ratio of exactly 1."""
    temperature = 0.5
    trainer = build(
        tmp_path, tokenizer, dataset, num_iterations=2, rollout_routing_temperature=temperature, reward=digit_share
    )
    batch = generate(trainer, dataset)
    with trainer._routing_step():
        trainer._compute_loss(trainer.model, with_reward_spread(batch, GROUP))
        captures = trainer.routing.captures()
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        live = trainer._gate_log_probs(captures, input_ids)
    mask = batch["routed_experts"][..., 0, 0] >= 0
    assert (live - batch["old_gate_logps"]).abs()[mask].max() <= 1e-5
    assert trainer._metrics["train"]["gate/clip_ratio"][-1] == 0.0

    recorded = torch.stack([c.recorded for c in captures])
    plain = torch.stack([torch.log_softmax(c.logits.detach().float(), -1) for c in captures])
    expected = set_log_prob(torch.log_softmax(plain / temperature, -1), recorded).t().reshape(live.shape)
    untempered = set_log_prob(plain, recorded).t().reshape(live.shape)
    torch.testing.assert_close(live[mask], expected[mask], rtol=0, atol=1e-5)
    assert (live - untempered).abs()[mask].max() > 1e-2

    trainer.args.num_iterations = 1  # old log-probs = current ones, detached: the ratio is exactly 1
    batch = {k: v for k, v in batch.items() if k not in ("old_gate_logps", "old_per_token_logps")}
    with trainer._routing_step():
        trainer._compute_loss(trainer.model, with_reward_spread(batch, GROUP))
    assert trainer._metrics["train"]["gate/clip_ratio"][-1] == 0.0


def test_tempered_rollouts_spread_the_routes(tmp_path, tokenizer, dataset):
    """In the trainer's rollouts a higher temperature makes the sampled sets leave the top-K more often."""

    def differs_from_topk(temperature: float) -> float:
        trainer = build(tmp_path, tokenizer, dataset, rollout_routing_temperature=temperature, reward=digit_share)
        torch.manual_seed(0)
        batch = generate(trainer, dataset, num_prompts=4)
        with trainer._routing_step():
            trainer._compute_loss(trainer.model, batch)
            captures = trainer.routing.captures()
        recorded = torch.stack([c.recorded for c in captures]).sort(-1).values
        top_k = torch.stack([c.top_k for c in captures]).sort(-1).values
        valid = torch.stack([c.valid for c in captures])
        return (recorded != top_k).any(-1)[valid].float().mean().item()

    cold, paper, hot = differs_from_topk(0.25), differs_from_topk(1.0), differs_from_topk(4.0)
    assert cold < paper < hot


# ---------------------------------------------------------------------------------- zero-spread groups


def _live_rows(batch: dict, live: torch.Tensor) -> dict:
    """The rows of `batch` with reward spread, with the generation batch's counts recounted over them alone."""
    rows = batch["prompt_ids"].size(0)
    sub = {k: v[live] if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == rows else v for k, v in batch.items()}
    sub["num_items_in_batch"] = batch["num_live_items_in_batch"]
    sub["num_gate_items_in_batch"] = batch["num_live_gate_items_in_batch"]
    return sub


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_excluding_zero_spread_groups_is_training_on_the_live_groups_alone(tmp_path, tokenizer, dataset, loss_type):
    """`exclude_from_normalizer`: the loss and gradients of the whole batch equal TRL's (`keep`) on the rows of the
    groups with reward spread alone; `keep` on the whole batch is diluted by the dead groups."""
    trainer = build(tmp_path, tokenizer, dataset, loss_type=loss_type, zero_spread_groups="exclude_from_normalizer")
    model = trainer.model
    batch = generate(trainer, dataset, num_prompts=4)
    live = batch["reward_spread"]
    assert live.tolist() == ([False] * GROUP + [True] * GROUP) * 2
    assert (batch["advantages"][~live] == 0).all() and (batch["advantages"][live] != 0).any()

    def loss_and_grads(inputs: dict, mode: str) -> tuple[float, dict[str, torch.Tensor]]:
        trainer.args.zero_spread_groups = mode
        model.zero_grad(set_to_none=True)
        with trainer._routing_step():
            loss = trainer._compute_loss(model, inputs)
            loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    excluded, excluded_grads = loss_and_grads(batch, "exclude_from_normalizer")
    alone, alone_grads = loss_and_grads(_live_rows(batch, live), "keep")
    _, kept_grads = loss_and_grads(batch, "keep")
    assert excluded == pytest.approx(alone, abs=1e-6)
    assert excluded_grads.keys() == alone_grads.keys()
    for name, grad in excluded_grads.items():
        torch.testing.assert_close(grad, alone_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # `keep` on the whole batch: the dead half dilutes the same gradient.
    scale = max(g.abs().max().item() for g in kept_grads.values())
    assert scale > 1e-4
    assert max((excluded_grads[n] - g).abs().max().item() for n, g in kept_grads.items()) > 0.1 * scale


def test_excluded_groups_get_exactly_zero_advantages(tmp_path, tokenizer, dataset):
    """A group whose rewards differ by one float32 ulp has zero std by TRL's test (no spread), yet TRL hands its
    rows advantages of about 1e-6 (a 1e-10 difference divided by `std + 1e-4`); excluded, they are exactly 0."""
    low = torch.tensor(1e-3)
    high = torch.nextafter(low, torch.tensor(1.0)).item()

    def one_ulp_apart(completions, **kwargs):
        return [high if i % GROUP == 0 else low.item() for i in range(len(completions))]

    for mode, expect_zero in (("keep", False), ("exclude_from_normalizer", True)):
        trainer = build(tmp_path, tokenizer, dataset, reward=one_ulp_apart, zero_spread_groups=mode)
        batch = generate(trainer, dataset)
        assert trainer._metrics["train"]["routing/reward_spread_share"] == [0.0]
        assert (batch["advantages"] == 0).all() == expect_zero, (mode, batch["advantages"])


def test_keep_leaves_the_batch_as_trl_builds_it(tmp_path, tokenizer, dataset):
    trainer = build(tmp_path, tokenizer, dataset)
    batch = generate(trainer, dataset)
    assert not {"reward_spread", "num_live_items_in_batch", "num_live_gate_items_in_batch"} & batch.keys()
    assert trainer._zero_spread_factor(batch, "token") == 1.0


# ---------------------------------------------------------------------------------- regenerating zero-spread groups


def test_unpad_routes_inverts_pad_routes():
    from trl_moe_grpo.routing import pad_routes
    from trl_moe_grpo.routing.traces import unpad_routes

    generator = torch.Generator().manual_seed(0)
    for multiple in (None, 4):
        prompts = [torch.randint(0, 8, (n, 2, 2), generator=generator, dtype=torch.int16) for n in (3, 1, 6)]
        completions = [torch.randint(0, 8, (n, 2, 2), generator=generator, dtype=torch.int16) for n in (2, 5, 1)]
        routes = pad_routes(prompts, completions, multiple)
        back_prompts, back_completions = unpad_routes(routes, [3, 1, 6], [2, 5, 1], multiple)
        for mine, theirs in zip(back_prompts + back_completions, prompts + completions):
            assert torch.equal(mine, theirs)


def test_regenerated_groups_carry_their_own_routing_traces(tmp_path, tokenizer, dataset):
    """DAPO's dynamic sampling: dead groups are generated again and take the rollouts of their first attempt with
    reward spread. Rows of one batch then come from different generations, and each must carry its own trace: a
    forward replaying the final batch's traces reproduces, row by row, the log-probabilities of the generation the
    row came from (within 1e-5). The first scoring gives every rollout the same reward, so every group is dead."""
    scorings = []

    def dead_first(completions, **kwargs):
        scorings.append(len(completions))
        return [1.0] * len(completions) if len(scorings) == 1 else digit_share(completions)

    trainer = build(
        tmp_path, tokenizer, dataset, reward=dead_first, regenerate_zero_spread_groups=3, max_completion_length=4
    )
    model = trainer.model
    generations = []
    plain_generate = model.generate

    def generate_keeping_logits(*args, **kwargs):
        out = plain_generate(*args, **kwargs, output_logits=True, return_dict_in_generate=True)
        generations.append(torch.stack(out.logits, 1).log_softmax(-1))
        return out.sequences

    model.generate = generate_keeping_logits
    torch.manual_seed(3)
    batch = generate(trainer, dataset, num_prompts=4)
    attempts = trainer.last_regeneration_attempts
    metrics = trainer._metrics["train"]
    assert metrics["routing/reward_spread_share_first_generation"] == [0.0]
    assert len(generations) == 1 + metrics["routing/regeneration_attempts"][-1] == len(scorings) - 1
    assert len(set(attempts.tolist())) >= 2, "the batch must mix rows of different generations for the check to bite"
    assert (attempts > 0).any() and metrics["routing/reward_spread_share"][-1] > 0
    for start in range(0, len(attempts), GROUP):  # a group's rollouts come from one generation
        assert len(set(attempts[start : start + GROUP].tolist())) == 1

    completions, completion_mask = batch["completion_ids"], batch["completion_mask"]
    width = completions.shape[1]
    generation_log_probs = torch.zeros(completions.shape)
    for row, attempt in enumerate(attempts.tolist()):
        logps = generations[attempt][row]
        steps = min(width, logps.shape[0])
        generation_log_probs[row, :steps] = logps[:steps].gather(-1, completions[row, :steps, None])[:, 0]
    with torch.no_grad(), trainer._routing_step():
        trainer._replay.set_trace(batch["routed_experts"])
        replayed, _, _ = trainer._get_per_token_logps_and_entropies(
            model,
            torch.cat([batch["prompt_ids"], completions], 1),
            torch.cat([batch["prompt_mask"], completion_mask], 1),
            width,
        )
    assert ((replayed - generation_log_probs).abs() * completion_mask).max() <= 1e-5
    # The check has teeth: the first generation's log-probs do not fit the regenerated rows.
    first = torch.zeros(completions.shape)
    steps = min(width, generations[0].shape[1])
    first[:, :steps] = generations[0][:, :steps].gather(-1, completions[:, :steps, None])[..., 0]
    regenerated = (attempts > 0)[:, None] & completion_mask.bool()
    assert ((replayed - first).abs() * regenerated).max() > 1e-3


def test_regeneration_stops_when_every_group_has_spread(tmp_path, tokenizer, dataset):
    trainer = build(tmp_path, tokenizer, dataset, regenerate_zero_spread_groups=2)
    generate(trainer, dataset, num_prompts=4)  # `alternating_spread`: half the groups are dead in every attempt
    metrics = trainer._metrics["train"]
    assert metrics["routing/regeneration_attempts"] == [2.0]
    assert (trainer.last_regeneration_attempts == 0).all()  # no attempt gave the dead groups spread: kept as they were

    trainer = build(
        tmp_path,
        tokenizer,
        dataset,
        regenerate_zero_spread_groups=2,
        reward=lambda completions, **kw: [float(i % GROUP) for i in range(len(completions))],
    )
    generate(trainer, dataset)
    assert trainer._metrics["train"]["routing/regeneration_attempts"] == [0.0]


# ---------------------------------------------------------------------------------- router entropy bonus


def test_router_entropy_bonus_alone_raises_the_routing_entropy(tmp_path, tokenizer, dataset):
    """With every advantage zero the policy-gradient terms give the routers no gradient; the entropy bonus does,
    its loss is minus the coefficient times the logged mean entropy (`bnpo`: a masked mean), and gradient steps on
    it raise that entropy."""
    coef = 0.5
    trainer = build(tmp_path, tokenizer, dataset, loss_type="bnpo", router_entropy_coef=coef, reward=digit_share)
    batch = generate(trainer, dataset)
    batch["advantages"] = torch.zeros_like(batch["advantages"])

    def step(coefficient: float) -> tuple[float, float]:
        trainer.args.router_entropy_coef = coefficient
        trainer.model.zero_grad(set_to_none=True)
        with trainer._routing_step():
            loss = trainer._compute_loss(trainer.model, batch)
            loss.backward()
        return loss.item(), trainer._metrics["train"]["gate/entropy"][-1] if coefficient else math.nan

    step(0.0)
    assert all(w.grad is None or w.grad.abs().max() == 0 for w in router_weights(trainer))
    entropies = []
    for _ in range(4):
        loss, entropy = step(coef)
        assert loss == pytest.approx(-coef * entropy, rel=1e-5)
        assert all(w.grad.abs().max() > 0 for w in router_weights(trainer))
        entropies.append(entropy)
        with torch.no_grad():
            for w in router_weights(trainer):
                w -= 1.0 * w.grad
    assert all(after > before for before, after in zip(entropies, entropies[1:])), entropies


# ---------------------------------------------------------------------------------- router warm-up


@pytest.mark.parametrize("router_learning_rate", [None, 1e-2])
def test_router_warmup_ramps_the_routers_learning_rate_alone(tmp_path, tokenizer, dataset, router_learning_rate):
    """Routers: their peak learning rate x the main schedule (its own warm-up included) x min(1, step / 4); every
    other parameter follows the main schedule alone. The scheduler's state saves and restores."""
    trainer = build(
        tmp_path,
        tokenizer,
        dataset,
        learning_rate=1e-3,
        router_learning_rate=router_learning_rate,
        router_warmup_steps=4,
        lr_scheduler_type="linear",
        warmup_steps=2,
        reward=digit_share,
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    routers = {id(p) for p in trainer.routing.router_parameters()}
    router_groups = [g for g in optimizer.param_groups if {id(p) for p in g["params"]} <= routers]
    other_groups = [g for g in optimizer.param_groups if not {id(p) for p in g["params"]} & routers]
    assert router_groups and other_groups and len(router_groups) + len(other_groups) == len(optimizer.param_groups)
    peak = router_learning_rate or 1e-3
    for step in range(10):
        main = min(step / 2, (10 - step) / 8)  # transformers' linear schedule, 2 warm-up steps
        for group in other_groups:
            assert group["lr"] == pytest.approx(1e-3 * main, abs=1e-12), step
        for group in router_groups:
            assert group["lr"] == pytest.approx(peak * main * min(1.0, step / 4), abs=1e-12), step
        optimizer.step()
        scheduler.step()
        if step == 2:
            state = scheduler.state_dict()
            torch.save(state, tmp_path / "scheduler.pt")  # closures are not part of the state: it pickles

    # A resumed run rebuilds the warm-up from the config and restores the step.
    resumed = build(
        tmp_path,
        tokenizer,
        dataset,
        learning_rate=1e-3,
        router_learning_rate=router_learning_rate,
        router_warmup_steps=4,
        lr_scheduler_type="linear",
        warmup_steps=2,
        reward=digit_share,
    )
    resumed.create_optimizer_and_scheduler(num_training_steps=10)
    resumed.lr_scheduler.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=True))
    resumed.optimizer.step()
    resumed.lr_scheduler.step()
    lrs = [g["lr"] for g in resumed.optimizer.param_groups if g.get("moe_routers")]
    assert lrs and all(lr == pytest.approx(peak * min(4 / 2, 6 / 8) * 1.0, abs=1e-12) for lr in lrs)


def test_router_warmup_needs_a_lambda_scheduler(tmp_path, tokenizer, dataset):
    plateau = {"lr_scheduler_type": "reduce_lr_on_plateau", "eval_strategy": "steps", "eval_steps": 1}
    with pytest.raises(MoEGRPOError, match="router_warmup_steps.*reduce_lr_on_plateau"):
        make_config(tmp_path, router_warmup_steps=2, **plateau)
    # The scheduler itself is checked too (options changed after the config's checks, or a scheduler of one's own).
    trainer = build(tmp_path, tokenizer, dataset, reward=digit_share)
    trainer.args.router_warmup_steps, trainer.args.lr_scheduler_type = 2, "reduce_lr_on_plateau"
    with pytest.raises(MoEGRPOError, match="router_warmup_steps.*ReduceLROnPlateau"):
        trainer.create_optimizer_and_scheduler(num_training_steps=4)


# ---------------------------------------------------------------------------------- all of them in a run


def test_a_run_with_every_lever_logs_and_saves_them(tmp_path, tokenizer, dataset):
    trainer = build(
        tmp_path,
        tokenizer,
        dataset,
        max_steps=2,
        rollout_routing_temperature=1.5,
        zero_spread_groups="exclude_from_normalizer",
        router_entropy_coef=0.01,
        router_warmup_steps=1,
        regenerate_zero_spread_groups=1,
        num_iterations=2,
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(math.isfinite(log["loss"]) for log in logs)
    assert all("gate/entropy" in log for log in logs)
    # Logged with each generation (here every other step: num_iterations=2 reuses it).
    assert logs[0]["routing/reward_spread_share"] == 0.5 and logs[0]["routing/regeneration_attempts"] == 1.0
    trainer._save(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / ROUTING_FILE).read_text())
    assert saved["rollout_routing_temperature"] == 1.5
    assert saved["zero_spread_groups"] == "exclude_from_normalizer"
    assert saved["router_entropy_coef"] == 0.01 and saved["router_warmup_steps"] == 1
    assert saved["regenerate_zero_spread_groups"] == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rollout_routing_temperature": 0.0}, "rollout_routing_temperature"),
        ({"rollout_routing_temperature": float("inf")}, "rollout_routing_temperature"),
        ({"rollout_routing_temperature": 2.0, "rollout_routing": "noise"}, "routing_noise_std"),
        ({"rollout_routing_temperature": 2.0, "rollout_routing": "topk"}, "rollout_routing='sample'"),
        ({"zero_spread_groups": "drop"}, "zero_spread_groups"),
        ({"regenerate_zero_spread_groups": -1}, "regenerate_zero_spread_groups"),
        ({"regenerate_zero_spread_groups": 1.5}, "regenerate_zero_spread_groups"),
        ({"router_entropy_coef": -0.1}, "router_entropy_coef"),
        ({"router_entropy_coef": 0.1, "loss_type": "cispo", "gate_loss_coef": 0.0}, "entropy bonus"),
        ({"router_warmup_steps": -2}, "router_warmup_steps"),
    ],
)
def test_invalid_lever_options_are_explained(tmp_path, overrides, message):
    with pytest.raises(MoEGRPOError, match=message):
        make_config(tmp_path, **overrides)
