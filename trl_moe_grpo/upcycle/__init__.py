"""Upcycling: turn a dense language or vision-language model into a Mixture-of-Experts model.

- `targets.py`    which dense architecture becomes which stock MoE architecture (config and checkpoint keys)
- `init.py`       how experts (`copy`, `noise`, `drop`) and routers start, and the trade-offs
- `checkpoint.py` safetensors shards in and out, one at a time
- `source.py`     the dense model: a folder, a hub name or a preset
- `convert.py`    `upcycle`: the streaming conversion
- `report.py`     `parameter_report`: total and active parameters per component, on the meta device
- `presets/`      published architectures (InternVL3.5-1B) as config files
"""

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
