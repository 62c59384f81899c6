"""Combine the QC signals of one prediction into a flag, a score and reasons a person can act on.

Each check compares one signal with the training reference and returns an *excess* (0 while the
signal lies within the training range widened by its tolerance) and, when it fires, a reason. The
score is the model's own expected Dice (:func:`~medunet.qc.signals.uncertainty_signals`) damped by
``exp(-excess)`` for every check that fired; the flag is ``review`` when a check fired or the score
is below :attr:`Thresholds.score_review` (learnt from out-of-fold predictions by
:func:`medunet.qc.calibrate.calibrate`, else the default). Reasons carry class names and numbers,
never a case name or anything read from a file header.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medunet.errors import DataError
from medunet.io.atomic import atomic_write_text
from medunet.qc.reference import QCReference

_AXES = "RAS"


@dataclass(frozen=True)
class Thresholds:
    """Where each check fires (documented in docs/quality-control.md)."""

    score_review: float = 0.5
    """Flag for review below this score (the model's calibrated expected Dice, damped by fired checks)."""
    temperature: float = 1.0
    """Softmax temperature applied to the probabilities before the expected Dice is read (fitted so that the
    expected Dice matches the true Dice of the calibration cases; 1 = uncalibrated)."""
    spacing_factor: float = 1.5
    """Voxel spacing may lie this factor outside the training range per axis."""
    extent_factor: float = 1.5
    """Field of view (mm per axis) may lie this factor outside the training range."""
    border_margin: float = 0.2
    """Share of a border face inside the body may exceed the training maximum by this much."""
    range_tolerance: float = 1.0
    """Whole-volume intensity range may leave the training range by this many training body spreads (p95 - p5)."""
    intensity_tolerance: float = 0.5
    """Body intensity quantiles may leave the training range by this many training body spreads."""
    noise_factor: float = 2.5
    """Noise may exceed the training maximum by this factor."""
    volume_factor: float = 2.0
    """A class volume may lie this factor outside the training range."""
    empty_present: float = 0.95
    """An empty class is flagged when at least this share of training cases contain it."""
    border_rare: float = 0.1
    """A mask touching the volume border is flagged when fewer training masks of its class did."""
    member_dice: float = 0.8
    """Flag when an ensemble member's foreground agrees with the ensemble below this Dice."""
    source: str = "defaults"
    """Where the values come from (defaults, or the out-of-fold cases they were calibrated on)."""
    achieved: dict[str, Any] = field(default_factory=dict)
    """The trade-off measured when calibrating (cases, bad cases, flagged, Spearman, AUROC)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """Which calibration this is, in words (it goes into every QC record)."""
        if self.source == "defaults":
            return "defaults (uncalibrated: review below 0.5, temperature 1)"
        return f"{self.source}: review below {self.score_review:.3g}, temperature {self.temperature:.3g}"

    @classmethod
    def from_json(cls, raw: dict[str, Any], *, source: str = "QC thresholds") -> Thresholds:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DataError(f"unknown QC threshold(s) {unknown}; known: {sorted(known)}", path=source)
        return cls(**raw)


def save_thresholds(thresholds: Thresholds, path: Path) -> Path:
    """Write thresholds as JSON, atomically."""
    atomic_write_text(Path(path), json.dumps(thresholds.to_json(), indent=2) + "\n")
    return Path(path)


def load_thresholds(path: Path) -> Thresholds:
    """Read :func:`save_thresholds`' file.

    Raises:
        DataError: unreadable JSON or unknown keys.
    """
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the QC thresholds ({exc}); delete the file to use the defaults", path=str(path)) from exc
    if not isinstance(raw, dict):
        raise DataError("QC thresholds must be a JSON object; delete the file to use the defaults", path=str(path))
    return Thresholds.from_json(raw, source=str(path))


@dataclass(frozen=True)
class Finding:
    """One check that fired: how far outside its tolerance (>= 0) and why, in words."""

    check: str
    excess: float
    reason: str


def _outside(value: float, low: float, high: float, factor: float) -> float:
    """How many ``factor`` steps (in log) ``value`` lies outside ``[low / factor, high * factor]``; 0 inside."""
    if value <= 0 or low <= 0:
        return 0.0 if value >= low / factor else 1.0
    step = math.log(factor)
    return max(0.0, math.log(low / factor / value) / step, math.log(value / (high * factor)) / step)


def _beyond(value: float, low: float, high: float, scale: float, tolerance: float) -> float:
    """Distance of ``value`` outside ``[low, high]`` in ``scale`` units, less ``tolerance``; 0 when within it."""
    scale = max(scale, 1e-6)
    return max(0.0, (low - value) / scale - tolerance, (value - high) / scale - tolerance)


def input_findings(signals: dict[str, Any], ref: QCReference, t: Thresholds) -> list[Finding]:
    """Checks of the input image against the training reference: channels, spacing, field of view, intensities, noise."""
    found: list[Finding] = []
    if signals["constant"]:
        value = signals["intensity"][0]["range"][0]
        return [Finding("constant", 5.0, f"the image is constant (every voxel {value:g}): an empty or failed export")]
    if signals["channels"] != ref.channels:
        found.append(Finding("channels", 5.0, f"{signals['channels']} input channel(s), the model was trained on {ref.channels}"))
    for axis in range(3):
        lo, hi = ref.spacing_mm.min[axis], ref.spacing_mm.max[axis]
        value = signals["spacing_mm"][axis]
        if (e := _outside(value, lo, hi, t.spacing_factor)) > 0:
            found.append(Finding("spacing", e, f"voxel spacing {value:.3g} mm along {_AXES[axis]}, training {lo:.3g}-{hi:.3g} mm"))
        lo, hi = ref.extent_mm.min[axis], ref.extent_mm.max[axis]
        value = signals["extent_mm"][axis]
        if (e := _outside(value, lo, hi, t.extent_factor)) > 0:
            kind = "smaller: part of the body may be cut off" if value < lo else "larger: another body region?"
            found.append(Finding("field_of_view", e, f"field of view {value:.0f} mm along {_AXES[axis]}, training {lo:.0f}-{hi:.0f} mm ({kind})"))
        limit = ref.body_at_border.max[axis] + t.border_margin
        value = signals["body_at_border"][axis]
        if value > limit:
            found.append(Finding("body_cut", (value - limit) / t.border_margin,
                                 f"body cut by the field of view along {_AXES[axis]} ({value:.0%} of a border face is body, "
                                 f"at most {ref.body_at_border.max[axis]:.0%} in training)"))
    found += _intensity_findings(signals, ref, t)
    return found


def _intensity_findings(signals: dict[str, Any], ref: QCReference, t: Thresholds) -> list[Finding]:
    found: list[Finding] = []
    unit = "HU" if ref.ct else ""
    for c, (own, train) in enumerate(zip(signals["intensity"], ref.intensity)):
        name = f"channel {c}: " if ref.channels > 1 else ""
        spread = train.body_spread
        excess = max(_beyond(v, lo, hi, spread, t.range_tolerance) for v, lo, hi in
                     zip(own["range"], train.range.min, train.range.max))
        if excess > 0:
            lo, hi = train.range.min, train.range.max
            found.append(Finding("units", excess, f"{name}intensity range {own['range'][0]:.4g}..{own['range'][1]:.4g}{unit}, "
                                 f"training {lo[0]:.4g}..{hi[1]:.4g}{unit}: wrong units or rescaled image?"))
        quantiles = train.body_quantiles
        excess = max(_beyond(v, lo, hi, spread, t.intensity_tolerance) for v, lo, hi in
                     zip(own["body_quantiles"], quantiles.min, quantiles.max))
        if excess > 0:
            median, lo, hi = own["body_quantiles"][2], quantiles.min[2], quantiles.max[2]
            found.append(Finding("contrast", excess, f"{name}intensities inside the body unlike training (median {median:.4g}{unit}, "
                                 f"training {lo:.4g}..{hi:.4g}{unit}): another modality, contrast phase or body part?"))
        limit = train.noise.max * t.noise_factor
        if own["noise"] > limit > 0:
            found.append(Finding("noise", math.log(own["noise"] / limit) / math.log(t.noise_factor) + 0.5,
                                 f"{name}image noise {own['noise']:.3g}{unit}, training at most {train.noise.max:.3g}{unit}: "
                                 "heavy noise or a low-dose series?"))
    return found


def mask_findings(signals: dict[str, Any], ref: QCReference, class_names: Sequence[str], t: Thresholds) -> list[Finding]:
    """Anatomical plausibility of the mask against the training labels: empty classes, volumes, fragments, border contact."""
    found: list[Finding] = []
    for key, own in signals.items():
        train = ref.classes.get(key)
        if train is None:
            continue
        name = class_names[int(key)] if int(key) < len(class_names) else key
        if own["volume_ml"] == 0:
            if train.present >= t.empty_present:
                found.append(Finding("empty_class", 2.0, f"{name}: predicted empty, present in {train.present:.0%} of training "
                                     "cases (another body part or a failed segmentation?)"))
            continue
        volume = train.volume_ml
        if volume and (e := _outside(own["volume_ml"], volume.min, volume.max, t.volume_factor)) > 0:
            found.append(Finding("volume", e, f"{name}: predicted volume {own['volume_ml']:.4g} mL, training "
                                 f"{volume.min:.4g}-{volume.max:.4g} mL (implausible anatomy: another body part or truncated?)"))
        allowed = max(2 * train.components_max, train.components_max + 2)
        if own["components"] > allowed:
            found.append(Finding("fragments", math.log(own["components"] / allowed) + 0.5, f"{name}: {own['components']} separate "
                                 f"pieces, at most {train.components_max} in training (fragmented mask)"))
        if own["touches_border"] and train.touches_border < t.border_rare:
            found.append(Finding("mask_at_border", 1.0, f"{name}: mask touches the volume border, as {train.touches_border:.0%} "
                                 "of training masks do (truncated field of view?)"))
    return found


def uncertainty_findings(signals: dict[str, Any], t: Thresholds) -> list[Finding]:
    """Disagreement between ensemble members (the score already carries the model's expected Dice)."""
    agreement = signals.get("member_dice")
    if agreement is not None and agreement < t.member_dice:
        return [Finding("ensemble_disagreement", (t.member_dice - agreement) / max(t.member_dice, 1e-6) * 4,
                        f"the folds of the ensemble disagree (foreground Dice {agreement:.2f} between a fold and the ensemble)")]
    return []


@dataclass(frozen=True)
class QCRecord:
    """The QC verdict on one prediction (its JSON form is the ``"qc"`` entry of ``inference_report.json``)."""

    flag: str
    """``ok`` or ``review``."""
    score: float
    """The model's calibrated expected Dice, damped by every check that fired (0..1)."""
    reasons: list[str]
    """One sentence per problem, with class names and numbers (never a case name or a header value)."""
    fired: list[str]
    """Names of the checks that fired (``spacing``, ``noise``, ``empty_class``, ...; docs/quality-control.md)."""
    checks: str
    """``all``, or why only the uncertainty checks ran."""
    calibration: str
    """Which calibration applied: the thresholds' and temperature's source (defaults, validation or out-of-fold cases)."""
    signals: dict[str, Any]
    """The measurements: ``input``, ``uncertainty`` and ``mask`` (:mod:`medunet.qc.signals`)."""

    @property
    def review(self) -> bool:
        return self.flag == "review"

    def to_json(self) -> dict[str, Any]:
        return {"flag": self.flag, "score": self.score, "reasons": list(self.reasons), "fired": list(self.fired),
                "checks": self.checks, "calibration": self.calibration, "signals": self.signals}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> QCRecord:
        return cls(flag=str(raw["flag"]), score=float(raw["score"]), reasons=list(raw["reasons"]), fired=list(raw.get("fired", [])),
                   checks=str(raw.get("checks", "")), calibration=str(raw.get("calibration", "")), signals=dict(raw.get("signals", {})))


def decide(
    signals: dict[str, Any], reference: QCReference | None, class_names: Sequence[str], thresholds: Thresholds | None = None
) -> QCRecord:
    """The QC record of one prediction.

    ``signals`` holds ``"input"``, ``"uncertainty"`` and ``"mask"`` (any may be missing). Without a
    ``reference`` only the uncertainty checks run and the record says so.
    """
    t = thresholds or Thresholds()
    findings: list[Finding] = []
    if reference is not None:
        if "input" in signals:
            findings += input_findings(signals["input"], reference, t)
        if "mask" in signals:
            findings += mask_findings(signals["mask"], reference, class_names, t)
    uncertainty = signals.get("uncertainty", {})
    findings += uncertainty_findings(uncertainty, t)
    confidence = float(uncertainty.get("expected_dice_min", 1.0))
    score = max(0.0, min(1.0, confidence * math.exp(-sum(f.excess for f in findings))))
    reasons = [f.reason for f in findings]
    if score < t.score_review and not findings:
        reasons.append(f"low model confidence: expected Dice {confidence:.2f} (review below {t.score_review:.2f})")
    elif score < t.score_review and confidence < t.score_review:
        reasons.append(f"low model confidence: expected Dice {confidence:.2f}")
    fired = sorted({f.check for f in findings} | ({"low_confidence"} if score < t.score_review and confidence < t.score_review else set()))
    checks = "all" if reference is not None else "uncertainty only: the model has no training reference (trained before QC existed)"
    return QCRecord(flag="review" if reasons else "ok", score=round(score, 4), reasons=reasons, fired=fired, checks=checks,
                    calibration=t.describe(), signals=dict(signals))
