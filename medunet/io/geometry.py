"""Grid geometry shared by every reader, writer and check: spacing, shear, "same grid", descriptions.

An image's grid is its 3D shape plus its 4x4 voxel-to-world (RAS+) affine. Everything that
compares two grids or describes one in an error message uses these functions, so one rule
(and one tolerance) decides what "the same grid" means across medunet.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

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
