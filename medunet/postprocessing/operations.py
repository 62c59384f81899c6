"""Morphological clean-up of predicted label maps, in physical units.

All sizes are in millimetres (radii) or cubic millimetres (volumes) and are
converted to voxels with the image spacing, so the same config behaves the same
on anisotropic or differently resampled images. Every function is pure: it
returns a new array and never changes its input.

Example:
    >>> cleaned = postprocess_labels(labels, spacing=(0.8, 0.8, 3.0),
    ...                              config=cfg.postprocessing, class_names={1: "liver"})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Literal

import cc3d
import numpy as np
from scipy import ndimage

from medunet.config import ClassPostprocessing, PostprocessingConfig
from medunet.errors import DataError

DEFAULT_CONNECTIVITY: Final = 26
"""Voxels touching by a face, edge or corner belong to the same component."""

_CONNECTIVITIES = (6, 18, 26)


def _check_spacing(spacing: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """Return spacing as three floats, or raise DataError if it is not 3 positive finite numbers."""
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise DataError(f"spacing must be 3 positive numbers (mm), got {spacing!r}") from None
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise DataError(f"spacing must be 3 positive numbers (mm), got {spacing!r}")
    return values


def _check_connectivity(connectivity: int) -> Literal[6, 18, 26]:
    """``connectivity`` as the neighbourhood cc3d takes, or ValueError."""
    neighbours: dict[int, Literal[6, 18, 26]] = {6: 6, 18: 18, 26: 26}
    if connectivity not in neighbours:
        raise ValueError(f"connectivity must be one of {_CONNECTIVITIES}, got {connectivity}")
    return neighbours[connectivity]


def ball(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Boolean structuring element: the voxels within ``radius_mm`` of the centre voxel.

    On anisotropic grids this is an ellipsoid in voxels, so morphology acts on
    the same physical distance along every axis. The centre voxel is always set.
    """
    if not (math.isfinite(radius_mm) and radius_mm >= 0):
        raise ValueError(f"radius_mm must be a finite number >= 0, got {radius_mm}")
    sp = _check_spacing(spacing)
    half = [int(math.floor(radius_mm / s)) for s in sp]
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    dist2 = sum((g * s) ** 2 for g, s in zip(grids, sp))
    # A small tolerance so that e.g. radius 2 mm on a 1 mm grid includes (2, 0, 0).
    return np.asarray(dist2 <= radius_mm**2 * (1 + 1e-9), dtype=bool)


def keep_largest_component(mask: np.ndarray, *, connectivity: int = DEFAULT_CONNECTIVITY) -> np.ndarray:
    """Keep only the largest connected component (ties: the first in scan order).

    Removes spurious islands around organs that are known to be one piece.
    """
    neighbours = _check_connectivity(connectivity)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    components = cc3d.connected_components(mask.astype(np.uint8), connectivity=neighbours)
    counts = np.bincount(components.ravel())
    counts[0] = 0
    return components == int(np.argmax(counts))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions fully enclosed by the mask in 3D (not touching the volume border)."""
    return ndimage.binary_fill_holes(np.asarray(mask, dtype=bool))


def remove_small_components(
    mask: np.ndarray,
    *,
    min_size_mm3: float,
    spacing: Sequence[float],
    connectivity: int = DEFAULT_CONNECTIVITY,
) -> np.ndarray:
    """Remove connected components whose volume (voxels x voxel volume) is below ``min_size_mm3``.

    A physical threshold means the same speck is removed whatever the resolution.
    """
    neighbours = _check_connectivity(connectivity)
    voxel_mm3 = math.prod(_check_spacing(spacing))
    mask = np.asarray(mask, dtype=bool)
    if min_size_mm3 <= 0 or not mask.any():
        return mask.copy()
    components = cc3d.connected_components(mask.astype(np.uint8), connectivity=neighbours)
    keep = np.bincount(components.ravel()) * voxel_mm3 >= min_size_mm3
    keep[0] = False
    return keep[components]


def _padded_morphology(
    operation: Callable[..., np.ndarray], mask: np.ndarray, radius_mm: float, spacing: Sequence[float], mode: Literal["edge", "constant"]
) -> np.ndarray:
    """Run a scipy binary opening/closing on a padded copy of ``mask`` and crop back to its shape."""
    structure = ball(radius_mm, spacing)
    mask = np.asarray(mask, dtype=bool)
    pad = [n // 2 + 1 for n in structure.shape]
    padded = np.pad(mask, [(p, p) for p in pad], mode=mode)
    result = operation(padded, structure=structure)
    return result[tuple(slice(p, p + n) for p, n in zip(pad, mask.shape))]


def binary_opening(mask: np.ndarray, *, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Erode then dilate with a ball: removes structures thinner than the ball (spurs, bridges).

    The volume is edge-padded first: scipy would treat the outside as background
    and erode objects cut by the field of view (a full volume would lose its corners).
    """
    return _padded_morphology(ndimage.binary_opening, mask, radius_mm, spacing, "edge")


def binary_closing(mask: np.ndarray, *, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Dilate then erode with a ball: bridges gaps and dents narrower than the ball.

    The volume is zero-padded before and cropped after, so no voxel is lost at
    the border (unpadded scipy erosion removes them) and nothing is bridged
    through foreground imagined outside the field of view.
    """
    return _padded_morphology(ndimage.binary_closing, mask, radius_mm, spacing, "constant")


def settings_for_class(config: PostprocessingConfig, index: int, name: str) -> ClassPostprocessing:
    """Settings of one class: the entry under its name, else under ``str(index)``, else the default."""
    if name in config.classes:
        return config.classes[name]
    return config.classes.get(str(index), config.default)


def _clean_mask(mask: np.ndarray, settings: ClassPostprocessing, spacing: tuple[float, float, float]) -> np.ndarray:
    """Apply one class's steps in a fixed order: opening, closing, fill holes, small components, largest."""
    if settings.opening_mm > 0:
        mask = binary_opening(mask, radius_mm=settings.opening_mm, spacing=spacing)
    if settings.closing_mm > 0:
        mask = binary_closing(mask, radius_mm=settings.closing_mm, spacing=spacing)
    if settings.fill_holes:
        mask = fill_holes(mask)
    if settings.min_size_mm3 > 0:
        mask = remove_small_components(mask, min_size_mm3=settings.min_size_mm3, spacing=spacing)
    if settings.keep_largest:
        mask = keep_largest_component(mask)
    return mask


def postprocess_labels(
    labels: np.ndarray,
    *,
    spacing: Sequence[float] | np.ndarray,
    config: PostprocessingConfig,
    class_names: Mapping[int, str],
) -> np.ndarray:
    """Clean each foreground class of a 3D label map with its configured steps.

    Classes are processed in ascending index order. Voxels a class loses become
    background (0); voxels it gains (holes, closing) are taken only from voxels
    that are background at that point, never from another class. Labels not in
    ``class_names`` are left as they are. Returns a new array of the same shape
    and dtype.
    """
    if not isinstance(labels, np.ndarray) or labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        got = f"{labels.ndim}D {labels.dtype} array" if isinstance(labels, np.ndarray) else type(labels).__name__
        raise DataError(f"labels must be a 3D integer array, got {got}")
    sp = _check_spacing(spacing)
    plan = [(k, settings_for_class(config, k, name)) for k, name in sorted(class_names.items()) if k > 0]
    plan = [(k, s) for k, s in plan if not s.is_noop()]
    out = labels.copy()
    for k, settings in plan:
        mask = out == k
        if not mask.any():
            continue
        cleaned = _clean_mask(mask, settings, sp)
        out[mask & ~cleaned] = 0
        out[cleaned & ~mask & (out == 0)] = k
    return out
