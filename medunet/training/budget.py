"""A wall-clock budget for training (``train.max_minutes``): how many steps fit, measured as training runs.

The clock starts when the trainer starts (data caching counts). After a few warm-up steps, and again
after every epoch, :meth:`TimeBudget.plan` turns the measured step, validation and per-epoch overhead
times into the number of optimisation steps that still fit, keeping back what the last validation and
checkpoint will take; the lr schedule is laid over that many steps, so the lr reaches its floor
as the budget ends. :meth:`TimeBudget.out_of_time` is the safety net when the machine slows down.

:class:`BudgetedRun` is what the trainer holds under a budget: it owns the per-step schedule and the
plan, and answers the trainer's questions (how long is the next epoch, stop after this step, is this
epoch the last), so the training loop itself stays the same with or without a budget.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from medunet.config import OptimConfig, TrainConfig
from medunet.errors import ConfigError
from medunet.training import distributed as dist
from medunet.training.optim import build_scheduler, step_schedule

log = logging.getLogger("medunet")

#: Optimisation steps timed (after the first, which pays one-off costs) before the first estimate.
WARMUP_STEPS = 2

_UNITS = {"s": 1 / 60, "sec": 1 / 60, "m": 1.0, "min": 1.0, "h": 60.0, "hr": 60.0}


def clock() -> float:
    """Seconds on the budget's clock (``time.perf_counter``).

    The trainer times its steps, validations and epochs with it too, so every duration the budget sees comes
    from this one function, and a test can replace it with a fake clock to check the plan exactly.
    """
    return time.perf_counter()


def parse_duration(text: str) -> float:
    """Minutes in a duration such as ``90m``, ``1.5h``, ``5400s`` or ``90`` (minutes).

    Raises:
        ConfigError: not a positive number with an optional s/m/h unit.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|sec|m|min|h|hr)?\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"time budget {text!r} must be a positive duration like 90m, 1.5h or 5400s")
    return float(match.group(1)) * _UNITS[match.group(2) or "m"]


@dataclass
class Plan:
    """How many steps fit in what is left of the budget."""

    total_steps: int
    """Steps of the whole run (those done included) that fit."""
    epochs: float
    """Epochs that makes, at the current steps per epoch."""
    seconds_per_step: float


@dataclass
class TimeBudget:
    """The budget's clock and the durations measured so far."""

    minutes: float
    started: float = field(default_factory=lambda: clock())
    step_seconds: list[float] = field(default_factory=list)
    validation_seconds: float | None = None
    """Duration of the last validation (with its snapshot)."""
    epoch_overhead_seconds: float = 0.0
    """Largest per-epoch time outside steps and validation (records, checkpoints)."""

    @property
    def seconds(self) -> float:
        return self.minutes * 60.0

    def elapsed(self) -> float:
        return clock() - self.started

    def step_time(self) -> float | None:
        """Typical seconds per step (median of the recent ones, the first step excluded), or None before any."""
        timed = self.step_seconds[1:] if len(self.step_seconds) > 1 else self.step_seconds
        return statistics.median(timed[-50:]) if timed else None

    def validation_time(self) -> float:
        """The last validation's duration, or before any a guess of three steps' time (it predicts without backward passes)."""
        return self.validation_seconds if self.validation_seconds is not None else 3 * (self.step_time() or 0.0)

    def ready(self) -> bool:
        """Enough steps timed for a first estimate."""
        return len(self.step_seconds) > WARMUP_STEPS

    def end_reserve(self) -> float:
        """Seconds kept back for the last validation, checkpoint and pictures, plus a safety margin."""
        margin = 0.03 * self.seconds + 2 * (self.step_time() or 0.0)
        return self.validation_time() + 2 * self.epoch_overhead_seconds + margin

    def plan(self, steps_done: int, steps_per_epoch: int, val_every: int) -> Plan:
        """Steps (the ``steps_done`` included) that fit in the remaining budget at the measured speeds."""
        step = self.step_time() or 1.0
        left = self.seconds - self.elapsed() - self.end_reserve()
        per_epoch = steps_per_epoch * step + self.epoch_overhead_seconds + (self.validation_seconds or 0.0) / val_every
        more = max(0, math.floor(left / per_epoch * steps_per_epoch)) if left > 0 else 0
        total = steps_done + more
        return Plan(total, total / steps_per_epoch, step)

    def out_of_time(self) -> bool:
        """True when one more step would leave too little for the final validation and checkpoint."""
        step = self.step_time() or 0.0
        needed = step + self.validation_time() + 2 * self.epoch_overhead_seconds + 0.01 * self.seconds
        return self.elapsed() + needed > self.seconds


class BudgetedRun:
    """A time-budgeted run's plan: the per-step lr schedule, the steps that fit, and when to stop.

    The trainer creates one when the clock starts, has it build the schedule once the steps per epoch are known
    (:meth:`build_scheduler`), and then asks it: :meth:`epoch_steps` before an epoch, :meth:`step_done` after
    every optimisation step, :meth:`epoch_is_last` before deciding whether to validate, :meth:`epoch_done`
    after the checkpoint, :meth:`finished` before the next epoch. The trainer counts the steps; this object
    counts time. Under torchrun rank 0's plan is broadcast and any rank running out of time stops every rank.
    """

    def __init__(self, train: TrainConfig, optim: OptimConfig, *, started: float) -> None:
        assert train.max_minutes is not None
        self.time = TimeBudget(train.max_minutes, started=started)
        self.max_epochs, self.val_every, self.optim = train.max_epochs, train.val_every, optim
        self.stopped = False
        """Set when the time ran out before the planned steps were done (the out-of-time safety net)."""
        self._planned, self._plan_total = False, 0  # the first estimate is made; the steps of the latest plan
        self.steps_per_epoch = 0
        self.scheduler: LRScheduler | ReduceLROnPlateau | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def minutes(self) -> float:
        return self.time.minutes

    def build_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LRScheduler | ReduceLROnPlateau:
        """The run's schedule, counted in steps (a :class:`StepSchedule`; plateau stays per validation), first laid
        over ``train.max_epochs`` epochs; the budget re-lays it as its estimates come in."""
        self.optimizer, self.steps_per_epoch = optimizer, steps_per_epoch
        self.scheduler = build_scheduler(self.optim, optimizer, self.max_epochs, steps_per_epoch=steps_per_epoch)
        return self.scheduler

    def _steps(self) -> tuple[LRScheduler | ReduceLROnPlateau, torch.optim.Optimizer]:
        assert self.scheduler is not None and self.optimizer is not None, "build_scheduler first"
        return self.scheduler, self.optimizer

    @property
    def most_steps(self) -> int:
        """Steps of ``train.max_epochs`` full epochs: a budget never trains longer than that."""
        return self.max_epochs * self.steps_per_epoch

    def resume(self, epochs_done: int, saved_scheduler: dict[str, Any]) -> int:
        """Put a resumed run's schedule on the steps it has done (a loaded scheduler state in place); returns them.

        The resumed run gets a fresh budget. A run saved in steps (time-budgeted before) continues its schedule from
        the progress it had made, laid over what the new budget allows; a run counted in epochs starts a fresh decay
        from the peak at its step count.
        """
        scheduler, _ = self._steps()
        schedule = step_schedule(scheduler)
        if schedule is None:  # plateau: stepped per validation, nothing counted in steps
            return epochs_done * self.steps_per_epoch
        lambdas = saved_scheduler.get("lr_lambdas") or [None]
        saved_in_steps = isinstance(lambdas[0], dict) and "total_steps" in lambdas[0]
        steps = scheduler.last_epoch if saved_in_steps else epochs_done * self.steps_per_epoch
        if not saved_in_steps:
            schedule.anchor_step, schedule.anchor_progress = max(steps, schedule.warmup_steps), 0.0
        scheduler.last_epoch = steps
        self._apply_lr(steps)
        return steps

    def planned_steps(self) -> int:
        """Steps the run will make in all: what the latest plan allows, at most ``train.max_epochs`` epochs.

        The plan's own total, not the schedule's: a schedule always keeps one step ahead of where it is laid
        (``StepSchedule.relay``), so once no further step fits, the schedule's total would still ask for one more
        and the run would go on in one-step epochs until the out-of-time safety net stopped it.
        """
        if self._planned:
            return self._plan_total
        schedule = step_schedule(self._steps()[0])
        planned = schedule.total_steps if schedule is not None else self.most_steps
        return min(planned, self.most_steps)

    def finished(self, steps_done: int) -> bool:
        """True when the run should make no further step: the plan's steps are done or the time ran out."""
        return self.stopped or steps_done >= self.planned_steps()

    def epoch_steps(self, steps_done: int) -> int:
        """Steps of the next epoch: a full epoch, or what is left of the plan when that is less (at least one)."""
        return max(1, min(self.steps_per_epoch, self.planned_steps() - steps_done))

    def step_done(self, steps_done: int, seconds: float) -> bool:
        """After a step that took ``seconds``: time it, step the schedule, plan once warmed up; True ends the epoch here."""
        scheduler, _ = self._steps()
        self.time.step_seconds.append(seconds)
        if not isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step()
        if not self._planned and self.time.ready():
            self._replan(steps_done)
        if not dist.all_true(not self.time.out_of_time()):
            if not self.stopped:
                log.warning("time budget nearly spent after %d steps: stopping training to validate and save within it", steps_done)
            self.stopped = True
        return self.finished(steps_done)

    def epoch_is_last(self, steps_done: int) -> bool:
        """Re-estimate from this epoch's timings; True when no further step fits (the epoch must validate)."""
        self._replan(steps_done)
        return self.finished(steps_done)

    def epoch_done(self, steps_done: int, *, seconds: float, step_seconds: list[float], validation_seconds: float,
                   validated: bool, last: bool) -> None:
        """Feed the epoch's validation and overhead times (checkpoints, records) to the budget; unless the epoch
        was the last, lay the next epochs' steps with them known."""
        if validated:
            self.time.validation_seconds = validation_seconds
        overhead = seconds - sum(step_seconds) - validation_seconds
        self.time.epoch_overhead_seconds = max(self.time.epoch_overhead_seconds, overhead)
        if not last:
            self._replan(steps_done)

    def _replan(self, steps_done: int) -> None:
        """Estimate how many steps fit in the rest of the budget and lay the schedule over them (rank 0 decides)."""
        scheduler, _ = self._steps()
        plan = dist.broadcast(self.time.plan(steps_done, self.steps_per_epoch, self.val_every))
        total = min(plan.total_steps, self.most_steps)
        schedule = step_schedule(scheduler)
        if schedule is not None:
            schedule.relay(steps_done, total)
            self._apply_lr(steps_done)
        self._plan_total = total
        first, self._planned = not self._planned, True
        (log.info if first else log.debug)(
            "time budget %.3g min: ~%d steps (%.1f epochs of %d, %.2f s per step) fit; re-estimated after every epoch",
            self.time.minutes, total, total / self.steps_per_epoch, self.steps_per_epoch, plan.seconds_per_step,
        )

    def _apply_lr(self, steps_done: int) -> None:
        """Set the optimizer's lr to what the (re-laid) step schedule gives for the next step."""
        scheduler, optimizer = self._steps()
        scheduler = cast(LambdaLR, scheduler)  # only reached with a StepSchedule
        scheduler.base_lrs = [self.optim.lr] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["lr"] = self.optim.lr * scheduler.lr_lambdas[0](steps_done)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
