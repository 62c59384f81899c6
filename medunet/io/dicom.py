"""DICOM series reading: a folder of slices -> one NIfTI-style volume on the scanner's grid.

A DICOM series is a stack of single-frame images. Its geometry lives in each slice's
header, not in file names: slices are sorted by their position along the slice normal
(``dot(ImagePositionPatient, row x column)``), never by file name or InstanceNumber,
and the affine is built from ImagePositionPatient, ImageOrientationPatient and
PixelSpacing, converted from DICOM's LPS+ to NIfTI's RAS+. Voxel axis 0 runs along
each slice's columns (the row direction), axis 1 along its rows, axis 2 along the
normal. RescaleSlope/Intercept are applied per slice in float64, so uint16 values above
32767 and negative intercepts never overflow.

Geometry medunet cannot represent exactly is refused with a :class:`DataError` naming the
folder and the problem, unless ``allow_resample`` asks for a regular grid:

- missing slices or uneven spacing (a gap differing from the median gap by more than
  :data:`SPACING_TOLERANCE` of it),
- gantry tilt (slice origins drifting in-plane by more than :data:`DRIFT_TOLERANCE` of a pixel),
- mixed orientations, pixel spacings or sizes within the series; duplicate slice positions,
- multi-frame objects (NumberOfFrames > 1, e.g. enhanced CT/MR), which are not supported.

Errors and logs name folders, files, SeriesInstanceUIDs and geometry, never patient attributes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medunet.errors import DataError
from medunet.io.geometry import MAX_VOXELS

log = logging.getLogger("medunet")

#: A gap between neighbouring slices may differ from the median gap by this fraction (rounded positions in headers).
SPACING_TOLERANCE = 0.01
#: Slice origins may drift in-plane (off the normal through the first slice) by this fraction of a pixel.
DRIFT_TOLERANCE = 0.1
#: Largest |cosine| between the row and column directions, or between two slices' directions, taken as equal/orthogonal.
ORIENTATION_TOLERANCE = 1e-3
#: SOP classes that carry pixel data but are not image slices of a volume.
NON_VOLUME_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG"})
#: DICOM LPS+ <-> NIfTI RAS+ (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SeriesInfo:
    """What ``medunet dicom ls`` shows for one series: geometry and description, never patient data."""

    series_uid: str
    modality: str
    description: str
    num_slices: int
    size: tuple[int, int, int]
    spacing: tuple[float, float, float] | None
    multi_frame: bool = False

    def describe(self) -> str:
        """One line for lists in messages: UID, modality, description, slice count."""
        return f"{self.series_uid} ({self.modality}, {self.description!r}, {self.num_slices} slice(s))"


@dataclass
class DicomSeries:
    """A series read as a volume.

    Attributes:
        image: float32 volume (after rescale) with its RAS+ affine; qform and sform code 1 (scanner).
        datasets: the slices' headers, sorted along the slice normal like ``image``'s axis 2
            (pixel data removed to save memory).
        series_uid: SeriesInstanceUID.
        modality: Modality (e.g. CT, MR).
        folder: where the series was read from.
        resampled: True when ``allow_resample`` moved voxels onto a regular grid (then ``datasets`` are
            the source slices, not one per output slice).
    """

    image: nib.Nifti1Image
    datasets: list[Any]
    series_uid: str
    modality: str
    folder: Path
    resampled: bool = False


def is_dicom_file(path: Path) -> bool:
    """True for a file with the DICOM preamble ("DICM" at byte 128)."""
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: str | Path) -> list[Path]:
    """Files under ``folder`` (recursively) that carry the DICOM preamble; DICOMDIR and hidden files are skipped."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR" and is_dicom_file(p)
    )


def is_dicom_folder(path: str | Path, *, recursive: bool = True) -> bool:
    """True when ``path`` is a folder holding at least one DICOM file (in it, or also below it if ``recursive``)."""
    path = Path(path)
    if not path.is_dir():
        return False
    candidates = path.rglob("*") if recursive else path.iterdir()
    return any(p.is_file() and not p.name.startswith(".") and is_dicom_file(p) for p in candidates)


def _read_header(path: Path, *, case: str | None) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise DataError(
            f"cannot read DICOM header ({type(exc).__name__}); the file is corrupt", case=case, path=str(path)
        ) from None


def _is_volume_slice(ds: Any) -> bool:
    return (
        "SeriesInstanceUID" in ds
        and "Rows" in ds
        and "Columns" in ds
        and str(ds.get("Modality", "")) not in NON_VOLUME_MODALITIES
    )


def _group_series(folder: Path, *, case: str | None) -> dict[str, list[tuple[Path, Any]]]:
    """{SeriesInstanceUID: [(file, header)]} for every image series under ``folder``."""
    if not folder.is_dir():
        raise DataError("DICOM folder does not exist or is not a folder", case=case, path=str(folder))
    files = dicom_files(folder)
    if not files:
        raise DataError("folder holds no DICOM files (no file has the 'DICM' preamble)", case=case, path=str(folder))
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for path in files:
        ds = _read_header(path, case=case)
        if _is_volume_slice(ds):
            groups.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    if not groups:
        raise DataError(
            f"folder holds {len(files)} DICOM file(s) but no image series (only SEG/RT/SR objects or no pixel data)",
            case=case,
            path=str(folder),
        )
    return groups


def _frames(ds: Any) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _orientation(ds: Any) -> tuple[np.ndarray, np.ndarray] | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    values = np.asarray([float(v) for v in iop])
    return values[:3], values[3:]


def _info(uid: str, members: list[tuple[Path, Any]]) -> SeriesInfo:
    first = members[0][1]
    frames = max(_frames(ds) for _, ds in members)
    num = len(members) if frames == 1 else frames
    spacing: tuple[float, float, float] | None = None
    pixel = first.get("PixelSpacing")
    directions = _orientation(first)
    if pixel is not None and directions is not None:
        normal = np.cross(*directions)
        positions = sorted(
            float(np.dot([float(v) for v in ds.ImagePositionPatient], normal))
            for _, ds in members
            if "ImagePositionPatient" in ds
        )
        gaps = np.diff(positions)
        if gaps.size:
            slice_gap = float(np.median(gaps))
        else:
            slice_gap = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 0.0)) or 0.0)
        spacing = (float(pixel[1]), float(pixel[0]), round(slice_gap, 6))
    return SeriesInfo(
        series_uid=uid,
        modality=str(first.get("Modality", "")),
        description=str(first.get("SeriesDescription", "")),
        num_slices=num,
        size=(int(first.Columns), int(first.Rows), num),
        spacing=spacing,
        multi_frame=frames > 1,
    )


def list_series(folder: str | Path, *, case: str | None = None) -> list[SeriesInfo]:
    """The image series in ``folder`` (recursively), largest first: UID, modality, description, size, spacing.

    Raises:
        DataError: the folder is missing, holds no DICOM files, a DICOM file is corrupt, or no image series.
    """
    groups = _group_series(Path(folder), case=case)
    infos = [_info(uid, members) for uid, members in groups.items()]
    return sorted(infos, key=lambda i: (-i.num_slices, i.series_uid))


def _choose(groups: dict[str, list[tuple[Path, Any]]], series_uid: str | None, folder: Path, case: str | None) -> str:
    if series_uid is not None:
        if series_uid not in groups:
            listed = "; ".join(_info(u, m).describe() for u, m in groups.items())
            raise DataError(f"no series {series_uid} here; the folder holds: {listed}", case=case, path=str(folder))
        return series_uid
    if len(groups) > 1:
        listed = "; ".join(i.describe() for i in sorted((_info(u, m) for u, m in groups.items()), key=lambda i: -i.num_slices))
        raise DataError(
            f"folder holds {len(groups)} image series; choose one with --series UID (series_uid=...): {listed}",
            case=case,
            path=str(folder),
        )
    return next(iter(groups))


def _check_slices(members: list[tuple[Path, Any]], folder: Path, case: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column directions (unit) and pixel spacing (column, row) shared by every slice, or a DataError."""
    first_path, first = members[0]
    frames = _frames(first)
    if any(_frames(ds) > 1 for _, ds in members):
        raise DataError(
            f"series holds multi-frame objects (NumberOfFrames {frames}); enhanced/multi-frame DICOM is not supported. "
            "Convert it to single-frame slices (e.g. with dcm2niix or emf2sf) first",
            case=case,
            path=str(folder),
        )
    for path, ds in members:
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
        if missing:
            raise DataError(f"slice lacks {', '.join(missing)}; cannot place it in space", case=case, path=str(path))
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise DataError(
                "colour (multi-sample) images are not supported; a volume needs one value per voxel", case=case, path=str(path)
            )
    row, col = _orientation(first)  # type: ignore[misc]
    if max(abs(np.linalg.norm(row) - 1), abs(np.linalg.norm(col) - 1), abs(float(np.dot(row, col)))) > ORIENTATION_TOLERANCE:
        raise DataError("ImageOrientationPatient is not two orthogonal unit vectors", case=case, path=str(first_path))
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    size = (int(first.Rows), int(first.Columns))
    pixel = np.asarray([float(v) for v in first.PixelSpacing])
    for _path, ds in members[1:]:
        other_row, other_col = _orientation(ds)  # type: ignore[misc]
        if max(np.abs(other_row - row).max(), np.abs(other_col - col).max()) > ORIENTATION_TOLERANCE:
            raise DataError(
                "series mixes slice orientations (ImageOrientationPatient differs between slices); "
                "it is probably several stacks in one series. Split it, or choose another series",
                case=case,
                path=str(folder),
            )
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise DataError(
                f"series mixes slice sizes ({size[0]}x{size[1]} and {int(ds.Rows)}x{int(ds.Columns)} pixels)",
                case=case,
                path=str(folder),
            )
        other_pixel = np.asarray([float(v) for v in ds.PixelSpacing])
        if np.abs(other_pixel - pixel).max() > 1e-3 * pixel.max():
            raise DataError(
                f"series mixes pixel spacings ({pixel.tolist()} and {other_pixel.tolist()} mm)", case=case, path=str(folder)
            )
    if pixel.min() <= 0:
        raise DataError(f"PixelSpacing must be positive, got {pixel.tolist()}", case=case, path=str(first_path))
    return row, col, pixel[::-1].copy()


def _decode(path: Path, *, case: str | None) -> tuple[np.ndarray, Any]:
    """(rescaled float64 pixels (rows, columns), header without pixel data) of one slice."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for damaged files; all mean "unreadable"
        raise DataError(f"cannot read DICOM file ({type(exc).__name__})", case=case, path=str(path)) from None
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # missing decoder plugin (NotImplementedError/RuntimeError) or damaged pixel data
        name = getattr(syntax, "name", str(syntax))
        raise DataError(
            f"cannot decode pixel data (transfer syntax {name}, {type(exc).__name__}); see docs/hospital-pipelines.md "
            "for the supported transfer syntaxes, or decompress the series first",
            case=case,
            path=str(path),
        ) from None
    if pixels.ndim != 2:
        raise DataError(f"expected one 2D frame per file, got pixel array shape {pixels.shape}", case=case, path=str(path))
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    values = pixels.astype(np.float64) * slope + intercept  # float64 first: no uint16/int16 wrap-around
    if "PixelData" in ds:
        del ds.PixelData
    return values, ds


def _resample_to_regular(
    slices: np.ndarray, positions: np.ndarray, drift: np.ndarray, gap: float, pixel: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Put irregular and/or in-plane-shifted slices on a regular orthogonal grid.

    Each slice is first shifted in-plane (linear interpolation, edges filled with the series minimum) so
    its origin lies on the normal through the first slice, which removes gantry tilt; then every voxel
    column is linearly interpolated along the normal onto positions ``positions[0] + k * gap``.

    Returns:
        The resampled (X, Y, Z) volume and the new positions along the normal.
    """
    from scipy import ndimage

    fill = float(slices.min())
    if np.abs(drift).max() > 0:
        slices = np.stack(
            [
                ndimage.shift(
                    slices[:, :, k], shift=(drift[k, 0] / pixel[0], drift[k, 1] / pixel[1]), order=1, mode="constant", cval=fill
                )
                for k in range(slices.shape[2])
            ],
            axis=2,
        )
    count = int(round((positions[-1] - positions[0]) / gap)) + 1
    targets = positions[0] + gap * np.arange(count)
    upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    weight = np.clip((targets - positions[lower]) / (positions[upper] - positions[lower]), 0.0, 1.0)
    out = slices[:, :, lower] * (1.0 - weight) + slices[:, :, upper] * weight
    return out, targets


def _regular_gap(gaps: np.ndarray) -> float:
    """The spacing the series was meant to have: the most common gap (median of the gaps close to the smallest)."""
    smallest = float(gaps.min())
    return float(np.median(gaps[gaps <= smallest * (1 + SPACING_TOLERANCE) + 1e-6]))


def _check_spacing(positions: np.ndarray, folder: Path, case: str | None) -> None:
    gaps = np.diff(positions)
    gap = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - gap) > max(SPACING_TOLERANCE * gap, 1e-3))
    if bad.size:
        k = int(bad[0])
        missing = gaps[k] / gap - 1
        hint = f"about {missing:.0f} slice(s) missing" if missing > 0.5 else "uneven slice spacing"
        raise DataError(
            f"slice gap of {gaps[k]:.4g} mm between slices {k + 1} and {k + 2} of {len(positions)} (sorted along the normal) "
            f"where the series spacing is {gap:.4g} mm: {hint} ({bad.size} irregular gap(s)). "
            "Export the complete series, or pass allow_resample (--allow-resample) to interpolate onto a regular grid",
            case=case,
            path=str(folder),
        )


def read_series(
    folder: str | Path, *, series_uid: str | None = None, allow_resample: bool = False, case: str | None = None
) -> DicomSeries:
    """Read one DICOM series from ``folder`` into a float32 NIfTI image on the scanner's grid.

    Args:
        folder: a folder of single-frame DICOM files (searched recursively; other files are ignored).
        series_uid: the SeriesInstanceUID to read when the folder holds several series.
        allow_resample: interpolate missing/unevenly spaced slices and gantry tilt onto a regular,
            orthogonal grid (linear; see :func:`_resample_to_regular`) instead of refusing the series.
        case: case name for error messages.

    Raises:
        DataError: see the module docstring; the message names the folder and the problem.
    """
    folder = Path(folder)
    groups = _group_series(folder, case=case)
    uid = _choose(groups, series_uid, folder, case)
    members = groups[uid]
    row, col, pixel = _check_slices(members, folder, case)
    normal = np.cross(row, col)
    origins = np.asarray([[float(v) for v in ds.ImagePositionPatient] for _, ds in members])
    order = np.argsort(origins @ normal, kind="stable")
    members = [members[i] for i in order]
    origins = origins[order]
    positions = origins @ normal
    if len(members) < 2:
        raise DataError("series has a single slice; a 3D volume needs at least 2", case=case, path=str(folder))
    gaps = np.diff(positions)
    if gaps.min() <= max(1e-3, SPACING_TOLERANCE * float(np.median(gaps))):
        k = int(np.argmin(gaps))
        raise DataError(
            f"two slices share a position along the normal (slices {k + 1} and {k + 2} of {len(members)}); the series holds "
            "repeated acquisitions or time points, which medunet cannot stack into one volume",
            case=case,
            path=str(folder),
        )
    offsets = origins - origins[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = np.stack([in_plane @ row, in_plane @ col], axis=1)  # mm along columns (x) and rows (y)
    drift_pixels = np.abs(drift / pixel).max()
    irregular = np.abs(gaps - np.median(gaps)).max() > max(SPACING_TOLERANCE * float(np.median(gaps)), 1e-3)
    if drift_pixels > DRIFT_TOLERANCE and not allow_resample:
        span = float(positions[-1] - positions[0])
        angle = np.degrees(np.arctan2(float(np.linalg.norm(in_plane[-1])), span))
        raise DataError(
            f"slice origins drift {np.linalg.norm(in_plane, axis=1).max():.3g} mm in-plane across the series "
            f"(gantry tilt of about {angle:.2g} degrees): the grid is sheared. Pass allow_resample (--allow-resample) "
            "to resample onto an orthogonal grid",
            case=case,
            path=str(folder),
        )
    if irregular and not allow_resample:
        _check_spacing(positions, folder, case)

    rows, cols = int(members[0][1].Rows), int(members[0][1].Columns)
    if rows * cols * len(members) > MAX_VOXELS or min(rows, cols) < 1:
        raise DataError(
            f"declares {cols} x {rows} x {len(members)} voxels, outside what medunet accepts", case=case, path=str(folder)
        )
    stack = np.empty((len(members), rows, cols), dtype=np.float32)  # slice-major: each slice is one contiguous write
    datasets = []
    for k, (path, _) in enumerate(members):
        values, ds = _decode(path, case=case)
        if values.shape != (rows, cols):
            raise DataError(f"pixel data is {values.shape}, the header says {(rows, cols)}", case=case, path=str(path))
        stack[k] = values
        datasets.append(ds)
    volume = stack.transpose(2, 1, 0)  # (columns, rows, slices) = (x, y, z), a view

    resampled = False
    gap = float(np.median(gaps))
    if allow_resample and (irregular or drift_pixels > DRIFT_TOLERANCE):
        gap = _regular_gap(gaps)
        volume, _ = _resample_to_regular(
            volume.astype(np.float64), positions, drift if drift_pixels > DRIFT_TOLERANCE else np.zeros_like(drift), gap, pixel
        )
        resampled = True
        log.warning(
            "series %s resampled onto a regular grid (%d -> %d slices, %.4g mm apart%s)",
            uid,
            len(members),
            volume.shape[2],
            gap,
            ", gantry tilt removed" if drift_pixels > DRIFT_TOLERANCE else "",
        )
    if not np.isfinite(volume).all():
        raise DataError("pixel values are not finite after rescale (check RescaleSlope/Intercept)", case=case, path=str(folder))

    lps = np.eye(4)
    lps[:3, 0] = row * pixel[0]
    lps[:3, 1] = col * pixel[1]
    lps[:3, 2] = normal * gap
    lps[:3, 3] = origins[0]
    affine = LPS_TO_RAS @ lps
    image = nib.Nifti1Image(volume.astype(np.float32, copy=False), affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    first = datasets[0]
    log.debug("read DICOM series %s: %d slices, %s", uid, len(datasets), image.shape)
    return DicomSeries(
        image=image,
        datasets=datasets,
        series_uid=uid,
        modality=str(first.get("Modality", "")),
        folder=folder,
        resampled=resampled,
    )


def series_summary(infos: Sequence[SeriesInfo]) -> list[dict[str, Any]]:
    """JSON-ready dictionaries of :class:`SeriesInfo` (for ``medunet dicom ls --json`` and reports)."""
    return [
        {
            "series_uid": i.series_uid,
            "modality": i.modality,
            "description": i.description,
            "slices": i.num_slices,
            "size": list(i.size),
            "spacing_mm": list(i.spacing) if i.spacing else None,
            "multi_frame": i.multi_frame,
        }
        for i in infos
    ]
