"""`ReplayState`, the rollout trace's hand-off: its lifetime alone, then as `MoEGRPOTrainer` drives it; and
`ActiveRouting`, which routing is active now."""

import pytest
import torch
from conftest import digit_share, make_config

from trl_moe_grpo import MoEGRPOError, MoEGRPOTrainer
from trl_moe_grpo.routing import LayerCapture
from trl_moe_grpo.testing import tiny_moe_model
from trl_moe_grpo.trainer.replay_state import ActiveRouting, ReplayState


def capture() -> LayerCapture:
    ids = torch.zeros(3, 2, dtype=torch.long)
    return LayerCapture(torch.zeros(3, 4), ids, ids, ids, torch.ones(3, dtype=torch.bool))


def test_generation_phase_hands_the_trace_and_old_gate_logps_on_once():
    state = ReplayState()
    trace, old = torch.zeros(2, 5, 3, 2, dtype=torch.int16), torch.zeros(2, 5, 3)
    state.begin_generation()
    assert state.scoring_rollouts
    with pytest.raises(MoEGRPOError, match="without a routing trace"):
        state.trace_to_replay()  # before the rollouts made one
    state.set_trace(trace)
    assert state.trace_to_replay() is trace
    state.keep_old_gate_logps(old)
    assert state.end_generation() is trace
    assert not state.scoring_rollouts
    assert state.take_old_gate_logps() is old
    assert state.take_old_gate_logps() is None  # taken once
    with pytest.raises(MoEGRPOError, match="without a routing trace"):
        state.trace_to_replay()  # the trace left with the batch


def test_a_new_generation_forgets_the_last_ones_results():
    state = ReplayState()
    state.begin_generation()
    state.set_trace(torch.zeros(1, 1, 1, 1))
    state.keep_old_gate_logps(torch.zeros(1))
    state.begin_generation()  # the previous batch's (say, after an error) must not be handed to this one
    assert state.end_generation() is None and state.take_old_gate_logps() is None


def test_loss_phase_and_end_of_step():
    state = ReplayState()
    routes = torch.zeros(2, 5, 3, 2, dtype=torch.int16)
    state.keep_policy_captures([capture()])  # stale: from some earlier forward
    state.begin_loss(routes)
    assert state.trace_to_replay() is routes and not state.scoring_rollouts
    with pytest.raises(MoEGRPOError, match="no policy forward"):
        state.take_policy_captures()  # the stale captures were dropped by `begin_loss`
    captures = [capture()]
    state.keep_policy_captures(captures)
    assert state.take_policy_captures() is captures
    with pytest.raises(MoEGRPOError, match="no policy forward"):
        state.take_policy_captures()  # taken once
    state.begin_generation()
    state.set_trace(routes)
    state.keep_old_gate_logps(torch.zeros(1))
    state.keep_policy_captures(captures)
    state.end_step()
    assert state.trace is None and not state.scoring_rollouts
    assert state.take_old_gate_logps() is None
    with pytest.raises(MoEGRPOError):
        state.take_policy_captures()


def test_trainer_follows_a_trace_from_generation_to_the_loss(tmp_path, tokenizer, dataset):
    """num_iterations=2: the old-log-prob pass replays the rollouts' trace while scoring, the loss's forward replays
    the batch's `routed_experts` outside scoring, and nothing is left once the step is over."""

    class Spy(MoEGRPOTrainer):
        def _get_per_token_logps_and_entropies(self, model, input_ids, *args, **kwargs):
            trace = self._replay.trace
            self.forwards.append((self._replay.scoring_rollouts, None if trace is None else trace.clone()))
            return super()._get_per_token_logps_and_entropies(model, input_ids, *args, **kwargs)

    trainer = Spy(
        tiny_moe_model("qwen3_moe", seed=4),
        digit_share,
        args=make_config(tmp_path, num_iterations=2),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.forwards = []
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    rows = [dataset[i] for i in range(2) for _ in range(4)]
    with trainer._routing_step():
        batch = trainer._generate_and_score_completions(rows)
    assert [scoring for scoring, _ in trainer.forwards] == [True]  # TRL's old-log-prob pass
    assert torch.equal(trainer.forwards[0][1], batch["routed_experts"])
    assert trainer._replay.trace is None and not trainer._replay.scoring_rollouts

    with trainer._routing_step():
        trainer._compute_loss(trainer.model, batch)
    assert [scoring for scoring, _ in trainer.forwards] == [True, False]  # the training forward
    assert torch.equal(trainer.forwards[1][1], batch["routed_experts"])
    assert trainer._replay.trace is None

    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with pytest.raises(MoEGRPOError, match="without a routing trace"):  # a stale trace is never replayed
        trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, batch["completion_ids"].shape[1]
        )


@pytest.mark.parametrize("rollout_routing", ["sample", "noise", "topk"])
@pytest.mark.parametrize("greedy_eval", [True, False])
@pytest.mark.parametrize("routing_replay", [True, False])
def test_active_routing_rule(tmp_path, rollout_routing, greedy_eval, routing_replay):
    """Training rollouts route with `rollout_routing`, evaluation ones with top-K; evaluation decodes greedily under
    `greedy_eval`, training under `greedy_decoding` (by default: whenever the routing is not top-K)."""
    args = make_config(
        tmp_path, rollout_routing=rollout_routing, greedy_eval=greedy_eval, routing_replay=routing_replay
    )
    training, evaluation = ActiveRouting.now(args, training=True), ActiveRouting.now(args, training=False)
    assert (training.rollout, evaluation.rollout) == (rollout_routing, "topk")
    assert training.draws_routes == (rollout_routing != "topk") and not evaluation.draws_routes
    assert training.greedy == (rollout_routing != "topk")
    assert evaluation.greedy == (greedy_eval or rollout_routing != "topk")
    assert training.dispatch_recorded == evaluation.dispatch_recorded == routing_replay
    assert training.noise_std == evaluation.noise_std == args.routing_noise_std


@pytest.mark.parametrize("rollout_routing", ["sample", "topk"])
@pytest.mark.parametrize("training", [True, False])
def test_rollouts_route_and_decode_as_the_active_routing_says(tmp_path, tokenizer, dataset, rollout_routing, training):
    """`rollout_routing="sample"` decodes greedily in training, `"topk"` samples tokens; evaluation (`greedy_eval`)
    decodes greedily and routes with top-K for both."""
    trainer = MoEGRPOTrainer(
        tiny_moe_model("qwen3_moe", seed=4),
        digit_share,
        args=make_config(tmp_path, rollout_routing=rollout_routing),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    model = trainer.model
    model.train(training)
    seen = []
    generate = model.generate

    def generate_and_see(*args, generation_config, **kwargs):
        seen.append((trainer.routing.mode, generation_config.do_sample))
        return generate(*args, generation_config=generation_config, **kwargs)

    model.generate = generate_and_see
    with trainer._routing_step():
        trainer._generate_and_score_completions([dataset[i] for i in range(2) for _ in range(4)])
    active = trainer._active_routing()
    assert seen == [(active.rollout, not active.greedy)]
    assert active.rollout == (rollout_routing if training else "topk")
    assert active.greedy == (rollout_routing == "sample" or not training)
    assert trainer.routing.mode == "topk"  # the rollout context is closed
