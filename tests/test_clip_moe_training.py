"""CLIP-MoE classification: reward and advantages, MoE-GRPO and Det-FT training runs, evaluation, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from trl_moe_grpo import MoEGRPOError
from trl_moe_grpo.cli import main
from trl_moe_grpo.clip_moe.classify import class_embeddings, image_logits
from trl_moe_grpo.clip_moe.config import CLIPDetFTConfig, CLIPMoEGRPOConfig
from trl_moe_grpo.clip_moe.evaluation import zero_shot_accuracy
from trl_moe_grpo.clip_moe.images import classification_dataset
from trl_moe_grpo.clip_moe.rewards import classification_rewards, group_advantages
from trl_moe_grpo.clip_moe.trainer import CLIPDetFTTrainer, CLIPMoEGRPOTrainer
from trl_moe_grpo.testing.clip import tiny_clip_moe
from trl_moe_grpo.upcycle import ExpertInit

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shapes():
    return classification_dataset("shapes", per_class=1, seed=0)  # 8 images, one per class


def fresh_moe(noise_std: float = 0.5):
    return tiny_clip_moe(seed=0, num_experts=4, top_k=2, init=ExpertInit("noise", noise_std=noise_std))


def config(cls, tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    return cls(**{**values, **overrides})


def test_reward_is_one_for_a_correct_prediction():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0]])
    assert classification_rewards(logits, torch.tensor([0, 2, 2])).tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(MoEGRPOError, match="3 predictions for 2 labels"):
        classification_rewards(logits, torch.tensor([0, 1]))


def test_group_relative_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    group = group_advantages(rewards, "group")
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    torch.testing.assert_close(group[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert group[1].abs().max() == 0  # no signal in a group where every rollout agrees
    torch.testing.assert_close(group_advantages(rewards, "none")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    torch.testing.assert_close(
        group_advantages(rewards, "batch")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (rewards.std() + 1e-4)
    )
    with pytest.raises(MoEGRPOError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_moe_grpo_two_steps_train_the_vision_tower_not_the_text_tower(shapes, tmp_path):
    model, tokenizer, image_processor = fresh_moe()
    args = config(CLIPMoEGRPOConfig, tmp_path, num_generations=4, router_learning_rate=1e-2)
    trainer = CLIPMoEGRPOTrainer(
        model, args, train_dataset=shapes, eval_dataset={"shapes": shapes}, tokenizer=tokenizer,
        image_processor=image_processor,
    )  # fmt: skip
    routers = [p.detach().clone() for p in trainer.routing.router_parameters()]
    text = model.text_model.embeddings.token_embedding.weight.detach().clone()
    trainer.train()
    assert all((a - b).abs().max() > 0 for a, b in zip(trainer.routing.router_parameters(), routers, strict=True))
    assert torch.equal(model.text_model.embeddings.token_embedding.weight, text)
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert 0.0 <= entry["reward"] <= 1.0 and entry["replay_matches_rollout"] == 1.0
        assert entry["routing/sampled_differs_from_topk"] > 0
    metrics = trainer.evaluate()
    assert set(metrics) == {"eval_shapes_accuracy"} and 0.0 <= metrics["eval_shapes_accuracy"] <= 1.0
    trainer.save_model(str(tmp_path / "saved"))
    assert {"tokenizer.json", "preprocessor_config.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "saved").iterdir()
    }


def gate_gradient(trainer, labels: torch.Tensor, pixels: torch.Tensor) -> float:
    trainer.model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = trainer.compute_loss(trainer.model, {"pixel_values": pixels, "labels": labels})
    loss.backward()
    return sum(float(p.grad.abs().sum()) for p in trainer.routing.router_parameters() if p.grad is not None)


def test_gate_grpo_learns_only_from_groups_whose_rewards_differ(tmp_path):
    """With the load-balancing loss off, the routers get a gradient exactly when some image's rollouts disagree."""
    model, tokenizer, image_processor = fresh_moe(noise_std=3.0)
    rows = classification_dataset("shapes", per_class=2, seed=3)
    args = config(CLIPMoEGRPOConfig, tmp_path, num_generations=16, router_aux_loss_coef=0.0)
    trainer = CLIPMoEGRPOTrainer(model, args, rows, tokenizer=tokenizer, image_processor=image_processor)
    pixels = trainer._collate([rows[i] for i in range(len(rows))])["pixel_values"]
    # The rollouts' predictions, as the trainer will draw them (same seed): find the class some rollouts predict.
    torch.manual_seed(0)
    with torch.no_grad(), trainer.routing.rollout("sample"):
        predictions = image_logits(model, pixels.repeat_interleave(16, 0), trainer.class_text).argmax(-1).view(-1, 16)
    split = [i for i in range(len(rows)) if predictions[i].unique().numel() > 1]
    assert split, "noise_std=3.0 makes some image's sampled routings disagree"
    labels = predictions[:, 0].clone()
    assert gate_gradient(trainer, labels, pixels) > 0
    # A label no rollout predicts gives every rollout reward 0: no advantage, no gate gradient.
    unseen = torch.tensor([next(c for c in range(8) if c not in predictions[i]) for i in range(len(rows))])
    assert gate_gradient(trainer, unseen, pixels) == 0


def test_det_ft_two_steps(shapes, tmp_path):
    model, tokenizer, image_processor = fresh_moe()
    trainer = CLIPDetFTTrainer(
        model, config(CLIPDetFTConfig, tmp_path), shapes, tokenizer=tokenizer, image_processor=image_processor
    )
    vision = model.vision_model.encoder.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer.train()
    assert (model.vision_model.encoder.layers[0].self_attn.q_proj.weight - vision).abs().max() > 0
    logged = [entry for entry in trainer.state.log_history if "cross_entropy" in entry]
    assert len(logged) == 2 and all(entry["routing/balance_loss"] > 0 for entry in logged)


def test_routers_only(shapes, tmp_path):
    model, tokenizer, image_processor = fresh_moe()
    args = config(CLIPDetFTConfig, tmp_path, train_parameters="routers")
    trainer = CLIPDetFTTrainer(model, args, shapes, tokenizer=tokenizer, image_processor=image_processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"vision_model.encoder.layers.{i}.mlp.gate.weight" for i in range(2)}


def test_zero_shot_accuracy_matches_a_hand_computed_classifier(shapes):
    model, tokenizer, image_processor = fresh_moe()
    accuracy = zero_shot_accuracy(model, tokenizer, image_processor, shapes)
    text = class_embeddings(model, tokenizer, shapes.features["label"].names)
    pixels = image_processor(images=list(shapes["image"]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        predictions = image_logits(model, pixels, text).argmax(-1)
    assert accuracy == (predictions == torch.tensor(shapes["label"])).float().mean().item()


def test_bad_input_is_a_clear_error(shapes, tmp_path):
    model, tokenizer, image_processor = fresh_moe()
    unlabeled = Dataset.from_dict({"image": list(shapes["image"]), "target": list(shapes["label"])})
    with pytest.raises(MoEGRPOError, match="no `label` column"):
        CLIPMoEGRPOTrainer(model, config(CLIPMoEGRPOConfig, tmp_path), unlabeled, tokenizer=tokenizer,
                           image_processor=image_processor)  # fmt: skip
    with pytest.raises(MoEGRPOError, match="3 class names were given, but the dataset's `label` column has 8"):
        zero_shot_accuracy(model, tokenizer, image_processor, shapes, class_names=["a", "b", "c"])
    plain = Dataset.from_dict({"image": list(shapes["image"]), "label": list(shapes["label"])})
    with pytest.raises(MoEGRPOError, match="pass `class_names=`"):
        zero_shot_accuracy(model, tokenizer, image_processor, plain)
    with pytest.raises(MoEGRPOError, match="Labels run from 0 to 7, but there are 4 class names"):
        zero_shot_accuracy(model, tokenizer, image_processor, plain, class_names=["a", "b", "c", "d"])
    with pytest.raises(MoEGRPOError, match="at least 2 rollouts"):
        config(CLIPMoEGRPOConfig, tmp_path, num_generations=1)
    with pytest.raises(MoEGRPOError, match="has no `{}`"):
        config(CLIPDetFTConfig, tmp_path, class_template="a photo")
    with pytest.raises(MoEGRPOError, match="needs a `CLIPDetFTConfig`"):
        CLIPDetFTTrainer(model, config(CLIPMoEGRPOConfig, tmp_path), shapes, tokenizer=tokenizer,
                         image_processor=image_processor)  # fmt: skip
    dense_like = model.text_model  # no CLIP-MoE vision encoder
    with pytest.raises(MoEGRPOError):
        CLIPDetFTTrainer(dense_like, config(CLIPDetFTConfig, tmp_path), shapes, tokenizer=tokenizer,
                         image_processor=image_processor)  # fmt: skip


def test_evaluate_clip_command(shapes, tmp_path, capsys):
    model, tokenizer, image_processor = fresh_moe()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    shapes.save_to_disk(str(tmp_path / "shapes"))
    digits = classification_dataset("digits", per_class=1, seed=0)
    digits.save_to_disk(str(tmp_path / "digits"))
    out = tmp_path / "acc.json"
    argv = ["evaluate-clip", str(folder), "--dataset", f"shapes={tmp_path / 'shapes'}", "--dataset",
            str(tmp_path / "digits"), "--split", "train", "--output-json", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| method | shapes | digits | average |" in printed
    accuracy = json.loads(out.read_text())[str(folder)]
    assert accuracy["shapes"] == zero_shot_accuracy(model, tokenizer, image_processor, shapes)
    assert f"| {100 * (accuracy['shapes'] + accuracy['digits']) / 2:.1f} |" in printed
    # --source: shown first, left out of the average.
    assert main([*argv[:-2], "--source", "shapes"]) == 0
    assert f"| {100 * accuracy['digits']:.1f} | {100 * accuracy['digits']:.1f} |" in capsys.readouterr().out
    Dataset.from_dict({"image": list(shapes["image"])}).save_to_disk(str(tmp_path / "bad"))
    argv = ["evaluate-clip", str(folder), "--dataset", str(tmp_path / "bad"), "--split", "train"]
    assert main(argv) == 2
    assert "no `label` column" in capsys.readouterr().err


@pytest.mark.slow
def test_clip_tables_smoke_runs_every_arm(tmp_path):
    """`benchmarks/clip_tables.py --smoke` (on the bundled tiny CLIP): every arm is trained and evaluated."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    output = tmp_path / "result.json"
    command = [sys.executable, "benchmarks/clip_tables.py", "--smoke", "--json", str(output)]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "### Table 2 (cross-dataset)" in result.stdout and "### Table 3 (domain generalization)" in result.stdout
    report = json.loads(output.read_text())
    arms = ["CLIP (dense, reference)", "CLIP-MoE", "+ Det-FT", "+ MoE-GRPO", "+ Det-FT, routers only",
            "+ MoE-GRPO, whole vision tower", "+ MoE-GRPO, 10x epochs", "CLIP-MoE (DMU)", "+ Det-FT (DMU)",
            "+ MoE-GRPO (DMU)"]  # fmt: skip
    assert list(report["accuracy"]) == arms
    for arm in arms:
        (accuracy,) = report["accuracy"][arm]
        assert set(accuracy) == {"shapes", "digits", "patterns", "arrows", "colors", "shapes-sketch",
                                 "shapes-inverted", "shapes-noisy", "shapes-rotated"}  # fmt: skip
        assert all(0.0 <= value <= 1.0 for value in accuracy.values())


ROUTING_SETTINGS = (
    "train_routing", "routing_noise_std", "noisy_mixing_weights", "expert_capacity_factor", "sinkhorn_iterations"
)  # fmt: skip


def test_det_ft_routing_settings_are_those_of_moe_sft_and_reach_the_controller(shapes, tmp_path):
    """Noise std and mixing, capacity factor and Sinkhorn iterations: MoESFTConfig's names, defaults and checks, and
    the training forward routes with them (evaluation with plain top-K)."""
    import dataclasses

    from trl_moe_grpo import MoESFTConfig

    defaults = {cls: {f.name: f.default for f in dataclasses.fields(cls)} for cls in (CLIPDetFTConfig, MoESFTConfig)}
    assert all(defaults[CLIPDetFTConfig][name] == defaults[MoESFTConfig][name] for name in ROUTING_SETTINGS)
    for name, bad in (("routing_noise_std", 0.0), ("expert_capacity_factor", 0.0), ("sinkhorn_iterations", 0)):
        with pytest.raises(MoEGRPOError, match=name):
            config(CLIPDetFTConfig, tmp_path, **{name: bad})

    model, tokenizer, image_processor = fresh_moe()
    settings = dict(routing_noise_std=0.25, expert_capacity_factor=2.0, sinkhorn_iterations=5)
    args = config(CLIPDetFTConfig, tmp_path, train_routing="noise", **settings)
    trainer = CLIPDetFTTrainer(model, args, shapes, tokenizer=tokenizer, image_processor=image_processor)
    opened = []
    real = trainer.routing.training_routing

    def recording(*pargs, **kwargs):  # the real context, with its arguments kept
        opened.append(kwargs)
        return real(*pargs, **kwargs)

    trainer.routing.training_routing = recording
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    trainer.compute_loss(model, batch)
    model.eval()
    with torch.no_grad():
        trainer.compute_loss(model, batch)
    expected = dict(noise_std=0.25, noisy_mixing_weights=True, capacity_factor=2.0, sinkhorn_iterations=5)
    assert opened == [{"mode": "noise", **expected}, {"mode": "topk", **expected}]
