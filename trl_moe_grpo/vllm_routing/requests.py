"""Request bookkeeping: cut each vLLM model step's routed rows into per-request route lists.

One vLLM step runs a flat batch of tokens: for every scheduled request, in `input_batch.req_ids` order, its
`num_scheduled_tokens[req_id]` tokens (a prompt chunk at prefill, one fed-back token at decode). Every MoE layer routes
that flat batch once, in layer order. `RouteBook` collects a step's per-layer ids, then appends each request's slice to
that request's rows, so a finished request holds one `[layers, K]` row per token the model processed, in order: its
prompt tokens, then its completion tokens except the last (never fed back). That is exactly the HF path's trace
contract (`trl_moe_grpo/routing/traces.py`), so `to_trace` only splits prompt from completion and pads the last row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import MoEGRPOError


@dataclass
class _Step:
    """What one model step scheduled, and the ids each layer chose for its flat token batch."""

    req_ids: list[str]
    num_tokens: list[int]
    layers: list[torch.Tensor | None]


@dataclass
class RouteBook:
    """Per-request routes recorded across vLLM steps.

    Args:
        num_layers (`int`): MoE layers of the model, in forward order.
        top_k (`int`): experts per token.
    """

    num_layers: int
    top_k: int
    rows: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    _step: _Step | None = None

    def begin_step(self, req_ids: Sequence[str], num_tokens: Sequence[int]) -> None:
        """Start a model step that runs `num_tokens[i]` tokens of request `req_ids[i]`, flat, in that order."""
        if self._step is not None:
            self.end_step()
        self._step = _Step(list(req_ids), [int(n) for n in num_tokens], [None] * self.num_layers)

    def record(self, layer: int, ids: torch.Tensor) -> None:
        """Record layer `layer`'s chosen ids `[flat_tokens, K]` for the current step."""
        if self._step is None:
            return  # a forward outside `generate` (vLLM's warm-up / profiling run): nothing to record
        total = sum(self._step.num_tokens)
        # vLLM may pad the flat batch (CUDA-graph / compile sizes); the scheduled tokens come first.
        if ids.shape[0] < total:
            raise MoEGRPOError(f"Layer {layer} routed {ids.shape[0]} tokens, the step scheduled {total}.")
        self._step.layers[layer] = ids[:total].to(device="cpu", dtype=torch.int16)

    def end_step(self) -> None:
        """Append the current step's rows to each request."""
        step, self._step = self._step, None
        if step is None or sum(step.num_tokens) == 0:
            return
        missing = [layer for layer, ids in enumerate(step.layers) if ids is None]
        if missing:
            raise MoEGRPOError(
                f"MoE layers {missing} recorded no route in a vLLM step: the router hooks did not run there "
                "(a compiled graph that skips `custom_routing_function`? run with enforce_eager=True)."
            )
        stacked = torch.stack(step.layers, dim=1)  # [flat_tokens, layers, K]
        start = 0
        for req_id, count in zip(step.req_ids, step.num_tokens, strict=True):
            if count:
                self.rows.setdefault(req_id, []).append(stacked[start : start + count])
            start += count

    def pop(self, req_id: str) -> torch.Tensor:
        """All rows recorded for `req_id`, `[tokens, layers, K]` int16, and forget the request.

        `req_id` is the id `RequestOutput.request_id` shows; the engine schedules it as `f"{req_id}-{random suffix}"`
        (vLLM >= 0.30 makes internal ids unique that way), so either form is accepted.
        """
        key = req_id if req_id in self.rows else next((k for k in self.rows if k.rsplit("-", 1)[0] == req_id), None)
        parts = self.rows.pop(key, []) if key is not None else []
        if not parts:
            return torch.empty(0, self.num_layers, self.top_k, dtype=torch.int16)
        return torch.cat(parts, dim=0)

    def clear(self) -> None:
        self.rows.clear()
        self._step = None


def to_trace(rows: torch.Tensor, prompt_length: int, completion_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split one request's recorded rows into its prompt trace and its completion trace (TRL layout).

    Args:
        rows (`torch.Tensor`): `[tokens, layers, K]`, the prompt's tokens then the fed-back completion tokens.
        prompt_length (`int`): prompt tokens.
        completion_length (`int`): completion tokens as TRL keeps them.

    Returns:
        `(prompt_routes [prompt_length, layers, K], completion_routes [completion_length, layers, K])`, `-1` where
        no route was taken (the last completion token, never fed back).
    """
    if rows.shape[0] < prompt_length:
        raise MoEGRPOError(
            f"vLLM routed {rows.shape[0]} tokens of a {prompt_length}-token prompt: is prefix caching on? It shares "
            "prompt blocks between rollouts, so their prompts are not routed per rollout "
            "(enable_prefix_caching=False)."
        )
    fed = max(completion_length - 1, 0)
    if rows.shape[0] != prompt_length + fed:
        # More rows: the request was routed twice somewhere (vLLM preempted it and recomputed its tokens, when the
        # KV cache ran out); fewer: steps were not recorded. Either way the rows no longer follow the tokens.
        raise MoEGRPOError(
            f"vLLM routed {rows.shape[0]} tokens for a request of {prompt_length} prompt and {completion_length} "
            f"completion tokens (expected {prompt_length + fed}): was it preempted and recomputed? Give vLLM more KV "
            "cache (`VLLM_CPU_KVCACHE_SPACE`, in GiB) or fewer concurrent sequences."
        )
    prompt = rows[:prompt_length]
    completion = torch.full((completion_length, *rows.shape[1:]), -1, dtype=torch.int16)
    if fed > 0:
        completion[:fed] = rows[prompt_length : prompt_length + fed]
    return prompt, completion
