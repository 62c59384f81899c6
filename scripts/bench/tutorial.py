"""The plain MONAI tutorial inference chain, the baseline the inference benchmarks compare medunet with."""

from __future__ import annotations

from collections.abc import Sequence

import monai.transforms as mt
import numpy as np


def tutorial_inference_chain(spacing: Sequence[float], window: Sequence[float], out_dir: str) -> tuple[mt.Compose, mt.Compose]:
    """(pre, post) as in MONAI's spleen tutorial: load, RAS, resample, window to [0, 1], crop; invert, argmax, save uint8.

    ``pre`` maps {"image": path} to a preprocessed image; ``post`` inverts ``data["pred"]`` (class scores)
    back to the input grid and writes ``<name>_seg.nii.gz`` into ``out_dir``.
    """
    pre = mt.Compose([
        mt.LoadImaged(keys="image"),
        mt.EnsureChannelFirstd(keys="image"),
        mt.Orientationd(keys="image", axcodes="RAS"),
        mt.Spacingd(keys="image", pixdim=tuple(spacing), mode="bilinear"),
        mt.ScaleIntensityRanged(keys="image", a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
        mt.CropForegroundd(keys="image", source_key="image", allow_smaller=True),
    ])
    post = mt.Compose([
        mt.Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
        mt.AsDiscreted(keys="pred", argmax=True),
        mt.SaveImaged(keys="pred", output_dir=out_dir, output_postfix="seg", resample=False, output_dtype=np.uint8,
                      separate_folder=False, print_log=False),
    ])
    return pre, post


def tutorial_training_chain(
    spacing: Sequence[float], window: Sequence[float], patch: Sequence[int], samples: int, *, pad_to_patch: bool = False
) -> tuple[mt.Compose, mt.Compose]:
    """(train, validation) as in MONAI's spleen tutorial's training section, with no cache.

    Both: load, window to [0, 1], crop to the foreground, RAS, resample. ``train`` then draws
    ``samples`` patches per volume, half centred on the label's foreground (RandCropByPosNegLabeld);
    ``pad_to_patch`` pads volumes smaller than a patch first.
    """
    keys = ["image", "label"]
    common = [
        mt.LoadImaged(keys=keys),
        mt.EnsureChannelFirstd(keys=keys),
        mt.ScaleIntensityRanged(keys=["image"], a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
        mt.CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
        mt.Orientationd(keys=keys, axcodes="RAS"),
        mt.Spacingd(keys=keys, pixdim=tuple(spacing), mode=("bilinear", "nearest")),
    ]
    pad = [mt.SpatialPadd(keys=keys, spatial_size=tuple(patch))] if pad_to_patch else []
    crop = mt.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=tuple(patch), pos=1, neg=1,
                                     num_samples=samples, image_key="image", image_threshold=0)
    return mt.Compose([*common, *pad, crop]), mt.Compose(common)
