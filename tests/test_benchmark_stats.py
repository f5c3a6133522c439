"""`benchmarks/stats.py`: the one statistics module of the benchmark tables (one seed: no std, no SE, no verdict)."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts import it as `stats`

import stats  # noqa: E402


def test_one_seed_has_no_spread_and_no_verdict():
    mean, std = stats.mean_std([0.5])
    assert mean == 0.5 and math.isnan(std)
    difference = stats.paired_difference([0.7], [0.5])
    assert difference.mean == pytest.approx(0.2) and math.isnan(difference.se)
    assert difference.verdict == stats.NO_VERDICT == "one seed: no verdict"
    assert stats.mean_pm(mean, std, 3) == "0.500 ± n/a"
    assert stats.mean_pm(difference.mean, difference.se, 1, sign=True) == "+0.2 ± n/a"


def test_known_values():
    assert stats.mean_std([1.0, 3.0]) == (2.0, math.sqrt(2))
    difference = stats.paired_difference([0.7, 0.8, 0.9], [0.6, 0.6, 0.6])
    assert difference.mean == pytest.approx(0.2) and difference.se == pytest.approx(0.1 / math.sqrt(3))
    assert difference.verdict == "higher"  # 0.2 > 2 * 0.0577
    assert stats.paired_difference([0.6, 0.7], [0.65, 0.6]).verdict == stats.WITHIN_NOISE
    assert stats.median_range([3.0, 1.0, 2.0]) == "2.000 (1.000-3.000)"
    with pytest.raises(ValueError):
        stats.paired_difference([1.0, 2.0], [1.0])  # seeds must pair up


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 1, allow_nan=False), st.floats(0, 1, allow_nan=False)), min_size=2, max_size=10)
)
def test_paired_difference_is_the_se_of_the_differences_and_antisymmetric(pairs):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    forward, backward = stats.paired_difference(a, b), stats.paired_difference(b, a)
    differences = [x - y for x, y in pairs]
    assert forward.se == pytest.approx(statistics.stdev(differences) / math.sqrt(len(pairs)), abs=1e-12)
    assert forward.mean == pytest.approx(-backward.mean, abs=1e-12) and forward.se == pytest.approx(backward.se)
    flipped = {"higher": "lower", "lower": "higher", stats.WITHIN_NOISE: stats.WITHIN_NOISE}
    assert backward.verdict == flipped[forward.verdict] or abs(abs(forward.mean) - 2 * forward.se) < 1e-12


def test_every_table_script_uses_it():
    """No benchmark keeps statistics of its own: the tables' functions are this module's."""
    benchmarks = Path(stats.__file__).parent
    for script in benchmarks.glob("*.py"):
        if script.name == "stats.py":
            continue
        source = script.read_text()
        for own in ("def mean_std", "def paired", "def verdict", "def spread", "statistics.stdev"):
            assert own not in source, f"{script.name} computes `{own}` itself"
    for script in ("paper_tables.py", "clip_tables.py", "step_time.py", "rollout_throughput.py", "vllm_rollout.py"):
        assert "from stats import" in (benchmarks / script).read_text(), script
