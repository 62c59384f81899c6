"""Training losses built from the config: MONAI's losses, with deep supervision and class weights."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss

from medunet.config import Config
from medunet.errors import DataError


class DeepSupervisionLoss(torch.nn.Module):
    """DiceCE on the main output plus halving-weight DiceCE on each deep-supervision head."""

    def __init__(self, config: Config, num_classes: int) -> None:
        super().__init__()
        lc = config.loss
        weight = torch.tensor(lc.class_weights, dtype=torch.float32) if lc.class_weights else None
        if weight is not None and len(weight) != num_classes:
            raise DataError(f"loss.class_weights needs {num_classes} values (one per class), got {len(weight)}")
        self.dice_ce = DiceCELoss(
            include_background=lc.include_background,
            to_onehot_y=True,
            softmax=True,
            lambda_dice=lc.dice_weight,
            lambda_ce=lc.ce_weight,
            weight=weight,
        )

    def forward(self, outputs: list[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        weights = [0.5**i for i in range(len(outputs))]
        total = sum(w * self.dice_ce(o.float(), label) for w, o in zip(weights, outputs))
        return total / sum(weights)
