"""Train an MoE model with MoE-GRPO from a TRL-style YAML recipe: the packaged script `trl_moe_grpo/scripts/grpo.py`.

    accelerate launch recipes/train.py --config recipes/quickstart.yaml
    accelerate launch --config_file recipes/accelerate_configs/multi_process.yaml recipes/train.py \
        --config recipes/quickstart.yaml

The same as `trl-moe-grpo train --config recipes/quickstart.yaml`; `trl_moe_grpo.scripts.grpo` documents the recipe's
keys (`--help` lists them).
"""

from trl_moe_grpo import MoEGRPOError
from trl_moe_grpo.scripts.grpo import main, make_parser

if __name__ == "__main__":
    parser = make_parser()
    try:
        script_args, training_args, model_args = parser.parse_args_and_config()
        main(script_args, training_args, model_args)
    except MoEGRPOError as error:
        parser.exit(2, f"error: {error}\n")
