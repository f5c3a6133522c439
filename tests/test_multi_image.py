"""Prompts with several images and short videos given as frames (the `motion` and `find` tasks of `visual_mc`).

Both go through TRL's `images` column: every image part of the prompt gets its own block of image tokens, and every one
of those tokens must carry a route, replay exactly and be trained like any other token. Checked with InternVL (whose
chat feeds a video as one image part per frame) and Qwen3-VL-MoE (M-RoPE positions over several images).
"""

import math

import pytest
import torch
from conftest import make_config
from datasets import Dataset
from trl.data_utils import prepare_multimodal_messages

from trl_moe_grpo import MoEGRPOTrainer, RoutingController
from trl_moe_grpo.demo.visual_mc import NUM_FIND_IMAGES, NUM_FRAMES, accuracy_reward, visual_mc_rows
from trl_moe_grpo.routing import pad_routes, split_rollout_routes
from trl_moe_grpo.routing.introspection import vision_token_ids
from trl_moe_grpo.testing import (
    build_tiny_internvl_processor,
    build_tiny_qwen3_vl_processor,
    tiny_moe_internvl,
    tiny_moe_qwen3_vl,
)

MODELS = {
    "internvl": (tiny_moe_internvl, build_tiny_internvl_processor),
    "qwen3_vl_moe": (tiny_moe_qwen3_vl, build_tiny_qwen3_vl_processor),
}


def multi_image_rows(n: int, seed: int = 0) -> list[dict]:
    rows = visual_mc_rows(n, seed=seed, tasks=("motion", "find"))
    assert {len(row["images"]) for row in rows} == {NUM_FRAMES, NUM_FIND_IMAGES} == {4}
    return rows


def image_token_id(processor) -> int:
    return processor.image_token_id


def tokens_per_image(processor) -> int:
    """How many image tokens one image of the tasks becomes, measured on a one-image prompt."""
    row = visual_mc_rows(1, seed=0, tasks=("colour",))[0]
    messages = [prepare_multimodal_messages(row["prompt"], images=row["images"])]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return int((inputs["input_ids"] == image_token_id(processor)).sum())


@pytest.mark.parametrize("family", list(MODELS))
def test_replay_reproduces_multi_image_generation(family):
    """Sampled routing over four images' tokens and the text, replayed in one forward: log-probs within 1e-5."""
    build_model, build_processor = MODELS[family]
    model, processor = build_model(seed=1), build_processor()
    processor.tokenizer.padding_side = "left"
    controller = RoutingController(model, vision_token_ids=vision_token_ids(model))
    rows = multi_image_rows(3)
    messages = [prepare_multimodal_messages(row["prompt"], images=row["images"]) for row in rows]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    )
    torch.manual_seed(0)
    with torch.no_grad(), controller.rollout("sample") as recording:
        out = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    prompt_width = inputs["input_ids"].shape[1]
    completions = out.sequences[:, prompt_width:]
    generated = torch.stack(out.logits, 1).log_softmax(-1).gather(-1, completions[..., None])[..., 0]
    lengths = [completions.shape[1]] * len(rows)
    routes = pad_routes(*split_rollout_routes(recording, inputs["attention_mask"].sum(1).tolist(), lengths))
    input_ids = torch.cat([inputs["input_ids"], completions], 1)
    on_images = routes[input_ids == image_token_id(processor)]
    assert on_images.shape[0] == len(rows) * 4 * tokens_per_image(processor) and (on_images >= 0).all()

    forward = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in inputs:
        forward["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completions)], 1)

    def max_error(replay: bool) -> float:
        with torch.no_grad(), controller.step_scope():
            if replay:
                controller.start_replay(routes)
            logits = model(
                input_ids=input_ids,
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(completions)], 1),
                **forward,
            ).logits
        log_probs = logits[:, prompt_width - 1 : -1].log_softmax(-1).gather(-1, completions[..., None])[..., 0]
        return (log_probs - generated).abs().max().item()

    assert max_error(replay=True) <= 1e-5
    assert max_error(replay=False) > 1e-4


@pytest.mark.parametrize("family", list(MODELS))
def test_trains_on_videos_and_image_sets(tmp_path, family):
    """Two steps on `motion` (4 frames) and `find` (4 images) rows: routes on every image token, finite losses."""

    class RecordingTrainer(MoEGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            self.batches.append(output)
            return output

    build_model, build_processor = MODELS[family]
    processor = build_processor()
    trainer = RecordingTrainer(
        build_model(seed=0),
        accuracy_reward,
        args=make_config(
            tmp_path, max_steps=2, max_completion_length=2, router_aux_loss_coef=0.01, modality_calibration_samples=4
        ),
        train_dataset=Dataset.from_list(multi_image_rows(8)),
        processing_class=processor,
    )
    trainer.batches = []
    trainer.train()

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    per_prompt = 4 * tokens_per_image(processor)
    for batch in trainer.batches:
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        on_images = batch["routed_experts"][input_ids == image_token_id(processor)]
        assert on_images.shape[0] == batch["prompt_ids"].shape[0] * per_prompt
        assert (on_images >= 0).all()
    stats = trainer.modality_statistics
    assert int(stats.counts[0, 1].sum()) // stats.model["top_k"] == 4 * per_prompt  # 4 calibration prompts
