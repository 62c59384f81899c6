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

Each file's header is parsed once into a :class:`SliceHeader` (:func:`_read_header`): a tag pydicom
cannot decode, a malformed or non-finite number or a wrong value count is a DataError naming the file
and the tag there, so nothing later converts header values again.

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

from medunet.errors import DataError, parse_error
from medunet.io.geometry import MAX_VOXELS, implausible_grid

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


@dataclass(frozen=True)
class SliceHeader:
    """One image file's header, with every value medunet uses parsed and validated once (see :func:`_parse_slice`).

    Geometry tags are None when absent (``list_series`` tolerates that; ``read_series`` refuses it).
    """

    path: Path
    dataset: Any
    series_uid: str
    modality: str
    description: str
    rows: int
    columns: int
    frames: int
    samples: int
    position: np.ndarray | None
    """ImagePositionPatient (LPS mm)."""
    orientation: np.ndarray | None
    """ImageOrientationPatient: row direction (3), then column direction (3)."""
    pixel_spacing: np.ndarray | None
    """PixelSpacing: (between rows, between columns) in mm."""
    slice_gap: float
    """SpacingBetweenSlices, else SliceThickness, else 0 (only used for a one-slice series' description)."""
    slope: float
    intercept: float


class _BadTag(Exception):
    """A tag whose value cannot be used (malformed number, wrong count, non-finite); turned into a DataError."""

    def __init__(self, keyword: str, detail: str) -> None:
        super().__init__(f"tag {keyword} {detail}")


def _value(ds: Any, keyword: str) -> Any:
    """A tag's value, or None when absent or empty; a value pydicom cannot decode is a _BadTag."""
    try:
        value = ds.get(keyword)
    except Exception as exc:  # pydicom converts lazily; a damaged element raises on access (many types)
        raise _BadTag(keyword, f"cannot be decoded ({type(exc).__name__})") from exc
    return None if value is None or value == "" else value


def _numbers(ds: Any, keyword: str, count: int) -> np.ndarray | None:
    """``count`` finite numbers from a (decimal string) tag, or None when absent."""
    value = _value(ds, keyword)
    if value is None:
        return None
    items = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
    if len(items) != count:
        raise _BadTag(keyword, f"holds {len(items)} value(s), expected {count}")
    try:
        numbers = np.asarray([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError):
        raise _BadTag(keyword, f"holds a malformed number ({str(value)[:40]!r})") from None
    if not np.isfinite(numbers).all():
        raise _BadTag(keyword, f"holds a non-finite number ({str(value)[:40]!r})")
    return numbers


def _integer(ds: Any, keyword: str, default: int) -> int:
    value = _numbers(ds, keyword, 1)
    if value is None:
        return default
    if value[0] != round(value[0]) or abs(value[0]) > 2**31:
        raise _BadTag(keyword, f"holds {value[0]:g}, not an integer")
    return int(value[0])


def _text(ds: Any, keyword: str) -> str:
    value = _value(ds, keyword)
    return "" if value is None else str(value)


def _parse_slice(path: Path, ds: Any) -> SliceHeader | None:
    """The parsed header of an image slice, or None for a file that is not one (SEG, RT, SR, no Rows/Columns)."""
    if "SeriesInstanceUID" not in ds or "Rows" not in ds or "Columns" not in ds:
        return None
    modality = _text(ds, "Modality")
    if modality in NON_VOLUME_MODALITIES:
        return None
    gap = _numbers(ds, "SpacingBetweenSlices", 1)
    gap = gap if gap is not None else _numbers(ds, "SliceThickness", 1)
    slope = _numbers(ds, "RescaleSlope", 1)
    intercept = _numbers(ds, "RescaleIntercept", 1)
    return SliceHeader(
        path=path,
        dataset=ds,
        series_uid=_text(ds, "SeriesInstanceUID"),
        modality=modality,
        description=_text(ds, "SeriesDescription"),
        rows=_integer(ds, "Rows", 0),
        columns=_integer(ds, "Columns", 0),
        frames=_integer(ds, "NumberOfFrames", 1) or 1,
        samples=_integer(ds, "SamplesPerPixel", 1),
        position=_numbers(ds, "ImagePositionPatient", 3),
        orientation=_numbers(ds, "ImageOrientationPatient", 6),
        pixel_spacing=_numbers(ds, "PixelSpacing", 2),
        slice_gap=float(gap[0]) if gap is not None else 0.0,
        slope=float(slope[0]) if slope is not None and slope[0] != 0 else 1.0,  # 0 means "not set" in the wild
        intercept=float(intercept[0]) if intercept is not None else 0.0,
    )


def _read_header(path: Path, *, case: str | None) -> SliceHeader | None:
    """Read and parse one file's header: the one place where a corrupt DICOM header becomes a DataError naming it."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return _parse_slice(path, ds)
    except _BadTag as exc:
        raise DataError(f"{exc}; the header is corrupt", case=case, path=str(path)) from exc
    except Exception as exc:  # pydicom raises many types for damaged files; all mean "unreadable"
        raise parse_error("cannot read DICOM header", exc, case=case, path=str(path)) from exc


Members = list[SliceHeader]


def _group_series(folder: Path, *, case: str | None) -> dict[str, Members]:
    """{SeriesInstanceUID: [slice headers]} for every image series under ``folder``."""
    if not folder.is_dir():
        raise DataError("DICOM folder does not exist or is not a folder", case=case, path=str(folder))
    files = dicom_files(folder)
    if not files:
        raise DataError("folder holds no DICOM files (no file has the 'DICM' preamble)", case=case, path=str(folder))
    groups: dict[str, Members] = {}
    for path in files:
        header = _read_header(path, case=case)
        if header is not None:
            groups.setdefault(header.series_uid, []).append(header)
    if not groups:
        raise DataError(
            f"folder holds {len(files)} DICOM file(s) but no image series (only SEG/RT/SR objects or no pixel data)",
            case=case,
            path=str(folder),
        )
    return groups


def _normal(orientation: np.ndarray) -> np.ndarray:
    return np.cross(orientation[:3], orientation[3:])


def _info(uid: str, members: Members) -> SeriesInfo:
    first = members[0]
    frames = max(m.frames for m in members)
    num = len(members) if frames == 1 else frames
    spacing: tuple[float, float, float] | None = None
    if first.pixel_spacing is not None and first.orientation is not None:
        normal = _normal(first.orientation)
        positions = sorted(float(np.dot(m.position, normal)) for m in members if m.position is not None)
        gaps = np.diff(positions)
        slice_gap = float(np.median(gaps)) if gaps.size else first.slice_gap
        spacing = (float(first.pixel_spacing[1]), float(first.pixel_spacing[0]), round(slice_gap, 6))
    return SeriesInfo(
        series_uid=uid,
        modality=first.modality,
        description=first.description,
        num_slices=num,
        size=(first.columns, first.rows, num),
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


def _choose(groups: dict[str, Members], series_uid: str | None, folder: Path, case: str | None) -> str:
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


def _check_each_slice(members: Members, folder: Path, case: str | None) -> None:
    """Every slice is a single-frame, one-sample image that can be placed in space."""
    if any(m.frames > 1 for m in members):
        raise DataError(
            f"series holds multi-frame objects (NumberOfFrames {max(m.frames for m in members)}); enhanced/multi-frame "
            "DICOM is not supported. Convert it to single-frame slices (e.g. with dcm2niix or emf2sf) first",
            case=case,
            path=str(folder),
        )
    for m in members:
        missing = [k for k, v in (("ImagePositionPatient", m.position), ("ImageOrientationPatient", m.orientation),
                                  ("PixelSpacing", m.pixel_spacing)) if v is None]
        if missing:
            raise DataError(f"slice lacks {', '.join(missing)}; cannot place it in space", case=case, path=str(m.path))
        if m.samples != 1:
            raise DataError(
                "colour (multi-sample) images are not supported; a volume needs one value per voxel", case=case, path=str(m.path)
            )
        if m.rows < 1 or m.columns < 1:
            raise DataError(f"declares {m.rows} x {m.columns} pixels; the header is corrupt", case=case, path=str(m.path))


def _check_slices(members: Members, folder: Path, case: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column directions (unit) and pixel spacing (column, row) shared by every slice, or a DataError."""
    _check_each_slice(members, folder, case)
    first = members[0]
    row, col = first.orientation[:3], first.orientation[3:]  # type: ignore[index]  # _check_each_slice refused None
    if max(abs(np.linalg.norm(row) - 1), abs(np.linalg.norm(col) - 1), abs(float(np.dot(row, col)))) > ORIENTATION_TOLERANCE:
        raise DataError("ImageOrientationPatient is not two orthogonal unit vectors", case=case, path=str(first.path))
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    pixel = first.pixel_spacing
    assert pixel is not None  # checked by _check_each_slice
    for m in members[1:]:
        if np.abs(m.orientation - first.orientation).max() > ORIENTATION_TOLERANCE:  # type: ignore[operator]  # _check_each_slice refused None
            raise DataError(
                "series mixes slice orientations (ImageOrientationPatient differs between slices); "
                "it is probably several stacks in one series. Split it, or choose another series",
                case=case,
                path=str(folder),
            )
        if (m.rows, m.columns) != (first.rows, first.columns):
            raise DataError(
                f"series mixes slice sizes ({first.rows}x{first.columns} and {m.rows}x{m.columns} pixels)",
                case=case,
                path=str(folder),
            )
        if np.abs(m.pixel_spacing - pixel).max() > 1e-3 * np.abs(pixel).max():
            raise DataError(
                f"series mixes pixel spacings ({pixel.tolist()} and {m.pixel_spacing.tolist()} mm)",  # type: ignore[union-attr]  # _check_each_slice refused None
                case=case,
                path=str(folder),
            )
    if pixel.min() <= 0:
        raise DataError(f"PixelSpacing must be positive, got {pixel.tolist()}", case=case, path=str(first.path))
    return row, col, pixel[::-1].copy()


def _decode(header: SliceHeader, *, case: str | None) -> tuple[np.ndarray, Any]:
    """(rescaled float64 pixels (rows, columns), header without pixel data) of one slice."""
    import pydicom

    path = header.path
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for damaged files; all mean "unreadable"
        raise parse_error("cannot read DICOM file", exc, case=case, path=str(path)) from exc
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
        ) from exc
    if pixels.ndim != 2 or pixels.shape != (header.rows, header.columns):
        raise DataError(
            f"pixel data is {pixels.shape}, the header says one {header.rows} x {header.columns} frame", case=case, path=str(path)
        )
    with np.errstate(all="ignore"):  # float64 first: no uint16/int16 wrap-around; overflow is checked below
        values = pixels.astype(np.float64) * header.slope + header.intercept
    if not np.isfinite(values).all():
        raise DataError("pixel values are not finite after rescale (check RescaleSlope/Intercept)", case=case, path=str(path))
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


@dataclass(frozen=True)
class _Stack:
    """Slices sorted along the normal, with where each lies: what the grid checks and the affine need."""

    members: Members
    origins: np.ndarray
    """ImagePositionPatient of each slice (LPS mm), in slice order."""
    positions: np.ndarray
    """Each origin's distance along the normal."""
    drift: np.ndarray
    """In-plane offset of each origin from the normal through the first (mm along columns, rows)."""

    @property
    def gaps(self) -> np.ndarray:
        return np.diff(self.positions)

    @property
    def irregular(self) -> bool:
        gap = float(np.median(self.gaps))
        return bool(np.abs(self.gaps - gap).max() > max(SPACING_TOLERANCE * gap, 1e-3))


def _stack(members: Members, row: np.ndarray, col: np.ndarray, folder: Path, case: str | None) -> _Stack:
    """Sort slices along the normal; refuse a single slice and slices sharing a position."""
    normal = np.cross(row, col)
    origins = np.asarray([m.position for m in members])
    order = np.argsort(origins @ normal, kind="stable")
    members, origins = [members[i] for i in order], origins[order]
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
    drift = np.stack([in_plane @ row, in_plane @ col], axis=1)
    return _Stack(members, origins, positions, drift)


def _check_grid(stack: _Stack, pixel: np.ndarray, allow_resample: bool, folder: Path, case: str | None) -> bool:
    """Refuse gantry tilt and uneven spacing unless ``allow_resample``; True when the series must be resampled."""
    tilted = float(np.abs(stack.drift / pixel).max()) > DRIFT_TOLERANCE
    if allow_resample:
        return tilted or stack.irregular
    if tilted:
        shift = np.linalg.norm(stack.drift, axis=1)
        span = float(stack.positions[-1] - stack.positions[0])
        angle = np.degrees(np.arctan2(float(shift[-1]), span))
        raise DataError(
            f"slice origins drift {shift.max():.3g} mm in-plane across the series "
            f"(gantry tilt of about {angle:.2g} degrees): the grid is sheared. Pass allow_resample (--allow-resample) "
            "to resample onto an orthogonal grid",
            case=case,
            path=str(folder),
        )
    if stack.irregular:
        _check_spacing(stack.positions, folder, case)
    return False


def _read_pixels(members: Members, folder: Path, case: str | None) -> tuple[np.ndarray, list[Any]]:
    """The (columns, rows, slices) float32 volume and the slices' headers (pixel data dropped).

    The first slice is decoded before the volume is allocated, so a header claiming a huge size with
    little pixel data behind it fails on that slice instead of allocating what it claims.
    """
    rows, cols = members[0].rows, members[0].columns
    if rows * cols * len(members) > MAX_VOXELS:
        raise DataError(f"declares {cols} x {rows} x {len(members)} voxels, outside what medunet accepts", case=case, path=str(folder))
    first, ds = _decode(members[0], case=case)
    stack = np.empty((len(members), rows, cols), dtype=np.float32)  # slice-major: each slice is one contiguous write
    datasets = [ds]
    for k, member in enumerate(members):
        values, ds = (first, datasets[0]) if k == 0 else _decode(member, case=case)
        if np.abs(values).max() > np.finfo(np.float32).max:
            raise DataError("pixel values overflow float32 after rescale (check RescaleSlope/Intercept)", case=case, path=str(member.path))
        stack[k] = values
        if k:
            datasets.append(ds)
    return stack.transpose(2, 1, 0), datasets  # (x, y, z), a view


def _series_affine(row: np.ndarray, col: np.ndarray, pixel: np.ndarray, gap: float, origin: np.ndarray) -> np.ndarray:
    """The RAS+ voxel-to-world affine of a regular stack of slices (built in LPS+, then converted)."""
    lps = np.eye(4)
    lps[:3, 0] = row * pixel[0]
    lps[:3, 1] = col * pixel[1]
    lps[:3, 2] = np.cross(row, col) * gap
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


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
    row, col, pixel = _check_slices(groups[uid], folder, case)
    stack = _stack(groups[uid], row, col, folder, case)
    resample = _check_grid(stack, pixel, allow_resample, folder, case)
    volume, datasets = _read_pixels(stack.members, folder, case)
    gap = float(np.median(stack.gaps))
    if resample:
        tilted = float(np.abs(stack.drift / pixel).max()) > DRIFT_TOLERANCE
        gap = _regular_gap(stack.gaps)
        drift = stack.drift if tilted else np.zeros_like(stack.drift)
        volume, _ = _resample_to_regular(volume.astype(np.float64), stack.positions, drift, gap, pixel)
        log.warning(
            "series %s resampled onto a regular grid (%d -> %d slices, %.4g mm apart%s)",
            uid, len(stack.members), volume.shape[2], gap, ", gantry tilt removed" if tilted else "",
        )
    affine = _series_affine(row, col, pixel, gap, stack.origins[0])
    problem = implausible_grid(affine)
    if problem:
        raise DataError(f"{problem}; the series' geometry tags are corrupt", case=case, path=str(folder))
    image = nib.Nifti1Image(volume.astype(np.float32, copy=False), affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    log.debug("read DICOM series %s: %d slices, %s", uid, len(datasets), image.shape)
    return DicomSeries(
        image=image, datasets=datasets, series_uid=uid, modality=stack.members[0].modality, folder=folder, resampled=resample
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
