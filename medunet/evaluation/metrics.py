"""Segmentation metrics per class, in physical units, with one convention for empty masks.

Overlap (Dice, IoU, sensitivity, precision) comes from MONAI's confusion-matrix metrics; surface
metrics from MONAI's edge extraction and surface distances (``get_edge_surface_distance``), computed
once per class and shared by HD95, ASD and NSD — the same numbers ``compute_hausdorff_distance``,
``compute_average_surface_distance`` and ``compute_surface_dice`` give, for a third of the work.
Distances honour the voxel spacing, including anisotropic grids.

Definitions (P = prediction, R = reference, ∂ = surface voxels: the mask minus its 6-connected erosion):

- Dice = 2|P∩R| / (|P|+|R|); IoU = |P∩R| / |P∪R|; sensitivity = |P∩R|/|R|; precision = |P∩R|/|P|.
- HD95: the larger of the two directed 95th percentiles (linear interpolation) of distances from
  ∂P to the nearest voxel of ∂R and from ∂R to ∂P, in mm.
- ASD (average symmetric surface distance): mean of both sets of distances pooled, in mm.
- NSD (normalised surface Dice at tolerance τ mm): fraction of the surface voxels of both masks
  that lie within τ of the other surface.
- Volumes: voxel count × voxel volume, in mL; ``volume_diff_ml`` = prediction − reference.

Empty masks (the flag column says which case applies):

====================  =========  ====  ==============  ===========  =========
flag                  Dice, IoU  NSD   HD95, ASD       sensitivity  precision
====================  =========  ====  ==============  ===========  =========
"" (both present)     value      value value           value        value
``both_empty``        1          1     NaN             NaN          NaN
``ref_empty``         0          0     NaN             NaN          0
``pred_empty``        0          0     NaN             0            NaN
====================  =========  ====  ==============  ===========  =========

Summaries average the defined values and count the undefined ones, so they are never silently NaN.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from monai.metrics import compute_confusion_matrix_metric, compute_dice
from monai.metrics.utils import get_edge_surface_distance
from monai.networks.utils import one_hot
from scipy import ndimage

#: Metric columns of a result row, in the order they are written.
METRICS = (
    "dice", "iou", "hd95_mm", "asd_mm", "nsd",
    "volume_pred_ml", "volume_ref_ml", "volume_diff_ml", "sensitivity", "precision",
)
#: Values of the ``flag`` column.
FLAGS = ("", "both_empty", "pred_empty", "ref_empty")


def _confusion_metrics(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Dice, IoU, sensitivity and precision of two binary masks, not both empty (MONAI's formulas).

    The counts are exact integers from numpy (a float tensor product loses counts past 2**24 voxels and
    is slower); MONAI's ``compute_confusion_matrix_metric`` turns them into the metrics.
    """
    tp = int(np.count_nonzero(pred & ref))
    fp, fn = int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(ref)) - tp
    tn = pred.size - tp - fp - fn
    matrix = torch.tensor([[[tp, fp, tn, fn]]], dtype=torch.float64)
    names = {"dice": "f1 score", "iou": "threat score", "sensitivity": "sensitivity", "precision": "precision"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0/0 is NaN here; the caller applies the empty convention
        return {key: float(compute_confusion_matrix_metric(name, matrix).reshape(-1)[0]) for key, name in names.items()}


def _surface_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> dict[str, float]:
    """HD95, ASD and NSD of two non-empty binary masks, from one pass of MONAI's surface distances."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, distances, _ = get_edge_surface_distance(
            torch.as_tensor(pred), torch.as_tensor(ref), distance_metric="euclidean",
            spacing=[float(s) for s in spacing], symmetric=True,
        )
    pred_to_ref, ref_to_pred = cast("tuple[torch.Tensor, torch.Tensor]", distances)  # symmetric: both directions
    a, b = pred_to_ref.double().numpy(), ref_to_pred.double().numpy()
    return {
        "hd95_mm": float(max(np.percentile(a, 95), np.percentile(b, 95))),
        "asd_mm": float(np.concatenate([a, b]).mean()),
        "nsd": float((np.count_nonzero(a <= tolerance_mm) + np.count_nonzero(b <= tolerance_mm)) / (a.size + b.size)),
    }


def union_box(
    a: tuple[slice, ...] | None, b: tuple[slice, ...] | None, shape: Sequence[int], *, margin: int = 1
) -> tuple[slice, ...]:
    """The bounding box holding boxes ``a`` and ``b`` (``ndimage.find_objects`` results), grown by ``margin`` voxels.

    When both are None (nothing to hold) the box is a single voxel, so callers can crop unconditionally.
    """
    boxes = [box for box in (a, b) if box is not None]
    if not boxes:
        return tuple(slice(0, 1) for _ in shape)
    return tuple(
        slice(max(min(box[axis].start for box in boxes) - margin, 0), min(max(box[axis].stop for box in boxes) + margin, n))
        for axis, n in enumerate(shape)
    )


def binary_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing: Sequence[float],
    *,
    nsd_tolerance_mm: float = 2.0,
) -> dict[str, float | str]:
    """All metrics of one class: ``prediction`` and ``reference`` are boolean masks on one grid.

    Args:
        prediction: predicted mask (any array; non-zero is foreground).
        reference: reference mask of the same shape.
        spacing: voxel size in mm along each array axis.
        nsd_tolerance_mm: the NSD tolerance τ in mm.

    Returns:
        A dict with every name in :data:`METRICS` (floats, NaN where undefined) and ``flag``.

    Example:
        >>> binary_metrics(np.ones((2, 2, 2)), np.ones((2, 2, 2)), (1, 1, 1))["dice"]
        1.0
    """
    pred, ref = np.asarray(prediction) != 0, np.asarray(reference) != 0
    if pred.shape != ref.shape or pred.ndim != len(spacing):
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} must share a shape matching spacing {tuple(spacing)}")
    if nsd_tolerance_mm < 0 or not math.isfinite(nsd_tolerance_mm):
        raise ValueError(f"nsd_tolerance_mm must be a finite number >= 0, got {nsd_tolerance_mm}")
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    row: dict[str, float | str] = {
        "volume_pred_ml": n_pred * voxel_ml,
        "volume_ref_ml": n_ref * voxel_ml,
        "volume_diff_ml": (n_pred - n_ref) * voxel_ml,
    }
    nan = math.nan
    if n_pred == 0 and n_ref == 0:
        return {**row, "dice": 1.0, "iou": 1.0, "hd95_mm": nan, "asd_mm": nan, "nsd": 1.0,
                "sensitivity": nan, "precision": nan, "flag": "both_empty"}
    if n_pred == 0 or n_ref == 0:
        return {**row, "dice": 0.0, "iou": 0.0, "hd95_mm": nan, "asd_mm": nan, "nsd": 0.0,
                "sensitivity": 0.0 if n_ref else nan, "precision": 0.0 if n_pred else nan,
                "flag": "pred_empty" if n_pred == 0 else "ref_empty"}
    # Everything below depends only on the voxels in (and just around) P ∪ R: crop to them.
    box = union_box(ndimage.find_objects(pred.astype(np.uint8))[0], ndimage.find_objects(ref.astype(np.uint8))[0], pred.shape)
    pred, ref = pred[box], ref[box]
    row.update(_confusion_metrics(pred, ref))
    row.update(_surface_metrics(pred, ref, spacing, nsd_tolerance_mm))
    row["flag"] = ""
    return {name: row[name] for name in (*METRICS, "flag")}


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of each foreground class (index 0 is class 1) using MONAI's implementation.

    Convention: a class absent from both volumes scores 1.0 (nothing to find, nothing found);
    absent from the reference but predicted scores 0.0. The result therefore never holds NaN.
    """
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction and reference must have the same shape, got {prediction.shape} and {reference.shape}")
    pred = one_hot(torch.as_tensor(prediction.astype(np.int64))[None, None], num_classes)
    ref = one_hot(torch.as_tensor(reference.astype(np.int64))[None, None], num_classes)
    dice = compute_dice(pred, ref, include_background=False, ignore_empty=False)[0].numpy().astype(np.float64)
    both_empty = (pred[0, 1:].flatten(1).sum(1) == 0) & (ref[0, 1:].flatten(1).sum(1) == 0)
    dice[both_empty.numpy()] = 1.0
    return dice
