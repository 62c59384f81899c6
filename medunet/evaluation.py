"""Overlap metrics between a predicted and a reference label volume."""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot


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
