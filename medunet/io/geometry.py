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



def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing in mm (column norms of the affine's 3x3 part)."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def shear_of(affine: np.ndarray) -> float:
    """Largest |cosine| between two voxel axes of the affine (0 for an orthogonal grid)."""
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = columns / np.maximum(np.linalg.norm(columns, axis=0), 1e-12)
    gram = unit.T @ unit
    return float(np.abs(gram - np.diag(np.diag(gram))).max())


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
