"""Training losses built from the config: MONAI's losses, with deep supervision and class weights.

``loss.name`` picks one of :data:`LOSSES`; every one takes ``loss.class_weights`` (background first)
and is applied to each deep-supervision head with halving weights. Where MONAI's loss has no class
weight of its own (Tversky, generalised Dice) the weights enter as described at :func:`build_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss, FocalLoss, GeneralizedDiceLoss, TverskyLoss

from medunet.config import Config, LossConfig
from medunet.errors import DataError

#: The loss names ``loss.name`` accepts.
LOSSES = ("dice_ce", "dice", "dice_focal", "focal", "tversky", "generalized_dice")


class _ClassWeighted(torch.nn.Module):
    """Weighted mean over classes of a MONAI region loss computed per class (``reduction="none"``)."""

    def __init__(self, loss: torch.nn.Module, weight: torch.Tensor) -> None:
        super().__init__()
        self.loss = loss
        self.register_buffer("weight", weight / weight.sum())

    def forward(self, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        values = self.loss(output, label)
        per_class = values.reshape(values.shape[0], values.shape[1], -1).mean(2)  # (batch, classes)
        return (per_class * self.weight).sum(1).mean()


def _generalized_dice(lc: LossConfig, weight: torch.Tensor | None) -> GeneralizedDiceLoss:
    """MONAI's generalised Dice; class weights multiply its own inverse-squared-volume class weights."""
    loss = GeneralizedDiceLoss(include_background=lc.include_background, to_onehot_y=True, softmax=True)
    if weight is not None:
        volume_weights: Callable[[torch.Tensor], torch.Tensor] = loss.w_func  # MONAI's method is unannotated
        loss.w_func = lambda volumes: volume_weights(volumes) * weight.to(volumes.device)  # type: ignore[method-assign]  # replacing MONAI's weighting method is the point
    return loss


def build_loss(lc: LossConfig, num_classes: int) -> torch.nn.Module:
    """One head's loss from ``loss.name``; it takes logits (B, C, ...) and an index label (B, 1, ...).

    Class weights (``loss.class_weights``, one per class, background first) act as MONAI's ``weight``
    for dice_ce (MONAI weights both its cross-entropy and its Dice term), dice, focal and dice_focal; as a weighted mean of the per-class
    Tversky losses for tversky; and as a factor on each class's inverse-volume weight for
    generalized_dice. Classes a loss leaves out (background without ``loss.include_background``) drop their weight.

    Raises:
        DataError: ``loss.class_weights`` does not have one value per class.
    """
    full = torch.tensor(lc.class_weights, dtype=torch.float32) if lc.class_weights else None
    if full is not None and len(full) != num_classes:
        raise DataError(f"loss.class_weights needs {num_classes} values (one per class, background first), got {len(full)}")
    region = full if full is None or lc.include_background else full[1:]  # weights of the classes a region loss sees
    common: dict[str, Any] = {"include_background": lc.include_background, "to_onehot_y": True}
    if lc.name == "dice_ce":
        return DiceCELoss(**common, softmax=True, lambda_dice=lc.dice_weight, lambda_ce=lc.ce_weight, weight=full)
    if lc.name == "dice":
        return DiceLoss(**common, softmax=True, weight=region)
    if lc.name == "dice_focal":
        return DiceFocalLoss(**common, softmax=True, gamma=lc.focal_gamma, weight=region, lambda_dice=lc.dice_weight,
                             lambda_focal=lc.ce_weight)
    if lc.name == "focal":  # a cross-entropy-like term: every class, background included
        return FocalLoss(include_background=True, to_onehot_y=True, use_softmax=True, gamma=lc.focal_gamma, weight=full)
    if lc.name == "tversky":
        tversky = TverskyLoss(**common, softmax=True, alpha=lc.tversky_alpha, beta=lc.tversky_beta,
                              reduction="none" if region is not None else "mean")
        return tversky if region is None else _ClassWeighted(tversky, region)
    return _generalized_dice(lc, region)


class DeepSupervisionLoss(torch.nn.Module):
    """The configured loss on the main output plus halving-weight copies on each deep-supervision head."""

    def __init__(self, config: Config, num_classes: int) -> None:
        super().__init__()
        self.loss = build_loss(config.loss, num_classes)

    def forward(self, outputs: list[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        weights = [0.5**i for i in range(len(outputs))]
        total = sum(w * self.loss(o.float(), label) for w, o in zip(weights, outputs))
        return total / sum(weights)
