"""Mutation check: do the tests see the method's wiring?

Each mutation below breaks one piece of MoE-GRPO's wiring the way a plausible bug would (the gate advantage's sign,
the modality masks in the gate loss, the old gate log-probs of reused generations, replay on one layer, the trace's
alignment, the set probability's gradient, the trainer options' effects). For each, the script copies the package and
the tests to a temporary folder, applies the mutation to the copy, runs the tests named for it there (the copy first
on `PYTHONPATH`, and the working folder, so the mutated package is the one imported) and counts the mutation as caught
when at least one of them fails. It exits non-zero unless every mutation is caught, after checking that the same tests
pass on the unmutated copy.

Each mutation finds its place by a small code anchor that must occur exactly once in its file: when a refactor moves
or rewrites that code the script stops with "anchor not found: update the mutation" instead of silently testing
nothing. `tests/test_mutation_check.py` checks every anchor and every named test against the current source, so a
refactor that invalidates the script fails the test suite.

    python scripts/mutation_check.py            # every mutation (a few minutes on 2 CPU cores)
    python scripts/mutation_check.py --only sign-of-gate-advantage --only trace-shifted
    python scripts/mutation_check.py --list
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GATE = "tests/test_gate_grpo.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    anchor: str  # must occur exactly once in `file`
    replacement: str
    tests: tuple[str, ...]  # pytest node ids, at least one of which must fail on the mutated copy
    why: str


MUTATIONS = (
    Mutation(
        "sign-of-gate-advantage",
        "trl_moe_grpo/trainer/grpo_trainer.py",
        'inputs["advantages"].reshape(-1, 1, 1),\n',
        '-inputs["advantages"].reshape(-1, 1, 1),\n',
        (
            f"{GATE}::test_off_policy_gate_loss_equals_the_reference",
            f"{GATE}::test_a_gate_only_step_raises_the_advantage_weighted_set_log_probs",
            f"{GATE}::test_off_policy_gate_gradient_matches_finite_differences",
        ),
        "Gate-GRPO pushes the chosen sets' probabilities against their advantages",
    ),
    Mutation(
        "gate-loss-ignores-modality-masks",
        "trl_moe_grpo/trainer/grpo_trainer.py",
        "if modality is None or masks is None or",
        "if True or modality is None or masks is None or",
        (f"{GATE}::test_masked_selection_law", f"{GATE}::test_off_policy_gate_loss_equals_the_reference"),
        "the gate loss scores the sets under the unmasked law although rollouts drew them under the mask",
    ),
    Mutation(
        "old-gate-logps-ignored-when-reused",
        "trl_moe_grpo/trainer/grpo_trainer.py",
        'old_gate_logps = inputs.get("old_gate_logps", gate_logps.detach())',
        "old_gate_logps = gate_logps.detach()",
        (
            f"{GATE}::test_off_policy_gate_loss_equals_the_reference",
            f"{GATE}::test_off_policy_gate_gradient_matches_finite_differences",
        ),
        "reused generations train on-policy ratios of 1 (no importance ratio, no clipping)",
    ),
    Mutation(
        "replay-skipped-on-layer-0",
        "trl_moe_grpo/routing/controller.py",
        "        if self._dispatch_recorded:\n",
        "        if self._dispatch_recorded and layer != 0:\n",
        (
            f"{GATE}::test_routing_replay",
            "tests/test_controller.py::test_replay_reproduces_sampled_logits",
            "tests/test_traces.py::test_replay_reproduces_generation_log_probs",
        ),
        "the first MoE layer's experts get the live top-K in training forwards, not the rollout's sets",
    ),
    Mutation(
        "trace-shifted-by-one-position",
        "trl_moe_grpo/routing/traces.py",
        "completion[:routed] = decoded[row, :routed]",
        "completion[:routed] = decoded[row, :routed].roll(1, 0)",
        (
            "tests/test_traces.py::test_replay_reproduces_generation_log_probs",
            "tests/test_traces.py::test_replay_with_completions_cut_at_eos",
        ),
        "each completion token replays the route of its neighbour",
    ),
    Mutation(
        "set-probability-gradient-wrong",
        "trl_moe_grpo/losses.py",
        "terms.append(chosen[..., j] - remaining[drawn])",
        "terms.append(chosen[..., j] - remaining[drawn].detach())",
        (
            "tests/test_sampling.py::test_set_log_prob_value_and_gradient_match_a_float64_reference",
            f"{GATE}::test_off_policy_gate_gradient_matches_finite_differences",
        ),
        "the set probability keeps its value but loses the normalizers' gradient",
    ),
    Mutation(
        "gate-loss-positions-ignored",
        "trl_moe_grpo/trainer/grpo_trainer.py",
        'if self.args.gate_loss_positions == "completion":',
        "if False:",
        (f"{GATE}::test_gate_loss_positions", f"{GATE}::test_off_policy_gate_loss_equals_the_reference"),
        'gate_loss_positions="completion" still trains the prompt\'s routing',
    ),
    Mutation(
        "gate-set-logprob-ignored",
        "trl_moe_grpo/trainer/grpo_trainer.py",
        "set_log_prob(log_probs, recorded, self.args.gate_set_logprob)",
        "set_log_prob(log_probs, recorded)",
        (f"{GATE}::test_off_policy_gate_loss_equals_the_reference",),
        'gate_set_logprob="ordered" still scores the unordered set',
    ),
    Mutation(
        "noise-rollouts-sample-instead",
        "trl_moe_grpo/routing/controller.py",
        "indices = noisy_top_k(log_probs, self.top_k, self.noise_std)",
        "indices = gumbel_top_k(log_probs, self.top_k)",
        (f"{GATE}::test_noise_rollouts_are_noisy_top_k",),
        'rollout_routing="noise" draws Gumbel-top-K sets, whatever routing_noise_std says',
    ),
    Mutation(
        "routing-replay-option-ignored",
        "trl_moe_grpo/trainer/replay_state.py",
        "dispatch_recorded=args.routing_replay,",
        "dispatch_recorded=True,",
        (f"{GATE}::test_routing_replay", f"{GATE}::test_off_policy_gate_loss_equals_the_reference"),
        "routing_replay=False still replays",
    ),
)


def find_anchor(mutation: Mutation, root: Path = ROOT) -> str:
    """The text of `mutation.file`, after checking that its anchor occurs exactly once."""
    path = root / mutation.file
    if not path.is_file():
        raise SystemExit(f"[{mutation.name}] {mutation.file} does not exist: anchor not found: update the mutation.")
    text = path.read_text()
    count = text.count(mutation.anchor)
    if count != 1:
        found = "anchor not found" if count == 0 else f"anchor found {count} times"
        raise SystemExit(f"[{mutation.name}] {found} in {mutation.file}: {mutation.anchor!r}: update the mutation.")
    return text


def missing_tests(mutation: Mutation, root: Path = ROOT) -> list[str]:
    """Named tests whose file or function does not exist (parametrized ids are not checked)."""
    missing = []
    for node in mutation.tests:
        file, _, function = node.partition("::")
        path = root / file
        if not path.is_file() or not re.search(rf"^def {re.escape(function)}\(", path.read_text(), re.MULTILINE):
            missing.append(node)
    return missing


def check_all(root: Path = ROOT) -> None:
    """Every anchor occurs once and every named test exists; raise `SystemExit` naming the first that does not."""
    for mutation in MUTATIONS:
        find_anchor(mutation, root)
        missing = missing_tests(mutation, root)
        if missing:
            raise SystemExit(f"[{mutation.name}] named tests not found: {missing}: update the mutation.")


def make_copy(workdir: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("trl_moe_grpo", "tests"):
        shutil.copytree(ROOT / folder, workdir / folder, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", workdir / "pyproject.toml")


def run_tests(workdir: Path, tests: tuple[str, ...]) -> tuple[int, list[str], str]:
    """`(pytest exit code, failed node ids, output tail)` for `tests` run against the copy in `workdir`."""
    env = {**os.environ, "PYTHONPATH": str(workdir), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    lines = result.stdout.splitlines()
    failed = sorted({line.split()[1].split("[")[0] for line in lines if line.startswith("FAILED")})
    return result.returncode, failed, (result.stdout + result.stderr)[-3000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", help="run only this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    args = parser.parse_args(argv)
    mutations = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(mutations) != len(set(args.only)):
        raise SystemExit(f"Unknown mutation in {args.only}; known: {[m.name for m in MUTATIONS]}")
    if args.list:
        for m in mutations:
            print(f"{m.name}: {m.why}\n  {m.file}: {m.anchor.strip()!r} -> {m.replacement.strip()!r}")
            print("".join(f"  - {t}\n" for t in m.tests), end="")
        return 0
    check_all()

    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        workdir = Path(tmp)
        make_copy(workdir)
        probe = subprocess.run(
            [sys.executable, "-c", "import trl_moe_grpo; print(trl_moe_grpo.__file__)"],
            cwd=workdir, env={**os.environ, "PYTHONPATH": str(workdir)}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        if not Path(probe.stdout.strip()).resolve().is_relative_to(workdir.resolve()):
            imported = probe.stdout.strip()
            raise SystemExit(f"The copy is not the package imported ({imported}): nothing would be tested.")

        every_test = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
        start = time.time()
        code, failed, tail = run_tests(workdir, every_test)
        if code != 0:
            print(tail)
            raise SystemExit(f"The named tests fail on the unmutated copy ({failed}): fix them before mutating.")
        print(f"unmutated copy: {len(every_test)} named tests pass ({time.time() - start:.0f} s)")

        survivors = []
        for m in mutations:
            original = find_anchor(m, workdir)
            target = workdir / m.file
            target.write_text(original.replace(m.anchor, m.replacement))
            start = time.time()
            try:
                code, failed, tail = run_tests(workdir, m.tests)
            finally:
                target.write_text(original)
            seconds = time.time() - start
            if code == 1 and failed:
                print(f"caught   {m.name} ({seconds:.0f} s) by {len(failed)}/{len(m.tests)}: {', '.join(failed)}")
            else:
                survivors.append(m.name)
                outcome = "every named test passes" if code == 0 else f"pytest exit code {code}"
                print(f"SURVIVED {m.name} ({seconds:.0f} s): {outcome}\n{tail if code != 0 else ''}")
    if survivors:
        print(f"{len(survivors)} of {len(mutations)} mutations survived: {', '.join(survivors)}")
        return 1
    print(f"all {len(mutations)} mutations caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
