"""A planted routing task: the rewarded experts lie outside the router's initial top-K.

A one-layer Qwen3-MoE (8 experts, top-2) whose weights are set by construction so that only the *routing* decides the
answer, and the answer is right only when an expert outside the initial top-K is routed:

- every token embeds to the same vector `e_0` and attention writes nothing (`o_proj = 0`), so each position's MoE
  input is the same and the last prompt position's routing alone decides the first completion token;
- the router puts experts 0 and 1 on top (logit 2; the others 0), so stock top-K routing takes `{0, 1}`;
- experts 0..5 output exactly zero, so with them the residual `e_0` reaches the LM head, which reads it as `"A"`
  (wrong); the rewarded experts 6 and 7 write a large `"B"` direction, so any set holding one of them answers `"B"`
  (right), whatever its mixing weight;
- the LM head is saturated: the answer token's probability is 1 up to `exp(-40)` either way, so the token loss gives
  the routers no gradient (experts 0..5 are identical zeros and the rewarded experts' weight cannot change a certain
  answer). Only a routing loss on *sampled* routes (Gate-GRPO) can raise the rewarded experts' logits.

Det-FT (`MoESFTTrainer`, `train_routing="topk"`) and GRPO with top-K routing never route experts 6 or 7, so they get
no gradient toward them; MoE-GRPO samples them in about one rollout in five, rewards those rollouts and moves the
top-K onto them within a few steps. `tests/test_planted.py` checks all three through the real trainers; benchmarks may
reuse the construction.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel

from .models import VOCAB, tiny_moe_config, tiny_moe_model

PROMPT = "?"
WRONG_ANSWER, RIGHT_ANSWER = "A", "B"
TOP_K_EXPERTS = (0, 1)  # the router's initial top-2
REWARDED_EXPERTS = (6, 7)  # the experts that produce the right answer

_INITIAL_LOGIT = 2.0  # of the top-K experts; every other expert starts at 0
_RESIDUAL, _ANSWER, _READOUT = 0, 1, 2  # hidden directions: the embedding, what experts 6 and 7 write
_EXPERT_SCALE = 100.0  # size of the rewarded experts' output: at mixing weight 0.12 it is still 8x the residual
_HEAD_SCALE = 10.0


@torch.no_grad()
def planted_moe_model(seed: int = 0) -> PreTrainedModel:
    """The planted one-layer Qwen3-MoE (8 experts, top-2) with only the routers trainable.

    Args:
        seed (`int`, *optional*, defaults to `0`): Seed of the weights the construction does not set (attention's
            query, key and value projections, which cannot reach the output since `o_proj` is zero).
    """
    model = tiny_moe_model("qwen3_moe", seed=seed, config=tiny_moe_config("qwen3_moe", num_hidden_layers=1))
    hidden = model.config.hidden_size
    root = math.sqrt(hidden)  # RMSNorm maps `c e_0` to `sqrt(hidden) e_0`
    model.model.embed_tokens.weight.zero_()[:, _RESIDUAL] = 1.0
    layer = model.model.layers[0]
    layer.self_attn.o_proj.weight.zero_()
    router = layer.mlp.gate
    router.weight.zero_()
    router.weight[list(TOP_K_EXPERTS), _RESIDUAL] = _INITIAL_LOGIT / root
    experts = layer.mlp.experts
    experts.gate_up_proj.zero_()
    experts.down_proj.zero_()
    intermediate = experts.intermediate_dim
    for expert in REWARDED_EXPERTS:
        experts.gate_up_proj[expert, 0, _RESIDUAL] = 1.0 / root  # gate unit 0: silu(1)
        experts.gate_up_proj[expert, intermediate, _RESIDUAL] = 1.0 / root  # up unit 0: 1
        experts.down_proj[expert, _ANSWER, 0] = _EXPERT_SCALE
    model.lm_head.weight.zero_()
    model.lm_head.weight[VOCAB.index(WRONG_ANSWER), _RESIDUAL] = _HEAD_SCALE
    model.lm_head.weight[VOCAB.index(RIGHT_ANSWER), _ANSWER] = _HEAD_SCALE
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name == "model.layers.0.mlp.gate.weight")
    return model


def planted_dataset(num_rows: int = 32):
    """`num_rows` copies of the planted prompt (`"?"`, one token) with its reference answer `"B"` in `answer`."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": PROMPT, "answer": RIGHT_ANSWER}] * num_rows)


def planted_reward(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1 for a completion that starts with the reference answer, else 0."""
    return [float(c.strip().startswith(a)) for c, a in zip(completions, answer)]


@torch.no_grad()
def rewarded_top_k_share(model: PreTrainedModel) -> float:
    """Share of the router's stock top-K slots at the prompt token that hold a rewarded expert (0, 0.5 or 1)."""
    router = model.model.layers[0].mlp.gate
    device = router.weight.device
    token = torch.tensor([[VOCAB.index(PROMPT)]], device=device)
    hidden = model.model.layers[0].post_attention_layernorm(model.model.embed_tokens(token))
    _, _, indices = router(hidden)
    return float(torch.isin(indices, torch.tensor(REWARDED_EXPERTS, device=device)).float().mean())


@torch.no_grad()
def planted_accuracy(model: PreTrainedModel) -> float:
    """1.0 when the stock top-K routing greedily answers the planted prompt right, else 0.0."""
    device = model.lm_head.weight.device
    logits = model(input_ids=torch.tensor([[VOCAB.index(PROMPT)]], device=device)).logits[0, -1]
    return float(int(logits.argmax()) == VOCAB.index(RIGHT_ANSWER))
