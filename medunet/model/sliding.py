"""Sliding-window prediction of class probabilities, shared by validation and inference.

Windows always run on the compute device; where they are blended ("stitched") into the
whole-volume result is chosen per volume, before anything is allocated, from an estimate of
the result's size against the GPU's free memory (:func:`choose_stitch_device`). A CT too large
for the GPU is then stitched in host memory instead of failing half-way with out-of-memory.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medunet.config import Config
from medunet.runtime import amp_dtype, autocast

log = logging.getLogger("medunet")

#: Fraction of the free GPU memory the stitched result may take under stitch_device=auto; the rest is
#: left for the network's activations (sw_batch_size windows) and the allocator's fragmentation.
STITCH_MEMORY_FRACTION = 0.5

#: Flip combinations over the three spatial axes (of a (B, C, X, Y, Z) tensor) for mirroring TTA.
ALL_FLIPS: list[tuple[int, ...]] = [
    tuple(2 + a for a in axes) for n in range(4) for axes in itertools.combinations(range(3), n)
]


def inference_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the network at inference (``inference.precision``); None is full precision."""
    precision = config.inference.precision
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return amp_dtype(config.train.amp, device)  # auto: as in training


def stitch_bytes(num_classes: int, spatial_shape: Sequence[int], *, batch: int = 1, tta: bool = False) -> int:
    """Estimated bytes the stitched result of one volume takes on the device where it is blended.

    MONAI's sliding window keeps a float32 sum over classes and a float32 weight map of the (padded)
    volume; the softmax makes a second class-sized copy, and flip TTA a running total (a third).
    """
    voxels = math.prod(int(s) for s in spatial_shape)
    class_maps = batch * num_classes * (3 if tta else 2)
    return 4 * voxels * (class_maps + 1)


def choose_stitch_device(
    mode: str,
    compute: torch.device,
    *,
    needed_bytes: int,
    free_bytes: int | None,
    fraction: float = STITCH_MEMORY_FRACTION,
) -> torch.device:
    """Where to blend the windows: the compute device, or the host when the result would not fit.

    A pure function of sizes, so the choice is made (and tested) before any allocation.

    Args:
        mode: ``inference.stitch_device``: "device", "cpu" or "auto".
        compute: the device the windows run on.
        needed_bytes: :func:`stitch_bytes` of the volume.
        free_bytes: memory free for new tensors on ``compute`` (None when it is the CPU).
        fraction: share of ``free_bytes`` the result may take under "auto".
    """
    if mode == "cpu" or compute.type == "cpu":
        return torch.device("cpu")
    if mode == "device":
        return compute
    if free_bytes is None or needed_bytes > fraction * free_bytes:
        return torch.device("cpu")
    return compute


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on a CUDA device (free driver memory + what torch's cache holds unused); None on CPU."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    config: Config,
    *,
    device: torch.device,
    amp: torch.dtype | None = None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Softmax probabilities (B, K, X, Y, Z) for a preprocessed image batch (B, C, X, Y, Z).

    Windows of ``config.roi_size()`` are blended with Gaussian (or constant) weights; with
    ``inference.tta_flips`` the prediction is averaged over all 8 mirror flips. Windows run on
    ``device``; the result is stitched there or in host memory (``inference.stitch_device``,
    :func:`choose_stitch_device`) and returned on that device.
    """
    inf = config.inference
    model.eval()
    classes = num_classes or int(getattr(getattr(model, "net", model), "out_channels", 2))  # only sizes the estimate
    needed = stitch_bytes(classes, image.shape[2:], batch=image.shape[0], tta=inf.tta_flips)
    stitch = choose_stitch_device(inf.stitch_device, device, needed_bytes=needed, free_bytes=free_device_memory(device))
    if stitch != device:
        log.info("stitching on the host: the result needs about %.1f GiB, %s has %.1f GiB free", needed / 2**30, device,
                 (free_device_memory(device) or 0) / 2**30)
    image = image.to(stitch)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            return model(x).float()

    flips = ALL_FLIPS if inf.tta_flips else [()]
    total: torch.Tensor | None = None
    for dims in flips:
        x = torch.flip(image, dims) if dims else image
        logits = sliding_window_inference(
            x,
            roi_size=config.roi_size(),
            sw_batch_size=inf.sw_batch_size,
            predictor=predictor,
            overlap=inf.overlap,
            mode=inf.blend,
            sw_device=device,
            device=stitch,
        )
        probs = torch.softmax(torch.as_tensor(logits).float(), dim=1)
        probs = torch.flip(probs, dims) if dims else probs
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(flips)
