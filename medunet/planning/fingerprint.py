"""The dataset fingerprint: the statistics of the training cases that planning is derived from.

One pass over the training cases (parallel over cases, threads: decompression and NumPy release
the GIL) collects, in the axis order the network sees (after reorientation to ``orientation``):

* spacing and shape of every case, and its shape after the foreground crop of the
  preprocessing chain (bounding box of nonzero voxels, the zscore/ct_window rule; and of
  voxels above -500 HU, the ct_clip_zscore rule);
* foreground intensities per channel (voxels inside the label's foreground, at most
  ``max_samples`` per dataset, drawn with a fixed seed per case) -> mean, std, median,
  0.5th and 99.5th percentiles;
* class volumes (mL) and voxel frequencies;
* the fraction of exactly-zero voxels, which tells skull-stripped or cropped MRI (a zero
  background) from raw images (a noise floor): z-score over nonzero voxels only for the former.

The result is a plain JSON-able dict (see :func:`compute_fingerprint`), saved atomically.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medunet.errors import DataError
from medunet.io.atomic import atomic_write_text
from medunet.io.datalist import Case, Datalist
from medunet.io.geometry import require_same_grid, spacing_of
from medunet.io.image import load_volume
from medunet.qc.reference import SharedRows
from medunet.transforms import CT_BODY_HU, check_label_values

log = logging.getLogger("medunet")

FORMAT = 1
#: Foreground intensity samples kept over the whole dataset (split equally between cases).
MAX_SAMPLES = 10_000_000
#: Median fraction of exactly-zero voxels above which images count as skull-stripped/cropped.
ZERO_BACKGROUND_FRACTION = 0.10


@dataclass
class _CaseStats:
    """What one case contributes; samples and profiles stay in memory, the rest goes to the JSON."""

    record: dict[str, Any]
    samples: list[np.ndarray]  # foreground intensities per channel


def reorient(arrays: Sequence[np.ndarray], affine: np.ndarray, axcodes: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Arrays and spacing in the voxel axis order of ``axcodes`` (as MONAI's Orientationd would give)."""
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(tuple(axcodes.upper()))
    )
    spacing = np.empty(3)
    for source_axis, (target_axis, _flip) in enumerate(transform):
        spacing[int(target_axis)] = spacing_of(affine)[source_axis]
    return [nib.orientations.apply_orientation(a, transform) for a in arrays], spacing


def _bounding_shape(mask_profiles: Sequence[np.ndarray]) -> list[int]:
    """Bounding-box shape from per-axis "any voxel in this slice" profiles (the whole shape when nothing is set)."""
    shape = []
    for profile in mask_profiles:
        idx = np.flatnonzero(profile)
        shape.append(int(idx[-1] - idx[0] + 1) if idx.size else len(profile))
    return shape


def _crop_shape(mask: np.ndarray) -> list[int]:
    """Shape of the bounding box of ``mask`` (as MONAI's CropForeground finds it; the whole shape when empty)."""
    return _bounding_shape([np.asarray(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)])


def _case_stats(
    case: Case, index: int, *, orientation: str, samples_per_case: int, num_classes: int | None, qc_rows: SharedRows | None
) -> _CaseStats:
    image, reference = load_volume(list(case.image), case=case.name)
    assert case.label is not None
    label_volume, label_ref = load_volume(case.label, case=case.name)
    if qc_rows is not None and qc_rows.wants(case):  # the QC reference's row, from these arrays: one read serves both
        qc_rows.add(case, image.numpy(), label_volume.numpy()[0], np.asarray(reference.affine))
    require_same_grid(label_volume.shape[1:], label_ref.affine, image.shape[1:], reference.affine,  # as at training time
                      what="label", against="the image's", case=case.name, path=str(case.label), error=DataError)
    arrays, spacing = reorient([*image.numpy(), label_volume.numpy()[0]], reference.affine, orientation)
    channels, label = arrays[:-1], arrays[-1]
    if num_classes is not None:  # the same check (and message) as at training time
        check_label_values(label, num_classes, case=case.name, path=str(case.label))
    elif label.size and (label.min() < 0 or not np.array_equal(label, np.round(label))):
        raise DataError("label has negative or non-integer values; run medunet check", case=case.name, path=str(case.label))
    label = label.astype(np.int64)
    foreground = label > 0
    rng = np.random.default_rng(index)  # deterministic: the same cases always give the same samples
    where = np.flatnonzero(foreground)
    if where.size > samples_per_case:
        where = np.sort(rng.choice(where, samples_per_case, replace=False))
    samples = [c.reshape(-1)[where].astype(np.float64) for c in channels]
    all_zero = np.all([c == 0 for c in channels], axis=0)
    record = {
        "name": case.name,
        "spacing": [round(float(s), 6) for s in spacing],
        "shape": [int(s) for s in label.shape],
        "shape_cropped_nonzero": _crop_shape(~all_zero),
        "shape_cropped_body": _crop_shape(np.any([c > CT_BODY_HU for c in channels], axis=0)),
        "zero_fraction": round(float(all_zero.mean()), 6),
        "class_voxels": [int(n) for n in np.bincount(label.reshape(-1))],
        "voxel_volume_mm3": float(np.prod(spacing)),
    }
    return _CaseStats(record, samples)


def _intensity_stats(samples: np.ndarray) -> dict[str, float]:
    if samples.size == 0:
        return {"samples": 0}
    p005, p50, p995 = np.percentile(samples, [0.5, 50.0, 99.5])
    return {
        "samples": int(samples.size),
        "mean": float(samples.mean()),
        "std": float(samples.std()),
        "median": float(p50),
        "percentile_00_5": float(p005),
        "percentile_99_5": float(p995),
        "min": float(samples.min()),
        "max": float(samples.max()),
    }


def _summary(values: np.ndarray) -> dict[str, list[float]]:
    return {
        "median": [float(v) for v in np.median(values, axis=0)],
        "percentile_10": [float(v) for v in np.percentile(values, 10, axis=0)],
        "min": [float(v) for v in values.min(axis=0)],
        "max": [float(v) for v in values.max(axis=0)],
    }


def compute_fingerprint(
    datalist: Datalist, *, orientation: str = "RAS", workers: int = 2, max_samples: int = MAX_SAMPLES,
    qc_rows: SharedRows | None = None,
) -> dict[str, Any]:
    """Fingerprint the training cases of ``datalist`` (see the module docstring for what is collected).

    With ``qc_rows``, the cases it expects also get their QC reference rows from the volumes read here.

    Raises:
        DataError: a case cannot be read or its label is not integer-valued (run ``medunet check`` for a full report).
    """
    cases = list(datalist.training)
    per_case = max(1000, max_samples // max(len(cases), 1))
    declared = len(datalist.labels) if datalist.labels else None
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        stats = list(
            pool.map(
                lambda ic: _case_stats(ic[1], ic[0], orientation=orientation, samples_per_case=per_case, num_classes=declared,
                                       qc_rows=qc_rows),
                enumerate(cases),
            )
        )
    channels = len(stats[0].samples)
    for case, s in zip(cases, stats):
        if len(s.samples) != channels:
            raise DataError(
                f"has {len(s.samples)} image channel(s), the first training case has {channels}; every case needs the same "
                "sequences in the same order",
                case=case.name,
                path=str(case.image[0]),
            )
    intensity = [_intensity_stats(np.concatenate([s.samples[c] for s in stats])) for c in range(channels)]
    records = [s.record for s in stats]
    num_classes = max(len(r["class_voxels"]) for r in records)
    if datalist.labels:
        num_classes = max(num_classes, len(datalist.labels))
    names = datalist.labels or {i: ("background" if i == 0 else f"class_{i}") for i in range(num_classes)}
    counts = np.zeros((len(records), num_classes))
    for i, r in enumerate(records):
        counts[i, : len(r["class_voxels"])] = r["class_voxels"]
    volumes_ml = counts * np.array([r["voxel_volume_mm3"] for r in records])[:, None] / 1000.0
    classes = {}
    for k in range(num_classes):
        present = counts[:, k] > 0
        classes[str(k)] = {
            "name": names.get(k, f"class_{k}"),
            "voxel_frequency": float(counts[:, k].sum() / counts.sum()),
            "volume_ml_median": float(np.median(volumes_ml[present, k])) if present.any() else 0.0,
            "volume_ml_min": float(volumes_ml[present, k].min()) if present.any() else 0.0,
            "present_in_cases": float(present.mean()),
        }
    zero_fraction = float(np.median([r["zero_fraction"] for r in records]))
    return {
        "format": FORMAT,
        "modality": datalist.modality,
        "orientation": orientation.upper(),
        "num_cases": len(records),
        "channels": channels,
        "spacing": _summary(np.array([r["spacing"] for r in records])),
        "shape": _summary(np.array([r["shape"] for r in records], dtype=float)),
        "shape_cropped_nonzero": _summary(np.array([r["shape_cropped_nonzero"] for r in records], dtype=float)),
        "shape_cropped_body": _summary(np.array([r["shape_cropped_body"] for r in records], dtype=float)),
        "intensity": intensity,
        "zero_fraction_median": zero_fraction,
        "zero_background": zero_fraction >= ZERO_BACKGROUND_FRACTION,
        "classes": classes,
        "total_voxels": int(counts.sum()),
        "cases": records,
    }


def save_fingerprint(fingerprint: dict[str, Any], path: str | Path) -> Path:
    """Write the fingerprint as JSON, atomically."""
    path = Path(path)
    atomic_write_text(path, json.dumps(fingerprint, indent=1) + "\n")
    return path


def load_fingerprint(path: str | Path) -> dict[str, Any]:
    """Read a fingerprint written by :func:`save_fingerprint`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the fingerprint ({exc})", path=str(path)) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"not a medunet fingerprint (format {FORMAT})", path=str(path))
    return data
