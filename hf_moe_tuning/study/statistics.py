"""Deltas between arms with paired bootstrap confidence intervals, and verdicts that can say no.

A delta is a linear expression over arms (``"t5 - moe"``, ``"(flan_moe - moe) - (flan_t5 - t5)"``).
Its value on one task is the mean over fine-tuning seeds and test items of the per-item delta
``D[s, i] = sum_a c_a * score[a, s, i]``; on the average it is the mean of the task values.

The 95 % interval is a **paired bootstrap** over both sources of noise: each replicate draws the
seeds with replacement (the same draw for every arm and task, so arms stay paired) and, per task,
the test items with replacement (the same draw for every arm and seed). Percentile interval,
``DEFAULT_REPLICATES`` replicates, fixed generator seed, so the same records give the same interval.

Verdicts follow from the interval only (never from ``|mean| <= std``):

=====================  ======================================  ==========================  ================
paper says             ``reproduced``                          the other way               otherwise
=====================  ======================================  ==========================  ================
``+`` (positive)       CI entirely above 0                     ``opposite``: CI below 0    ``inconclusive``
``-`` (negative)       CI entirely below 0                     ``opposite``: CI above 0    ``inconclusive``
``0`` (no difference)  CI entirely within ±``EQUIVALENCE`` pts  ``different``: CI excl. 0  ``inconclusive``
=====================  ======================================  ==========================  ================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: Bootstrap replicates per delta.
DEFAULT_REPLICATES = 4000
#: Half-width (points) of the equivalence margin of a "no clear difference" finding.
EQUIVALENCE = 2.0
VERDICTS = ("reproduced", "opposite", "different", "inconclusive")


@dataclass(frozen=True)
class DeltaEstimate:
    """Mean and 95 % paired-bootstrap interval of a delta, in points."""

    mean: float
    ci_low: float
    ci_high: float

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2


def verdict(paper: str, ci_low: float, ci_high: float, equivalence: float = EQUIVALENCE) -> str:
    """The verdict of a finding in direction ``paper`` (``+``, ``-`` or ``0``) given its 95 % CI."""
    if math.isnan(ci_low) or math.isnan(ci_high):
        return "inconclusive"
    if paper == "0":
        if -equivalence <= ci_low and ci_high <= equivalence:
            return "reproduced"
        return "different" if ci_low > 0 or ci_high < 0 else "inconclusive"
    if paper not in ("+", "-"):
        raise ValueError(f"unknown paper direction {paper!r}; use '+', '-' or '0'")
    sign = 1.0 if paper == "+" else -1.0
    low, high = sorted((sign * ci_low, sign * ci_high))
    if low > 0:
        return "reproduced"
    if high < 0:
        return "opposite"
    return "inconclusive"


def paired_bootstrap(
    per_task: Mapping[str, np.ndarray],
    replicates: int = DEFAULT_REPLICATES,
    seed: int = 0,
) -> dict[str, DeltaEstimate]:
    """Estimates per task and for their average (key ``"average"``).

    ``per_task[task]`` is the per-item delta in points, shape ``[seeds, items]`` (the same seeds, in the
    same order, for every task).
    """
    if not per_task:
        raise ValueError("no tasks to bootstrap")
    num_seeds = {values.shape[0] for values in per_task.values()}
    if len(num_seeds) != 1:
        raise ValueError(f"every task needs the same seeds, got seed counts {sorted(num_seeds)}")
    (n_seeds,) = num_seeds
    rng = np.random.default_rng(seed)
    seed_weights = rng.multinomial(n_seeds, [1.0 / n_seeds] * n_seeds, size=replicates) / n_seeds  # [B, S]
    out: dict[str, DeltaEstimate] = {}
    samples: list[np.ndarray] = []
    for task, values in per_task.items():
        values = np.asarray(values, dtype=np.float64)
        n_items = values.shape[1]
        item_weights = rng.multinomial(n_items, [1.0 / n_items] * n_items, size=replicates) / n_items  # [B, N]
        replicate_means = np.einsum("bs,sn,bn->b", seed_weights, values, item_weights)
        samples.append(replicate_means)
        out[task] = _estimate(values.mean(), replicate_means)
    average = np.mean(samples, axis=0)
    out["average"] = _estimate(float(np.mean([v.mean() for v in per_task.values()])), average)
    return out


def _estimate(mean: float, replicate_means: np.ndarray) -> DeltaEstimate:
    low, high = np.percentile(replicate_means, [2.5, 97.5])
    return DeltaEstimate(float(mean), float(low), float(high))


def delta_items(
    coefficients: Mapping[str, float], items: Mapping[str, Mapping[int, Sequence[float]]], seeds: Sequence[int]
) -> np.ndarray:
    """Per-item delta ``[seeds, items]`` in points from ``items[arm][seed]`` (per-item scores in [0, 1])."""
    total: np.ndarray | None = None
    for arm, coef in coefficients.items():
        try:
            rows = np.array([items[arm][seed] for seed in seeds], dtype=np.float64)
        except KeyError as err:
            raise KeyError(f"no per-item scores for arm {arm!r}, seed {err}") from None
        total = coef * rows if total is None else total + coef * rows
    if total is None:
        raise ValueError("a delta needs at least one arm")
    return 100.0 * total
