"""Fit QC to the model it judges, from predictions whose true Dice is known.

``medunet train`` calibrates on the run's validation cases, ``medunet crossval`` refines it on the
out-of-fold cases; both predict those cases through the very pipeline inference applies (ensemble,
post-processing, CRF) and call :func:`calibrate`.

* A softmax **temperature** makes the model's expected Dice match the true Dice (a short run's U-Net is
  often under-confident: expected 0.4 where it achieves 0.9; a long one over-confident).
* A case is *bad* when its Dice is below the run's median minus :data:`BAD_MARGIN`. The review
  **threshold** best separates bad from good cases (Youden's J); with no bad case it sits below
  every case's score.

How well the score ranks cases (Spearman against Dice, AUROC for "bad") and the flag's trade-off
(bad and good cases flagged) are stored with the thresholds, so users see what the model achieved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from scipy import stats

from medunet.qc.decide import QCRecord, Thresholds, decide
from medunet.qc.reference import QCReference

#: A case is bad below (median Dice of the run - BAD_MARGIN).
BAD_MARGIN = 0.1
#: Least distance between the bad-case cut and the review threshold when no calibration case is bad.
MIN_MARGIN = 0.05
#: Softmax temperatures calibration chooses from (0.05 .. 4, evenly spaced in log).
TEMPERATURES: tuple[float, ...] = tuple(round(float(t), 4) for t in np.geomspace(0.05, 4.0, 31))


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


def trade_off(records: Sequence[QCRecord], dice: Sequence[float], score_review: float) -> dict[str, Any]:
    """What a review threshold achieves on cases of known Dice: ranking quality and who gets flagged."""
    scores = [r.score for r in records]
    bad, cut = bad_cases(dice)
    flagged = np.array([bool(set(r.fired) - {"low_confidence"}) or s < score_review for r, s in zip(records, scores)])
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


def case_dice(per_class: Sequence[float]) -> float:
    """A case's true Dice for ranking and flagging: the lowest over its foreground classes (NaN, absent from both masks, left out).

    ``per_class[c - 1]`` is class ``c``'s Dice. A class the model missed counts (Dice 0): the score sees it
    through the empty-class check. A case whose classes are all absent from both masks counts as perfect.
    """
    values = [float(v) for v in per_class if v == v]
    return min(values) if values else 1.0


def mask_dice(record: QCRecord, per_class: Sequence[float]) -> float:
    """The true Dice the expected Dice estimates: the lowest over the classes the predicted mask holds.

    The expected Dice is computed for the mask's classes only (:func:`medunet.qc.signals.expected_dice`),
    so the temperature is fitted against the same classes; a class the model never predicts (Dice 0 in
    every case that has it) must not drag the temperature towards zero confidence. 1 when the mask holds
    no foreground, as ``expected_dice_min`` is.
    """
    curve = record.signals.get("uncertainty", {}).get("expected_dice_curve") or [{}]
    values = [float(per_class[int(c) - 1]) for c in curve[0] if per_class[int(c) - 1] == per_class[int(c) - 1]]
    return min(values) if values else 1.0


def at_temperature(record: QCRecord, index: int) -> dict[str, Any]:
    """``record``'s signals with the expected Dice read at ``TEMPERATURES[index]`` (from its ``expected_dice_curve``)."""
    uncertainty = dict(record.signals.get("uncertainty", {}))
    curve = uncertainty.get("expected_dice_curve")
    if not curve:
        raise ValueError("calibration needs QC records made with calibration=True (an expected_dice_curve)")
    expected = curve[index]
    uncertainty.update(expected_dice=expected, expected_dice_min=min(expected.values()) if expected else 1.0,
                       temperature=TEMPERATURES[index])
    uncertainty.pop("expected_dice_curve")
    return {**record.signals, "uncertainty": uncertainty}


def fit_temperature(records: Sequence[QCRecord], targets: Sequence[float]) -> int:
    """Index in :data:`TEMPERATURES` whose expected Dice is closest (least squares) to ``targets`` (:func:`mask_dice`).

    Cases where an input or mask check fired are left out (their score is damped for another reason),
    unless every case has one.
    """
    clean = [i for i, r in enumerate(records) if not set(r.fired) - {"low_confidence"}] or list(range(len(records)))
    errors = []
    for index in range(len(TEMPERATURES)):
        predicted = [at_temperature(records[i], index)["uncertainty"]["expected_dice_min"] for i in clean]
        errors.append(float(np.mean((np.asarray(predicted) - np.asarray([targets[i] for i in clean])) ** 2)))
    return int(np.argmin(errors))


def calibrate(records: Sequence[QCRecord], per_class_dice: Sequence[Sequence[float]], *, reference: QCReference | None, class_names: Sequence[str],
              source: str, base: Thresholds | None = None) -> Thresholds:
    """Temperature and review threshold fitted to these QC records (made with ``calibration=True``) and their cases' true Dice.

    1. The temperature makes the expected Dice match the true Dice of the mask's classes (:func:`fit_temperature`,
       :func:`mask_dice`);
    2. the records are scored again at it (:func:`~medunet.qc.decide.decide`, same checks);
    3. the review threshold separates bad cases from good ones (:func:`choose_score_threshold`); with no bad
       case it is the bad-case cut (median Dice - :data:`BAD_MARGIN`) less the fit's error (at least
       :data:`MIN_MARGIN`), lowered below every case's score, and it stays within [0.05, 0.95].
       A case bad only through a class its mask lacks, with no check firing, is left out of this
       choice (``achieved["bad_unseen"]`` counts them): the score cannot see such a miss, and
       separating it from good cases by chance spread of the score flags good cases later.

    Bad cases, the threshold and the ranking use each case's :func:`case_dice`, missed classes included.

    ``per_class_dice``: per case, its true Dice per foreground class (entry ``c - 1`` for class ``c``).
    """
    base = base or Thresholds()
    if len(records) != len(per_class_dice) or not records:
        raise ValueError(f"need one Dice per QC record, got {len(records)} records and {len(per_class_dice)} Dice values")
    dice = [case_dice(d) for d in per_class_dice]
    targets = np.asarray([mask_dice(r, d) for r, d in zip(records, per_class_dice)])
    before = [r.score for r in records]
    index = fit_temperature(records, targets.tolist())
    temperature = TEMPERATURES[index]
    fitted = replace(base, temperature=temperature)
    rescored = [decide(at_temperature(r, index), reference, class_names, fitted) for r in records]
    scores = np.asarray([r.score for r in rescored])
    bad, cut = bad_cases(dice)
    clean = np.asarray([not set(r.fired) - {"low_confidence"} for r in rescored])
    residual = scores[clean] - targets[clean] if clean.any() else np.zeros(1)
    margin = max(MIN_MARGIN, 2.0 * float(np.sqrt(np.mean(residual ** 2))))
    unseen = bad & (targets >= cut) & clean  # bad only through a class the mask lacks, and no check fired
    seen = ~unseen
    threshold = choose_score_threshold(scores[seen].tolist(), bad[seen], cut - margin)
    threshold = round(float(np.clip(threshold, 0.05, 0.95)), 4)
    achieved = trade_off(rescored, dice, threshold) | {
        "bad_unseen": int(unseen.sum()),
        "temperature": temperature,
        "mean_abs_error_uncalibrated": round(float(np.mean(np.abs(np.asarray(before) - targets))), 4),
        "mean_abs_error": round(float(np.mean(np.abs(scores - targets))), 4),
        "spearman_uncalibrated": _finite(spearman(before, dice)),
    }
    return replace(fitted, score_review=threshold, source=f"calibrated on {len(records)} {source}", achieved=achieved)
