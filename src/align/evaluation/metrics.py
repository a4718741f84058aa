"""Small statistics helpers shared by the evaluators.

The formulas follow lm-evaluation-harness (``lm_eval.api.metrics``) on purpose, so that
numbers reported by ``align`` can be compared with lm-eval's one to one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; ``nan`` for an empty sequence (so callers need no special case)."""
    return sum(values) / len(values) if len(values) else math.nan


def sample_stddev(values: Sequence[float]) -> float:
    """Sample standard deviation (Bessel-corrected, ``n - 1``), as lm-eval's ``sample_stddev``."""
    n = len(values)
    if n < 2:
        return math.nan
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1))


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean, ``sample_stddev / sqrt(n)`` (lm-eval ``mean_stderr``).

    For 0/1 accuracies this equals ``sqrt(p * (1 - p) / (n - 1))``.
    """
    return sample_stddev(values) / math.sqrt(len(values)) if len(values) >= 2 else math.nan


def weighted_mean(values: Sequence[float], sizes: Sequence[int]) -> float:
    """Mean of group scores weighted by group size (lm-eval ``weight_by_size: true``)."""
    if len(values) != len(sizes):
        raise ValueError(f"got {len(values)} values but {len(sizes)} sizes")
    total = sum(sizes)
    return sum(v * s for v, s in zip(values, sizes, strict=True)) / total if total else math.nan


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """Stderr of a size-weighted group score, lm-eval's ``pooled_sample_stderr``.

    ``sqrt(sum((n_i - 1) * se_i**2 * n_i) / (N - k) / N)`` with ``N = sum(n_i)`` and ``k`` groups:
    the pooled *within-group* variance (``se_i**2 * n_i`` is group i's sample variance) over
    ``N``. It ignores the spread between group means, exactly like lm-eval does.
    """
    if len(stderrs) != len(sizes):
        raise ValueError(f"got {len(stderrs)} stderrs but {len(sizes)} sizes")
    total, k = sum(sizes), len(sizes)
    if total - k <= 0:
        return math.nan
    pooled_var = sum((n - 1) * se**2 * n for se, n in zip(stderrs, sizes, strict=True)) / (total - k)
    return math.sqrt(pooled_var / total)
