"""The router options every MoE config shares are checked by one function (`trainer/options.py`), the same way."""

from __future__ import annotations

import pytest
from conftest import make_config

from trl_moe_grpo import MoEGRPOError, MoESFTConfig
from trl_moe_grpo.clip_moe.config import CLIPDetFTConfig, CLIPMoEGRPOConfig


def common(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)


BUILDERS = {
    "MoEGRPOConfig": lambda tmp_path, **kw: make_config(tmp_path, **kw),
    "MoESFTConfig": lambda tmp_path, **kw: MoESFTConfig(**common(tmp_path), **kw),
    "CLIPMoEGRPOConfig": lambda tmp_path, **kw: CLIPMoEGRPOConfig(**common(tmp_path), **kw),
    "CLIPDetFTConfig": lambda tmp_path, **kw: CLIPDetFTConfig(**common(tmp_path), **kw),
}


@pytest.mark.parametrize("config", sorted(BUILDERS))
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"router_learning_rate": -1e-3}, r"`router_learning_rate` must be >= 0, got -0.001"),
        ({"router_aux_loss_coef": -0.1}, r"`router_aux_loss_coef` must be >= 0, got -0.1; 0 turns"),
        ({"use_liger_kernel": True}, r"Set `use_liger_kernel=False`"),
    ],
)
def test_every_config_refuses_bad_router_options_alike(tmp_path, config, overrides, message):
    with pytest.raises(MoEGRPOError, match=message):
        BUILDERS[config](tmp_path, **overrides)


@pytest.mark.parametrize("config", ["MoEGRPOConfig", "MoESFTConfig"])
def test_reentrant_checkpointing_is_refused_alike(tmp_path, config):
    reentrant = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(MoEGRPOError, match=r"sets `use_reentrant=True`.*no gradient.*'use_reentrant': False"):
        BUILDERS[config](tmp_path, **reentrant)
    BUILDERS[config](tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})


@pytest.mark.parametrize("config", sorted(BUILDERS))
def test_legal_router_options_pass(tmp_path, config):
    args = BUILDERS[config](tmp_path, router_learning_rate=0.0, router_aux_loss_coef=0.0)
    assert args.router_learning_rate == 0.0 and args.router_aux_loss_coef == 0.0
