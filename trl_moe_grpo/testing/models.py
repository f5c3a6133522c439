"""Test fixtures: tiny MoE models and tokenizers built locally, for the tests, examples and benchmarks.

Nothing here downloads anything: configs are written out, weights are random (seeded) and the tokenizer is built with
`tokenizers` from a fixed alphabet.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

ALPHABET = string.digits + string.ascii_lowercase + " +-=?:.," + string.ascii_uppercase + "()\n"
SPECIAL_TOKENS = ["<pad>", "<eos>"]
# InternVL's processor looks these up by role on the tokenizer; they come after the alphabet so text ids stay put.
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
VOCAB = SPECIAL_TOKENS + list(ALPHABET) + list(IMAGE_TOKENS.values())

# Content may be a string or a list of parts (TRL's multimodal format); an image part becomes the placeholder token the
# processor expands into the image's tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'][0] }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}a:{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over digits, lowercase letters and a little punctuation, with a chat template.

    It also knows InternVL's image tokens (`<img>`, `</img>`, `<IMG_CONTEXT>`, `<video>`) as special tokens.
    """
    vocab = {token: i for i, token in enumerate(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", extra_special_tokens=IMAGE_TOKENS
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _decoder_args(vocab_size: int) -> dict:
    """What every tiny decoder here shares: 2 layers, hidden size 32, the character tokenizer's special ids."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        # At the usual 0.02 the experts barely move a 32-wide residual stream and every routing decodes the same
        # text; 0.1 makes routing (and small weight changes) matter, as in trained models.
        initializer_range=0.1,
    )


def tiny_moe_config(family: str = "qwen3_moe", vocab_size: int = len(VOCAB), **overrides):
    """Config of a 2-layer MoE model of `family` with 8 experts, top-2, hidden size 32.

    `family` is one of `qwen3_moe`, `qwen2_moe`, `mixtral`, `olmoe`, `gpt_oss`, `deepseek_v3`.
    """
    from transformers import (
        DeepseekV3Config,
        GptOssConfig,
        MixtralConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    common = dict(**_decoder_args(vocab_size), num_experts_per_tok=2, tie_word_embeddings=False)
    if family == "qwen3_moe":
        config = Qwen3MoeConfig(**common, num_experts=8, moe_intermediate_size=16, head_dim=8, norm_topk_prob=True)
    elif family == "qwen2_moe":
        config = Qwen2MoeConfig(
            **common, num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=16, norm_topk_prob=False
        )
    elif family == "mixtral":
        config = MixtralConfig(**common, num_local_experts=8, head_dim=8)
    elif family == "olmoe":
        config = OlmoeConfig(**common, num_experts=8, norm_topk_prob=False)
    elif family == "gpt_oss":
        config = GptOssConfig(**common, num_local_experts=8, head_dim=8, layer_types=["full_attention"] * 2)
    elif family == "deepseek_v3":
        common["num_key_value_heads"] = common["num_attention_heads"]  # multi-head latent attention
        config = DeepseekV3Config(
            **common,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=0,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    else:
        raise ValueError(f"Unknown tiny MoE family {family!r}.")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_moe_model(
    family: str = "qwen3_moe", seed: int = 0, config: PretrainedConfig | None = None
) -> PreTrainedModel:
    """A randomly initialized (seeded) tiny MoE causal LM, fp32, eager attention, in eval mode."""
    torch.manual_seed(seed)
    config = config or tiny_moe_config(family)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    if family == "deepseek_v3":
        # The bias correction starts at zero; give it values so the tests see the stock rule use it.
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0.0, 0.02)
    return model.eval()


# Vision tower: 28x28 images in 14x14 patches (2x2), pixel-shuffled by 0.5 into a single image token.
TINY_IMAGE_SIZE = 28


def build_tiny_internvl_processor(image_size: int = TINY_IMAGE_SIZE, image_seq_length: int = 1):
    """An `InternVLProcessor` over the character tokenizer: square images of `image_size` pixels.

    `image_seq_length` must match the model: `(image_size / patch_size)^2 * downsample_ratio^2` tokens per image.
    """
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    size = {"height": image_size, "width": image_size}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=False),
        tokenizer=build_char_tokenizer(),
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=image_seq_length,
        chat_template=CHAT_TEMPLATE,
    )


def _tiny_internvl(text_config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """A seeded tiny InternVL: a 1-layer vision tower on 28x28 images, one image token, and `text_config`."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

    vision = InternVLVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_IMAGE_SIZE // 2,
        initializer_range=0.1,
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=text_config.to_dict(),
        image_token_id=VOCAB.index(IMAGE_TOKENS["context_image_token"]),
        downsample_ratio=0.5,
        image_seq_length=1,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration._from_config(config, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def tiny_moe_internvl(seed: int = 0) -> PreTrainedModel:
    """A randomly initialized (seeded) tiny `InternVLForConditionalGeneration` whose language model is Qwen3-MoE."""
    return _tiny_internvl(tiny_moe_config("qwen3_moe"), seed)


# Qwen3-VL: the character tokenizer with Qwen's vision tokens (after the alphabet, so text ids stay put), and a vision
# tower that resizes a 28x28 image to 32x32, cuts it into 8x8 patches and merges them 2x2: four image tokens.
QWEN3_VL_TOKENS = {
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
}
# `<` and `>` spell the frame timestamps (`<0.5 seconds>`) the processor writes into video prompts.
QWEN3_VL_VOCAB = (
    SPECIAL_TOKENS + list(ALPHABET) + [c for c in "<>" if c not in ALPHABET] + list(QWEN3_VL_TOKENS.values())
)
# An image part becomes `<|vision_start|><|image_pad|><|vision_end|>`, as in Qwen's template; the processor expands the
# pad into the image's tokens. For a video part it writes the frames' own start/end tokens around each frame.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'][0] }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|video_pad|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}a:{% endif %}"
)
QWEN3_VL_PATCH_SIZE = 8
QWEN3_VL_MERGE_SIZE = 2


def build_qwen3_vl_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer with Qwen's vision tokens as special tokens; it pads on the left, as TRL needs."""
    vocab = {token: i for i, token in enumerate(QWEN3_VL_VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        extra_special_tokens=QWEN3_VL_TOKENS,
        padding_side="left",
    )
    fast.chat_template = QWEN3_VL_CHAT_TEMPLATE
    return fast


def build_tiny_qwen3_vl_processor():
    """A `Qwen3VLProcessor` over `build_qwen3_vl_tokenizer()`: a 28x28 or 32x32 image gives four image tokens."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    sizes = dict(patch_size=QWEN3_VL_PATCH_SIZE, merge_size=QWEN3_VL_MERGE_SIZE, temporal_patch_size=2)
    side = QWEN3_VL_PATCH_SIZE * QWEN3_VL_MERGE_SIZE  # images are resized to multiples of this
    image_processor = Qwen2VLImageProcessor(
        **sizes, size={"shortest_edge": side * side, "longest_edge": 4 * side * side}
    )
    video_processor = Qwen3VLVideoProcessor(
        **sizes, size={"shortest_edge": side * side, "longest_edge": 16 * side * side}, cap_pixels_per_frame=True
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=build_qwen3_vl_tokenizer(),
        video_processor=video_processor,
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )


def tiny_moe_qwen3_vl(seed: int = 0) -> PreTrainedModel:
    """A randomly initialized (seeded) tiny `Qwen3VLMoeForConditionalGeneration`, fp32, eager attention, in eval mode.

    Its language model has the sizes of `tiny_moe_config("qwen3_moe")` (2 layers, hidden 32, 8 experts, top-2) with
    interleaved multimodal rotary positions; its one-block vision tower feeds DeepStack features to the first layer.
    """
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    tokenizer = build_qwen3_vl_tokenizer()
    text = dict(
        **_decoder_args(len(QWEN3_VL_VOCAB)),  # pad and EOS ids as the character tokenizer's: 0 and 1
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        tie_word_embeddings=False,
        # head_dim 8 has 4 rotary frequencies: 2 temporal, 1 height, 1 width.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        patch_size=QWEN3_VL_PATCH_SIZE,
        spatial_merge_size=QWEN3_VL_MERGE_SIZE,
        temporal_patch_size=2,
        out_hidden_size=32,
        num_position_embeddings=16,  # a 4x4 grid of learned positions, interpolated to each image's grid
        deepstack_visual_indexes=[0],
        initializer_range=0.1,
    )
    config = Qwen3VLMoeConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        vision_start_token_id=tokenizer.vision_start_token_id,
        vision_end_token_id=tokenizer.vision_end_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration._from_config(config, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def tiny_dense_config(family: str = "qwen3", vocab_size: int = len(VOCAB), **overrides):
    """Config of a 2-layer dense decoder of `family` (`qwen3`, `llama`, `mistral`), hidden 32: an upcycling source.

    The Llama one ties its embeddings (like Llama 3.2), so both tied and untied checkpoints are exercised.
    """
    from transformers import LlamaConfig, MistralConfig, Qwen3Config

    common = dict(**_decoder_args(vocab_size), head_dim=8)
    if family == "qwen3":
        config = Qwen3Config(**common, tie_word_embeddings=False)
    elif family == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=True)
    elif family == "mistral":
        config = MistralConfig(**common, tie_word_embeddings=False)
    else:
        raise ValueError(f"Unknown tiny dense family {family!r}: use qwen3, llama or mistral.")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_dense_model(family: str = "qwen3", seed: int = 0, config: PretrainedConfig | None = None) -> PreTrainedModel:
    """A randomly initialized (seeded) tiny dense causal LM, fp32, eager attention, in eval mode."""
    torch.manual_seed(seed)
    config = config or tiny_dense_config(family)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()


def tiny_dense_internvl(seed: int = 0) -> PreTrainedModel:
    """A randomly initialized (seeded) tiny `InternVLForConditionalGeneration` whose language model is dense Qwen3."""
    return _tiny_internvl(tiny_dense_config("qwen3"), seed)
