"""A wall-clock budget for training (``train.max_minutes``): how many steps fit, measured as training runs.

The clock starts when the trainer starts (data caching counts). After a few warm-up steps, and again
after every epoch, :meth:`TimeBudget.plan` turns the measured step, validation and per-epoch overhead
times into the number of optimisation steps that still fit, keeping back what the last validation and
checkpoint will take; the trainer lays its lr schedule over that many steps, so the lr reaches its floor
as the budget ends. :meth:`TimeBudget.out_of_time` is the safety net when the machine slows down.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field

from medunet.errors import ConfigError

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
