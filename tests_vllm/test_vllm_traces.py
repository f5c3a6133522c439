"""`to_trace`: a request's recorded rows become its prompt and completion traces, or a clear error if they cannot."""

from __future__ import annotations

import pytest
import torch

from trl_moe_grpo import MoEGRPOError
from trl_moe_grpo.vllm_routing.requests import to_trace


def test_rows_split_into_prompt_and_completion_with_no_route_on_the_last_token():
    rows = torch.arange(8 * 2 * 2, dtype=torch.int16).view(8, 2, 2)  # 6 prompt tokens + 2 of 3 completion tokens
    prompt, completion = to_trace(rows, prompt_length=6, completion_length=3)
    assert torch.equal(prompt, rows[:6])
    assert torch.equal(completion[:2], rows[6:])
    assert (completion[2] == -1).all()


@pytest.mark.parametrize("tokens", [5, 7, 9, 14])
def test_rows_that_do_not_follow_the_tokens_are_an_error(tokens):
    """Fewer rows (prefix caching, unrecorded steps) or more (a preempted request, recomputed) misalign the trace."""
    with pytest.raises(MoEGRPOError, match="vLLM routed"):
        to_trace(torch.zeros(tokens, 2, 2, dtype=torch.int16), prompt_length=6, completion_length=3)
