"""Commands of the `trl-moe-grpo` command line, one module each."""
