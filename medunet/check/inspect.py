"""Inspect one file on its own: header first, then voxels, collecting every problem instead of stopping.

The header checks (exists, readable, 3D, spacing, shear) cost a few kilobytes of reading; the
voxel checks (truncation, NaN/Inf, intensity range, label values, a hash for duplicates) read
the file once, as stored (no scaling to float64, no reorientation), so memory stays at one copy.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

from medunet.check.findings import FileSummary, Finding, Severity
from medunet.errors import DataError
from medunet.io.geometry import SHEAR_TOLERANCE, shear_of, spacing_of
from medunet.io.image import read_image
from medunet.io.nifti import read_nifti, spatial_shape_3d, voxel_array

#: Spacings (mm) outside this range are implausible for CT/MRI (a warning; <= 0 or non-finite is an error).
MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 20.0
#: CT intensities outside this range (HU) suggest a wrong rescale slope/intercept (warning). Wider than the
#: physical -1024..4000 so that scanners' padding values (-2048, -3024) and metal do not warn.
CT_MIN_HU = -3100.0
CT_MAX_HU = 10000.0
#: Intensity percentiles reported per image channel (from a strided sample of at most SAMPLE_VOXELS voxels).
PERCENTILES = (0.5, 50.0, 99.5)
SAMPLE_VOXELS = 1_000_000
#: Label voxels counted per chunk (bounds the memory of counting to ~8 bytes x this).
_CHUNK = 1 << 23

Kind = Literal["CT", "MRI"] | None
#: Records one problem of the file being inspected: (severity, code, message).
Report = Callable[[Severity, str, str], None]


@dataclass(frozen=True)
class FileTask:
    """One file to inspect: its path (and how to show it), its role, modality kind and the class count."""

    path: Path
    shown: str
    role: Literal["image", "label"]
    kind: Kind = None
    num_classes: int | None = None


def modality_kind(name: str | None) -> Kind:
    """ "CT", "MRI" or None (unknown: no intensity-range checks) from a datalist modality name."""
    text = (name or "").upper()
    if any(word in text for word in ("MR", "T1", "T2", "FLAIR", "ADC", "DWI", "PD")):
        return "MRI"
    return "CT" if "CT" in text else None


def _fmt(values: np.ndarray | tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def inspect_file(task: FileTask) -> FileSummary:
    """Check one file; every problem becomes a finding in the summary (case names are added by the caller)."""
    summary = FileSummary(path=task.shown, role=task.role)

    def problem(severity: Severity, code: str, message: str) -> None:
        summary.problems.append(Finding(severity, code, message, path=task.shown))

    if task.path.is_dir() and task.role == "image":  # a DICOM series folder, read whole (checked by its reader)
        try:
            image = read_image(task.path)
        except DataError as exc:
            problem("error", "dicom_series", exc.problem)
            return summary
    elif not task.path.is_file():
        problem("error", "missing_file", "file does not exist; fix the path in the datalist or add the file")
        return summary
    else:
        try:
            image = read_nifti(task.path, check_grid=False)
        except DataError as exc:
            # read_nifti says "file is empty (0 bytes)" or "file is truncated: ..." (uncompressed, known from the size)
            code = "truncated" if "truncated" in exc.problem else "empty_file" if "empty" in exc.problem else "unreadable"
            problem("error", code, f"{exc.problem}; re-export or re-copy the file")
            return summary
    summary.shape = tuple(int(s) for s in image.shape)
    summary.affine = np.asarray(image.affine, dtype=np.float64)
    summary.dtype = str(image.get_data_dtype())
    try:
        summary.shape3d = spatial_shape_3d(image.shape, case=None, path=None)
    except DataError as exc:
        problem("error", "not_3d", exc.problem)
        return summary  # channels stored in one file: the voxel checks below would mislead
    _check_affine(summary.affine, problem)
    _check_voxels(task, image, summary, problem)
    return summary


def _check_affine(affine: np.ndarray, problem: Report) -> None:
    spacing = spacing_of(affine)
    if not np.isfinite(affine).all() or (spacing <= 0).any():
        problem(
            "error", "invalid_spacing",
            f"voxel spacing {_fmt(spacing)} mm is zero, negative or not finite: the header's affine is broken; "
            "re-convert the image (e.g. from DICOM) or fix pixdim/srow in the header",
        )
        return
    if (spacing < MIN_SPACING_MM).any() or (spacing > MAX_SPACING_MM).any():
        problem(
            "warning", "implausible_spacing",
            f"voxel spacing {_fmt(spacing)} mm is outside the plausible {MIN_SPACING_MM}..{MAX_SPACING_MM} mm; "
            "check the header's units (mm expected) and pixdim",
        )
    skew = shear_of(affine)
    if skew > SHEAR_TOLERANCE:
        problem(
            "error", "sheared_affine",
            f"sheared affine (gantry tilt, skew {skew:.3g}): medunet refuses it for training and inference; "
            "resample the image to an orthogonal grid first",
        )


def _read_raw(image: nib.Nifti1Image, problem: Report) -> np.ndarray | None:
    """The voxels as stored (unscaled), or None after reporting why they cannot be read."""
    try:  # a file's proxy gives the stored values; an in-memory image (a DICOM series) holds its array
        data = voxel_array(image, scaled=False, case=None, path=None)
    except DataError as exc:
        problem("error", "truncated", f"{exc.problem}; re-export or re-copy it")
        return None
    if np.issubdtype(data.dtype, np.complexfloating) or data.dtype.fields is not None:
        problem("error", "unsupported_dtype", f"unsupported voxel type {data.dtype} (RGB or complex); store one number per voxel")
        return None
    return data


def _scaling(image: nib.Nifti1Image) -> tuple[float, float]:
    slope, inter = getattr(image.dataobj, "slope", 1.0), getattr(image.dataobj, "inter", 0.0)
    return float(slope), float(inter)


def _digest(data: np.ndarray, scaling: tuple[float, float]) -> str:
    """blake2b of the stored voxels with their shape, type and scaling: equal for byte-identical volumes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((data.shape, str(data.dtype), scaling)).encode())
    flat = data.T if data.flags.f_contiguous and not data.flags.c_contiguous else np.ascontiguousarray(data)
    h.update(flat.data.cast("B"))
    return h.hexdigest()


def _check_voxels(task: FileTask, image: nib.Nifti1Image, summary: FileSummary, problem: Report) -> None:
    data = _read_raw(image, problem)
    if data is None:
        return
    summary.voxels_read = True
    slope, inter = _scaling(image)
    flat = data.ravel(order="K")
    finite: np.ndarray | None = None
    if np.issubdtype(flat.dtype, np.floating):
        finite_mask = np.isfinite(flat)
        summary.nonfinite = int(flat.size - np.count_nonzero(finite_mask))
        if summary.nonfinite:
            finite = flat[finite_mask]
            problem(
                "error", "non_finite",
                f"{summary.nonfinite} NaN/Inf voxels; replace them (e.g. with the background value) or drop the case",
            )
    values = flat if finite is None else finite
    if task.role == "image":
        summary.digest = _digest(data, (slope, inter))
        _image_statistics(values, slope, inter, summary)
        _check_intensities(task, values, slope, inter, summary, problem)
    else:
        _check_label(task, values if slope == 1.0 and inter == 0.0 else values * slope + inter, summary, problem)


def _image_statistics(values: np.ndarray, slope: float, inter: float, summary: FileSummary) -> None:
    if values.size == 0:
        return
    ends = sorted((float(values.min()) * slope + inter, float(values.max()) * slope + inter))
    summary.minimum, summary.maximum = ends
    sample = values[:: max(1, values.size // SAMPLE_VOXELS)].astype(np.float64) * slope + inter
    summary.percentiles = {f"{q:g}": float(v) for q, v in zip(PERCENTILES, np.percentile(sample, PERCENTILES))}


def _check_intensities(
    task: FileTask, values: np.ndarray, slope: float, inter: float, summary: FileSummary, problem: Report
) -> None:
    lo, hi = summary.minimum, summary.maximum
    if lo is None or hi is None:
        return
    if lo == hi:
        problem("warning", "constant_image", f"every voxel is {lo:g}: the image is blank; re-export it or drop the case")
        return
    if task.kind == "CT" and (lo < CT_MIN_HU or hi > CT_MAX_HU):
        problem(
            "warning", "ct_intensity_range",
            f"CT values span {lo:g}..{hi:g}, far outside -1024..4000 HU (warned below {CT_MIN_HU:g} or above "
            f"{CT_MAX_HU:g}); check the rescale slope/intercept, or whether this channel really is CT",
        )
    elif task.kind == "MRI" and lo < 0:
        threshold = -inter / slope if slope else 0.0
        negative = int(np.count_nonzero(values < threshold)) if slope > 0 else int(np.count_nonzero(values > threshold))
        problem(
            "warning", "mri_negative_values",
            f"{negative} negative voxels (min {lo:g}) in an MR image, whose magnitudes are >= 0; "
            "check the conversion, or clip at 0 if they are interpolation ringing",
        )


def _value_counts(values: np.ndarray) -> Counter[float]:
    """Voxel count per distinct value, chunked so memory stays bounded for large labels."""
    counts: Counter[float] = Counter()
    for start in range(0, values.size, _CHUNK):
        chunk = values[start : start + _CHUNK]
        if np.issubdtype(chunk.dtype, np.floating):
            integral = chunk == np.round(chunk)
            if not integral.all():
                odd, n = np.unique(chunk[~integral], return_counts=True)
                counts.update({float(v): int(c) for v, c in zip(odd, n)})
                chunk = chunk[integral]
        if chunk.size == 0:
            continue
        lo, hi = int(chunk.min()), int(chunk.max())
        if hi - lo < 1 << 16:
            index = chunk.astype(np.intp)
            index -= lo
            binned = np.bincount(index, minlength=hi - lo + 1)
            counts.update({float(lo + i): int(binned[i]) for i in np.flatnonzero(binned)})
        else:
            found, n = np.unique(chunk, return_counts=True)
            counts.update({float(v): int(c) for v, c in zip(found, n)})
    return counts


def _check_label(task: FileTask, values: np.ndarray, summary: FileSummary, problem: Report) -> None:
    counts = _value_counts(values)
    summary.values = {f"{v:g}": n for v, n in sorted(counts.items())}
    summary.highest = max(counts) if counts else 0.0
    k = task.num_classes
    bad = {v: n for v, n in sorted(counts.items()) if v != round(v) or v < 0 or (k is not None and v > k - 1)}
    if bad:
        shown = ", ".join(f"{v:g} ({n} voxels)" for v, n in list(bad.items())[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        classes = f"the classes 0..{k - 1}" if k is not None else "non-negative integers"
        problem(
            "error", "label_values",
            f"label values outside {classes}: {shown}{more}; fix the label file or the datalist's \"labels\"",
        )
    elif counts and set(counts) == {0.0}:
        problem(
            "warning", "empty_label",
            "label is all background (0): the case trains but teaches no foreground; check it is the right file",
        )
