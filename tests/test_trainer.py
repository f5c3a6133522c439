"""MoEGRPOTrainer end to end on tiny models: equivalence with TRL, gradients, rollouts, metrics, errors."""

import importlib.util
import math

import pytest
import torch
from conftest import config_values, digit_share, make_config, spread_reward
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from trl_moe_grpo import MoEGRPOConfig, MoEGRPOError, MoEGRPOTrainer
from trl_moe_grpo.testing import tiny_dense_model, tiny_moe_config, tiny_moe_model

MOE_KEYS = (
    "routed_experts",
    "old_gate_logps",
    "num_gate_items_in_batch",
    "expert_load",
    "num_balance_tokens_in_batch",
)


def group_rows(dataset, num_prompts: int, group: int) -> list[dict]:
    """Rows as TRL's sampler hands them to generation: each prompt repeated `group` times in a row."""
    return [dataset[i] for i in range(num_prompts) for _ in range(group)]


def with_reward_spread(batch: dict, group: int) -> dict:
    """`batch` with fixed, non-zero group-relative advantages (+1, -1, ... within each group of `group` rollouts).

    For tests of the loss math: whether a tiny random model's rollouts happen to disagree in reward depends on the
    random stream, and with no spread every advantage (and so every policy gradient) is zero.
    """
    signs = torch.tensor([1.0, -1.0]).repeat(group // 2)
    return {**batch, "advantages": signs.repeat(batch["advantages"].numel() // group).to(batch["advantages"])}


def router_weights(trainer) -> list[torch.Tensor]:
    return [adapter.router.weight for adapter in trainer.routing.adapters]


def test_topk_without_gate_loss_equals_trl_grpo(tmp_path, tokenizer, dataset):
    """rollout_routing='topk', gate_loss_coef=0, no balance loss: the same loss and gradients as trl.GRPOTrainer."""
    values = config_values(tmp_path)
    moe = MoEGRPOTrainer(
        tiny_moe_model("qwen3_moe", seed=1),
        digit_share,
        args=MoEGRPOConfig(**values, rollout_routing="topk", gate_loss_coef=0.0),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    grpo = GRPOTrainer(
        tiny_moe_model("qwen3_moe", seed=1),
        digit_share,
        args=GRPOConfig(**values),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    for trainer in (moe, grpo):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1

    with moe._routing_step():
        batch = moe._generate_and_score_completions(group_rows(dataset, 2, 4))
        moe_loss = moe._compute_loss(moe.model, batch)
        moe_loss.backward()
    grpo_loss = grpo._compute_loss(grpo.model, {k: v for k, v in batch.items() if k not in MOE_KEYS})
    grpo_loss.backward()

    assert batch["advantages"].abs().sum() > 0, "the batch must carry a learning signal for the check to bite"
    assert abs(moe_loss.item() - grpo_loss.item()) <= 1e-6
    for mine, theirs in zip(moe.model.parameters(), grpo.model.parameters()):
        assert (mine.grad is None) == (theirs.grad is None)
        if mine.grad is not None:
            torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-6, rtol=0)


def test_topk_with_a_balance_loss_equals_trl_grpo_with_its_aux_loss_on_one_moe_layer(tmp_path, tokenizer, dataset):
    """The exact R3 claim with a balance coefficient: one MoE layer (transformers pools layers, this trainer averages
    them), one micro-batch per generation, and only tokens with a recorded route (a rollout's last completion token
    has none: it is masked here in both trainers' batch)."""
    values = config_values(tmp_path, router_aux_loss_coef=0.05)
    config = tiny_moe_config("qwen3_moe", num_hidden_layers=1)
    moe = MoEGRPOTrainer(
        tiny_moe_model("qwen3_moe", seed=1, config=config),
        digit_share,
        args=MoEGRPOConfig(**values, rollout_routing="topk", gate_loss_coef=0.0),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    grpo = GRPOTrainer(
        tiny_moe_model("qwen3_moe", seed=1, config=tiny_moe_config("qwen3_moe", num_hidden_layers=1)),
        digit_share,
        args=GRPOConfig(**values),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert grpo.aux_loss_enabled and moe.balance_loss_coef == grpo.router_aux_loss_coef == 0.05
    for trainer in (moe, grpo):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1

    with moe._routing_step():
        batch = moe._generate_and_score_completions(group_rows(dataset, 2, 4))
    width = batch["prompt_ids"].size(1)
    unrecorded = (batch["routed_experts"][:, width:, 0, 0] < 0) & batch["completion_mask"].bool()
    assert unrecorded.any()
    batch["completion_mask"] = batch["completion_mask"] * ~unrecorded
    batch.update(moe._generation_batch_load(batch["routed_experts"], batch["prompt_mask"], batch["completion_mask"]))
    with moe._routing_step():
        moe_loss = moe._compute_loss(moe.model, batch)
        moe_loss.backward()
    grpo_loss = grpo._compute_loss(grpo.model, {k: v for k, v in batch.items() if k not in MOE_KEYS})
    grpo_loss.backward()

    assert moe._metrics["train"]["routing/balance_loss"][-1] == pytest.approx(grpo._metrics["train"]["aux_loss"][-1])
    assert abs(moe_loss.item() - grpo_loss.item()) <= 1e-6
    for mine, theirs in zip(moe.model.parameters(), grpo.model.parameters()):
        if mine.grad is not None:
            torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_gradient_accumulation_leaves_the_gradients_unchanged(tmp_path, tokenizer, dataset, loss_type):
    """One micro-batch of 8 rows (GA 1x8) and two of 4 (GA 2x4) give the same gradients: every term (token loss,
    Gate-GRPO, balance loss) is additive over the micro-batches of an accumulation window."""
    trainer = MoEGRPOTrainer(
        tiny_moe_model("qwen3_moe", seed=2),
        digit_share,
        args=make_config(tmp_path, router_aux_loss_coef=0.1, loss_type=loss_type),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    model = trainer.model
    model.train()
    with trainer._routing_step():
        batch = with_reward_spread(trainer._generate_and_score_completions(group_rows(dataset, 2, 4)), 4)

    def grads(accumulation: int) -> dict[str, torch.Tensor]:
        trainer.current_gradient_accumulation_steps = accumulation
        trainer.args.gradient_accumulation_steps = trainer.args.steps_per_generation = accumulation
        model.zero_grad(set_to_none=True)
        for micro_batch in split_tensor_dict(batch, accumulation):
            with trainer._routing_step():
                trainer._compute_loss(model, micro_batch).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    whole, accumulated = grads(1), grads(2)
    assert whole.keys() == accumulated.keys()
    difference = max((whole[name] - accumulated[name]).abs().max().item() for name in whole)
    assert difference <= 1e-6, f"GA 1x8 and GA 2x4 gradients differ by {difference}"


def test_truncated_rollouts_leave_the_routing_losses(tmp_path, tokenizer, dataset):
    """mask_truncated_completions: TRL zeroes a truncated row's completion mask; its prompt's routing must not be
    trained with its advantage either, nor counted in `num_gate_items_in_batch`."""
    model = tiny_moe_model("qwen3_moe", seed=8)
    with torch.no_grad():  # end a rollout where this random model would write token 24, so some rollouts finish
        model.lm_head.weight[tokenizer.eos_token_id] = 2 * model.lm_head.weight[24]
    trainer = MoEGRPOTrainer(
        model,
        digit_share,
        args=make_config(tmp_path, mask_truncated_completions=True, max_completion_length=3, num_iterations=2),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    with trainer._routing_step():
        batch = trainer._generate_and_score_completions(group_rows(dataset, 2, 4))
    truncated = ~batch["completion_mask"].bool().any(dim=1)
    assert truncated.any() and not truncated.all(), "the batch needs truncated and finished rollouts"
    recorded = batch["routed_experts"][..., 0, 0] >= 0
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1).bool()
    assert batch["num_gate_items_in_batch"] == (recorded & attention & ~truncated[:, None]).sum()

    def loss_with(advantages: torch.Tensor) -> torch.Tensor:
        with trainer._routing_step():
            return trainer._compute_loss(trainer.model, {**batch, "advantages": advantages}).detach()

    other = torch.where(truncated, 10.0 + batch["advantages"], batch["advantages"])
    torch.testing.assert_close(loss_with(other), loss_with(batch["advantages"]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gate_loss_gives_router_gradients(tmp_path, tokenizer, dataset, checkpointing):
    """The Gate-GRPO term alone sends non-zero gradients to every router, with and without checkpointing."""
    trainer = MoEGRPOTrainer(
        tiny_moe_model("qwen3_moe", seed=2),
        digit_share,
        args=make_config(tmp_path, gradient_checkpointing=checkpointing),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    model = trainer.model
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing == checkpointing
    trainer.current_gradient_accumulation_steps = 1

    def router_grads(gate_loss_coef: float) -> list[torch.Tensor]:
        trainer.args.gate_loss_coef = gate_loss_coef
        model.zero_grad()
        with trainer._routing_step():
            trainer._compute_loss(model, batch).backward()
        return [w.grad.clone() for w in router_weights(trainer)]

    with trainer._routing_step():
        batch = with_reward_spread(trainer._generate_and_score_completions(group_rows(dataset, 2, 4)), 4)
    with_gate, without_gate = router_grads(1.0), router_grads(0.0)
    for g1, g0 in zip(with_gate, without_gate):
        assert torch.isfinite(g1).all()
        assert (g1 - g0).abs().max() > 1e-6


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_training_end_to_end(tmp_path, tokenizer, dataset, family):
    """A few steps: finite losses, routers move, rollouts of one prompt take different routes, eval routes top-K."""

    class RecordingTrainer(MoEGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            if self.model.training:
                self.batches.append({k: output[k] for k in ("routed_experts", "prompt_mask", "completion_mask")})
            return output

    trainer = RecordingTrainer(
        tiny_moe_model(family, seed=3),
        spread_reward,  # every group carries a learning signal, whatever this random model writes
        args=make_config(tmp_path, max_steps=3, eval_strategy="no", per_device_eval_batch_size=8),
        train_dataset=dataset,
        eval_dataset=dataset.select(range(4)),
        processing_class=tokenizer,
    )
    trainer.batches = []
    before = [w.detach().clone() for w in router_weights(trainer)]
    trainer.train()

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    for old, new in zip(before, router_weights(trainer)):
        assert not torch.equal(old, new.detach())
    logs = trainer.state.log_history[0]
    for key in ("gate/loss", "routing/entropy", "routing/sampled_differs_from_topk", "reward_std_within_group"):
        assert key in logs
    assert logs["routing/sampled_differs_from_topk"] > 0
    assert "routing/expert_utilization/layer_01" in logs

    group = trainer.args.num_generations
    for batch in trainer.batches:
        routes = batch["routed_experts"]
        for start in range(0, routes.shape[0], group):
            rollouts = routes[start : start + group]
            assert any(not torch.equal(rollouts[0], other) for other in rollouts[1:])

    metrics = trainer.evaluate()
    assert metrics["eval_routing/sampled_differs_from_topk"] == 0.0  # evaluation routes like inference


def test_gate_only_ablation_leaves_the_token_path_untrained(tmp_path, tokenizer, dataset):
    """token_loss_coef=0: one step moves every router, but nothing only the token loss reaches (the final norm, the
    LM head, the last layer's experts); the gate loss still reaches what computes the routers' inputs."""
    trainer = MoEGRPOTrainer(
        tiny_moe_model("qwen3_moe", seed=5),
        spread_reward,  # every group carries a learning signal, whatever this random model writes
        args=make_config(tmp_path, max_steps=1, token_loss_coef=0.0, weight_decay=0.0),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert not trainer.model.config.tie_word_embeddings
    routers = {id(p) for p in trainer.routing.router_parameters()}
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p.detach())}
    router_names = {name for name, p in trainer.model.named_parameters() if id(p) in routers}
    last = trainer.model.config.num_hidden_layers - 1
    token_only = {"lm_head.weight", "model.norm.weight"} | {
        name for name in before if name.startswith(f"model.layers.{last}.mlp.experts.")
    }
    assert router_names and router_names <= changed
    assert len(token_only) == 4 and not token_only & changed


def test_router_learning_rate_gets_its_own_param_group(tmp_path, tokenizer, dataset):
    trainer = MoEGRPOTrainer(
        tiny_moe_model("qwen3_moe", seed=5),
        digit_share,
        args=make_config(tmp_path, learning_rate=1e-5, router_learning_rate=3e-3, lr_scheduler_type="constant"),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    routers = {id(p) for p in trainer.routing.router_parameters()}
    by_lr: dict[float, set[int]] = {}
    for group in trainer.optimizer.param_groups:
        by_lr.setdefault(group["lr"], set()).update(id(p) for p in group["params"])
    assert by_lr.pop(3e-3) == routers
    assert set(by_lr) == {1e-5} and not by_lr[1e-5] & routers
    assert len(by_lr[1e-5]) + len(routers) == sum(1 for p in trainer.model.parameters() if p.requires_grad)


def test_reused_generations_score_old_gate_logps(tmp_path, tokenizer, dataset):
    """With num_iterations > 1 the old gate log-probs come from a replayed no-grad forward right after generation."""
    trainer = MoEGRPOTrainer(
        tiny_moe_model("qwen3_moe", seed=4),
        digit_share,
        args=make_config(tmp_path, num_iterations=2),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    with trainer._routing_step():
        batch = trainer._generate_and_score_completions(group_rows(dataset, 2, 4))
        assert "old_gate_logps" in batch and "old_per_token_logps" in batch
        trainer._compute_loss(trainer.model, batch)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        live = trainer._gate_log_probs(trainer.routing.captures(), input_ids)
    mask = batch["routed_experts"][..., 0, 0] >= 0
    assert (live - batch["old_gate_logps"]).abs()[mask].max() <= 1e-5
    assert trainer._metrics["train"]["gate/clip_ratio"][-1] == 0.0


def test_greedy_decoding_follows_routing(tmp_path, tokenizer, dataset):
    """Sampled routing decodes tokens greedily (rollouts differ only through routing); top-K routing samples them."""
    sampled = MoEGRPOTrainer(
        tiny_moe_model(), digit_share, args=make_config(tmp_path), train_dataset=dataset, processing_class=tokenizer
    )
    assert sampled.generation_config.do_sample is False
    topk = MoEGRPOTrainer(
        tiny_moe_model(),
        digit_share,
        args=make_config(tmp_path, rollout_routing="topk"),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert topk.generation_config.do_sample is True


def test_dense_model_is_rejected(tmp_path, tokenizer, dataset):
    with pytest.raises(MoEGRPOError, match="no Mixture-of-Experts router"):
        MoEGRPOTrainer(
            tiny_dense_model("qwen3"),
            digit_share,
            args=make_config(tmp_path),
            train_dataset=dataset,
            processing_class=tokenizer,
        )


def test_plain_grpo_config_is_rejected(tmp_path, tokenizer, dataset):
    with pytest.raises(MoEGRPOError, match="MoEGRPOConfig"):
        MoEGRPOTrainer(tiny_moe_model(), digit_share, args=GRPOConfig(**config_values(tmp_path)))


def test_tools_are_rejected(tmp_path, tokenizer, dataset):
    def tool(x: str) -> str:
        """A tool."""
        return x

    with pytest.raises(MoEGRPOError, match="tools"):
        MoEGRPOTrainer(tiny_moe_model(), digit_share, args=make_config(tmp_path), tools=[tool])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rollout_routing": "greedy"}, "rollout_routing"),
        ({"gate_loss_positions": "prompt"}, "gate_loss_positions"),
        ({"gate_set_logprob": "bag"}, "gate_set_logprob"),
        ({"routing_noise_std": 0.0}, "routing_noise_std"),
        ({"gate_loss_coef": -1.0}, "gate_loss_coef"),
        ({"token_loss_coef": -1.0}, "token_loss_coef"),
        ({"token_loss_coef": 0.0, "gate_loss_coef": 0.0}, "nothing would be trained"),
        ({"router_learning_rate": -1.0}, "router_learning_rate"),
        ({"loss_type": "cispo"}, "loss_type"),
        ({"importance_sampling_level": "sequence"}, "importance_sampling_level"),
        ({"use_liger_kernel": True}, "use_liger_kernel"),
        ({"use_transformers_continuous_batching": True}, "use_transformers_continuous_batching"),
        ({"gradient_checkpointing_kwargs": {"use_reentrant": True}}, "use_reentrant"),
    ],
)
def test_invalid_options_are_explained(tmp_path, overrides, message):
    with pytest.raises(MoEGRPOError, match=message):
        make_config(tmp_path, **overrides)


def test_reentrant_checkpointing_set_after_the_config_is_refused(tmp_path, tokenizer, dataset):
    """TRL 1.16 forces `use_reentrant=True` for PEFT models under ZeRO-3 after `MoEGRPOConfig` checked it: the
    trainer checks the resolved value (here set the same way, after the config, without DeepSpeed)."""
    args = make_config(tmp_path, gradient_checkpointing=True)
    args.gradient_checkpointing_kwargs = {"use_reentrant": True}
    with pytest.raises(MoEGRPOError, match="use_reentrant=True.*ZeRO-3.*no gradient"):
        MoEGRPOTrainer(tiny_moe_model(), digit_share, args=args, train_dataset=dataset, processing_class=tokenizer)


def test_model_card_cites_moe_grpo():
    assert MoEGRPOTrainer._paper["title"].startswith("MoE-GRPO: Optimizing Mixture-of-Experts")
    assert "MoE-GRPO" in MoEGRPOTrainer._paper["citation"] and "2026" in MoEGRPOTrainer._paper["citation"]
    assert "id" not in MoEGRPOTrainer._paper  # no arXiv id is known: the card cites the paper without a link


def test_vllm_server_mode_is_explained(tmp_path):
    with pytest.raises(MoEGRPOError, match="vllm_mode='server'.*not supported.*vllm_mode='colocate'"):
        make_config(tmp_path, use_vllm=True, vllm_mode="server")


def test_vllm_without_vllm_installed_is_explained(tmp_path, tokenizer, dataset):
    """The main environment has no vLLM (the vLLM suite, tests_vllm/, runs in its own environment)."""
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    args = make_config(tmp_path, use_vllm=True)
    with pytest.raises(MoEGRPOError, match="vLLM is not installed.*vllm_env.sh.*use_vllm=False"):
        MoEGRPOTrainer(tiny_moe_model(), digit_share, args=args, train_dataset=dataset, processing_class=tokenizer)
