"""`trl-moe-grpo upcycle` end to end: a conversion, the preset's dry-run table, errors as exit codes."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM

from trl_moe_grpo.cli import main
from trl_moe_grpo.testing import build_char_tokenizer, tiny_dense_model


def test_upcycle_command_converts_a_model(tmp_path, capsys):
    source, output = str(tmp_path / "dense"), str(tmp_path / "moe")
    tiny_dense_model("qwen3").save_pretrained(source, max_shard_size="12KB")
    build_char_tokenizer().save_pretrained(source)
    argv = ["upcycle", source, "--num-experts", "4", "--top-k", "2", "--output", output, "--max-shard-size", "20KB"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "MLP / experts" in printed and "qwen3 -> qwen3_moe" in printed
    model = AutoModelForCausalLM.from_pretrained(output)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert model.config.num_experts == 4 and model.config.num_experts_per_tok == 2
    assert len([name for name in os.listdir(output) if name.endswith(".safetensors")]) > 1
    with torch.no_grad():
        assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False).shape[1] > 3


def test_preset_dry_run_prints_the_parameter_table(capsys):
    argv = ["upcycle", "--preset", "internvl3_5-1b", "--num-experts", "8", "--top-k", "2", "--dry-run"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| **total** | **1.061B** | **2.911B** | **1.325B** |" in printed
    assert "vision tower" in printed and "routers" in printed


def test_errors_are_exit_codes_with_the_fix(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    assert main(["upcycle", str(tmp_path / "gpt2"), "--output", str(tmp_path / "out")]) == 2
    assert "Supported sources" in capsys.readouterr().err
    assert main(["upcycle", "--preset", "internvl3_5-1b", "--output", str(tmp_path / "out")]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert main(["upcycle", "--preset", "nope", "--dry-run"]) == 2
    assert "internvl3_5-1b" in capsys.readouterr().err
