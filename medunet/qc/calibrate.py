"""Choose the review threshold from predictions whose true Dice is known (cross-validation's out-of-fold cases).

A case is *bad* when its mean Dice is below the run's median minus :data:`BAD_MARGIN`. The score
threshold is the one that best separates bad from good cases (largest true-positive rate minus
false-positive rate, Youden's J); with no bad case it is lowered until no good case falls under it.
How well the score ranks cases (Spearman against Dice, AUROC for "bad") and the flag's trade-off
(bad and good cases flagged) are stored with the thresholds, so users see what the model achieved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from scipy import stats

from medunet.qc.decide import Thresholds

#: A case is bad below (median Dice of the run - BAD_MARGIN).
BAD_MARGIN = 0.1


def spearman(scores: Sequence[float], dice: Sequence[float]) -> float:
    """Spearman rank correlation of QC scores with true Dice (NaN when either is constant or under 3 cases)."""
    if len(scores) < 3 or np.ptp(scores) == 0 or np.ptp(dice) == 0:
        return float("nan")
    return float(stats.spearmanr(scores, dice).statistic)


def auroc(scores: Sequence[float], bad: Sequence[bool] | np.ndarray) -> float:
    """Probability that a bad case scores lower than a good one (ties count half); NaN without both kinds."""
    scores_a, bad_a = np.asarray(scores, dtype=float), np.asarray(bad, dtype=bool)
    low, high = scores_a[bad_a], scores_a[~bad_a]
    if low.size == 0 or high.size == 0:
        return float("nan")
    wins = (low[:, None] < high[None, :]).sum() + 0.5 * (low[:, None] == high[None, :]).sum()
    return float(wins / (low.size * high.size))


def bad_cases(dice: Sequence[float]) -> tuple[np.ndarray, float]:
    """Which cases are bad, and the Dice below which a case is (median - :data:`BAD_MARGIN`)."""
    values = np.asarray(dice, dtype=float)
    cut = float(np.median(values)) - BAD_MARGIN
    return values < cut, cut


def choose_score_threshold(scores: Sequence[float], bad: Sequence[bool] | np.ndarray, default: float) -> float:
    """The score threshold with the best Youden's J; without bad cases, ``default`` lowered under every case's score."""
    s, b = np.asarray(scores, dtype=float), np.asarray(bad, dtype=bool)
    if not b.any() or b.all():
        return float(min(default, s.min() - 1e-3)) if s.size else default
    candidates = np.unique(np.concatenate([s, [s.min() - 1e-3, s.max() + 1e-3]]))
    best, best_j = default, -np.inf
    for threshold in candidates:
        flagged = s < threshold
        j = flagged[b].mean() - flagged[~b].mean()
        if j > best_j + 1e-12:
            best, best_j = float(threshold), j
    return best


def trade_off(records: Sequence[dict[str, Any]], dice: Sequence[float], score_review: float) -> dict[str, Any]:
    """What a review threshold achieves on cases of known Dice: ranking quality and who gets flagged."""
    scores = [float(r["score"]) for r in records]
    bad, cut = bad_cases(dice)
    flagged = np.array([bool(r["signals"].get("fired")) or s < score_review for r, s in zip(records, scores)])
    return {
        "cases": len(scores),
        "bad_dice_below": round(cut, 4),
        "bad_cases": int(bad.sum()),
        "bad_flagged": int((flagged & bad).sum()),
        "good_flagged": int((flagged & ~bad).sum()),
        "spearman": _finite(spearman(scores, dice)),
        "auroc": _finite(auroc(scores, bad)),
    }


def _finite(value: float) -> float | None:
    """``value`` rounded, or None (JSON null) when undefined."""
    return None if value != value else round(value, 4)


def calibrate(records: Sequence[dict[str, Any]], dice: Sequence[float], base: Thresholds | None = None) -> Thresholds:
    """Thresholds whose review cut-off is fitted to these QC records and their cases' true mean Dice."""
    base = base or Thresholds()
    if len(records) != len(dice) or not records:
        raise ValueError(f"need one Dice per QC record, got {len(records)} records and {len(dice)} Dice values")
    scores = [float(r["score"]) for r in records]
    bad, _ = bad_cases(dice)
    threshold = round(choose_score_threshold(scores, bad, base.score_review), 4)
    achieved = trade_off(records, dice, threshold)
    return replace(base, score_review=threshold, source=f"calibrated on {len(records)} out-of-fold cases", achieved=achieved)
