"""Architecture presets: configs of published dense models, written out because the hub is not always in reach.

`internvl3_5-1b` (`internvl3_5_1b.json`) is OpenGVLab's InternVL3.5-1B in transformers' own `InternVLConfig` format
(the `-HF` release): InternViT-300M-448px (hidden 1024, 24 layers, 16 heads, intermediate 4096, patch 14, 448x448
images), the projector (pixel shuffle 0.5 -> LayerNorm(4096) -> Linear 4096->1024 -> GELU -> Linear 1024->1024) and
Qwen3-0.6B as the language model (hidden 1024, intermediate 3072, 28 layers, 16 heads, 8 KV heads, head_dim 128,
vocab 151936, rope_theta 1e6, rms_norm_eps 1e-6).

One value differs from the stand-alone Qwen3-0.6B: `tie_word_embeddings` is false. The released checkpoint stores its
LM head apart from the embeddings: 1,060,897,792 parameters in all, 751,632,384 of them in the language model, which is
Qwen3-0.6B's 596,049,920 plus a second 151936 x 1024 matrix. The dry-run of this preset reproduces that count exactly
(see `tests/test_upcycle.py`), and with 8 experts, top-2, the paper's 1.3B active / 2.9B total. Tied embeddings would
give 1.17B / 2.76B.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import MoEGRPOError

PRESETS: dict[str, str] = {"internvl3_5-1b": "internvl3_5_1b.json"}


def load_preset(name: str) -> dict:
    """The raw config dict of preset `name` (as a `config.json` would hold it)."""
    if name not in PRESETS:
        raise MoEGRPOError(f"Unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}.")
    return json.loads((Path(__file__).parent / PRESETS[name]).read_text(encoding="utf-8"))
