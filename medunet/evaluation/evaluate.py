"""Score a folder of predicted masks against a datalist's reference labels.

:func:`evaluate` is the public entry point (the CLI and cross-validation call it);
:func:`evaluate_pair` scores one prediction/reference pair already in memory. Both check that the
two masks lie on one grid before any metric is computed: a mask resampled or written on the
wrong grid would otherwise give plausible-looking but meaningless numbers.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from medunet.errors import DataError
from medunet.evaluation.metrics import METRICS, binary_metrics, union_box
from medunet.io.atomic import atomic_write_text
from medunet.io.datalist import Case
from medunet.io.geometry import require_same_grid, spacing_of
from medunet.io.nifti import read_nifti, read_voxels, spatial_shape_3d

log = logging.getLogger("medunet")

#: Columns of ``metrics.csv``: case, class name, label value, every metric, then the empty-mask flag.
COLUMNS = ("case", "class", "label", *METRICS, "flag")
#: Statistics of each metric in the summary.
STATISTICS = ("mean", "median", "std", "min", "max", "n", "n_undefined")
#: How the report chooses its worst cases.
WORST_BY = "dice"


@dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate` computed and wrote.

    Attributes:
        rows: one dict per case and foreground class, keys :data:`COLUMNS`.
        summary: class name → metric → {mean, median, std, min, max, n, n_undefined}, plus
            ``"mean_dice"`` (mean over classes of each class's mean Dice).
        metrics_csv, summary_json: the files written.
        report: ``report.html`` / ``report.md``, or None when no report was asked for.
        nsd_tolerance_mm: the NSD tolerance used.
    """

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    metrics_csv: Path
    summary_json: Path
    report: Path | None
    nsd_tolerance_mm: float

    @property
    def cases(self) -> list[str]:
        """Case names, in evaluation order."""
        return list(dict.fromkeys(row["case"] for row in self.rows))


def _labels(image: nib.Nifti1Image, *, what: str, case: str | None, path: str | None, num_classes: int) -> np.ndarray:
    """A label image's voxels as integers, refusing non-integer values and values outside 0..num_classes-1.

    Integer files without scaling (the usual uint8 mask) are read as they are stored, without a float copy.
    """
    stored = image.get_data_dtype()
    unscaled = getattr(image.dataobj, "slope", 1.0) == 1.0 and getattr(image.dataobj, "inter", 0.0) == 0.0
    if np.issubdtype(stored, np.integer) and unscaled:
        labels = read_voxels(image, case=case, path=path, dtype=stored)
    else:
        data = read_voxels(image, case=case, path=path, dtype=np.float32)
        labels = np.rint(data)
        fractional = int(np.count_nonzero(labels != data))
        if fractional:
            raise DataError(f"{what} has {fractional} non-integer voxel values; expected class labels", case=case, path=path)
        labels = labels.astype(np.int64)
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
        raise DataError(
            f"{what} holds label values {[int(v) for v in bad[:10]]} outside the classes 0..{num_classes - 1}; "
            'check the datalist\'s "labels" or the model that wrote it',
            case=case,
            path=path,
        )
    return labels.astype(np.uint8 if num_classes <= 256 else np.uint16, copy=False)


def check_same_grid(prediction: nib.Nifti1Image, reference: nib.Nifti1Image, *, case: str | None) -> None:
    """Raise GeometryError unless the two images have one shape and (within tolerance) one affine."""
    pred_shape = spatial_shape_3d(prediction.shape, case=case, path=prediction.get_filename())
    ref_shape = spatial_shape_3d(reference.shape, case=case, path=reference.get_filename())
    require_same_grid(pred_shape, prediction.affine, ref_shape, reference.affine, what="prediction", against="the reference's",
                      case=case, path=prediction.get_filename(),
                      fix="predict on the reference's image (medunet infer writes masks on the input grid) or resample the prediction")


def evaluate_pair(
    prediction: nib.Nifti1Image,
    reference: nib.Nifti1Image,
    class_names: Mapping[int, str],
    *,
    nsd_tolerance_mm: float = 2.0,
    case: str = "case",
) -> list[dict[str, Any]]:
    """Score one prediction against its reference: one row per foreground class (keys :data:`COLUMNS`).

    ``class_names`` maps label values to names (``{0: "background", 1: "liver"}``); label 0 is
    background and not scored. Distances are in mm using the reference's voxel spacing.

    Raises:
        GeometryError: the two images are not on one grid.
        DataError: unreadable voxels, non-integer labels or labels outside ``class_names``.
    """
    check_same_grid(prediction, reference, case=case)
    num_classes = max(class_names) + 1
    pred = _labels(prediction, what="prediction", case=case, path=prediction.get_filename(), num_classes=num_classes)
    ref = _labels(reference, what="reference label", case=case, path=reference.get_filename(), num_classes=num_classes)
    spacing = tuple(float(s) for s in spacing_of(reference.affine))
    # One pass over each volume finds every class's bounding box; each class is then scored on the
    # crop holding it in either mask, so many small structures in a large CT stay fast.
    pred_boxes = ndimage.find_objects(pred, max_label=num_classes - 1)
    ref_boxes = ndimage.find_objects(ref, max_label=num_classes - 1)
    rows = []
    for value in sorted(v for v in class_names if v != 0):
        box = union_box(pred_boxes[value - 1], ref_boxes[value - 1], pred.shape)
        scores = binary_metrics(pred[box] == value, ref[box] == value, spacing, nsd_tolerance_mm=nsd_tolerance_mm)
        rows.append({"case": case, "class": class_names[value], "label": value, **scores})
    return rows


def _label_of(case: Case) -> Path:
    """The case's reference label (cases without one were refused by :func:`_check_inputs`)."""
    if case.label is None:
        raise DataError("case has no reference label", case=case.name)
    return case.label


def _evaluate_files(pred_path: Path, label_path: Path, class_names: Mapping[int, str], tolerance: float, case: str) -> list[dict[str, Any]]:
    """:func:`evaluate_pair` on two NIfTI files."""
    prediction = read_nifti(pred_path, case=case)
    reference = read_nifti(label_path, case=case)
    return evaluate_pair(prediction, reference, class_names, nsd_tolerance_mm=tolerance, case=case)


def _stats(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, median, std, min, max over the defined (finite) values; counts of defined and undefined ones."""
    array = np.asarray(values, dtype=np.float64)
    defined = array[np.isfinite(array)]
    out: dict[str, float | int | None] = {"n": int(defined.size), "n_undefined": int(array.size - defined.size)}
    if defined.size:
        out.update(mean=float(defined.mean()), median=float(np.median(defined)), std=float(defined.std()),
                   min=float(defined.min()), max=float(defined.max()))
    else:
        out.update(mean=None, median=None, std=None, min=None, max=None)
    return {key: out[key] for key in STATISTICS}


def summarize(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    """Summary of result rows: class → metric → statistics, plus ``mean_dice`` over classes.

    Statistics use only defined values (``None`` when a metric has none); ``n_undefined`` counts
    the NaN ones (e.g. HD95 where a mask is empty), so a summary is never silently NaN.
    """
    summary: dict[str, Any] = {}
    for name in class_names:
        class_rows = [r for r in rows if r["class"] == name]
        summary[name] = {metric: _stats([r[metric] for r in class_rows]) for metric in METRICS}
    means = [summary[name]["dice"]["mean"] for name in class_names if summary[name]["dice"]["mean"] is not None]
    summary["mean_dice"] = float(np.mean(means)) if means else None
    return summary


def _check_inputs(pred_dir: Path, cases: Sequence[Case], class_names: Mapping[int, str]) -> None:
    """Refuse up front: no cases, cases without labels, missing predictions (all listed), bad class names."""
    if not cases:
        raise DataError("no cases to evaluate")
    if sorted(class_names) != list(range(len(class_names))) or len(class_names) < 2:
        raise DataError(f"class_names must number classes 0..K (0 = background, at least one more), got {dict(class_names)}")
    if "mean_dice" in class_names.values():
        raise DataError('a class may not be named "mean_dice" (that key holds the summary\'s mean over classes)')
    unlabelled = [c.name for c in cases if c.label is None]
    if unlabelled:
        raise DataError(
            f"{len(unlabelled)} case(s) have no reference label: {', '.join(unlabelled[:20])}; "
            'give them a "label" in the datalist or evaluate another split'
        )
    if not Path(pred_dir).is_dir():
        raise DataError("prediction folder does not exist", path=str(pred_dir))
    missing = [c.name for c in cases if not (Path(pred_dir) / f"{c.name}.nii.gz").is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(cases)} prediction(s) missing (expected <case>.nii.gz): "
            f"{', '.join(f'{m}.nii.gz' for m in missing[:20])}{' ...' if len(missing) > 20 else ''}; "
            "run medunet infer on these cases first",
            path=str(pred_dir),
        )


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """``metrics.csv`` text: floats with 6 significant digits, NaN as ``nan``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in COLUMNS})
    return buffer.getvalue()


def evaluate(
    pred_dir: Path,
    cases: Sequence[Case],
    class_names: Mapping[int, str],
    out_dir: Path,
    *,
    nsd_tolerance_mm: float = 2.0,
    report: str | None = "html",
    worst_cases: int = 3,
    workers: int = 1,
    progress: bool = False,
) -> EvaluationResult:
    """Score ``pred_dir/<case>.nii.gz`` against each case's label; write metrics, summary and a report.

    Writes to ``out_dir`` (atomically, replacing earlier results): ``metrics.csv`` (one row per
    case and foreground class), ``summary.json`` (the summary plus ``n_cases`` and
    ``nsd_tolerance_mm``) and, unless ``report`` is None or ``"none"``, ``report.html`` (self-contained)
    or ``report.md`` (pictures in ``out_dir/figures/``) with box plots and the ``worst_cases``
    lowest-Dice cases drawn as contours.

    Args:
        pred_dir: folder of predicted masks named ``<case>.nii.gz``.
        cases: cases with reference labels (e.g. a datalist's ``test`` or ``validation`` list).
        class_names: label value → name, 0 = background (not scored).
        out_dir: output folder (created).
        nsd_tolerance_mm: tolerance of the normalised surface Dice, in mm.
        report: ``"html"``, ``"md"`` or None / ``"none"``.
        worst_cases: how many of the lowest-Dice cases the report draws.
        workers: threads scoring cases in parallel (1 = one after another).
        progress: show a progress bar.

    Raises:
        DataError: missing predictions (all named), cases without labels, unreadable or bad label files.
        GeometryError: a prediction is not on its reference's grid (the case and both grids are named).
    """
    pred_dir, out_dir = Path(pred_dir), Path(out_dir)
    report = None if report in (None, "none") else report
    if report not in (None, "html", "md"):
        raise ValueError(f'report must be "html", "md" or None, got {report!r}')
    class_names = {int(k): str(v) for k, v in class_names.items()}
    _check_inputs(pred_dir, cases, class_names)
    jobs = [(pred_dir / f"{c.name}.nii.gz", _label_of(c), class_names, nsd_tolerance_mm, c.name) for c in cases]
    bar = tqdm(total=len(jobs), desc="evaluating", unit="case", disable=not progress)
    rows: list[dict[str, Any]] = []
    if workers > 1 and len(jobs) > 1:
        # Threads, not processes: decompression, numpy, torch and the KD-tree release the GIL, and a
        # library must not make its callers guard their script with `if __name__ == "__main__"`.
        with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            for case_rows in pool.map(_evaluate_files, *zip(*jobs)):
                rows.extend(case_rows)
                bar.update()
    else:
        for job in jobs:
            rows.extend(_evaluate_files(*job))
            bar.update()
    bar.close()

    foreground = [class_names[k] for k in sorted(class_names) if k != 0]
    summary = summarize(rows, foreground)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_csv, summary_json = out_dir / "metrics.csv", out_dir / "summary.json"
    atomic_write_text(metrics_csv, _csv_text(rows))
    document = {**summary, "n_cases": len(cases), "nsd_tolerance_mm": nsd_tolerance_mm}
    atomic_write_text(summary_json, json.dumps(document, indent=2, allow_nan=False))
    report_path = None
    if report is not None:
        from medunet.evaluation.report import write_report

        report_path = write_report(
            rows, summary, cases={c.name: c for c in cases}, pred_dir=pred_dir, out_dir=out_dir,
            class_names=class_names, fmt=report, worst_cases=worst_cases, nsd_tolerance_mm=nsd_tolerance_mm,
        )
    log.info("evaluated %d case(s): mean Dice %s", len(cases), _fmt(summary["mean_dice"]))
    return EvaluationResult(rows, summary, metrics_csv, summary_json, report_path, nsd_tolerance_mm)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
