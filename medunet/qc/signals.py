"""QC signals: pure functions of arrays, each measuring one way a prediction can go wrong.

Three families (docs/quality-control.md says what each one catches):

* :func:`input_signals` — the input image against what training saw: channel count, spacing and
  field of view (mm, in RAS axis order so any orientation compares), intensities inside the body,
  the body's share of the volume and of each border face, noise, a constant image;
* :func:`uncertainty_signals` — the network's own probabilities on its grid (tempered by the calibrated
  temperature): the soft Dice the model expects of its own mask, entropy and margin near the predicted foreground;
* :func:`mask_signals` — the final mask on the input grid: volume (mL), connected components and
  border contact per class.

Everything here is cheap: images are subsampled to about :data:`SAMPLE_VOXELS` voxels, uncertainty
reads the probabilities once, components are labelled in the mask's bounding box only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cc3d
import nibabel as nib
import numpy as np
import torch

#: Voxels an image is subsampled to (on a regular grid) for its intensity and noise statistics.
SAMPLE_VOXELS = 1_000_000
#: Quantiles (percent) of the intensities inside the body that describe an image.
BODY_QUANTILES = (5, 25, 50, 75, 95)
#: Raw HU above which a CT voxel is body rather than air (as the ct_clip_zscore crop).
CT_BODY_HU = -500.0
#: A voxel counts as "uncertain" when its top two class probabilities differ by less than this.
UNCERTAIN_MARGIN = 0.5


def ras_order(affine: np.ndarray) -> np.ndarray:
    """For each world axis R, A, S: the voxel axis closest to it (so per-axis values compare across orientations)."""
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=float))
    order = np.zeros(3, dtype=int)
    for voxel_axis, (world_axis, _flip) in enumerate(ornt):
        order[int(world_axis)] = voxel_axis
    return order


def _stride(shape: Sequence[int], target: int = SAMPLE_VOXELS) -> int:
    """Step along every axis so that a strided view holds at most about ``target`` voxels."""
    return max(1, math.ceil((float(np.prod(shape)) / target) ** (1.0 / 3.0)))


def body_threshold(sample: np.ndarray, *, ct: bool) -> float:
    """Intensity above which a voxel is inside the body: denser than air for CT (HU), else above 10 % of the 1-99 % range."""
    if ct:
        return CT_BODY_HU
    low, high = (float(v) for v in np.percentile(sample, [1.0, 99.0]))
    return low + 0.1 * (high - low)


def noise_sigma(image: np.ndarray, threshold: float, stride: int) -> float:
    """Robust noise level inside the body: the median absolute difference of neighbours along the first axis.

    Differences of adjacent voxels cancel smooth anatomy and keep the noise; the median ignores edges.
    For white noise of standard deviation s this returns about s. Sampled every ``stride`` voxels.
    """
    if image.shape[0] < 2:
        return 0.0
    a = image[0:image.shape[0] - 1:stride, ::stride, ::stride].astype(np.float64)
    b = image[1:image.shape[0]:stride, ::stride, ::stride].astype(np.float64)
    inside = (a > threshold) & (b > threshold)
    if not inside.any():
        return 0.0
    diff = b[inside] - a[inside]
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))) / math.sqrt(2.0))


def _border_fractions(body: np.ndarray, order: np.ndarray) -> list[float]:
    """Per world axis (R, A, S): the larger share of body voxels on the two border faces across that axis."""
    out = []
    for world in range(3):
        axis = int(order[world])
        faces = [np.take(body, 0, axis=axis), np.take(body, body.shape[axis] - 1, axis=axis)]
        out.append(float(max(f.mean() for f in faces)))
    return out


def input_signals(channels: np.ndarray, affine: np.ndarray, *, ct: bool) -> dict[str, Any]:
    """Statistics of an input image (channels first, voxel order of the file) that training inputs are compared on.

    Returns (JSON-ready): ``channels``; ``spacing_mm`` and ``extent_mm`` (R, A, S order); per channel
    ``intensity`` (quantiles inside the body, range of the whole volume, noise); and of the first channel
    ``body_fraction``, ``body_at_border`` (per R, A, S axis), ``constant``.
    """
    channels = np.asarray(channels)
    shape = channels.shape[1:]
    order = ras_order(affine)
    spacing = np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))
    stride = _stride(shape)
    per_channel = []
    first_body = None
    for index, image in enumerate(channels):
        sample = image[::stride, ::stride, ::stride].astype(np.float64)  # float32 inputs near their limit would overflow np.std
        threshold = body_threshold(sample, ct=ct and index == 0)
        body = sample > threshold
        values = sample[body] if body.any() else sample.reshape(-1)
        low, high = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
        per_channel.append({
            "body_quantiles": [float(v) for v in np.percentile(values, BODY_QUANTILES)],
            "range": [low, high],
            "noise": noise_sigma(image, threshold, stride),
            "spread": float(np.std(sample)),
        })
        if index == 0:
            first_body = body
    assert first_body is not None
    return {
        "channels": int(channels.shape[0]),
        "spacing_mm": [round(float(spacing[order[w]]), 4) for w in range(3)],
        "extent_mm": [round(float(spacing[order[w]] * shape[order[w]]), 2) for w in range(3)],
        "intensity": per_channel,
        "body_fraction": float(first_body.mean()),
        "body_at_border": _border_fractions(first_body, order),
        "constant": bool(per_channel[0]["spread"] == 0.0),
    }


def tempered(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Class probabilities (K, ...) as the network would give them with its logits divided by ``temperature``.

    ``softmax(log p / T)`` equals ``softmax(logits / T)``, so calibration needs only the probabilities.
    T < 1 sharpens (an under-confident model), T > 1 softens (an over-confident one); T = 1 is the identity.
    """
    if temperature == 1.0:
        return probs
    return torch.softmax(torch.log(probs.clamp_min(1e-8)) / temperature, dim=0)


def expected_dice(probs: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """Per foreground class predicted somewhere: the Dice the model expects of its argmax mask, were it calibrated.

    ``2 sum_{pred=k} p_k / (sum p_k + n_k)``. A class the mask does not contain is left out: the Dice of
    an empty mask says nothing about whether the class is truly absent (a tumour-free scan), and QC judges
    absent classes by how often training cases had them (:func:`medunet.qc.decide.mask_findings`).
    """
    k = probs.shape[0]
    flat_labels = labels.reshape(-1)
    counts = torch.bincount(flat_labels, minlength=k)
    agree = torch.bincount(flat_labels, weights=probs.reshape(k, -1).gather(0, flat_labels[None])[0].double(), minlength=k)
    mass = probs.reshape(k, -1).double().sum(dim=1)
    return {c: float(2.0 * agree[c] / (mass[c] + counts[c])) for c in range(1, k) if int(counts[c]) > 0}


def expected_dice_curve(probs: torch.Tensor, temperatures: Sequence[float]) -> list[dict[str, float]]:
    """:func:`expected_dice` at each temperature (the argmax, and so the mask, does not change with it): what calibration fits."""
    probs = probs.detach().float()
    labels = probs.max(dim=0).indices
    return [{str(c): round(v, 4) for c, v in expected_dice(tempered(probs, t), labels).items()} for t in temperatures]


def uncertainty_signals(probs: torch.Tensor, member_labels: Sequence[torch.Tensor] = (), *, temperature: float = 1.0) -> dict[str, Any]:
    """How sure the network is of its mask, from its class probabilities (K, X, Y, Z) on the network grid.

    The probabilities are first :func:`tempered` by the calibrated ``temperature``.

    * ``expected_dice``: per foreground class in the mask, :func:`expected_dice`; the minimum over them is
      ``expected_dice_min`` (1 when the mask holds no foreground); ``absent`` lists the classes the mask lacks;
    * ``entropy`` / ``margin``: mean normalised entropy and mean top-two margin over the voxels where
      some foreground class has probability above 0.1 (the predicted foreground and its boundary);
    * ``uncertain_ratio``: voxels there with margin below :data:`UNCERTAIN_MARGIN`, per predicted
      foreground voxel (a thick band of doubt around a small mask is a bad sign);
    * ``member_dice``: with several ensemble members' argmax labels, the lowest foreground Dice of one
      member's mask against the ensemble's (absent otherwise).
    """
    probs = tempered(probs.detach().float(), temperature)
    k = probs.shape[0]
    top, labels = probs.max(dim=0)
    expected = expected_dice(probs, labels)
    region = (1.0 - probs[0]) > 0.1 if k > 1 else torch.zeros_like(top, dtype=torch.bool)
    foreground = int((labels > 0).sum())
    entropy = margin = 0.0
    uncertain = 0
    if bool(region.any()):
        inside = probs[:, region]  # (K, N)
        entropy = float((-(inside * torch.log(inside.clamp_min(1e-8))).sum(dim=0) / math.log(max(k, 2))).mean())
        best2 = torch.topk(inside, 2, dim=0).values if k > 1 else inside
        gaps = best2[0] - best2[-1]
        margin, uncertain = float(gaps.mean()), int((gaps < UNCERTAIN_MARGIN).sum())
    out: dict[str, Any] = {
        "expected_dice": {str(c): round(v, 4) for c, v in expected.items()},
        "expected_dice_min": round(min(expected.values()), 4) if expected else 1.0,
        "absent": [str(c) for c in range(1, k) if c not in expected],
        "temperature": round(float(temperature), 4),
        "entropy": round(entropy, 4),
        "margin": round(margin, 4),
        "uncertain_ratio": round(uncertain / max(foreground, 1), 4),
    }
    if len(member_labels) > 1:
        ensemble = labels.cpu()
        out["member_dice"] = round(min(_foreground_dice(m.cpu(), ensemble) for m in member_labels), 4)
    return out


def _foreground_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice of the foregrounds (label > 0) of two label maps; 1 when both are empty."""
    fa, fb = a > 0, b > 0
    total = int(fa.sum() + fb.sum())
    return 1.0 if total == 0 else 2.0 * int((fa & fb).sum()) / total


def entropy_map(probs: torch.Tensor) -> torch.Tensor:
    """Per-voxel normalised entropy (0 = certain, 1 = uniform over the classes), shape (1, X, Y, Z)."""
    probs = probs.float()
    k = max(probs.shape[0], 2)
    return (-(probs * torch.log(probs.clamp_min(1e-8))).sum(dim=0, keepdim=True) / math.log(k)).clamp(0.0, 1.0)


def mask_signals(labels: np.ndarray, spacing: Sequence[float] | np.ndarray, num_classes: int, *, min_component_ml: float = 0.1) -> dict[str, Any]:
    """Per foreground class of a label mask: ``volume_ml``, ``components`` (of at least ``min_component_ml``) and ``touches_border``."""
    labels = np.asarray(labels)
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=float))) / 1000.0
    counts = np.bincount(labels.reshape(-1).astype(np.intp, copy=False), minlength=num_classes)
    box = _bounding_box(labels > 0)
    cropped = labels[box] if box is not None else labels[:0, :0, :0]
    min_voxels = max(1, int(math.ceil(min_component_ml / voxel_ml))) if voxel_ml > 0 else 1
    components = _components_per_class(cropped, num_classes, min_voxels)
    touches = _border_classes(labels, num_classes)
    return {
        str(c): {"volume_ml": round(float(counts[c]) * voxel_ml, 3), "components": int(components[c]), "touches_border": bool(touches[c])}
        for c in range(1, num_classes)
    }


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of ``mask`` as slices, or None when it is empty."""
    box = []
    for axis in range(mask.ndim):
        profile = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if profile.size == 0:
            return None
        box.append(slice(int(profile[0]), int(profile[-1]) + 1))
    return tuple(box)


def _components_per_class(labels: np.ndarray, num_classes: int, min_voxels: int) -> np.ndarray:
    """Connected components (26-connectivity, at least ``min_voxels``) of every class of a label array."""
    out = np.zeros(num_classes, dtype=int)
    if labels.size == 0:
        return out
    components, count = cc3d.connected_components(labels.astype(np.uint16, copy=False), connectivity=26, return_N=True)
    if count == 0:
        return out
    sizes = np.bincount(components.reshape(-1), minlength=count + 1)
    first = np.zeros(count + 1, dtype=np.intp)  # the class of each component: one of its voxels
    flat_components, flat_labels = components.reshape(-1), labels.reshape(-1)
    first[flat_components] = flat_labels
    for component in range(1, count + 1):
        if sizes[component] >= min_voxels:
            out[int(first[component])] += 1
    return out


def _border_classes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Which classes have a voxel on one of the volume's six border faces."""
    touched = np.zeros(num_classes, dtype=bool)
    for axis in range(3):
        for index in (0, labels.shape[axis] - 1):
            values = np.unique(np.take(labels, index, axis=axis))
            touched[values[(values > 0) & (values < num_classes)].astype(int)] = True
    return touched
