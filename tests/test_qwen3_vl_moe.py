"""Qwen3-VL-MoE through TRL's own multimodal path: processor, routing parity, replay fidelity, training.

The tiny model and processor (`trl_moe_grpo.testing`) are built here: a 2-layer Qwen3-VL-MoE language model (8 experts,
top-2) with interleaved multimodal rotary positions (M-RoPE) and DeepStack, a one-block vision tower, and a
`Qwen3VLProcessor` that turns a 28x28 image into four `<|image_pad|>` tokens.
"""

import math

import numpy as np
import pytest
import torch
from conftest import make_config
from datasets import Dataset
from PIL import Image
from trl.trainer.utils import pad

from trl_moe_grpo import MoEGRPOConfig, MoEGRPOTrainer, RoutingController
from trl_moe_grpo.routing import pad_routes, split_rollout_routes
from trl_moe_grpo.testing import build_tiny_qwen3_vl_processor, tiny_moe_qwen3_vl

COLOURS = {"r": (220, 30, 30), "g": (30, 200, 30), "b": (30, 30, 220)}
# Prompts of different lengths, so that left padding (and the M-RoPE positions behind it) is exercised.
QUESTIONS = ["colour?", "what colour is this?", "hue?"]
IMAGE_TOKENS_PER_IMAGE = 4
EOS = 1


@pytest.fixture(scope="module")
def processor():
    return build_tiny_qwen3_vl_processor()


def colour_rows(n: int) -> list[dict]:
    """TRL's conversational VLM format: an `image` column and a prompt with an image part; the answer is r, g or b."""
    rows = []
    for i in range(n):
        key = "rgb"[i % 3]
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i % 3]}]}]
        rows.append({"prompt": prompt, "image": Image.new("RGB", (28, 28), COLOURS[key]), "answer": key})
    return rows


def first_letter_reward(completions, answer, **kwargs):
    return [1.0 if c[0]["content"][:1] == a else 0.0 for c, a in zip(completions, answer)]


def image_messages(rows: list[dict]) -> list[list[dict]]:
    """The rows' prompts with their images inlined, as `processor.apply_chat_template` takes them."""
    return [
        [{"role": "user", "content": [{"type": "image", "image": r["image"]}, *r["prompt"][0]["content"][1:]]}]
        for r in rows
    ]


def chat_inputs(processor, messages, **kwargs):
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
    )


def moe_config(tmp_path, **overrides) -> MoEGRPOConfig:
    """The shared test config, with a balance loss and a short calibration pass for this vision model."""
    values = dict(max_completion_length=4, router_aux_loss_coef=0.01, modality_calibration_samples=8)
    return make_config(tmp_path, **{**values, **overrides})


def test_processor_tokens_and_model_generate(processor):
    tokenizer, model = processor.tokenizer, tiny_moe_qwen3_vl(seed=0)
    config = model.config
    for name in ("image_token", "video_token", "vision_start_token", "vision_end_token"):
        token = getattr(processor, name)
        assert tokenizer(token)["input_ids"] == [getattr(processor, f"{name}_id")]  # one special token each
        assert getattr(config, f"{name}_id") == getattr(processor, f"{name}_id")
    assert config.text_config.eos_token_id == tokenizer.eos_token_id == EOS
    assert config.text_config._attn_implementation == "eager" and model.dtype == torch.float32
    assert not model.training

    text = processor.apply_chat_template(image_messages(colour_rows(1)), add_generation_prompt=True, tokenize=False)
    assert text[0].startswith("u:<|vision_start|><|image_pad|><|vision_end|>colour?") and text[0].endswith("a:")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "u:hi<eos>"

    inputs = chat_inputs(processor, image_messages(colour_rows(1)))
    ids = inputs["input_ids"][0].tolist()
    start = ids.index(processor.vision_start_token_id)
    pads = [processor.image_token_id] * IMAGE_TOKENS_PER_IMAGE
    assert ids[start : start + 6] == [processor.vision_start_token_id, *pads, processor.vision_end_token_id]
    assert inputs["mm_token_type_ids"][0].tolist() == [int(t == processor.image_token_id) for t in ids]
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, len(ids) + 4)

    video = np.zeros((4, 28, 28, 3), dtype=np.uint8)
    messages = [
        [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "colour?"}]}]
    ]
    inputs = chat_inputs(processor, messages)
    assert (inputs["input_ids"] == processor.video_token_id).sum() == (inputs["mm_token_type_ids"] == 2).sum() == 8
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2


def test_routers_are_found_and_topk_is_bit_identical(processor):
    model = tiny_moe_qwen3_vl(seed=0)
    inputs = chat_inputs(processor, image_messages(colour_rows(3)), padding=True)
    with torch.no_grad():
        stock_logits = model(**inputs).logits
        stock_sequences = model.generate(**inputs, max_new_tokens=4, do_sample=False)

    controller = RoutingController(model, vision_token_ids=[processor.image_token_id, processor.video_token_id])
    assert controller.layer_names == [f"model.language_model.layers.{i}.mlp.gate" for i in range(2)]
    assert {type(a.router).__name__ for a in controller.adapters} == {"Qwen3VLMoeTextTopKRouter"}
    assert (controller.num_layers, controller.num_experts, controller.top_k) == (2, 8, 2)
    modality = controller.token_modality(inputs["input_ids"])
    assert torch.equal(modality.bool(), inputs["input_ids"] == processor.image_token_id)

    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock_logits)
        with controller.rollout("topk") as recording:
            assert torch.equal(model(**inputs).logits, stock_logits)
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), stock_sequences)
    assert (recording.steps[0][inputs["attention_mask"].bool()] >= 0).all()


def test_replay_reproduces_generation_log_probs(processor):
    """Sampled routing over image and text tokens, replayed in one full forward with M-RoPE inputs: <= 1e-5."""
    model = tiny_moe_qwen3_vl(seed=1)
    controller = RoutingController(model, vision_token_ids=[processor.image_token_id, processor.video_token_id])
    inputs = chat_inputs(processor, image_messages(colour_rows(4)), padding=True)
    assert not inputs["attention_mask"].all(), "prompts of different lengths: left padding must be exercised"
    torch.manual_seed(3)
    with torch.no_grad(), controller.rollout("sample") as recording:
        out = model.generate(
            **inputs, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True
        )

    prompt_width = inputs["input_ids"].shape[1]
    generated = out.sequences[:, prompt_width:]
    # Completions as TRL keeps them: up to and including the first EOS, right-padded.
    lengths = [row.index(EOS) + 1 if EOS in row else len(row) for row in generated.tolist()]
    completions = pad([row[:n] for row, n in zip(generated, lengths)], padding_value=0, padding_side="right")
    completion_mask = pad([torch.ones(n, dtype=torch.long) for n in lengths], padding_value=0, padding_side="right")
    generation_log_probs = torch.stack(out.logits, 1)[:, : completions.shape[1]].log_softmax(-1)
    generation_log_probs = generation_log_probs.gather(-1, completions[..., None])[..., 0]

    routes = pad_routes(*split_rollout_routes(recording, inputs["attention_mask"].sum(1).tolist(), lengths))
    input_ids = torch.cat([inputs["input_ids"], completions], 1)
    assert routes.shape[:2] == input_ids.shape
    on_images = routes[input_ids == processor.image_token_id]
    assert on_images.shape[0] == 4 * IMAGE_TOKENS_PER_IMAGE and (on_images >= 0).all()
    # The inputs TRL's training forward gets: prompt fields extended over the completion.
    forward_inputs = dict(
        input_ids=input_ids,
        attention_mask=torch.cat([inputs["attention_mask"], completion_mask], 1),
        mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completions)], 1),
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
    )

    def max_error(replay: bool) -> float:
        with torch.no_grad(), controller.step_scope():
            if replay:
                controller.start_replay(routes)
            logits = model(**forward_inputs).logits
            controller.finish_replay()
        log_probs = logits[:, prompt_width - 1 : -1].log_softmax(-1).gather(-1, completions[..., None])[..., 0]
        return ((log_probs - generation_log_probs).abs() * completion_mask).max().item()

    assert max_error(replay=True) <= 1e-5
    assert max_error(replay=False) > 1e-3


@pytest.mark.parametrize(
    "padding_side",
    ["left", "right"],
)
def test_trainer_forward_replays_generation(tmp_path, processor, padding_side):
    """TRL's own training forward (processor re-run, `mm_token_type_ids` extended) under replay equals generation."""
    processor = build_tiny_qwen3_vl_processor()
    processor.tokenizer.padding_side = padding_side
    model = tiny_moe_qwen3_vl(seed=1)
    trainer = MoEGRPOTrainer(
        model,
        first_letter_reward,
        args=moe_config(tmp_path),
        train_dataset=Dataset.from_list(colour_rows(12)),
        processing_class=processor,
    )
    trainer.model.train()  # rollouts sample their routing in training mode
    generation_logits = []
    generate = model.generate

    def generate_keeping_logits(*args, **kwargs):
        out = generate(*args, **kwargs, output_logits=True, return_dict_in_generate=True)
        generation_logits.append(torch.stack(out.logits, 1))
        return out.sequences

    model.generate = generate_keeping_logits
    rows = colour_rows(2)
    batch = trainer._generate_and_score_completions([row for row in rows for _ in range(4)])
    assert {"mm_token_type_ids", "image_grid_thw", "pixel_values", "routed_experts"} <= batch.keys()

    completions, completion_mask = batch["completion_ids"], batch["completion_mask"]
    generation_log_probs = generation_logits[0][:, : completions.shape[1]].log_softmax(-1)
    generation_log_probs = generation_log_probs.gather(-1, completions[..., None])[..., 0]
    forward_kwargs = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids", "num_images")}
    with torch.no_grad(), trainer._routing_step():
        trainer._replay.set_trace(batch["routed_experts"])
        log_probs, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([batch["prompt_ids"], completions], 1),
            torch.cat([batch["prompt_mask"], completion_mask], 1),
            completions.shape[1],
            **forward_kwargs,
        )
    assert ((log_probs - generation_log_probs).abs() * completion_mask).max() <= 1e-5


def test_trains_with_images_balance_loss_and_calibration(tmp_path, processor):
    """Finite losses with a balance loss, routes on every image token, calibration saw them, routers move."""

    class RecordingTrainer(MoEGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            self.batches.append(output)
            return output

    model = tiny_moe_qwen3_vl(seed=0)
    routers_before = [p.detach().clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    trainer = RecordingTrainer(
        model,
        first_letter_reward,
        args=moe_config(tmp_path),
        train_dataset=Dataset.from_list(colour_rows(12)),
        processing_class=processor,
    )
    trainer.batches = []
    trainer.train()

    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(math.isfinite(log["loss"]) for log in logs)
    assert all(math.isfinite(log["routing/balance_loss"]) for log in logs)
    for batch in trainer.batches:
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        on_images = batch["routed_experts"][input_ids == processor.image_token_id]  # [image tokens, layers, top_k]
        assert on_images.shape[0] == batch["prompt_ids"].shape[0] * IMAGE_TOKENS_PER_IMAGE
        assert (on_images >= 0).all()

    stats = trainer.modality_statistics
    assert stats.present.all()
    vision_tokens = int(stats.counts[0, 1].sum()) // stats.model["top_k"]
    assert vision_tokens == 8 * IMAGE_TOKENS_PER_IMAGE  # the image pads of the 8 calibration prompts, nothing else
    assert stats.model["architecture"] == "Qwen3VLMoeForConditionalGeneration"
    assert (~trainer.routing.expert_masks).sum(-1).eq(2).all()  # P=0.25 of 8 experts, per layer and modality

    routers_after = [p.detach() for n, p in trainer.model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert len(routers_after) == 2
    assert all(not torch.equal(before, after) for before, after in zip(routers_before, routers_after))


def test_evaluation_with_modality_masks_gives_a_finite_loss(tmp_path, processor):
    trainer = MoEGRPOTrainer(
        tiny_moe_qwen3_vl(seed=0),
        first_letter_reward,
        args=moe_config(tmp_path),
        train_dataset=Dataset.from_list(colour_rows(12)),
        eval_dataset=Dataset.from_list(colour_rows(8)),
        processing_class=processor,
    )
    trainer._setup_modality_guidance(None)  # what `train()` does before step 1
    assert trainer.routing.expert_masks is not None
    metrics = trainer.evaluate()
    assert metrics["eval_routing/sampled_differs_from_topk"] == 0  # evaluation routes like inference
    assert math.isfinite(metrics["eval_loss"])
