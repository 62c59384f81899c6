"""Grid geometry shared by every reader, writer and check: spacing, shear, "same grid", descriptions.

An image's grid is its 3D shape plus its 4x4 voxel-to-world (RAS+) affine. Everything that
compares two grids or describes one in an error message uses these functions, so one rule
(and one tolerance) decides what "the same grid" means across medunet.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np

from medunet.errors import DataError, GeometryError

#: Refuse files that declare more voxels than this (a corrupt header must not allocate terabytes).
MAX_VOXELS = 2_000_000_000
#: Tolerance of "same grid" comparisons between affines (relative to the voxel size).
AFFINE_TOLERANCE = 1e-3
#: Largest |cosine| between voxel axes still taken as orthogonal (rounding in headers, not real shear).
SHEAR_TOLERANCE = 1e-3
#: Voxel sizes (mm) and world coordinates (|mm|) outside these bounds come from a corrupt header, not a scanner:
#: no medical image has voxels under 0.1 micrometre or over 1 m, or lies 1 km from the scanner's origin.
PLAUSIBLE_SPACING_MM = (1e-4, 1e3)
MAX_COORDINATE_MM = 1e6


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing in mm (column norms of the affine's 3x3 part)."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def shear_of(affine: np.ndarray) -> float:
    """Largest |cosine| between two voxel axes of the affine (0 for an orthogonal grid, Inf for a non-finite one)."""
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.isfinite(columns).all():
        return float("inf")  # no angle between axes that have no direction; callers report it as broken
    unit = columns / np.maximum(np.linalg.norm(columns, axis=0), 1e-12)
    gram = unit.T @ unit
    return float(np.abs(gram - np.diag(np.diag(gram))).max())


def implausible_grid(affine: np.ndarray) -> str | None:
    """Why an affine cannot be a real image's (non-finite, degenerate, absurd spacing or origin), or None."""
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        return "the affine is not finite"
    spacing = spacing_of(matrix)
    low, high = PLAUSIBLE_SPACING_MM
    if spacing.min() < low or spacing.max() > high:
        return f"voxel spacing ({', '.join(f'{s:.3g}' for s in spacing)}) mm is outside {low:g}..{high:g} mm"
    if np.abs(matrix[:3, 3]).max() > MAX_COORDINATE_MM:
        return f"the origin ({', '.join(f'{o:.3g}' for o in matrix[:3, 3])}) mm lies over {MAX_COORDINATE_MM / 1e6:g} km away"
    return None


def same_grid(affine_a: np.ndarray, affine_b: np.ndarray, *, tolerance: float = AFFINE_TOLERANCE) -> bool:
    """True when two affines describe the same grid within ``tolerance`` of a voxel."""
    a = np.asarray(affine_a, dtype=np.float64)
    b = np.asarray(affine_b, dtype=np.float64)
    scale = max(float(spacing_of(a).max()), 1e-6)
    return bool(np.allclose(a[:3, :4], b[:3, :4], rtol=0.0, atol=tolerance * scale))


def describe_affine(affine: np.ndarray) -> str:
    """Short text for error messages: spacing, origin and axis codes."""
    affine = np.asarray(affine, dtype=np.float64)
    # a degenerate axis (zero or non-finite spacing) has no direction: shown as "?"
    codes = "".join(c or "?" for c in nib.aff2axcodes(affine)) if np.isfinite(affine).all() else "???"
    spacing = ", ".join(f"{s:.4g}" for s in spacing_of(affine))
    origin = ", ".join(f"{o:.4g}" for o in affine[:3, 3])
    return f"spacing ({spacing}) mm, origin ({origin}), axes {codes}"


def require_same_grid(
    shape: Sequence[int],
    affine: np.ndarray,
    ref_shape: Sequence[int],
    ref_affine: np.ndarray,
    *,
    what: str,
    against: str,
    case: str | None = None,
    path: str | None = None,
    fix: str = "",
    error: type[DataError] | type[GeometryError] = GeometryError,
    tolerance: float = AFFINE_TOLERANCE,
) -> None:
    """Raise ``error`` unless the grid (3D ``shape``, ``affine``) is the reference grid.

    The one "same grid" check of medunet: a label against its image, a channel against the
    first one, a prediction against its reference. The message names both shapes and both
    affines, e.g. "case 'a', file l.nii.gz: label grid differs from the image's: shape ... vs ...".

    Args:
        what: the grid checked ("label", "prediction").
        against: whose grid it must match, possessive ("the image's").
        case, path: where the problem is (the file is the one checked).
        fix: how to fix it, appended after a semicolon.
        error: DataError for bad input data, GeometryError for results off their input's grid.
    """
    shape3, ref3 = tuple(int(s) for s in shape[:3]), tuple(int(s) for s in ref_shape[:3])
    if shape3 == ref3 and same_grid(affine, ref_affine, tolerance=tolerance):
        return
    message = (
        f"{what} grid differs from {against}: shape {shape3} vs {ref3}, "
        f"{describe_affine(affine)} vs {describe_affine(ref_affine)}" + (f"; {fix}" if fix else "")
    )
    if error is DataError:
        raise DataError(message, case=case, path=path)
    where = ", ".join([*([f"case {case!r}"] if case is not None else []), *([f"file {path}"] if path is not None else [])])
    raise error(f"{where}: {message}" if where else message)
