"""Typed, documented configuration.

A config is a tree of frozen dataclasses, one per YAML section. Loading is strict:
an unknown key is an error with a "did you mean" hint, and every value is checked
against the field's type. ``--set section.field=value`` overrides go through the
same checks, so a typo never silently trains the wrong model.

Example:
    >>> cfg = load_config("configs/ct.yaml", overrides=["train.max_epochs=10"])
    >>> cfg.train.max_epochs
    10

Every field is documented in ``docs/configuration.md`` (kept in sync by a test).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from medunet.errors import ConfigError

#: CT intensity windows (low, high) in HU, selectable by name in ``data.ct_window``.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (-160.0, 240.0),  # W400 / L40
    "abdomen": (-175.0, 250.0),
    "liver": (-25.0, 225.0),  # W250 / L100
    "lung": (-1350.0, 150.0),  # W1500 / L-600
    "bone": (-450.0, 1050.0),  # W1500 / L300
    "brain": (0.0, 80.0),  # W80 / L40
}

Vec3f = tuple[float, float, float]
Vec3i = tuple[int, int, int]

#: Field metadata of data settings that do not change what preprocessing makes of a case (where and how fast it is
#: cached, which cases are held out, which paths are accepted): the disk-cache key and the ensemble check skip them.
_NOT_PREPROCESSING = {"preprocessing": False}


def non_preprocessing_fields(section: type) -> frozenset[str]:
    """Names of the fields of config dataclass ``section`` marked as not changing preprocessing."""
    return frozenset(f.name for f in dataclasses.fields(section) if f.metadata.get("preprocessing", True) is False)


@dataclass(frozen=True)
class DataConfig:
    """How volumes are read and turned into network input (the deterministic part)."""

    modality: Literal["CT", "MRI"] = "CT"
    """Imaging modality; chooses sensible checks and is recorded in the checkpoint."""
    labels: dict[str, str] | None = None
    """Class index -> name, e.g. {"0": "background", "1": "liver"}. The datalist's "labels" wins when both are set; when neither is, classes are found from the training labels."""
    orientation: str = "RAS"
    """Canonical axis codes every volume is reoriented to before resampling."""
    target_spacing: Vec3f | None = (1.5, 1.5, 2.0)
    """Voxel spacing in mm the network works at, or null to keep each volume's own spacing."""
    normalization: Literal["ct_window", "ct_clip_zscore", "zscore", "none"] = "ct_window"
    """ct_window: clip to data.ct_window and scale to [0, 1]; ct_clip_zscore: clip to data.ct_window, then (x - data.ct_mean) / data.ct_std (what medunet plan picks for CT, from foreground statistics); zscore: per-case, per-channel z-score (MRI; see data.zscore_nonzero); none: leave intensities."""
    ct_window: str | tuple[float, float] = "soft_tissue"
    """CT window as [low, high] in HU or a preset name (soft_tissue, abdomen, liver, lung, bone, brain); with ct_clip_zscore, the clip range."""
    ct_mean: float = 0.0
    """ct_clip_zscore only: HU subtracted after clipping (medunet plan: mean of the training set's foreground voxels)."""
    ct_std: float = 1.0
    """ct_clip_zscore only: HU divided by after subtracting data.ct_mean (medunet plan: std of the foreground voxels)."""
    zscore_nonzero: bool = True
    """zscore only: compute mean/std over nonzero voxels and leave zeros at 0 (skull-stripped or cropped MRI); false: over the whole volume."""
    crop_foreground: bool = True
    """Crop each volume to the bounding box of its nonzero (after normalisation) voxels (ct_clip_zscore: voxels above -500 HU, before normalising); inverted at inference."""
    cache: Literal["memory", "disk", "none"] = field(default="memory", metadata=_NOT_PREPROCESSING)
    """Where preprocessed volumes are cached: memory (CacheDataset), disk (PersistentDataset in data.cache_dir) or none."""
    cache_dir: str | None = field(default=None, metadata=_NOT_PREPROCESSING)
    """Folder for the disk cache (a subfolder per preprocessing settings, so runs can share it); default: <run>/cache."""
    cache_workers: int = field(default=2, metadata=_NOT_PREPROCESSING)
    """Threads that preprocess volumes while the cache is filled."""
    loader_workers: int = field(default=0, metadata=_NOT_PREPROCESSING)
    """DataLoader worker processes for the random transforms (0: a background thread feeds the model)."""
    val_fraction: float = field(default=0.2, metadata=_NOT_PREPROCESSING)
    """Fraction of training cases held out for validation when the datalist has no "validation" list."""
    split_seed: int = field(default=0, metadata=_NOT_PREPROCESSING)
    """Seed of that split; the split itself is saved as split.json in the run folder."""
    allow_outside_root: bool = field(default=False, metadata=_NOT_PREPROCESSING)
    """Allow datalist paths that are absolute or leave the datalist's folder (refused by default)."""

    def window(self) -> tuple[float, float]:
        """The CT window as (low, high) HU."""
        if isinstance(self.ct_window, str):
            return CT_WINDOWS[self.ct_window]
        return (float(self.ct_window[0]), float(self.ct_window[1]))

    def __post_init__(self) -> None:
        if isinstance(self.ct_window, str) and self.ct_window not in CT_WINDOWS:
            raise ConfigError(
                f"data.ct_window must be [low, high] or one of {sorted(CT_WINDOWS)}, got {self.ct_window!r}"
                + _suggest(self.ct_window, CT_WINDOWS)
            )
        low, high = self.window()
        if not low < high:
            raise ConfigError(f"data.ct_window must have low < high, got [{low}, {high}]")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.ct_std <= 0:
            raise ConfigError(f"data.ct_std must be positive, got {self.ct_std}")
        if self.target_spacing is not None and min(self.target_spacing) <= 0:
            raise ConfigError(f"data.target_spacing must be positive, got {list(self.target_spacing)}")
        codes = self.orientation.upper()
        axes = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}
        if len(codes) != 3 or set(codes) - set(axes) or len({axes[c] for c in codes}) != 3:
            raise ConfigError(
                f"data.orientation must be 3 axis codes naming each axis once (L/R, P/A, I/S), like 'RAS' or 'LPS'; "
                f"got {self.orientation!r}"
            )


@dataclass(frozen=True)
class AugmentationConfig:
    """Random transforms applied to training patches only (each with its probability)."""

    patch_size: Vec3i = (96, 96, 96)
    """Training patch size in voxels (at data.target_spacing)."""
    samples_per_volume: int = 2
    """Patches cropped from each volume each time it is drawn."""
    foreground_ratio: float = 0.67
    """Fraction of patches centred on a foreground voxel, shared equally by the classes; the rest are centred anywhere."""
    class_ratios: tuple[float, ...] | None = None
    """Relative frequency of patch centres per class, background first (e.g. [1, 1, 3] favours a rare class 2); overrides foreground_ratio; null: use foreground_ratio."""
    flip_prob: float = 0.5
    """Probability of a mirror flip, per spatial axis."""
    rotate_prob: float = 0.2
    """Probability of a random rotation."""
    rotate_range_deg: Vec3f = (30.0, 30.0, 30.0)
    """Maximum rotation about each axis, in degrees."""
    scale_prob: float = 0.2
    """Probability of a random isotropic zoom."""
    scale_range: tuple[float, float] = (0.7, 1.4)
    """Zoom factor range."""
    elastic_prob: float = 0.0
    """Probability of an elastic deformation (off by default, as in nnU-Net: costly, rarely helps)."""
    elastic_sigma: tuple[float, float] = (5.0, 8.0)
    """Smoothing (voxels) of the elastic displacement field."""
    elastic_magnitude: tuple[float, float] = (50.0, 150.0)
    """Magnitude range of the elastic displacement field."""
    intensity_scale_prob: float = 0.15
    """Probability of multiplying intensities by (1 + f), f uniform in +-intensity_scale."""
    intensity_scale: float = 0.1
    """Maximum relative intensity scale."""
    intensity_shift_prob: float = 0.15
    """Probability of adding an offset uniform in +-intensity_shift."""
    intensity_shift: float = 0.1
    """Maximum intensity offset (in normalised units)."""
    gamma_prob: float = 0.15
    """Probability of a gamma (contrast) change."""
    gamma_range: tuple[float, float] = (0.7, 1.5)
    """Gamma range."""
    noise_prob: float = 0.1
    """Probability of additive Gaussian noise."""
    noise_std: float = 0.05
    """Standard deviation of that noise (normalised units)."""
    blur_prob: float = 0.1
    """Probability of a Gaussian blur."""
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    """Blur sigma range in voxels."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """Where the random transforms after the patch crop run. auto: on the training GPU when training on CUDA with data.loader_workers 0 (volumes stay cached in host memory and only the cropped patches move), else on the CPU; gpu: always on the training GPU; cpu: always on the CPU."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name.endswith("_prob") and not 0.0 <= getattr(self, f.name) <= 1.0:
                raise ConfigError(f"augmentation.{f.name} must be in [0, 1], got {getattr(self, f.name)}")
        if min(self.patch_size) < 1:
            raise ConfigError(f"augmentation.patch_size must be positive, got {list(self.patch_size)}")
        if self.samples_per_volume < 1:
            raise ConfigError(f"augmentation.samples_per_volume must be >= 1, got {self.samples_per_volume}")
        if not 0.0 <= self.foreground_ratio <= 1.0:
            raise ConfigError(f"augmentation.foreground_ratio must be in [0, 1], got {self.foreground_ratio}")
        if self.class_ratios is not None and (min(self.class_ratios, default=-1) < 0 or sum(self.class_ratios) <= 0):
            raise ConfigError(f"augmentation.class_ratios must be >= 0 with a positive sum, got {list(self.class_ratios)}")


@dataclass(frozen=True)
class ModelConfig:
    """The network, picked by name from the registry in medunet.model.networks."""

    name: str = "dynunet"
    """One of: dynunet, unet, attention_unet, unet++, segresnet."""
    features: tuple[int, ...] = (32, 64, 128, 256, 320)
    """Feature maps per resolution level, from full resolution down (one level per entry)."""
    strides: tuple[Vec3i, ...] | None = None
    """Per-level, per-axis downsampling strides for dynunet (first entry is the input level); null: [1,1,1] then [2,2,2]."""
    kernel_sizes: tuple[Vec3i, ...] | None = None
    """Per-level, per-axis kernel sizes for dynunet; null: 3 everywhere."""
    deep_supervision: bool = True
    """Train with auxiliary losses at lower resolutions (dynunet and unet++)."""
    deep_supervision_heads: int = 2
    """Number of auxiliary outputs for dynunet deep supervision."""
    norm: Literal["instance", "batch"] = "instance"
    """Normalisation layers."""
    dropout: float = 0.0
    """Dropout probability inside the network."""
    residual: bool = False
    """Residual convolution blocks (dynunet)."""

    def __post_init__(self) -> None:
        if len(self.features) < 2:
            raise ConfigError(f"model.features needs at least 2 levels, got {list(self.features)}")
        for name in ("strides", "kernel_sizes"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.features):
                raise ConfigError(
                    f"model.{name} needs one entry per level ({len(self.features)} from model.features), got {len(value)}"
                )

    def level_strides(self) -> list[Vec3i]:
        """Strides per level (input level first)."""
        if self.strides is not None:
            return [tuple(s) for s in self.strides]  # type: ignore[misc]  # validated as 3 ints each
        return [(1, 1, 1)] + [(2, 2, 2)] * (len(self.features) - 1)

    def level_kernels(self) -> list[Vec3i]:
        """Kernel sizes per level."""
        if self.kernel_sizes is not None:
            return [tuple(k) for k in self.kernel_sizes]  # type: ignore[misc]  # validated as 3 ints each
        return [(3, 3, 3)] * len(self.features)

    def total_stride(self) -> Vec3i:
        """Product of strides per axis: patch and window sizes must be divisible by it."""
        total = [1, 1, 1]
        for s in self.level_strides():
            total = [t * x for t, x in zip(total, s)]
        return (total[0], total[1], total[2])


@dataclass(frozen=True)
class LossConfig:
    """The training loss (MONAI's implementations), applied to every deep-supervision head."""

    name: Literal["dice_ce", "dice", "dice_focal", "focal", "tversky", "generalized_dice"] = "dice_ce"
    """dice_ce: soft Dice + cross-entropy (robust default); dice: soft Dice alone; dice_focal: soft Dice + focal; focal: focal loss alone (cross-entropy that down-weights easy voxels); tversky: Tversky index (loss.tversky_alpha/beta trade false positives against false negatives); generalized_dice: Dice with classes weighted by inverse squared volume. For small structures: dice_ce or dice_focal first; tversky with beta > alpha (e.g. 0.3/0.7) when they are under-segmented; generalized_dice when several classes differ greatly in size (docs/training.md#choosing-a-loss)."""
    dice_weight: float = 1.0
    """Weight of the soft Dice term (dice_ce, dice_focal)."""
    ce_weight: float = 1.0
    """Weight of the cross-entropy term (dice_ce) or of the focal term (dice_focal)."""
    include_background: bool = False
    """Include the background class in the region (Dice, Tversky, generalised Dice) terms; cross-entropy and focal alone always include it."""
    class_weights: tuple[float, ...] | None = None
    """Weight per class (background first), or null for equal weights: for dice_ce the weight of both the cross-entropy and the Dice term (MONAI applies it to both), the per-class weight of the other losses (a factor on the inverse-volume weight for generalized_dice)."""
    focal_gamma: float = 2.0
    """Focusing exponent of the focal term (focal, dice_focal); 0 turns it into cross-entropy."""
    tversky_alpha: float = 0.5
    """Tversky weight of false positives (tversky); alpha = beta = 0.5 is the Dice loss."""
    tversky_beta: float = 0.5
    """Tversky weight of false negatives (tversky); raise it (e.g. 0.7, with alpha 0.3) to penalise missed voxels of small structures more."""

    def __post_init__(self) -> None:
        if self.class_weights is not None and (min(self.class_weights, default=-1) < 0 or sum(self.class_weights) <= 0):
            raise ConfigError(f"loss.class_weights must be >= 0 with a positive sum, got {list(self.class_weights)}")
        if self.tversky_alpha < 0 or self.tversky_beta < 0 or self.tversky_alpha + self.tversky_beta <= 0:
            raise ConfigError(f"loss.tversky_alpha and loss.tversky_beta must be >= 0 with a positive sum, got "
                              f"{self.tversky_alpha} and {self.tversky_beta}")
        if self.focal_gamma < 0:
            raise ConfigError(f"loss.focal_gamma must be >= 0, got {self.focal_gamma}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "sgd"] = "adamw"
    """adamw or sgd (Nesterov momentum, as nnU-Net)."""
    lr: float = 1e-3
    """Peak learning rate (after warm-up)."""
    weight_decay: float = 1e-5
    """Weight decay."""
    momentum: float = 0.99
    """SGD momentum."""
    scheduler: Literal["cosine", "poly", "plateau", "constant"] = "cosine"
    """cosine or poly decay over train.max_epochs, plateau (halve when validation Dice stalls), or constant."""
    warmup_epochs: int = 0
    """Epochs of linear warm-up from lr/10 (cosine, poly, constant)."""
    poly_power: float = 0.9
    """Exponent of the poly schedule."""
    min_lr: float = 1e-6
    """Floor of the cosine schedule and of plateau reductions (poly decays to 0)."""
    hold_fraction: float | None = None
    """Fraction of the cosine/poly schedule (after warm-up) held at the peak lr before the decay starts; null: 0 for runs counted in epochs, 0.5 under train.max_minutes (a short run must keep its rate high for a good part of its steps to learn a hard class; docs/benchmarks.md#short-time-budgets-which-schedule)."""
    plateau_patience: int = 3
    """Validations without improvement before plateau reduces the LR."""
    plateau_factor: float = 0.5
    """LR multiplier of a plateau reduction."""
    grad_clip: float | None = 12.0
    """Maximum gradient norm, or null for no clipping."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.hold_fraction is not None and not 0.0 <= self.hold_fraction < 1.0:
            raise ConfigError(f"optim.hold_fraction must be in [0, 1), got {self.hold_fraction}")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""

    max_epochs: int = 300
    """Number of epochs (an upper bound when train.max_minutes is set)."""
    max_minutes: float | None = None
    """Wall-clock budget in minutes for the whole training (data caching, validation and the last checkpoint included), or null for none. The lr schedule is then laid over the steps estimated to fit, re-estimated every epoch, so it reaches optim.min_lr when the budget ends (docs/training.md#time-budget). CLI: --time-budget 90m."""
    iterations_per_epoch: int | None = None
    """Batches per epoch; null: one pass over the training cases (samples_per_volume patches each)."""
    batch_size: int = 2
    """Volumes per batch (each gives augmentation.samples_per_volume patches); per process under torchrun (global batch = batch_size x processes)."""
    val_every: int = 5
    """Validate (sliding window over whole validation volumes) every N epochs, and after the last."""
    early_stopping_patience: int | None = None
    """Stop after this many validations without a better mean validation score (train.selection_metric); null: never."""
    selection_metric: Literal["dice", "iou"] = "dice"
    """Mean validation score over the foreground classes that picks best.pt and drives early stopping and the plateau schedule: dice, or iou (Jaccard). Both are written per class to metrics.csv either way."""
    tracking: tuple[Literal["none", "tensorboard", "mlflow"], ...] = ()
    """Experiment trackers to log to, e.g. [tensorboard, mlflow]: losses, lr, per-class validation scores, step time, the config and the pictures. tensorboard: event files in <run>/tensorboard (pip install 'medunet[tensorboard]'); mlflow: train.mlflow_uri (pip install 'medunet[mlflow]')."""
    mlflow_uri: str | None = None
    """MLflow tracking URI; null: a local file store in <run>/mlruns."""
    snapshots: bool = True
    """Watch it learn: at each validation keep the prediction on a fixed slice of the first validation case (three views, reference contour drawn), and at the end draw learning.png (a grid over epochs, with the training curve) and learning.gif."""
    seed: int = 0
    """Seed of every random number generator; each epoch reseeds from (seed, epoch) so a resumed run repeats an uninterrupted one."""
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """Mixed precision. auto: bf16 where the hardware computes it natively (CUDA GPUs with bf16; CPUs with AVX512-BF16 or AMX, about 2x faster there, see docs/benchmarks.md), fp16 on older GPUs, fp32 on other CPUs; bf16/fp16: that dtype (fp16 on CUDA only); off: fp32 everywhere."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    channels_last: bool = False
    """Keep weights and activations in channels_last_3d (NDHWC) memory order. Off by default: measured 0.93x the steps/s on the CPU (docs/benchmarks.md); not yet measured on a GPU, where cuDNN with AMP often prefers it."""
    compile: bool = False
    """Compile the training network with torch.compile. Measured 1.19x (fp32) and 1.05x (bf16) faster steps on the CPU after a one-off ~30 s compile (docs/benchmarks.md): worth it for long runs, not short ones. Needs a C++ compiler on the CPU."""

    def __post_init__(self) -> None:
        for name in ("max_epochs", "batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"train.max_minutes must be positive (or null for no budget), got {self.max_minutes}")


@dataclass(frozen=True)
class InferenceConfig:
    """Sliding-window inference."""

    roi_size: Vec3i | None = None
    """Window size in voxels; null: augmentation.patch_size."""
    sw_batch_size: int = 4
    """Windows per forward pass."""
    overlap: float = 0.25
    """Overlap of neighbouring windows (0 to <1). 0.25 with gaussian blending: half the windows of 0.5 at equal Dice (docs/benchmarks.md)."""
    blend: Literal["gaussian", "constant"] = "gaussian"
    """How overlapping windows are weighted."""
    tta_flips: bool = False
    """Average predictions over mirror flips on all 8 axis combinations (8x slower)."""
    resample_probabilities: bool = True
    """Resample class probabilities (linear) back to the input grid before argmax; false: resample labels (nearest), less memory."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Network arithmetic. auto: as train.amp (bf16 on GPUs and CPUs that compute it natively, AVX512-BF16/AMX; fp32 on other CPUs); bf16: always, also where it is emulated (slower); fp32: full precision everywhere."""
    engine: Literal["auto", "torch", "onnxruntime"] = "auto"
    """What runs the network. torch: the checkpoint's PyTorch module (or an exported package's TorchScript model.ts); onnxruntime: an exported package's ONNX network in an onnxruntime session (CUDA provider on a GPU when installed, else CPU; needs medunet[onnx]); auto: onnxruntime for a package holding ONNX, torch otherwise. Reading, preprocessing, inversion and post-processing are the same medunet code either way (docs/export.md)."""
    stitch_device: Literal["auto", "device", "cpu"] = "auto"
    """Where windows are blended into the whole-volume result. device: on the GPU (fastest); cpu: in host memory (windows still run on the GPU); auto: device when the estimate (classes x voxels x 4 bytes, plus the weight map) fits in free GPU memory with headroom, else cpu, decided before allocating."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"inference.overlap must be in [0, 1), got {self.overlap}")
        if self.sw_batch_size < 1:
            raise ConfigError(f"inference.sw_batch_size must be >= 1, got {self.sw_batch_size}")


@dataclass(frozen=True)
class ClassPostprocessing:
    """Morphological clean-up of one class, in physical units."""

    keep_largest: bool = False
    """Keep only the largest connected component."""
    fill_holes: bool = False
    """Fill enclosed holes."""
    min_size_mm3: float = 0.0
    """Remove connected components smaller than this volume (mm^3)."""
    opening_mm: float = 0.0
    """Binary opening with a ball of this radius (mm); 0: off."""
    closing_mm: float = 0.0
    """Binary closing with a ball of this radius (mm); 0: off."""

    def is_noop(self) -> bool:
        """True when nothing would change the mask."""
        return not (self.keep_largest or self.fill_holes or self.min_size_mm3 > 0 or self.opening_mm > 0 or self.closing_mm > 0)


@dataclass(frozen=True)
class CrfConfig:
    """Dense (fully connected) 3D CRF on the softmax probabilities and the image, on the network's grid before inversion (medunet.postprocessing.crf)."""

    enabled: bool = False
    """Refine the probabilities with mean-field inference of a dense CRF before they are brought back to the input grid. Off by default; `medunet crossval` tries it and keeps it only if it raises the out-of-fold Dice (docs/benchmarks.md has its time and effect)."""
    iterations: int = 5
    """Mean-field iterations (each: one Gaussian and one bilateral filtering of the class maps)."""
    spatial_sigma_mm: float = 3.0
    """Width (standard deviation, mm) of the smoothness kernel: nearby voxels prefer the same class whatever their intensity."""
    spatial_weight: float = 1.0
    """Weight of the smoothness kernel: how far full agreement of the neighbourhood shifts a voxel's log-probabilities."""
    bilateral_sigma_mm: float = 8.0
    """Spatial width (standard deviation, mm) of the appearance kernel: voxels this close and of similar intensity prefer the same class."""
    intensity_sigma: float = 0.1
    """Intensity width of the appearance kernel, in the network's normalised input units (ct_window: 0..1 over the window, so 0.1 = a tenth of it; z-score: standard deviations)."""
    bilateral_weight: float = 2.0
    """Weight of the appearance kernel: how far full agreement of similar-looking neighbours shifts a voxel's log-probabilities."""
    search: bool = True
    """Let `medunet crossval` try the CRF as a post-processing candidate. It predicts every out-of-fold case a second time and the CRF's time grows with the network-grid volume (about 1 s for 60k voxels, minutes for a full CT on a CPU: docs/benchmarks.md), so turn it off for large volumes without a GPU."""

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ConfigError(f"postprocessing.crf.iterations must be >= 1, got {self.iterations}")
        for name in ("spatial_sigma_mm", "bilateral_sigma_mm", "intensity_sigma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"postprocessing.crf.{name} must be a finite number > 0, got {value}")
        for name in ("spatial_weight", "bilateral_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"postprocessing.crf.{name} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class PostprocessingConfig:
    """Post-processing: an optional dense CRF on the probabilities, then clean-up per class on the input grid."""

    default: ClassPostprocessing = field(default_factory=ClassPostprocessing)
    """Applied to every foreground class without its own entry."""
    classes: dict[str, ClassPostprocessing] = field(default_factory=dict)
    """Per-class settings keyed by class name or index (e.g. {"liver": {keep_largest: true}})."""
    crf: CrfConfig = field(default_factory=CrfConfig)
    """Dense CRF on the softmax probabilities (all classes together), before the per-class clean-up."""


@dataclass(frozen=True)
class EvaluationConfig:
    """How predictions are scored (`medunet crossval`'s out-of-fold evaluation; `medunet evaluate --tolerance-mm`)."""

    nsd_tolerance_mm: float = 2.0
    """Tolerance of the normalised surface Dice (mm): surface points closer than this to the other surface count as agreeing."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.nsd_tolerance_mm) and self.nsd_tolerance_mm >= 0):
            raise ConfigError(f"evaluation.nsd_tolerance_mm must be a finite number >= 0, got {self.nsd_tolerance_mm}")


@dataclass(frozen=True)
class Config:
    """The whole medunet configuration: one section per pipeline stage."""

    data: DataConfig = field(default_factory=DataConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    postprocessing: PostprocessingConfig = field(default_factory=PostprocessingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def roi_size(self) -> Vec3i:
        """Sliding-window size (inference.roi_size, else the training patch)."""
        return self.inference.roi_size or self.augmentation.patch_size


# --------------------------------------------------------------------------- loading


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` and convert YAML lists to tuples, dicts to dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        detail = f" ({errors[0].split(', ', 1)[0]})" if len(errors) == 1 else ""
        names = " or ".join("null" if a is type(None) else _type_name(a) for a in args)
        raise ConfigError(f"{where} must be {names}, got {value!r}{detail}")
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in args:
            value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as a boolean
        if value not in args:
            raise ConfigError(
                f"{where} must be one of {list(args)}, got {value!r}" + (_suggest(value, map(str, args)) if isinstance(value, str) else "")
            )
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # a section whose fields are all commented out
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping of fields, got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} must have {len(args)} values, got {len(value)}: {list(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - programming error


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        key = str(key)
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}" + _suggest(key, names) + f" (valid: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - all fields have defaults
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def config_from_dict(values: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from plain nested dicts, strictly checked."""
    return _build(Config, values or {}, "")


def section_from_dict(cls: type, values: Mapping[str, Any], where: str = "") -> Any:
    """Build config dataclass ``cls`` from plain dicts with the same strict checks as :func:`config_from_dict`.

    For configs other than the training :class:`Config` (``medunet serve``'s): unknown keys get a "did you mean",
    every value is checked against its field's type, and messages name the field under ``where``.
    """
    return _build(cls, values or {}, where)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dicts/lists (YAML- and checkpoint-safe) from a config dataclass."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return plain(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b=value"`` into (["a", "b"], parsed value); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value, e.g. train.max_epochs=100")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.__class__.__name__})") from exc
    return keys, value


def apply_overrides(values: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested dict, checking each key path against the schema."""
    result = _deep_copy(values)
    for text in overrides:
        keys, value = parse_override(text)
        _check_key_path(keys)
        node = result
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[keys[-1]] = value
    return result


def _check_key_path(keys: list[str]) -> None:
    """Raise a "did you mean" error unless ``keys`` names a field of the schema."""
    tp: Any = Config
    for depth, key in enumerate(keys):
        where = ".".join(keys[: depth + 1])
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (Union, types.UnionType) and len(options) == 1:
            tp = options[0]
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp)]
            if key not in names:
                raise ConfigError(f"unknown config key {where!r}" + _suggest(key, names) + f" (valid: {', '.join(names)})")
            tp = typing.get_type_hints(tp)[key]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]  # free keys, e.g. postprocessing.classes.<class name>
        else:
            raise ConfigError(f"config key {'.'.join(keys[:depth])!r} has no field {key!r}: it is not a section")


def _deep_copy(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in values.items()}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(values).__name__}")
    return values


#: What the MRI preset changes from the (CT) defaults; configs/mri.yaml holds the same values.
MRI_PRESET: dict[str, dict[str, Any]] = {
    "data": {"modality": "MRI", "normalization": "zscore", "target_spacing": [1.0, 1.0, 1.0]},
    "augmentation": {"patch_size": [128, 128, 128]},
}


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (), *, modality: str = "CT") -> Config:
    """Load a YAML config and apply ``--set`` overrides.

    Without ``path`` the built-in preset of ``modality`` is used: the defaults for CT,
    :data:`MRI_PRESET` for MRI.
    """
    if path is not None:
        values = read_yaml(path)
    elif modality.upper() in ("MR", "MRI"):
        values = _deep_copy(MRI_PRESET)
    else:
        values = {}
    values = apply_overrides(values, overrides)
    try:
        return config_from_dict(values)
    except ConfigError as exc:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"{exc}{where}") from exc


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from medunet.io.atomic import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(config), sort_keys=False))
