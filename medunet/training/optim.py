"""Optimizer and learning-rate schedule from the config."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from medunet.config import OptimConfig


def build_optimizer(cfg: OptimConfig, params: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum (nnU-Net's choice)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: OptimConfig, epoch: int, max_epochs: int) -> float:
    """Multiplier of ``cfg.lr`` at the start of ``epoch`` (0-based): warm-up, then cosine/poly/constant."""
    if epoch < cfg.warmup_epochs:
        return 0.1 + 0.9 * epoch / cfg.warmup_epochs
    span = max(1, max_epochs - cfg.warmup_epochs)
    progress = min(1.0, (epoch - cfg.warmup_epochs) / span)
    floor = min(1.0, cfg.min_lr / cfg.lr)
    if cfg.scheduler == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.scheduler == "poly":
        return (1.0 - progress) ** cfg.poly_power
    return 1.0


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, max_epochs: int) -> LRScheduler | ReduceLROnPlateau:
    """A per-epoch scheduler; ``plateau`` steps on the validation Dice, the others every epoch."""
    if cfg.scheduler == "plateau":
        return ReduceLROnPlateau(  # eps=0: reduce at any LR scale; optim.min_lr is the floor
            optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr, eps=0.0
        )
    return LambdaLR(optimizer, lambda epoch: lr_factor(cfg, epoch, max_epochs))


def continue_schedule(scheduler: LRScheduler | ReduceLROnPlateau, cfg: OptimConfig, max_epochs: int) -> None:
    """After loading a saved scheduler on resume, put the optimizer on the schedule of the *current* config.

    The saved learning rate belongs to the old schedule: resuming a finished cosine run with a larger
    ``train.max_epochs`` would otherwise train one epoch at the old run's final (minimum) rate and then
    jump. ``optim.lr`` given again on resume becomes the new base rate. Plateau schedules keep their state.
    """
    if isinstance(scheduler, ReduceLROnPlateau):
        return
    scheduler.base_lrs = [cfg.lr] * len(scheduler.base_lrs)
    for group in scheduler.optimizer.param_groups:
        group["lr"] = cfg.lr * lr_factor(cfg, scheduler.last_epoch, max_epochs)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
