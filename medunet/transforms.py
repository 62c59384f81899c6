"""MONAI dictionary-transform chains built from the config.

Three chains share one deterministic preprocessing part, so training, validation
and inference see identical intensities and geometry:

* ``preprocessing`` (deterministic, cached): load + check, orientation, spacing,
  intensity normalisation, foreground crop. Every spatial step is invertible, so
  ``Invertd`` brings predictions back to the input grid.
* ``augmentation`` (training only, random): pad, class-balanced crops, spatial and
  intensity augmentation.

Only :class:`LoadCased` is ours: MONAI's loader cannot say which case and file is
bad, and we want one-line errors before anything is cached.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    DeleteItemsd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    ToDeviced,
)

from medunet.config import AugmentationConfig, Config
from medunet.errors import ConfigError, DataError
from medunet.io.geometry import require_same_grid
from medunet.io.image import load_volume

IMAGE = "image"
LABEL = "label"


def check_label_values(label: np.ndarray, num_classes: int, *, case: str | None, path: str | None) -> None:
    """Refuse labels that are not integers in 0..num_classes-1, listing offending values and counts."""
    flat = label.reshape(-1)
    bad = (flat < 0) | (flat > num_classes - 1) | (flat != np.round(flat))
    if bad.any():
        values, counts = np.unique(flat[bad], return_counts=True)
        shown = ", ".join(f"{v:g} ({c} voxels)" for v, c in list(zip(values, counts))[:8])
        more = f" and {len(values) - 8} more" if len(values) > 8 else ""
        raise DataError(
            f"label values outside the classes 0..{num_classes - 1}: {shown}{more}; "
            "fix the label file or the datalist's \"labels\"",
            case=case,
            path=path,
        )


class LoadCased(MapTransform):
    """Load a case's image channels (and label), refusing bad files with the case and file named.

    Checks: files readable and 3D, no NaN/Inf, channels on one grid, the expected channel count,
    label on the image's grid (shape and affine), label values in 0..num_classes-1.
    """

    def __init__(self, *, num_classes: int, in_channels: int, keys: Sequence[str] = (IMAGE, LABEL)) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.num_classes = num_classes
        self.in_channels = in_channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = d.get("case")
        sources = d[IMAGE] if isinstance(d[IMAGE], (list, tuple)) else [d[IMAGE]]
        image, reference = load_volume(sources, case=case)
        if image.shape[0] != self.in_channels:
            raise DataError(
                f"has {image.shape[0]} image channel(s), the model expects {self.in_channels}",
                case=case,
                path=str(sources[0]),
            )
        d[IMAGE] = image
        if LABEL in self.keys and d.get(LABEL) is not None:
            label_path = str(d[LABEL])
            label, label_ref = load_volume(d[LABEL], case=case)
            require_same_grid(label.shape[1:], label_ref.affine, image.shape[1:], reference.affine,
                              what="label", against="the image's", case=case, path=label_path, error=DataError)
            check_label_values(label.numpy(), self.num_classes, case=case, path=label_path)
            label.affine = image.affine.clone()  # identical within tolerance; make resampling use one grid
            d[LABEL] = label
        return d


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    """Foreground for cropping: any nonzero voxel after normalisation (air is 0 after CT windowing)."""
    return x != 0


#: Raw HU above which a voxel is body rather than air: the ct_clip_zscore crop (made before normalising,
#: because the planned clip floor is a foreground percentile, usually far above air).
CT_BODY_HU = -500.0


def _above_air(x: torch.Tensor) -> torch.Tensor:
    """Foreground for cropping raw CT (ct_clip_zscore): voxels denser than air."""
    return x > CT_BODY_HU


def preprocessing(config: Config, *, num_classes: int, in_channels: int, with_label: bool) -> Compose:
    """The deterministic chain: load, orient, resample, normalise, crop. Invertible for predictions."""
    data = config.data
    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    chain: list[Any] = [
        LoadCased(num_classes=num_classes, in_channels=in_channels, keys=keys),
        Orientationd(keys=keys, axcodes=data.orientation.upper()),
    ]
    if data.target_spacing is not None:
        # float32 resampling (MONAI's default is float64): half the memory of the sampling grid and of the inverse
        # at inference (about 2.4 GB less for a 512x512x300 CT); the values differ only by float32 rounding
        chain.append(Spacingd(keys=keys, pixdim=data.target_spacing, mode=modes, dtype=torch.float32))  # type: ignore[arg-type]  # MONAI takes torch dtypes; its hint names numpy's
    if data.crop_foreground and data.normalization == "ct_clip_zscore":
        chain.append(CropForegroundd(keys=keys, source_key=IMAGE, select_fn=_above_air, allow_smaller=True))
    if data.normalization == "ct_window":
        low, high = data.window()
        chain.append(ScaleIntensityRanged(keys=IMAGE, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    elif data.normalization == "ct_clip_zscore":  # clip to [low, high] HU, then (x - mean) / std, in one affine map
        low, high = data.window()
        b_min, b_max = (low - data.ct_mean) / data.ct_std, (high - data.ct_mean) / data.ct_std
        chain.append(ScaleIntensityRanged(keys=IMAGE, a_min=low, a_max=high, b_min=b_min, b_max=b_max, clip=True))
    elif data.normalization == "zscore":
        chain.append(NormalizeIntensityd(keys=IMAGE, nonzero=data.zscore_nonzero, channel_wise=True))
    if data.crop_foreground and data.normalization != "ct_clip_zscore":
        chain.append(CropForegroundd(keys=keys, source_key=IMAGE, select_fn=_nonzero, allow_smaller=True))
    return Compose(chain)


def class_ratios(num_classes: int, foreground_ratio: float) -> list[float]:
    """Crop-centre ratios for RandCropByLabelClassesd: background first, foreground shared equally."""
    if num_classes < 2:
        return [1.0]
    per_class = foreground_ratio / (num_classes - 1)
    return [1.0 - foreground_ratio] + [per_class] * (num_classes - 1)


def crop_ratios(aug: AugmentationConfig, num_classes: int) -> list[float]:
    """augmentation.class_ratios when set (checked against the class count), else class_ratios(foreground_ratio)."""
    if aug.class_ratios is None:
        return class_ratios(num_classes, aug.foreground_ratio)
    if len(aug.class_ratios) != num_classes:
        raise ConfigError(
            f"augmentation.class_ratios needs one value per class ({num_classes}, background first), "
            f"got {len(aug.class_ratios)}: {list(aug.class_ratios)}"
        )
    return [float(r) for r in aug.class_ratios]


CLASS_CENTRES = "label_class_centres"
"""Key of the cached patch-centre candidates per class (see :class:`ClassCentresd`)."""


class ClassCentresd(MapTransform):
    """Find, once, up to ``max_per_class`` voxels of each class to centre training patches on.

    Without it, ``RandCropByLabelClassesd`` scans the whole label for every class at every draw:
    classes x voxels of work per volume and epoch, which on 512 x 512 CTs costs as much as a
    training step. Placed before the first random transform, this runs once and is cached. Each
    class keeps a random subset of its voxels (the generator is seeded by the case name, so the
    cache is reproducible), not an evenly spaced one, which could line up with the volume's rows.
    The positions are flat indices into the label's spatial shape, stored as int64 tensors.
    """

    def __init__(self, num_classes: int, max_per_class: int = 10_000, *, label_key: str = LABEL, output_key: str = CLASS_CENTRES) -> None:
        super().__init__(keys=[label_key])
        self.num_classes, self.max_per_class = num_classes, max_per_class
        self.label_key, self.output_key = label_key, output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = d[self.label_key]
        flat = (label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)).reshape(-1)
        rng = np.random.default_rng(zlib.crc32(str(d.get("case", "")).encode()))
        centres = []
        for c in range(self.num_classes):
            where = np.flatnonzero(flat == c)
            if where.size > self.max_per_class:
                where = np.sort(rng.choice(where, self.max_per_class, replace=False))
            centres.append(torch.from_numpy(where.astype(np.int64)))
        d[self.output_key] = centres
        return d


def augmentation(config: Config, *, num_classes: int, device: torch.device | None = None) -> Compose:
    """The random chain applied to cached, preprocessed training volumes.

    With ``device``, the cropped patches move there before the remaining (costlier) transforms:
    the whole volumes stay cached in host memory, and rotation, zoom, elastic, intensity, noise
    and blur run on the GPU.
    """
    aug = config.augmentation
    keys = [IMAGE, LABEL]
    modes = ["bilinear", "nearest"]
    chain: list[Any] = [
        SpatialPadd(keys=keys, spatial_size=aug.patch_size),
        ClassCentresd(num_classes),  # deterministic: cached with the volume
        RandCropByLabelClassesd(
            keys=keys,
            label_key=LABEL,
            spatial_size=aug.patch_size,
            ratios=crop_ratios(aug, num_classes),
            num_classes=num_classes,
            num_samples=aug.samples_per_volume,
            indices_key=CLASS_CENTRES,
            warn=False,
        ),
        DeleteItemsd(keys=CLASS_CENTRES),  # the patches do not need them (and they would not collate)
    ]
    if device is not None:
        chain.append(ToDeviced(keys=keys, device=device, non_blocking=True))
    if aug.rotate_prob > 0:
        r = [math.radians(a) for a in aug.rotate_range_deg]
        chain.append(
            RandRotated(keys=keys, range_x=r[0], range_y=r[1], range_z=r[2], prob=aug.rotate_prob, mode=modes, padding_mode="border")
        )
    if aug.scale_prob > 0:
        chain.append(
            RandZoomd(
                keys=keys,
                prob=aug.scale_prob,
                min_zoom=aug.scale_range[0],
                max_zoom=aug.scale_range[1],
                mode=["trilinear", "nearest"],
                padding_mode="edge",
                keep_size=True,
            )
        )
    if aug.elastic_prob > 0:
        chain.append(
            Rand3DElasticd(
                keys=keys,
                sigma_range=aug.elastic_sigma,
                magnitude_range=aug.elastic_magnitude,
                prob=aug.elastic_prob,
                mode=modes,
                padding_mode="border",
            )
        )
    if aug.flip_prob > 0:
        chain.extend(RandFlipd(keys=keys, prob=aug.flip_prob, spatial_axis=axis) for axis in range(3))
    if aug.intensity_scale_prob > 0:
        chain.append(RandScaleIntensityd(keys=IMAGE, factors=aug.intensity_scale, prob=aug.intensity_scale_prob))
    if aug.intensity_shift_prob > 0:
        chain.append(RandShiftIntensityd(keys=IMAGE, offsets=aug.intensity_shift, prob=aug.intensity_shift_prob))
    if aug.gamma_prob > 0:
        chain.append(RandAdjustContrastd(keys=IMAGE, gamma=aug.gamma_range, prob=aug.gamma_prob))
    if aug.noise_prob > 0:
        chain.append(RandGaussianNoised(keys=IMAGE, std=aug.noise_std, prob=aug.noise_prob))
    if aug.blur_prob > 0:
        s = aug.blur_sigma
        chain.append(RandGaussianSmoothd(keys=IMAGE, sigma_x=s, sigma_y=s, sigma_z=s, prob=aug.blur_prob))
    return Compose(chain)
