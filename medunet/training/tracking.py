"""Experiment tracking: a run's numbers and pictures sent to TensorBoard and/or MLflow (``train.tracking``).

Driven by the trainer's epoch callbacks: after every epoch each tracker gets the epoch's
``metrics.csv`` row (train loss, lr, step and epoch seconds, per-class validation Dice and IoU); at
the start the resolved config; at the end the pictures (train_curve.png, learning.png/gif). Both
backends are optional extras: ``pip install 'medunet[tensorboard]'`` / ``'medunet[mlflow]'``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from medunet.config import Config, config_to_dict
from medunet.errors import ConfigError
from medunet.model.layout import CONFIG_FILE

log = logging.getLogger("medunet")

#: How a training session ended, as MLflow records a run's status: completed, raised an exception, or interrupted (Ctrl-C).
RunEnd = Literal["FINISHED", "FAILED", "KILLED"]

#: What each tracker needs importable, and the extra that installs it.
_NEEDS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "mlflow": ("mlflow.tracking", "mlflow")}


def require_tracking(config: Config | None, names: Sequence[str] = ()) -> None:
    """Fail early, in one line, when a tracker in ``train.tracking`` (or in ``names``) is not installed.

    Raises:
        ConfigError: names the missing package and the extra that installs it.
    """
    import importlib

    for name in sorted({*(_selected(config) if config is not None else []), *names} - {"none"}):
        module, extra = _NEEDS[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:  # the cause shows, under --debug, why an installed package fails to import
            raise ConfigError(
                f"train.tracking includes {name}, but its package is not installed: pip install 'medunet[{extra}]' "
                f"(or remove {name} from train.tracking)"
            ) from exc


def _selected(config: Config) -> list[str]:
    return sorted({t for t in config.train.tracking if t != "none"})


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite numbers under tracker names (``train/loss``, ``val/dice_liver``, ...)."""
    names = {"train_loss": "train/loss", "lr": "train/lr", "step_seconds": "time/step_seconds", "epoch_seconds": "time/epoch_seconds"}
    out = {}
    for key, value in row.items():
        if key == "epoch" or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        name = names.get(key) or (f"val/{key[4:]}" if key.startswith("val_") else key)
        out[re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)] = float(value)
    return out


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class _TensorBoard:
    """Event files in ``<run>/tensorboard``: scalars per epoch, the config as text, pictures as images."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)  # markdown code block

    def log_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        for name, value in _scalars(row).items():
            self.writer.add_scalar(name, value, epoch)
        self.writer.flush()

    def log_pictures(self, paths: Sequence[Path], epoch: int) -> None:
        import numpy as np
        from PIL import Image

        for path in paths:
            if path.suffix == ".png":
                self.writer.add_image(f"pictures/{path.stem}", np.asarray(Image.open(path).convert("RGB")), epoch, dataformats="HWC")

    def close(self, ended: RunEnd) -> None:
        """Flush and close the event files (TensorBoard has no run status: ``ended`` is not recorded)."""
        self.writer.close()


class _MLflow:
    """One MLflow run per training session: config as params, scalars per epoch, pictures as artifacts."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = config.train.mlflow_uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # a local file store: fine for one user, kept readable by newer MLflow
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name("medunet")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("medunet")
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.resolve().name).info.run_id
        params = [Param(k, v[:500]) for k, v in _flat(config_to_dict(config)).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.config_path = run_dir / CONFIG_FILE
        self.uri = uri

    def log_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, epoch) for name, value in _scalars(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_pictures(self, paths: Sequence[Path], epoch: int) -> None:
        for path in [self.config_path, *paths]:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))

    def close(self, ended: RunEnd) -> None:
        """End the MLflow run with how the session ended, so a crashed or interrupted run is not shown as FINISHED."""
        self.client.set_terminated(self.run_id, status=ended)


class Tracker:
    """The trackers a config asks for, behind one interface; :meth:`on_epoch` is an epoch callback."""

    def __init__(self, backends: list[Any]) -> None:
        self.backends = backends
        self.epoch = 0

    def on_epoch(self, record: Any) -> None:
        """Log an :class:`~medunet.training.trainer.EpochRecord`'s row (never asks to stop)."""
        self.epoch = record.epoch
        for backend in self.backends:
            backend.log_epoch(record.epoch, record.row)

    def log_pictures(self, paths: Sequence[Path]) -> None:
        for backend in self.backends:
            backend.log_pictures(paths, self.epoch)

    def close(self, ended: RunEnd) -> None:
        """Close every backend; ``ended`` says how the training session ended (MLflow records it as the run's status)."""
        for backend in self.backends:
            backend.close(ended)


def open_tracking(config: Config, run_dir: Path) -> Tracker | None:
    """Start the trackers in ``train.tracking`` for a run folder, or None when there are none.

    Raises:
        ConfigError: a tracker's package is missing (see :func:`require_tracking`).
    """
    selected = _selected(config)
    if not selected:
        return None
    require_tracking(config)
    backends: list[Any] = []
    for name in selected:
        backends.append(_TensorBoard(config, run_dir) if name == "tensorboard" else _MLflow(config, run_dir))
        log.info("tracking to %s", run_dir / "tensorboard" if name == "tensorboard" else backends[-1].uri)
    return Tracker(backends)
