"""Train an MoE model with MoE-GRPO from a TRL-style YAML recipe: the packaged script `trl_moe_grpo/scripts/grpo.py`.

    accelerate launch recipes/train.py --config recipes/quickstart.yaml
    accelerate launch --config_file trl_moe_grpo/accelerate_configs/multi_process.yaml recipes/train.py \
        --config recipes/quickstart.yaml

The same as `trl-moe-grpo train --config recipes/quickstart.yaml`; `trl_moe_grpo.scripts.grpo` documents the recipe's
keys (`--help` lists them).
"""

from trl_moe_grpo.scripts.grpo import run_from_command_line

if __name__ == "__main__":
    run_from_command_line()
