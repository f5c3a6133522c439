"""vLLM rollouts with sampled routing and recorded routes (issue 11; `docs/vllm.md`).

Not named `vllm`: a folder of that name would shadow the real package (`tests/test_layout.py`). Nothing here imports
vLLM at module import time, so the main environment (no vLLM) can import the package; `check.py` does the import and
the startup check of the vLLM internals relied on.
"""

from .router_hooks import SUPPORTED_MODES, make_routing_function

__all__ = ["SUPPORTED_MODES", "make_routing_function"]
