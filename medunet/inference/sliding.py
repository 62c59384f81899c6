"""Sliding-window prediction of class probabilities, shared by validation and inference."""

from __future__ import annotations

import itertools

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medunet.config import Config
from medunet.runtime import autocast

#: Flip combinations over the three spatial axes (of a (B, C, X, Y, Z) tensor) for mirroring TTA.
ALL_FLIPS: list[tuple[int, ...]] = [
    tuple(2 + a for a in axes) for n in range(4) for axes in itertools.combinations(range(3), n)
]


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    config: Config,
    *,
    device: torch.device,
    amp: torch.dtype | None = None,
) -> torch.Tensor:
    """Softmax probabilities (B, K, X, Y, Z) for a preprocessed image batch (B, C, X, Y, Z).

    Windows of ``config.roi_size()`` are blended with Gaussian (or constant) weights; with
    ``inference.tta_flips`` the prediction is averaged over all 8 mirror flips. Windows run on
    ``device``; the stitched result lives there too.
    """
    inf = config.inference
    model.eval()
    image = image.to(device)

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
        )
        probs = torch.softmax(torch.as_tensor(logits).float(), dim=1)
        probs = torch.flip(probs, dims) if dims else probs
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(flips)
