"""vLLM rollouts with sampled routing and recorded routes (issue 11; `docs/vllm.md`).

- `router_hooks.py`: the routing function vLLM's CPU routers call (the HF path's selection laws).
- `engine_hooks.py`: installs it in an in-process engine and keeps each step's bookkeeping.
- `requests.py`: cuts each step's routes by request and turns a request's rows into its trace.
- `generation.py`: `MoEVLLMGeneration`, TRL's colocate `VLLMGeneration` with the above (what the trainer builds).
- `weight_sync.py`: the trainer's weights into the CPU engine (TRL's per-parameter sync fails there).
- `check.py`, `options.py`: the startup check of the vLLM internals used, and the set-ups refused up front.

Not named `vllm`: a folder of that name would shadow the real package (`tests/test_layout.py`). Nothing here imports
vLLM at package import time, so the main environment (no vLLM) can import the package.
"""

from .router_hooks import SUPPORTED_MODES, make_routing_function

__all__ = ["SUPPORTED_MODES", "make_routing_function"]
