"""Vision-language MoE models: a tiny InternVL with a Qwen3-MoE language model, end to end with guidance."""

import json
import logging
import math

import pytest
import torch
from conftest import colour_rows, digit_share, first_letter_reward, make_config
from datasets import Dataset

from trl_moe_grpo import MoEGRPOError, MoEGRPOTrainer, RoutingController
from trl_moe_grpo.cli import main as cli
from trl_moe_grpo.guidance import ModalityStatistics
from trl_moe_grpo.routing import pad_routes, split_rollout_routes
from trl_moe_grpo.testing import build_tiny_internvl_processor, tiny_moe_internvl, tiny_moe_model


@pytest.fixture(scope="module")
def processor():
    return build_tiny_internvl_processor()


@pytest.fixture(scope="module")
def rows():
    return colour_rows(12)


def vlm_trainer(tmp_path, processor, rows, **overrides):
    values = dict(max_steps=2, router_aux_loss_coef=0.01, modality_calibration_samples=6)
    values.update(overrides)
    return MoEGRPOTrainer(
        tiny_moe_internvl(seed=0),
        first_letter_reward,
        args=make_config(tmp_path, **values),
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
    )


def test_internvl_trains_with_images_and_a_balance_loss(tmp_path, processor, rows):
    """Finite losses with a non-zero balance coefficient (TRL 1.16 crashes there), routes on the image tokens."""

    class RecordingTrainer(MoEGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            self.batches.append(output)
            return output

    trainer = RecordingTrainer(
        tiny_moe_internvl(seed=0),
        first_letter_reward,
        args=make_config(tmp_path, max_steps=2, router_aux_loss_coef=0.01, modality_calibration_samples=6),
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
    )
    trainer.batches = []
    trainer.train()

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert "routing/balance_loss" in trainer.state.log_history[0]
    image_token = processor.image_token_id
    for batch in trainer.batches:
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        on_images = batch["routed_experts"][input_ids == image_token]  # [image tokens, layers, top_k]
        assert on_images.shape[0] == batch["prompt_ids"].shape[0]  # one image token per prompt
        assert (on_images >= 0).all()
    assert trainer.modality_statistics.present.all()
    assert (tmp_path / "modality_statistics.json").exists()
    masks = trainer.routing.expert_masks
    assert (~masks).sum(-1).eq(2).all()  # P=0.25 of 8 experts, per layer and modality


def test_internvl_replay_reproduces_generation_log_probs(processor, rows):
    """Sampled routing over image and text tokens, replayed: completion log-probs match generation's (<= 1e-5)."""
    model = tiny_moe_internvl(seed=1)
    controller = RoutingController(model, vision_token_ids=[processor.image_token_id])
    messages = [
        [{"role": "user", "content": [{"type": "image", "image": r["image"]}, *r["prompt"][0]["content"][1:]]}]
        for r in rows[:3]
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    )
    with torch.no_grad(), controller.rollout("sample") as recording:
        out = model.generate(
            **inputs, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    prompt_width = inputs["input_ids"].shape[1]
    completions = out.sequences[:, prompt_width:]
    generated = torch.stack(out.logits, 1).log_softmax(-1).gather(-1, completions[..., None])[..., 0]
    prompt_lengths = inputs["attention_mask"].sum(1).tolist()
    routes = pad_routes(*split_rollout_routes(recording, prompt_lengths, [completions.shape[1]] * 3))
    input_ids = torch.cat([inputs["input_ids"], completions], 1)
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(completions)], 1)

    def completion_log_probs(replay: bool) -> torch.Tensor:
        with torch.no_grad(), controller.step_scope():
            if replay:
                controller.start_replay(routes)
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, pixel_values=inputs["pixel_values"]
            ).logits
        return logits[:, prompt_width - 1 : -1].log_softmax(-1).gather(-1, completions[..., None])[..., 0]

    assert (routes[input_ids == processor.image_token_id] >= 0).all()
    assert (completion_log_probs(replay=True) - generated).abs().max() <= 1e-5
    assert (completion_log_probs(replay=False) - generated).abs().max() > 1e-4


def test_calibrate_file_trainer_round_trip(tmp_path, processor, rows):
    """`trl-moe-grpo calibrate` writes the file, `show-modality-stats` plots it, the trainer trains with its masks."""
    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    tiny_moe_internvl(seed=0).save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    Dataset.from_list(rows).save_to_disk(data_dir)
    stats_path = tmp_path / "stats.json"
    assert (
        cli(
            [
                "calibrate",
                str(model_dir),
                "--dataset",
                str(data_dir),
                "--num-samples",
                "6",
                "--output",
                str(stats_path),
            ]
        )
        == 0
    )
    data = json.loads(stats_path.read_text())
    assert data["model"]["architecture"] == "InternVLForConditionalGeneration" and data["num_samples"] == 6
    assert data["tokens"]["vision"] == 6  # one image token per prompt
    assert cli(["show-modality-stats", str(stats_path), "--plot", str(tmp_path / "heatmap.png")]) == 0
    assert (tmp_path / "heatmap.png").stat().st_size > 1000

    trainer = vlm_trainer(tmp_path / "run", processor, rows, modality_stats_path=str(stats_path), max_steps=1)
    trainer.train()
    expected = ModalityStatistics.load(stats_path).masks(0.25)
    assert torch.equal(trainer.routing.expert_masks, expected)


def test_statistics_of_another_model_are_refused_by_the_trainer(tmp_path, processor, rows):
    text_model = tiny_moe_model("qwen3_moe")
    stats = ModalityStatistics(
        counts=torch.ones(2, 2, 8, dtype=torch.long),
        model={
            "architecture": type(text_model).__name__,
            "num_layers": 2,
            "num_experts": 8,
            "top_k": 2,
            "router_layers": ["a", "b"],
        },
    )
    stats.save(tmp_path / "text.json", 0.25)
    trainer = vlm_trainer(tmp_path / "run", processor, rows, modality_stats_path=str(tmp_path / "text.json"))
    with pytest.raises(MoEGRPOError, match="made for another model"):
        trainer.train()


def test_resume_keeps_the_checkpoint_masks(tmp_path, processor, rows, caplog):
    """A checkpoint carries the statistics and routing options; resuming uses its masks over any other source."""
    run = tmp_path / "run"
    first = vlm_trainer(run, processor, rows, max_steps=1, save_strategy="steps", save_steps=1)
    first.train()
    checkpoint = run / "checkpoint-1"
    assert (checkpoint / "modality_statistics.json").exists()
    assert json.loads((checkpoint / "moe_grpo_routing.json").read_text())["rollout_routing"] == "sample"

    other = ModalityStatistics.load(checkpoint / "modality_statistics.json")
    other.counts = other.counts.flip(-1)  # different statistics, different masks
    other.save(tmp_path / "other.json", 0.25)
    resumed = vlm_trainer(
        run, processor, rows, max_steps=2, modality_stats_path=str(tmp_path / "other.json"), gate_loss_coef=0.5
    )
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=True)
    assert torch.equal(resumed.routing.expert_masks, first.routing.expert_masks)
    assert not torch.equal(resumed.routing.expert_masks, other.masks(0.25))
    assert "gate_loss_coef: 1.0 -> 0.5" in caplog.text


def test_text_only_model_turns_guidance_off_and_says_so(tmp_path, tokenizer, dataset, caplog):
    trainer = MoEGRPOTrainer(
        tiny_moe_model("qwen3_moe"),
        digit_share,
        args=make_config(tmp_path, max_steps=1),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    with caplog.at_level(logging.WARNING):
        trainer._setup_modality_guidance(None)
    assert trainer.routing.expert_masks is None and trainer.modality_statistics is None
    assert caplog.text.count("guidance is off") == 1
