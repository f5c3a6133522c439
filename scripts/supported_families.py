"""Print the README's table of Mixture-of-Experts families: each family of the installed transformers, built tiny.

    python scripts/supported_families.py > families.md

The checks are those of `tests/test_families.py` (`trl_moe_grpo.testing.families.check_family`).
"""

from __future__ import annotations

import argparse
import warnings

import transformers

from trl_moe_grpo.testing.families import check_family, moe_model_types


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="model types to check (default: every MoE family)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    types = args.model_types or moe_model_types()
    checks = [check_family(t) for t in types]
    print(f"| family | model class | router rule | replay (transformers {transformers.__version__}, fp32) |")
    print("|---|---|---|---|")
    for c in checks:
        if c.status == "replays":
            result = (
                f"exact: {c.replay_error:.1e} (stock top-K {c.stock_replay_error:.1e}, control {c.control_gap:.2f})"
            )
        elif c.status == "failed":
            result = f"**fails**: replay {c.replay_error:.1e} {c.detail}"
        elif c.status == "refused":
            result = "refused: " + c.detail.split(": ", 1)[-1][:160]
        else:
            result = "not built tiny: " + c.detail[:120]
        print(f"| `{c.model_type}` | `{c.model_class}` | {_cell(c.rule.replace('Adapter', ''))} | {_cell(result)} |")
    counts = {s: sum(c.status == s for c in checks) for s in ("replays", "refused", "failed", "not built")}
    print()
    print(
        f"{len(checks)} families: {counts['replays']} replay exactly, {counts['refused']} refused with a reason, "
        f"{counts['failed']} fail a check, {counts['not built']} not built tiny by the test."
    )


if __name__ == "__main__":
    main()
