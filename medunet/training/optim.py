"""Optimizer and learning-rate schedule from the config.

Runs counted in epochs step a :class:`LambdaLR` once per epoch (:func:`lr_factor`). Under a time
budget (``train.max_minutes``) the schedule is a :class:`StepSchedule`, stepped after every
optimisation step and laid again over the remaining steps whenever the estimate of how many fit changes.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from medunet.config import OptimConfig

#: Fraction of a time-budgeted cosine/poly schedule held at the peak before it decays, when optim.hold_fraction
#: is null. Chosen because a decay from the first step left a small low-contrast organ unlearnt; measured with
#: scripts/bench/budget_schedule.py (docs/benchmarks.md): 100 steps, hold 0 / 0.5 / 0.75 gave 0.847 / 0.879 / 0.896 Dice.
BUDGET_HOLD_FRACTION = 0.5


def build_optimizer(cfg: OptimConfig, params: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum (nnU-Net's choice)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def decay_factor(scheduler: str, progress: float, *, floor: float, hold: float = 0.0, poly_power: float = 0.9) -> float:
    """Multiplier of the peak lr at ``progress`` (0..1) through the decay: held at 1 for ``hold``, then cosine/poly."""
    progress = min(1.0, max(0.0, progress))
    if progress < hold:
        return 1.0
    progress = (progress - hold) / (1.0 - hold)
    if scheduler == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if scheduler == "poly":
        return (1.0 - progress) ** poly_power
    return 1.0


def lr_factor(cfg: OptimConfig, epoch: int, max_epochs: int) -> float:
    """Multiplier of ``cfg.lr`` at the start of ``epoch`` (0-based): warm-up, then cosine/poly/constant."""
    if epoch < cfg.warmup_epochs:
        return 0.1 + 0.9 * epoch / cfg.warmup_epochs
    span = max(1, max_epochs - cfg.warmup_epochs)
    progress = min(1.0, (epoch - cfg.warmup_epochs) / span)
    floor = min(1.0, cfg.min_lr / cfg.lr)
    return decay_factor(cfg.scheduler, progress, floor=floor, hold=cfg.hold_fraction or 0.0, poly_power=cfg.poly_power)


class StepSchedule:
    """The lr multiplier per optimisation step of a time-budgeted run, re-laid as the step estimate changes.

    Progress through the decay runs from 0 after warm-up to 1 at step ``total_steps - 1`` (the last
    step trains at the floor). :meth:`relay` keeps the progress already made at the current step and
    spreads the rest over the new total, so a new estimate bends the curve without a jump. Holds plain
    numbers only: :class:`LambdaLR` saves them in its state, and checkpoints load with ``weights_only``.
    """

    def __init__(self, cfg: OptimConfig, *, warmup_steps: int, total_steps: int) -> None:
        self.scheduler, self.poly_power = cfg.scheduler, cfg.poly_power
        self.floor = min(1.0, cfg.min_lr / cfg.lr)
        self.hold = BUDGET_HOLD_FRACTION if cfg.hold_fraction is None else cfg.hold_fraction
        self.warmup_steps = warmup_steps
        self.total_steps = max(total_steps, warmup_steps + 1)
        self.anchor_step, self.anchor_progress = warmup_steps, 0.0

    def progress(self, step: int) -> float:
        """Fraction of the decay done at ``step`` (0-based)."""
        if step <= self.anchor_step:
            return self.anchor_progress if step == self.anchor_step else 0.0
        span = max(1, self.total_steps - 1 - self.anchor_step)
        return min(1.0, self.anchor_progress + (1.0 - self.anchor_progress) * (step - self.anchor_step) / span)

    def relay(self, step: int, total_steps: int) -> None:
        """From ``step`` on, lay the rest of the decay over steps ``step .. total_steps - 1``."""
        if step >= self.warmup_steps:
            self.anchor_progress, self.anchor_step = self.progress(step), step
        self.total_steps = max(total_steps, step + 1, self.warmup_steps + 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return 0.1 + 0.9 * step / self.warmup_steps
        return decay_factor(self.scheduler, self.progress(step), floor=self.floor, hold=self.hold, poly_power=self.poly_power)


def build_scheduler(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, max_epochs: int, *, steps_per_epoch: int | None = None
) -> LRScheduler | ReduceLROnPlateau:
    """A per-epoch scheduler; ``plateau`` steps on the validation score, the others every epoch.

    With ``steps_per_epoch`` (a time-budgeted run) cosine/poly/constant become a per-step :class:`StepSchedule`
    laid over ``max_epochs`` epochs until the budget's first estimate re-lays it.
    """
    if cfg.scheduler == "plateau":
        return ReduceLROnPlateau(  # eps=0: reduce at any LR scale; optim.min_lr is the floor
            optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr, eps=0.0
        )
    if steps_per_epoch is not None:
        schedule = StepSchedule(cfg, warmup_steps=cfg.warmup_epochs * steps_per_epoch, total_steps=max_epochs * steps_per_epoch)
        return LambdaLR(optimizer, schedule)
    return LambdaLR(optimizer, lambda epoch: lr_factor(cfg, epoch, max_epochs))


def step_schedule(scheduler: LRScheduler | ReduceLROnPlateau) -> StepSchedule | None:
    """The :class:`StepSchedule` behind a time-budgeted run's scheduler, else None."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    return lambdas[0] if lambdas and isinstance(lambdas[0], StepSchedule) else None


def continue_schedule(scheduler: LRScheduler | ReduceLROnPlateau, cfg: OptimConfig, max_epochs: int) -> None:
    """After loading a saved scheduler on resume, put the optimizer on the schedule of the *current* config.

    The saved learning rate belongs to the old schedule: resuming a finished cosine run with a larger
    ``train.max_epochs`` would otherwise train one epoch at the old run's final (minimum) rate and then
    jump. ``optim.lr`` given again on resume becomes the new base rate. Plateau schedules keep their state;
    a time-budgeted run's :class:`StepSchedule` is re-laid by its new budget instead.
    """
    if isinstance(scheduler, ReduceLROnPlateau) or step_schedule(scheduler) is not None:
        return
    scheduler.base_lrs = [cfg.lr] * len(scheduler.base_lrs)
    for group in scheduler.optimizer.param_groups:
        group["lr"] = cfg.lr * lr_factor(cfg, scheduler.last_epoch, max_epochs)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
