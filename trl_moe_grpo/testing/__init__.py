"""Test fixtures: tiny models, tokenizers and processors built locally from configs (nothing is downloaded).

- `models.py`: tiny MoE language and vision-language models (Qwen3-MoE, InternVL, Qwen3-VL-MoE...) and their
  tokenizers and processors, for the tests, examples and benchmarks;
- `clip.py`: a tiny dense CLIP and its tokenizer and image processor (`import trl_moe_grpo.testing.clip`);
- `planted.py`: the planted routing task, whose rewarded experts lie outside the initial top-K (the mechanism test of
  `tests/test_planted.py`; `import trl_moe_grpo.testing.planted`).

Runtime code never imports from here.
"""

from .models import (
    ALPHABET,
    CHAT_TEMPLATE,
    IMAGE_TOKENS,
    SPECIAL_TOKENS,
    TINY_IMAGE_SIZE,
    VOCAB,
    build_char_tokenizer,
    build_qwen3_vl_tokenizer,
    build_tiny_internvl_processor,
    build_tiny_qwen3_vl_processor,
    tiny_dense_config,
    tiny_dense_internvl,
    tiny_dense_model,
    tiny_moe_config,
    tiny_moe_internvl,
    tiny_moe_model,
    tiny_moe_qwen3_vl,
)

__all__ = [
    "ALPHABET",
    "CHAT_TEMPLATE",
    "IMAGE_TOKENS",
    "SPECIAL_TOKENS",
    "TINY_IMAGE_SIZE",
    "VOCAB",
    "build_char_tokenizer",
    "build_qwen3_vl_tokenizer",
    "build_tiny_internvl_processor",
    "build_tiny_qwen3_vl_processor",
    "tiny_dense_config",
    "tiny_dense_internvl",
    "tiny_dense_model",
    "tiny_moe_config",
    "tiny_moe_internvl",
    "tiny_moe_model",
    "tiny_moe_qwen3_vl",
]
