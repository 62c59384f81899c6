"""k-fold cross-validation: train every fold, predict each case with the fold that never saw it, evaluate, choose post-processing.

One call, :func:`run_crossval`, fills a cross-validation folder::

    runs/x/
      config.yaml          the resolved config every fold trains with
      splits.json          the folds (see medunet.training.splits)
      fold_0/ ... fold_k/  one ordinary run folder per fold (best.pt, last.pt, metrics.csv, ...)
      oof/                 <case>.nii.gz: each training case predicted once, by the fold that validated it, on its own grid
      oof_crf/             the same predictions refined by the dense CRF (postprocessing.crf settings): its candidate in the search
      oof_eval/            metrics.csv, summary.json, report.html of the out-of-fold predictions
      postprocessing.json  the post-processing the out-of-fold predictions support (applied by `medunet infer -m runs/x`)
      qc.json              QC's temperature and review threshold fitted on the out-of-fold cases (with the chosen
                           post-processing and CRF applied, as `medunet infer -m runs/x` applies them) and what it achieved
                           (see docs/quality-control.md)
      crossval.json        per-fold best validation Dice, out-of-fold Dice before/after post-processing

Restarting the same command skips finished folds, resumes an interrupted one from its
``last.pt`` and redoes the prediction, evaluation and search (they are cheap next to training).
The out-of-fold masks are predicted without any post-processing so the search starts from
the network's own output. The dense CRF works on probabilities before their inversion to the
input grid, so it cannot be replayed on saved masks: each case's network probabilities (in
preprocessed space) are finished twice, once as they are (``oof/``) and once refined by the CRF
(``oof_crf/``), each inverted from the same prepared case; the network runs once per case. The
search keeps the CRF only if its masks score better. QC is calibrated after that choice, on the kept pass's records and
its post-processed masks. One gap remains: inference from the folder averages the folds, which the
out-of-fold cases cannot (each fold's own model predicts them), so the ensemble's probabilities are
calibrated as the single folds'.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medunet._version import __version__
from medunet.config import Config, save_config
from medunet.io.atomic import atomic_write_text
from medunet.io.datalist import Case, load_datalist
from medunet.model.checkpoint import Checkpoint, load_checkpoint
from medunet.model.layout import (
    CONFIG_FILE,
    CROSSVAL_FILE,
    LAST_CHECKPOINT,
    OOF_CRF_DIR,
    OOF_DIR,
    OOF_EVAL_DIR,
    POSTPROCESSING_FILE,
    QC_FILE,
    fold_dir,
)
from medunet.postprocessing.search import PostprocessingChoice, load_search_cases, save_choice, search_postprocessing
from medunet.qc.decide import QCRecord, Thresholds, save_thresholds
from medunet.qc.reference import QCReference, reference_of
from medunet.training.splits import Fold, datalist_folds

log = logging.getLogger("medunet")

#: Overrides that switch every post-processing step off (out-of-fold masks are the raw network output).
NO_POSTPROCESSING = ("postprocessing.default={}", "postprocessing.classes={}", "postprocessing.crf.enabled=false")


@dataclass
class CrossvalResult:
    """What a cross-validation produced and how good it is."""

    root: Path
    fold_dice: dict[int, float]
    """Best validation mean Dice of each fold (during training, on the preprocessed grid)."""
    oof_dir: Path
    eval_dir: Path
    oof_summary: dict[str, Any]
    """The out-of-fold evaluation summary (class -> metric -> statistics, and "mean_dice")."""
    postprocessing: PostprocessingChoice
    report: Path | None = None
    """The out-of-fold evaluation report (HTML)."""


def fold_finished(saved: Checkpoint, config: Config) -> bool:
    """True when a fold's ``last.pt`` has reached ``train.max_epochs`` or stopped early."""
    patience = config.train.early_stopping_patience
    stale = saved.train_state.stale_validations if saved.train_state else 0
    return saved.epoch >= config.train.max_epochs or (patience is not None and stale >= patience)


def train_folds(datalist_path: Path, root: Path, config: Config, folds: list[Fold], *, progress: bool) -> dict[int, float]:
    """Train every fold into ``root/fold_<k>``: skip finished ones, resume interrupted ones. Returns best Dice per fold."""
    from medunet.training.trainer import train

    best: dict[int, float] = {}
    for fold in folds:
        run_dir = fold_dir(root, fold.index)
        last = run_dir / LAST_CHECKPOINT
        resume = last.is_file()
        if resume:
            saved = load_checkpoint(last)
            if fold_finished(saved, config):
                log.info("fold %d: finished (epoch %s), skipping", fold.index, saved.epoch)
                best[fold.index] = saved.train_state.best_mean_dice() if saved.train_state else 0.0
                continue
            log.info("fold %d: resuming after epoch %s", fold.index, saved.epoch)
        else:
            log.info("fold %d of %d: training on %d cases, validating on %d", fold.index, len(folds), len(fold.train), len(fold.val))
        result = train(datalist_path, run_dir, config, resume=resume, progress=progress, fold=fold)
        best[fold.index] = result.best_dice
    return best


def predict_out_of_fold(
    root: Path, folds: list[Fold], cases: dict[str, Case], *, device: str, progress: bool, try_crf: bool = True
) -> tuple[Path, Path | None, dict[str, dict[str, QCRecord]]]:
    """Predict each fold's validation cases with that fold's model, on their input grids, into ``root/oof/<case>.nii.gz``
    (no post-processing) and, with ``try_crf``, ``root/oof_crf/<case>.nii.gz`` (only the dense CRF, with the run's
    ``postprocessing.crf`` settings; None is returned for it otherwise).

    The network runs once per case: its probabilities stay in preprocessed space and are finished (inverted, and
    for the CRF candidate refined first) once per pass, each from the same prepared case. Also returns each case's
    QC record per pass (``"plain"``, ``"crf"``), made for calibration (default thresholds, the expected Dice curve):
    the CRF changes the probabilities QC reads, so each pass has its own.
    """
    from tqdm.auto import tqdm

    from medunet.inference.outputs import write_outputs
    from medunet.inference.segmenter import Segmenter
    from medunet.inference.stages import refine

    oof_dir, crf_dir = root / OOF_DIR, root / OOF_CRF_DIR
    total = sum(len(f.val) for f in folds)
    records: dict[str, dict[str, QCRecord]] = {"plain": {}, "crf": {}}
    with tqdm(total=total, desc="out-of-fold", unit="case", disable=not progress) as bar:
        for fold in folds:
            segmenter = Segmenter.from_checkpoint(fold_dir(root, fold.index), device=device, overrides=NO_POSTPROCESSING)
            segmenter.qc_thresholds = Thresholds()  # calibration starts from the defaults, whatever a previous run stored
            crf = replace(segmenter.config.postprocessing.crf, enabled=True)
            for name in fold.val:
                prepared = segmenter.prepare(list(cases[name].image), case=name)
                # The network runs once; both passes finish its probabilities, inverted through this segmenter's own chain:
                # MONAI's inverse checks the transform instances that recorded the case, which is why a second Segmenter's
                # chain (the CRF pass's, before) failed in Cropd.inverse on a case the first had prepared.
                output = segmenter.network_output(prepared, members=True)
                for key, folder in (("plain", oof_dir), ("crf", crf_dir))[:2 if try_crf else 1]:
                    probabilities = refine(output, prepared, crf, timings={}) if key == "crf" else output
                    prediction = segmenter.finish(prepared, probabilities, qc=True, calibration=True)
                    write_outputs(segmenter.segmented(prepared, prediction), {"nifti": folder / f"{name}.nii.gz"},
                                  class_names=segmenter.class_names, model_name=segmenter.model_name, overwrite=True)
                    assert prediction.qc is not None
                    records[key][name] = prediction.qc
                bar.update()
    return oof_dir, crf_dir if try_crf else None, records


def calibrate_qc(records: dict[str, dict[str, QCRecord]], choice: PostprocessingChoice, cases: list[Case],
                 root: Path, *, class_names: list[str], reference: QCReference | None) -> Thresholds | None:
    """Fit QC on the out-of-fold cases as inference from ``root`` applies it, and save it as ``root/qc.json``.

    The records of the pass the search kept (with or without the CRF) are used; their masks get the chosen
    label post-processing, and each case's true Dice and mask checks are those of the post-processed mask.
    """
    from medunet.config import config_from_dict
    from medunet.evaluation import dice_per_class
    from medunet.io.geometry import spacing_of
    from medunet.io.nifti import read_nifti, read_voxels
    from medunet.postprocessing.operations import postprocess_labels
    from medunet.qc.calibrate import calibrate
    from medunet.qc.signals import mask_signals
    from medunet.workflows.calibration import log_calibration

    kept_crf = choice.crf is not None and choice.crf.enabled
    chosen = records["crf" if kept_crf else "plain"]
    folder = root / (OOF_CRF_DIR if kept_crf else OOF_DIR)
    post = config_from_dict({"postprocessing": choice.to_json()["postprocessing"]}).postprocessing
    names, targets = [], []
    for case in cases:
        if case.name not in chosen or case.label is None:
            continue
        image = read_nifti(folder / f"{case.name}.nii.gz", case=case.name)
        spacing = spacing_of(image.affine)
        labels = postprocess_labels(read_voxels(image, case=case.name, path=None, dtype=np.int64), spacing=spacing, config=post,
                                    class_names=dict(enumerate(class_names)))
        truth = read_voxels(read_nifti(case.label, case=case.name), case=case.name, path=str(case.label), dtype=np.int64)
        dice = dice_per_class(labels, truth, len(class_names))
        signals = {**chosen[case.name].signals, "mask": mask_signals(labels, spacing, len(class_names))}
        chosen[case.name] = replace(chosen[case.name], signals=signals)
        names.append(case.name)
        targets.append([float(d) for d in dice])
    if len(names) < 2:
        return None
    thresholds = calibrate([chosen[n] for n in names], targets, reference=reference, class_names=class_names,
                           source="out-of-fold cases" + (" (dense CRF)" if kept_crf else ""))
    save_thresholds(thresholds, root / QC_FILE)
    log_calibration(thresholds)
    return thresholds


def run_crossval(
    datalist_path: str | Path,
    root: str | Path,
    config: Config,
    *,
    folds: int | None = None,
    splits_file: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> CrossvalResult:
    """Cross-validate on a datalist's "training" cases in ``root`` (see the module docstring for what it writes).

    Args:
        datalist_path: the datalist; its "training" cases are split into folds (it must not have a "validation" list).
        root: the cross-validation folder.
        config: the config every fold trains with (saved as ``root/config.yaml``).
        folds: number of folds for new splits (default 5; must match an existing ``splits.json``).
        splits_file: user-made splits (a ``splits.json``-format file) instead of generated ones.
        device: device for the out-of-fold predictions (auto: ``inference.device``).

    Raises:
        MedunetError: bad data, config, splits or checkpoints, or a failed training.
    """
    from medunet.evaluation import evaluate
    from medunet.training.cases import resolve_labels

    datalist_path, root = Path(datalist_path), Path(root)
    datalist = load_datalist(datalist_path, allow_outside_root=config.data.allow_outside_root)
    fold_list = datalist_folds(
        datalist, root, folds=folds, seed=config.data.split_seed,
        splits_file=Path(splits_file) if splits_file else None, disjoint_validation=True,
    )
    save_config(config, root / CONFIG_FILE)
    fold_dice = train_folds(datalist_path, root, config, fold_list, progress=progress)

    cases = {c.name: c for c in datalist.training}
    oof_cases = [cases[n] for f in fold_list for n in f.val]
    log.info("predicting %d out-of-fold cases on their original grids", len(oof_cases))
    oof_dir, crf_dir, qc_records = predict_out_of_fold(root, fold_list, cases, device=device, progress=progress,
                                                       try_crf=config.postprocessing.crf.search)
    labels = resolve_labels(datalist, config)
    evaluation = evaluate(oof_dir, oof_cases, labels, root / OOF_EVAL_DIR,
                          nsd_tolerance_mm=config.evaluation.nsd_tolerance_mm, progress=progress)

    log.info("choosing post-processing on the out-of-fold predictions")
    choice = search_postprocessing(load_search_cases(oof_dir, oof_cases), labels,
                                   crf_cases=load_search_cases(crf_dir, oof_cases) if crf_dir else None, crf=config.postprocessing.crf)
    save_choice(choice, root / POSTPROCESSING_FILE)
    class_names = [labels[i] for i in sorted(labels)]
    qc = calibrate_qc(qc_records, choice, oof_cases, root, class_names=class_names,
                      reference=reference_of(load_checkpoint(fold_dir(root, fold_list[0].index)).qc_reference))
    summary = {
        "medunet_version": __version__,
        "folds": len(fold_list),
        "cases": len(oof_cases),
        "fold_best_val_dice": {str(k): v for k, v in fold_dice.items()},
        "oof_mean_dice": evaluation.summary.get("mean_dice"),
        "oof_dice": {n: evaluation.summary[n]["dice"]["mean"] for n in choice.dice_before},
        "postprocessing": {n: s for n, s in choice.to_json()["postprocessing"]["classes"].items()},
        "dense_crf_kept": bool(choice.crf is not None and choice.crf.enabled),
        "oof_dice_postprocessed": choice.dice_after,
        "qc": {"score_review": qc.score_review, **qc.achieved} if qc is not None else None,
    }
    atomic_write_text(root / CROSSVAL_FILE, json.dumps(summary, indent=2) + "\n")
    return CrossvalResult(root, fold_dice, oof_dir, root / OOF_EVAL_DIR, evaluation.summary, choice, evaluation.report)
