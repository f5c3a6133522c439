"""Training scripts, as in TRL (`trl/scripts/`): each exposes `make_parser()` and `main(...)`, and `trl-moe-grpo train`
launches `grpo.py` through `accelerate launch`."""
