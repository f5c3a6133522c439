"""Upcycling: turn a dense language or vision-language model into a Mixture-of-Experts model.

- `targets.py`    which dense architecture becomes which stock MoE architecture (config and checkpoint keys)
- `init.py`       how experts (`copy`, `noise`, `drop`) and routers start, and the trade-offs
- `checkpoint.py` safetensors shards in and out, one at a time
- `source.py`     the dense model: a folder, a hub name or a preset
- `convert.py`    `upcycle`: the streaming conversion
- `report.py`     `parameter_report`: total and active parameters per component, on the meta device
- `presets/`      published architectures (InternVL3.5-1B) as config files
"""

import sys
import types
import warnings

from .convert import UpcycleResult, upcycle
from .init import DEFAULT_INIT, EXPERT_INITS, ExpertInit
from .presets import PRESETS
from .report import ComponentCount, ParameterReport, parameter_report
from .targets import supported_sources

__all__ = [
    "DEFAULT_INIT",
    "EXPERT_INITS",
    "PRESETS",
    "ComponentCount",
    "ExpertInit",
    "ParameterReport",
    "UpcycleResult",
    "parameter_report",
    "supported_sources",
    "upcycle",
]


class _CallableForOneRelease(types.ModuleType):
    """`trl_moe_grpo.upcycle` used to be the function on first access; calling the subpackage still works, with a
    warning, for one release."""

    def __call__(self, *args, **kwargs):
        warnings.warn(
            "`trl_moe_grpo.upcycle` is the upcycling subpackage; call `trl_moe_grpo.upcycle.upcycle(...)` "
            "(`from trl_moe_grpo.upcycle import upcycle`). Calling the subpackage stops working in the next release.",
            FutureWarning,
            stacklevel=2,
        )
        return upcycle(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableForOneRelease
