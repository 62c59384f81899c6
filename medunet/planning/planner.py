"""From a dataset fingerprint to a complete, explained config (what ``medunet plan`` writes).

The rules follow nnU-Net's 3d_fullres planner, simplified so each fits in a sentence
(docs/planning.md explains each and compares them with nnU-Net v2):

* **spacing**: the median spacing per axis; when the coarsest axis is more than 3x the next
  one, it takes the 10th percentile of that axis' spacings instead (less interpolation
  across slices, as nnU-Net does);
* **intensities**: CT: clip to the 0.5/99.5th percentiles of foreground voxels and z-score
  with their mean and std (``ct_clip_zscore``); MRI: per-case z-score, within nonzero voxels
  when the images have an exactly-zero background (skull-stripped/cropped);
* **patch, batch and network**: start from the median (cropped) shape at the target spacing;
  build the DynUNet topology for it (downsample an axis only while its spacing is at most 2x
  the finest and its size stays >= 4; kernel 1 on axes still much coarser than the finest);
  shrink the axis covering the most millimetres until one training step fits the GPU budget
  (:mod:`medunet.planning.memory`); then raise the batch while it fits and covers <= 5% of
  the dataset's voxels;
* **sampling**: rare classes (small median volume) get more patch centres;
* **augmentation**: very anisotropic data rotates in-plane only and is not zoomed.

:func:`make_plan` returns a :class:`Plan`: the config values plus a comment per planned field.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medunet.config import Config, ModelConfig, config_from_dict
from medunet.errors import ConfigError, DataError
from medunet.planning.memory import MemoryEstimate, fits, training_step_memory

#: Coarse-to-fine spacing ratio above which data counts as anisotropic.
ANISOTROPY = 3.0
#: Smallest feature map edge (voxels) at the bottom of the network.
MIN_EDGE = 4
#: At most this many resolution levels (5 downsamplings).
MAX_LEVELS = 6
#: Feature maps double per level up to this many (nnU-Net's cap).
MAX_FEATURES = 320
#: A batch covers at most this fraction of the dataset's voxels (nnU-Net's rule against over-large batches).
BATCH_DATASET_FRACTION = 0.05
MRI_WORDS = ("MR", "T1", "T2", "FLAIR", "ADC", "DWI", "PD")


@dataclass
class Plan:
    """Planned config values (nested dict, the config's sections) and the reason for each planned field."""

    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    comments: dict[str, str] = field(default_factory=dict)
    memory: MemoryEstimate | None = None

    def set(self, key: str, value: Any, comment: str) -> None:
        """Plan ``section.field`` = ``value`` because of ``comment``."""
        section, name = key.split(".", 1)
        self.values.setdefault(section, {})[name] = value
        self.comments[key] = comment

    def config(self) -> Config:
        """The planned values as a checked Config."""
        return config_from_dict(self.values)


def _fmt(values: Iterable[float], digits: int = 3) -> str:
    return "(" + ", ".join(f"{v:.{digits}g}" for v in values) + ")"


def modality_of(text: str | None) -> str:
    """ "MRI" when a datalist modality names an MR sequence, else "CT"."""
    return "MRI" if text and any(word in text.upper() for word in MRI_WORDS) else "CT"


def target_spacing(fingerprint: dict[str, Any]) -> tuple[list[float], int | None, str]:
    """Median spacing per axis; the coarse axis of anisotropic data takes the 10th percentile.

    Returns the spacing, the anisotropic axis (or None) and the explanation.
    """
    median = np.asarray(fingerprint["spacing"]["median"], dtype=float)
    p10 = np.asarray(fingerprint["spacing"]["percentile_10"], dtype=float)
    coarse = int(np.argmax(median))
    others = [median[a] for a in range(3) if a != coarse]
    spacing = median.copy()
    reason = f"median spacing {_fmt(median)}"
    if median[coarse] > ANISOTROPY * max(others):
        spacing[coarse] = max(p10[coarse], max(others))
        reason += (
            f"; axis {coarse} is {median[coarse] / max(others):.1f}x coarser (> {ANISOTROPY:g}x) -> its 10th percentile "
            f"{p10[coarse]:.3g}"
        )
        return [round(float(s), 4) for s in spacing], coarse, reason
    return [round(float(s), 4) for s in spacing], None, reason


def topology(patch: Sequence[int], spacing: Sequence[float]) -> tuple[list[list[int]], list[list[int]]]:
    """DynUNet strides and kernel sizes per level for a patch at a spacing (nnU-Net's rule, simplified).

    An axis is downsampled at the next level while its current spacing is at most 2x the finest
    axis' and its size stays >= MIN_EDGE; a level uses kernel 3 on an axis once that axis' spacing
    is within 2x of the finest, else 1 (in-plane convolutions first on anisotropic data).
    """
    current = [float(s) for s in spacing]
    size = [int(p) for p in patch]

    def kernel() -> list[int]:
        return [3 if c <= 2 * min(current) else 1 for c in current]

    strides, kernels = [[1, 1, 1]], [kernel()]
    while len(strides) < MAX_LEVELS:
        finest = min(current)
        stride = [2 if c <= 2 * finest and s // 2 >= MIN_EDGE else 1 for c, s in zip(current, size)]
        if stride == [1, 1, 1]:
            break
        current = [c * st for c, st in zip(current, stride)]
        size = [math.ceil(s / st) for s, st in zip(size, stride)]
        strides.append(stride)
        kernels.append(kernel())
    return strides, kernels


def base_features(gpu_memory_gb: float) -> int:
    """Width of the first level: nnU-Net's 32 from 4 GB up, halved per halving of the budget below (at least 4)."""
    if gpu_memory_gb >= 4:
        return 32
    return max(4, 2 ** int(math.floor(math.log2(32 * gpu_memory_gb / 4))))


def network_for(patch: Sequence[int], spacing: Sequence[float], width: int) -> tuple[ModelConfig, list[int]]:
    """The DynUNet for a patch, and the patch rounded up to a multiple of its total stride."""
    strides, kernels = topology(patch, spacing)
    features = [min(width * 2**level, MAX_FEATURES) for level in range(len(strides))]
    model = ModelConfig(
        name="dynunet",
        features=tuple(features),
        strides=tuple((s[0], s[1], s[2]) for s in strides),
        kernel_sizes=tuple((k[0], k[1], k[2]) for k in kernels),
        deep_supervision=len(features) > 2,
        deep_supervision_heads=min(2, max(len(features) - 2, 0)),
    )
    total = model.total_stride()
    return model, [math.ceil(p / t) * t for p, t in zip(patch, total)]


def median_shape_at(fingerprint: dict[str, Any], spacing: Sequence[float], crop_key: str) -> tuple[list[int], float]:
    """Median cropped case shape (voxels) at ``spacing``, and the dataset's total voxels there."""
    shapes = np.array([
        np.asarray(case[crop_key]) * np.asarray(case["spacing"]) / np.asarray(spacing) for case in fingerprint["cases"]
    ])
    return [max(1, int(round(v))) for v in np.median(shapes, axis=0)], float(np.prod(shapes, axis=1).sum())


def patch_and_network(
    median_shape: Sequence[int], spacing: Sequence[float], *, in_channels: int, out_channels: int, gpu_memory_gb: float,
    dataset_voxels: float,
) -> tuple[list[int], int, ModelConfig, MemoryEstimate, list[str]]:
    """Largest patch (from the median shape down) whose training step with batch 2 fits; then the batch.

    Returns patch, batch (patches per step), model, its memory estimate and the steps taken (for comments).
    """
    width = base_features(gpu_memory_gb)
    # at least 16 voxels on the fine axes, so the U-Net has >= 3 levels (DynUNet's minimum); small cases are padded
    smallest = [4 * MIN_EDGE if s <= 2 * min(spacing) else MIN_EDGE for s in spacing]
    patch = [max(int(m), lo) for m, lo in zip(median_shape, smallest)]
    steps: list[str] = []
    while True:
        model, rounded = network_for(patch, spacing, width)
        estimate = training_step_memory(model, rounded, 2, in_channels=in_channels, out_channels=out_channels)
        if fits(estimate, gpu_memory_gb):
            break
        total = model.total_stride()
        shrinkable = [a for a in range(3) if rounded[a] - total[a] >= smallest[a]]
        if not shrinkable:
            raise ConfigError(
                f"no patch fits in --gpu-memory {gpu_memory_gb:g} GB even at {rounded} voxels ({estimate.describe()}); "
                "raise --gpu-memory or plan a coarser spacing (--set data.target_spacing=... on the plan)"
            )
        axis = max(shrinkable, key=lambda a: (rounded[a] * spacing[a], rounded[a] / median_shape[a]))
        patch = list(rounded)
        patch[axis] = rounded[axis] - total[axis]
        steps.append(f"axis {axis} -> {patch[axis]}")
    batch = 2
    patch_voxels = float(np.prod(rounded))
    while (batch + 2) * patch_voxels <= BATCH_DATASET_FRACTION * dataset_voxels:
        bigger = training_step_memory(model, rounded, batch + 2, in_channels=in_channels, out_channels=out_channels)
        if not fits(bigger, gpu_memory_gb):
            break
        batch, estimate = batch + 2, bigger
    return rounded, batch, model, estimate, steps


def crop_ratios(fingerprint: dict[str, Any], foreground_ratio: float) -> tuple[list[float] | None, str]:
    """Patch-centre ratios favouring rare classes: weight sqrt(largest median volume / class volume), 1..4x."""
    classes = {int(k): v for k, v in fingerprint["classes"].items() if int(k) > 0}
    volumes = {k: v["volume_ml_median"] for k, v in classes.items()}
    if len(volumes) < 2 or min(volumes.values()) <= 0:
        return None, "one foreground class (or an absent one): foreground_ratio shared equally"
    largest = max(volumes.values())
    weights = {k: float(np.clip(math.sqrt(largest / v), 1.0, 4.0)) for k, v in volumes.items()}
    described = ", ".join(f"{classes[k]['name']} {volumes[k]:.3g} mL" for k in sorted(volumes))
    if max(weights.values()) < 1.5:
        return None, f"median class volumes {described}: none rare, foreground_ratio shared equally"
    total = sum(weights.values())
    ratios = [round(1.0 - foreground_ratio, 3)] + [round(foreground_ratio * weights[k] / total, 3) for k in sorted(weights)]
    return ratios, f"median class volumes {described} -> rarer classes get up to {max(weights.values()):.1f}x more patch centres"


def _normalization(plan: Plan, fingerprint: dict[str, Any], modality: str) -> None:
    stats = fingerprint["intensity"][0]  # CT: the first channel's statistics (CT datasets have one channel)
    if modality == "CT":
        if not stats.get("samples"):
            raise DataError("no training label has foreground voxels, so CT intensities cannot be planned; check the labels")
        low, high = round(stats["percentile_00_5"], 1), round(stats["percentile_99_5"], 1)
        if high <= low:  # (nearly) constant foreground: keep a valid 1 HU range
            pad = max(0.5, 1e-3 * abs(low))
            low, high = low - pad, high + pad
        plan.set("data.normalization", "ct_clip_zscore", "CT: clip to foreground percentiles, z-score with foreground mean/std")
        plan.set("data.ct_window", [low, high], f"0.5/99.5th percentiles of {stats['samples']} foreground voxels (HU)")
        plan.set("data.ct_mean", round(stats["mean"], 2), "mean of those foreground voxels (HU)")
        plan.set("data.ct_std", float(f"{max(stats['std'], 1e-3):.4g}"), "std of those foreground voxels (HU)")
        plan.set("data.crop_foreground", True, f"crop to voxels above -500 HU (not air): median {_crop_text(fingerprint, 'body')}")
        return
    zero = fingerprint["zero_fraction_median"]
    stripped = bool(fingerprint["zero_background"])
    why = f"median {zero:.0%} of voxels exactly 0 -> " + (
        "skull-stripped/cropped: statistics within nonzero voxels" if stripped else "raw images: statistics over the whole volume"
    )
    plan.set("data.normalization", "zscore", "MRI: per-case, per-channel z-score")
    plan.set("data.zscore_nonzero", stripped, why)
    plan.set("data.crop_foreground", stripped, "crop to the nonzero box" if stripped else "no zero background to crop")


def _crop_text(fingerprint: dict[str, Any], rule: str) -> str:
    return _fmt(fingerprint[f"shape_cropped_{rule}"]["median"]) + f" of median {_fmt(fingerprint['shape']['median'])} voxels"


def _augmentation(plan: Plan, coarse_axis: int | None, ratio: float) -> None:
    if coarse_axis is None:
        plan.set("augmentation.rotate_range_deg", [30.0, 30.0, 30.0], f"spacing ratio {ratio:.1f} <= {ANISOTROPY:g}: 3D rotations")
        return
    rotation = [0.0, 0.0, 0.0]
    rotation[coarse_axis] = 30.0
    why = f"spacing ratio {ratio:.1f} > {ANISOTROPY:g}"
    plan.set("augmentation.rotate_range_deg", rotation, f"{why}: rotate in-plane only (about axis {coarse_axis})")
    plan.set("augmentation.scale_prob", 0.0, f"{why}: an isotropic zoom would resample across slices; off")
    plan.set("augmentation.elastic_prob", 0.0, f"{why}: no out-of-plane elastic deformation")


def make_plan(fingerprint: dict[str, Any], *, modality: str | None = None, gpu_memory_gb: float = 8.0) -> Plan:
    """Plan a full config from a fingerprint (see the module docstring for the rules)."""
    if gpu_memory_gb <= 0:
        raise ConfigError(f"--gpu-memory must be positive (GB), got {gpu_memory_gb}")
    modality = (modality or modality_of(fingerprint.get("modality"))).upper()
    modality = "MRI" if modality in ("MR", "MRI") else "CT"
    plan = Plan()
    plan.set("data.modality", modality, f"datalist modality {fingerprint.get('modality')!r}")
    plan.set("data.orientation", fingerprint["orientation"], "axis order the fingerprint was taken in")
    spacing, coarse, why = target_spacing(fingerprint)
    plan.set("data.target_spacing", spacing, why)
    _normalization(plan, fingerprint, modality)

    crop_key = "shape_cropped_body" if modality == "CT" else (
        "shape_cropped_nonzero" if fingerprint["zero_background"] else "shape"
    )
    median, dataset_voxels = median_shape_at(fingerprint, spacing, crop_key)
    out_channels = len(fingerprint["classes"])
    patch, batch, model, estimate, steps = patch_and_network(
        median, spacing, in_channels=fingerprint["channels"], out_channels=out_channels, gpu_memory_gb=gpu_memory_gb,
        dataset_voxels=dataset_voxels,
    )
    plan.memory = estimate
    shrunk = f"; shrunk {', '.join(steps[-3:])}{' ...' if len(steps) > 3 else ''} to fit" if steps else ""
    plan.set("augmentation.patch_size", patch, f"median shape at target spacing {_fmt(median)}, rounded to stride {_fmt(model.total_stride())}{shrunk}")
    plan.set("augmentation.samples_per_volume", 2, "patches per drawn volume")
    plan.set("train.batch_size", batch // 2, f"{batch} patches per step: {estimate.describe()} of {gpu_memory_gb:g} GB")
    ratio = max(spacing) / min(spacing)
    plan.set("model.name", "dynunet", "per-axis strides and kernels")
    plan.set("model.features", list(model.features), f"{model.features[0]} doubling per level up to {MAX_FEATURES}; budget {gpu_memory_gb:g} GB")
    plan.set("model.strides", [list(s) for s in model.level_strides()], f"downsample an axis while its spacing <= 2x the finest and size >= {MIN_EDGE}")
    plan.set("model.kernel_sizes", [list(k) for k in model.level_kernels()], "kernel 1 on an axis while it is > 2x coarser than the finest")
    plan.set("model.deep_supervision", model.deep_supervision, "auxiliary losses at lower resolutions")
    plan.set("model.deep_supervision_heads", model.deep_supervision_heads, "auxiliary outputs at the levels below the top")
    ratios, why = crop_ratios(fingerprint, Config().augmentation.foreground_ratio)
    plan.set("augmentation.class_ratios", ratios, why)
    _augmentation(plan, coarse, ratio)
    plan.set("inference.roi_size", None, f"null: the sliding window is the training patch {_fmt(patch)}")
    plan.config()  # every planned value passes the config's own checks
    return plan
