"""Calibrate a trained model's QC on cases of known truth, through the very pipeline inference applies.

``medunet train`` ends with :func:`calibrate_run` on the run's validation cases, so every run has
calibrated QC without cross-validation; ``medunet crossval`` refines it on the out-of-fold cases
(:mod:`medunet.workflows.crossval`). Each case is predicted as ``medunet infer`` would (the run's
post-processing, CRF and QC checks), its mask scored against the reference label on the input grid,
and :func:`medunet.qc.calibrate.calibrate` fits the temperature and review threshold to them.
The result is the run's ``qc.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medunet.errors import MedunetError
from medunet.evaluation import dice_per_class
from medunet.inference.segmenter import Segmenter
from medunet.io.datalist import Case, DatalistSource, load_datalist
from medunet.io.nifti import read_nifti, read_voxels
from medunet.model.layout import QC_FILE, SPLIT_FILE
from medunet.qc.calibrate import calibrate
from medunet.qc.decide import QCRecord, Thresholds, save_thresholds

log = logging.getLogger("medunet")

#: Validation cases predicted for the calibration at most (an evenly spaced subset of larger validation sets).
MAX_CASES = 64


@dataclass(frozen=True)
class KnownCase:
    """One prediction whose true Dice is known: its QC record (with the expected Dice curve) and per-class Dice."""

    name: str
    record: QCRecord
    dice: dict[str, float]


def predict_known(segmenter: Segmenter, cases: Sequence[Case], *, progress: bool, desc: str = "calibrating QC") -> list[KnownCase]:
    """Predict labelled cases with QC (and the calibration curve) and score each mask against its label."""
    known = []
    for case in tqdm(cases, desc=desc, unit="case", disable=not progress):
        if case.label is None:
            continue
        prepared = segmenter.prepare(list(case.image), case=case.name)
        prediction = segmenter.predict_case(prepared, qc=True, calibration=True)
        assert prediction.qc is not None
        reference = read_voxels(read_nifti(case.label, case=case.name), case=case.name, path=str(case.label), dtype=np.int64)
        dice = dice_per_class(prediction.labels.astype(np.int64), reference, segmenter.num_classes)
        known.append(KnownCase(case.name, prediction.qc, dict(zip(segmenter.class_names[1:], map(float, dice)))))
    return known


def fit(segmenter: Segmenter, known: Sequence[KnownCase], *, source: str) -> Thresholds:
    """The calibration of ``segmenter``'s QC fitted to ``known`` cases (its checks' other thresholds kept)."""
    base = Thresholds(**{**segmenter.qc_thresholds.to_json(), "temperature": 1.0, "source": "defaults", "achieved": {}})
    per_class = [[k.dice[name] for name in segmenter.class_names[1:]] for k in known]
    return calibrate([k.record for k in known], per_class, reference=segmenter.qc_reference,
                     class_names=segmenter.class_names, source=source, base=base)


def validation_cases(datalist_path: DatalistSource, run_dir: Path) -> list[Case]:
    """The cases a finished run validated on (its ``split.json``), at most :data:`MAX_CASES` of them."""
    datalist = load_datalist(datalist_path)
    names = set(json.loads((run_dir / SPLIT_FILE).read_text())["validation"])
    cases = [c for c in [*datalist.training, *datalist.validation] if c.name in names and c.label is not None]
    if len(cases) > MAX_CASES:
        cases = [cases[i] for i in np.linspace(0, len(cases) - 1, MAX_CASES).round().astype(int)]
    return cases


def calibrate_run(datalist_path: DatalistSource, run_dir: str | Path, *, device: str = "auto", progress: bool = True) -> Thresholds | None:
    """Fit the QC calibration of a finished run on its validation cases and save it as ``run_dir/qc.json``.

    Returns None (and keeps any earlier ``qc.json``) when the run has fewer than two labelled
    validation cases, or a case cannot be predicted: calibration must never cost a user the model.
    """
    run_dir = Path(run_dir)
    try:
        cases = validation_cases(datalist_path, run_dir)
        if len(cases) < 2:
            log.warning("QC not calibrated: the run has %d labelled validation case(s), at least 2 are needed; "
                        "QC uses its defaults (or run medunet crossval)", len(cases))
            return None
        segmenter = Segmenter.from_checkpoint(run_dir, device=device)
        segmenter.qc_thresholds = Thresholds()
        known = predict_known(segmenter, cases, progress=progress)
        thresholds = fit(segmenter, known, source="validation cases of the run")
    except (MedunetError, OSError, ValueError, KeyError) as exc:
        log.warning("QC not calibrated (%s: %s); QC uses its defaults", type(exc).__name__, exc)
        return None
    save_thresholds(thresholds, run_dir / QC_FILE)
    log_calibration(thresholds)
    return thresholds


def log_calibration(thresholds: Thresholds) -> None:
    """One line: what the calibration chose and how well the score then ranks and flags the cases."""
    a = thresholds.achieved
    log.info("QC %s: temperature %.3g (expected vs true Dice off by %.3f, was %.3f), review below %.3f flags %d of %d bad "
             "and %d good cases (Spearman %s, AUROC %s)", thresholds.source, thresholds.temperature, a["mean_abs_error"],
             a["mean_abs_error_uncalibrated"], thresholds.score_review, a["bad_flagged"], a["bad_cases"], a["good_flagged"],
             a["spearman"], a["auroc"])
    if a.get("bad_unseen"):
        log.warning("QC cannot see why %d of the bad calibration cases are bad: a class missing from their masks, no check "
                    "firing (the model misses that class; QC flags a missing class only when nearly every training case has it)",
                    a["bad_unseen"])
