"""The accuracy gate: is the canary, on fed-back ground truth, no worse than the champion? Pure.

Classification: Newcombe's hybrid score interval for the difference of two proportions
(Newcombe 1998, method 10: Wilson score intervals of each side, combined), read one-sided
at the declared confidence. It keeps its coverage with small counts and accuracies near
0 or 1, where the Wald z-test does not. Regression: Welch's large-sample z on the mean
absolute errors. Either way three answers: `pass` (shown not worse than the champion by
more than the margin), `fail` (shown worse by more than the margin), `hold` (too few
labels on either side, or not conclusive yet: the canary waits at its step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

from extproc.registry import AccuracyGate
from extproc.rollout.feedback import FeedbackBook, Tally
from extproc.rollout.weights import Weights

NEWCOMBE = "newcombe_hybrid_score"
WELCH = "welch_z"


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Literal["pass", "fail", "hold"]
    reason: str
    detail: dict[str, Any]


def wilson(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson's score interval for a proportion (z per side)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_difference(x1: int, n1: int, x2: int, n2: int, z: float) -> tuple[float, float]:
    """Newcombe's hybrid score bounds for p1 - p2, each bound at the one-sided level of `z`."""
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson(x1, n1, z)
    l2, u2 = wilson(x2, n2, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def _mae_difference(canary: Tally, champion: Tally, z: float) -> tuple[float, float]:
    """Bounds for MAE(canary) - MAE(champion) (positive: the canary errs more), Welch's standard error."""

    def mean_var(t: Tally) -> tuple[float, float]:
        mean = t.abs_sum / t.labelled
        return mean, max(0.0, (t.sq_sum - t.labelled * mean * mean) / (t.labelled - 1))

    (m1, v1), (m2, v2) = mean_var(canary), mean_var(champion)
    se = math.sqrt(v1 / canary.labelled + v2 / champion.labelled)
    d = m1 - m2
    return d - z * se, d + z * se


def accuracy_verdict(gate: AccuracyGate, kind: str, canary: Tally, champion: Tally) -> Verdict:
    """Judge the canary's labels against the champion's; `hold` until both have `min_labelled`."""
    z = NormalDist().inv_cdf(gate.confidence)
    detail: dict[str, Any] = {
        "canary_labelled": canary.labelled,
        "champion_labelled": champion.labelled,
        "min_labelled": gate.min_labelled,
        "margin": gate.margin,
        "confidence": gate.confidence,
    }
    if min(canary.labelled, champion.labelled) < gate.min_labelled:
        return Verdict("hold", "too_few_labels", detail)
    if kind == "classification":
        return _proportions(gate, z, canary, champion, detail)
    return _mean_errors(gate, z, canary, champion, detail)


def _proportions(gate: AccuracyGate, z: float, canary: Tally, champion: Tally, detail: dict[str, Any]) -> Verdict:
    low, high = newcombe_difference(canary.correct, canary.labelled, champion.correct, champion.labelled, z)
    detail |= {
        "test": NEWCOMBE,
        "canary_accuracy": round(canary.correct / canary.labelled, 6),
        "champion_accuracy": round(champion.correct / champion.labelled, 6),
        "difference_low": round(low, 6),
        "difference_high": round(high, 6),
    }
    if low > -gate.margin:
        return Verdict("pass", "accuracy_not_worse", detail)
    if high < -gate.margin:
        return Verdict("fail", "accuracy", detail)
    return Verdict("hold", "accuracy_inconclusive", detail)


def _mean_errors(gate: AccuracyGate, z: float, canary: Tally, champion: Tally, detail: dict[str, Any]) -> Verdict:
    low, high = _mae_difference(canary, champion, z)
    detail |= {
        "test": WELCH,
        "canary_mae": round(canary.abs_sum / canary.labelled, 6),
        "champion_mae": round(champion.abs_sum / champion.labelled, 6),
        "difference_low": round(low, 6),
        "difference_high": round(high, 6),
    }
    if high <= gate.margin:
        return Verdict("pass", "mae_not_worse", detail)
    if low > gate.margin:
        return Verdict("fail", "mae", detail)
    return Verdict("hold", "mae_inconclusive", detail)


def gate_canary(
    gate: AccuracyGate, kind: str, book: FeedbackBook, model: str, *, weights: Weights, canary: str
) -> Verdict | None:
    """The canary's labels against the champion's: the other version with the most traffic (None: no other)."""
    others = {v: w for v, w in weights.items() if v != canary}
    if not others:
        return None
    champion = max(others, key=lambda v: others[v])
    verdict = accuracy_verdict(gate, kind, book.tally(model, canary), book.tally(model, champion))
    verdict.detail["champion"] = champion
    return verdict
