"""The statistics of the benchmark tables, written once: spread over seeds, paired differences, their verdicts.

Conventions (every table uses them):

- the spread over seeds is the sample standard deviation (`n - 1` in the denominator);
- a paired difference compares two arms seed by seed (`a - b` on the same seed): its standard error (SE) is the
  standard deviation of the differences over `sqrt(n)`;
- with **one seed** neither a standard deviation nor an SE exists: both are `nan` (not 0.0, which would claim an
  exact result), shown as "n/a", and a comparison gets no verdict;
- a difference counts only where it exceeds twice its SE;
- timings are summarized by their median and their range (min-max) over repeats.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

NO_VERDICT = "one seed: no verdict"
WITHIN_NOISE = "no difference (within 2 SE)"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation; the std of a single value is `nan`."""
    if not values:
        raise ValueError("mean_std of no values")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of `values` (`nan` for a single value)."""
    return mean_std(values)[1] / math.sqrt(len(values))


def verdict(difference: float, se: float) -> str:
    """ "higher" or "lower" where `|difference| > 2 SE`, else that it is within noise; no verdict without an SE."""
    if not math.isfinite(se):
        return NO_VERDICT
    if abs(difference) <= 2 * se:
        return WITHIN_NOISE
    return "higher" if difference > 0 else "lower"


@dataclass
class PairedDifference:
    """`a - b` seed by seed: the mean difference, its SE and the verdict."""

    mean: float
    se: float
    per_seed: list[float] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return verdict(self.mean, self.se)

    def to_json(self) -> dict:
        return {"mean": self.mean, "se": self.se, "verdict": self.verdict, "per_seed": self.per_seed}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """The paired difference of two arms' per-seed values (same seeds, same order)."""
    differences = [x - y for x, y in zip(a, b, strict=True)]
    return PairedDifference(statistics.fmean(differences), standard_error(differences), differences)


def format_spread(value: float, digits: int, sign: bool = False) -> str:
    """`value` with `digits` decimals (and a sign with `sign`); "n/a" for nan."""
    if math.isnan(value):
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def mean_pm(mean: float, spread: float, digits: int, sign: bool = False) -> str:
    """ "mean ± spread" (an std or an SE), with "n/a" for a spread that does not exist (one seed)."""
    return f"{format_spread(mean, digits, sign)} ± {format_spread(spread, digits)}"


def median_range(values: Sequence[float], digits: int = 3) -> str:
    """ "median (min-max)" of repeated timings or ratios."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"
