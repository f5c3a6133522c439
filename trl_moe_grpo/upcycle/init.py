"""How the experts and routers of an upcycled model start.

Every expert starts from the dense MLP it replaces. Three options, with their trade-offs:

- `copy`: every expert an exact copy. The MoE computes exactly the dense model's function, whatever the routing (the
  top-K weights sum to 1). But then every routing gives the same output: the G rollouts of a prompt under sampled
  routing agree token for token, every reward in a group is equal, every advantage is zero, and MoE-GRPO has nothing to
  learn from. Use it only when a training stage that breaks the symmetry (SFT with a load-balancing loss,
  continued pretraining) comes before MoE-GRPO, or to check a conversion.
- `noise` (the default): a copy plus Gaussian noise of `noise_std` times the weight's own standard deviation, drawn
  independently per expert. The model stays within about `noise_std` of the dense one (its benchmarks carry over),
  yet experts differ, so routing changes the output and sampled rollouts can disagree: MoE-GRPO gets a learning
  signal from the first step. Larger `noise_std` means more diverse rollouts but a model further from the dense one.
- `drop` (Drop-Upcycling, Nakamura et al., ICLR 2025): in each expert a random `drop_ratio` share of the intermediate
  neurons is re-initialized (their rows of the gate and up projections and their column of the down projection) from
  a normal distribution with the original matrix's mean and std. Experts diverge strongly and specialize faster,
  but the model loses part of the dense model's function until it is trained again: it suits a continued-training
  stage before RL, not RL straight from the dense checkpoint with a learning rate of 1e-6.

`multiplet` (CLIP only) is the CLIP-MoE paper's Diversified Multiplet Upcycling (`clip_moe/multiplet.py`): the
experts are trained, on image-caption pairs, so of these settings only `seed` applies to it.

Every upcycling function takes one `init` argument, an `ExpertInit` or the name of a kind (its default settings):
`resolve_init` turns either into an `ExpertInit`, so the settings and their checks live here only.

Routers start small and random (normal with std `router_std`), never zero: zero routers give every expert the same
probability, so the top-K would be decided by index order, and sampling could not prefer anything.

Random draws come from a generator seeded by `seed` and the tensor's checkpoint name, so a conversion is reproducible
and does not depend on how the checkpoint is sharded.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import MoEGRPOError

ExpertInitKind = Literal["copy", "noise", "drop", "multiplet"]
# The kinds computed from the dense weights alone (every source); `multiplet` trains, for CLIP sources only.
EXPERT_INITS: tuple[str, ...] = ("copy", "noise", "drop")
MULTIPLET = "multiplet"
DEFAULT_INIT: ExpertInitKind = "noise"


@dataclass(frozen=True)
class ExpertInit:
    """Initialization of the experts and routers of an upcycled model (see the module docstring for trade-offs).

    Args:
        kind (`str`, defaults to `"noise"`): `copy`, `noise` or `drop`; for CLIP sources also `multiplet`.
        noise_std (`float`, defaults to `0.01`): for `noise`, noise std relative to each weight matrix's std.
        drop_ratio (`float`, defaults to `0.5`): for `drop`, share of each expert's intermediate neurons
            re-initialized (the Drop-Upcycling paper's r=0.5).
        router_std (`float`, defaults to `0.02`): std of the router weights (transformers' usual initializer range).
        seed (`int`, defaults to `0`): seed of every random draw.
    """

    kind: ExpertInitKind = DEFAULT_INIT
    noise_std: float = 0.01
    drop_ratio: float = 0.5
    router_std: float = 0.02
    seed: int = 0

    def __post_init__(self):
        if self.kind not in (*EXPERT_INITS, MULTIPLET):
            raise MoEGRPOError(
                f"Unknown expert init {self.kind!r}: use one of {', '.join(EXPERT_INITS)} (or {MULTIPLET} for CLIP)."
            )
        if self.kind == "noise" and not self.noise_std > 0:
            raise MoEGRPOError(
                f"noise_std={self.noise_std}: `noise` needs a positive std (for exact copies use init='copy')."
            )
        if self.kind == "drop" and not 0 < self.drop_ratio <= 1:
            raise MoEGRPOError(f"drop_ratio={self.drop_ratio}: it is a share of neurons, in (0, 1].")
        if not 0 <= self.seed < 2**31:
            raise MoEGRPOError(f"seed={self.seed}: use an integer in [0, 2**31).")
        if not self.router_std > 0:
            raise MoEGRPOError(
                f"router_std={self.router_std}: routers must start random, not zero (zero routers tie all experts)."
            )

    def require_computed(self, where: str) -> None:
        """Raise for `multiplet`, which trains experts instead of computing them from the dense weights."""
        if self.kind == MULTIPLET:
            raise MoEGRPOError(
                "init='multiplet' (Diversified Multiplet Upcycling) trains on image-caption pairs and applies to "
                f"CLIP only; {where} computes experts from the dense weights: use one of "
                f"{', '.join(EXPERT_INITS)}, or `clip_moe.convert.upcycle_clip(..., init='multiplet', pairs=...)`."
            )

    def generator(self, name: str) -> torch.Generator:
        """A generator seeded by `seed` and `name` (a checkpoint key), independent of the order tensors come in.

        The CPU generator keeps only the low 32 bits of its seed, so `seed` and the name's CRC are mixed into 32
        bits (`seed=0` gives the name's CRC, as before this mixing).
        """
        return torch.Generator().manual_seed((zlib.crc32(name.encode()) + self.seed * 0x9E3779B1) % 2**32)

    def expert(self, dense: torch.Tensor, proj: str, expert_key: str, neuron_key: str) -> torch.Tensor:
        """One expert's weight for one projection, from the dense MLP's weight `dense`.

        Args:
            dense: the dense weight, `[intermediate, hidden]` for `gate`/`up`, `[hidden, intermediate]` for `down`.
            proj: `gate`, `up` or `down`.
            expert_key: the output key, which seeds this tensor's noise.
            neuron_key: a name shared by the three projections of one expert, which seeds `drop`'s neuron choice
                (the same neurons must be dropped in all three).
        """
        if self.kind == "copy":
            return dense.clone()
        weight = dense.float()
        if self.kind == "noise":
            noise = torch.randn(weight.shape, generator=self.generator(expert_key))
            return (weight + noise * (self.noise_std * weight.std())).to(dense.dtype)
        intermediate = weight.shape[1] if proj == "down" else weight.shape[0]
        dropped = torch.randperm(intermediate, generator=self.generator(neuron_key))
        dropped = dropped[: round(self.drop_ratio * intermediate)]
        fresh_shape = (weight.shape[0], len(dropped)) if proj == "down" else (len(dropped), weight.shape[1])
        fresh = torch.randn(fresh_shape, generator=self.generator(expert_key)) * weight.std() + weight.mean()
        weight = weight.clone()
        if proj == "down":
            weight[:, dropped] = fresh
        else:
            weight[dropped] = fresh
        return weight.to(dense.dtype)

    def router(self, num_experts: int, hidden_size: int, dtype: torch.dtype, router_key: str) -> torch.Tensor:
        """A router weight `[num_experts, hidden_size]`, normal with std `router_std`."""
        weight = torch.randn((num_experts, hidden_size), generator=self.generator(router_key)) * self.router_std
        return weight.to(dtype)


def resolve_init(init: ExpertInit | str) -> ExpertInit:
    """The `ExpertInit` an upcycling function's `init` argument names: itself, or a kind with default settings."""
    if isinstance(init, ExpertInit):
        return init
    if isinstance(init, str):
        return ExpertInit(init)
    raise MoEGRPOError(
        f"`init` is an `ExpertInit` or the name of a kind ({', '.join(EXPERT_INITS)}), got {type(init).__name__}. "
        "For settings other than the defaults pass e.g. `ExpertInit('noise', noise_std=0.05, seed=1)`."
    )
