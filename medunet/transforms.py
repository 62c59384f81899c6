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
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
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
from medunet.io.nifti import describe_affine, load_volume, same_grid

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
            if label.shape[1:] != image.shape[1:] or not same_grid(label_ref.affine, reference.affine):
                raise DataError(
                    f"label grid differs from the image's: shape {tuple(label.shape[1:])} vs {tuple(image.shape[1:])}, "
                    f"{describe_affine(label_ref.affine)} vs {describe_affine(reference.affine)}",
                    case=case,
                    path=label_path,
                )
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
        chain.append(Spacingd(keys=keys, pixdim=data.target_spacing, mode=modes, dtype=torch.float32))
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
        RandCropByLabelClassesd(
            keys=keys,
            label_key=LABEL,
            spatial_size=aug.patch_size,
            ratios=crop_ratios(aug, num_classes),
            num_classes=num_classes,
            num_samples=aug.samples_per_volume,
            warn=False,
        ),
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
