"""Volume and intensity of each class in a label mask (``medunet infer --stats``).

Per case and class: voxel count, volume in mL and the mean and standard deviation of the image's
intensity inside the class (first channel; Hounsfield units for CT, as stored after the file's
scaling). Like TotalSegmentator's ``--statistics``, this turns masks into numbers a study can use.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medunet.errors import DataError
from medunet.io.atomic import atomic_write_text
from medunet.io.geometry import require_same_grid, spacing_of
from medunet.io.image import read_image
from medunet.io.nifti import read_nifti, read_voxels

#: Columns of the statistics CSV.
STAT_COLUMNS = ("case", "class", "label", "voxels", "volume_ml", "intensity_mean", "intensity_std")


def label_statistics(
    labels: np.ndarray,
    image: np.ndarray,
    spacing: Sequence[float] | np.ndarray,
    class_names: Mapping[int, str] | Sequence[str],
) -> list[dict[str, Any]]:
    """One row per foreground class: voxels, volume (mL), mean and std (population) of ``image`` inside it.

    Args:
        labels: integer label array (0 = background).
        image: intensities on the same grid (e.g. HU).
        spacing: voxel size in mm per axis.
        class_names: label value → name (a mapping, or a list indexed by value); label 0 is skipped.

    Returns:
        Rows keyed by :data:`STAT_COLUMNS` minus ``case``; intensities are NaN for an absent class.

    Example:
        >>> labels, image = np.array([[[0, 1], [1, 1]]]), np.array([[[9.0, 1.0], [2.0, 3.0]]])
        >>> label_statistics(labels, image, (1, 1, 1), ["background", "organ"])[0]["intensity_mean"]
        2.0
    """
    labels, image = np.asarray(labels), np.asarray(image, dtype=np.float64)
    if labels.shape != image.shape:
        raise ValueError(f"labels {labels.shape} and image {image.shape} must have the same shape")
    names = dict(enumerate(class_names)) if not isinstance(class_names, Mapping) else dict(class_names)
    top = max(names)
    flat = labels.ravel().astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() > top):
        raise ValueError(f"labels must lie in 0..{top}, got {flat.min()}..{flat.max()}")
    values = image.ravel()
    counts = np.bincount(flat, minlength=top + 1)
    means = np.bincount(flat, weights=values, minlength=top + 1) / np.maximum(counts, 1)
    spread = np.bincount(flat, weights=(values - means[flat]) ** 2, minlength=top + 1) / np.maximum(counts, 1)  # two-pass
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    rows = []
    for value in sorted(v for v in names if v != 0):
        n = int(counts[value])
        rows.append({
            "class": names[value],
            "label": value,
            "voxels": n,
            "volume_ml": n * voxel_ml,
            "intensity_mean": float(means[value]) if n else math.nan,
            "intensity_std": float(np.sqrt(spread[value])) if n else math.nan,
        })
    return rows


def case_statistics(
    mask_path: Path, image_source: Any, class_names: Mapping[int, str] | Sequence[str], *, case: str
) -> list[dict[str, Any]]:
    """:func:`label_statistics` of a written mask and its input image (first channel), which must share one grid."""
    mask = read_nifti(mask_path, case=case)
    image = read_image(image_source, case=case)
    require_same_grid(mask.shape, mask.affine, image.shape, image.affine, what="mask", against="its image's", case=case,
                      path=str(mask_path), fix="statistics need both on one grid")
    labels = read_voxels(mask, case=case, path=str(mask_path), dtype=np.int64)
    voxels = read_voxels(image, case=case, path=str(image_source), dtype=np.float64)
    try:
        rows = label_statistics(labels, voxels, spacing_of(image.affine), class_names)
    except ValueError as exc:
        raise DataError(f"cannot compute statistics: {exc}", case=case, path=str(mask_path)) from exc
    return [{"case": case, **row} for row in rows]


def prediction_statistics(
    labels: np.ndarray, image: nib.Nifti1Image, class_names: Mapping[int, str] | Sequence[str], *, case: str, name: str
) -> list[dict[str, Any]]:
    """:func:`label_statistics` of labels held in memory on ``image``'s grid (a prediction, before or without its file).

    ``name`` names the image in errors. Raises a DataError when the labels are not on the image's grid.
    """
    shape = tuple(int(s) for s in image.shape[:3])
    if tuple(np.shape(labels)) != shape:
        raise DataError(f"mask of shape {tuple(np.shape(labels))} is not on its image's grid {shape}; statistics need both on one grid",
                        case=case, path=name)
    voxels = read_voxels(image, case=case, path=name, dtype=np.float64)
    try:
        rows = label_statistics(np.asarray(labels, dtype=np.int64), voxels, spacing_of(image.affine), class_names)
    except ValueError as exc:
        raise DataError(f"cannot compute statistics: {exc}", case=case, path=name) from exc
    return [{"case": case, **row} for row in rows]


def write_statistics_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Write statistics rows (keys :data:`STAT_COLUMNS`) to a CSV atomically; NaN is written as ``nan``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=STAT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in STAT_COLUMNS})
    atomic_write_text(Path(path), buffer.getvalue())
