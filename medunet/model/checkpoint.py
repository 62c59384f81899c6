"""The one on-disk format of a trained model: typed, saved atomically, loaded safely.

A :class:`Checkpoint` holds everything inference needs (weights, resolved config, class names,
channel count, modality, and the QC reference of the training data) and, in a
:class:`TrainState`, everything ``--resume`` needs (optimizer, scheduler, scaler, RNG states,
best score, history). :meth:`Checkpoint.to_dict` and :meth:`Checkpoint.from_dict` are the only
places that know the stored keys.

On disk it is a flat dict of tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``: a file carrying a pickle payload is refused and runs nothing.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from medunet.errors import CheckpointError
from medunet.io.atomic import atomic_path
from medunet.model.layout import BEST_CHECKPOINT, FOLD_DIRS, LAST_CHECKPOINT, SPLITS_FILE, fold_index, run_checkpoint

log = logging.getLogger("medunet")

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "model", "config", "labels", "in_channels", "epoch")
_TRAIN_STATE_KEYS = ("optimizer", "scheduler", "rng", "best_epoch", "stale_validations", "history")
#: Where the best score is stored; ``best_dice`` in earlier checkpoints, where it held the IoU under IoU selection.
_BEST_SCORE_KEYS = ("best_score", "best_dice")


@dataclass
class TrainState:
    """What ``--resume`` needs besides the weights: optimisation state, generators and the run's records."""

    optimizer: dict[str, Any]
    """``optimizer.state_dict()``."""
    scheduler: dict[str, Any]
    """``scheduler.state_dict()``."""
    rng: dict[str, Any]
    """Every random generator's state (:func:`capture_rng`)."""
    scaler: dict[str, Any] | None = None
    """The fp16 gradient scaler's state; None when it was disabled."""
    best_score: float = -1.0
    """Best mean validation score so far, in ``best_metric`` (-1 before the first validation)."""
    best_metric: str = "dice"
    """What ``best_score`` measures: the run's ``train.selection_metric`` (``"dice"`` or ``"iou"``)."""
    best_epoch: int = 0
    """Epoch (1-based) of ``best_score``; 0 before the first validation."""
    stale_validations: int = 0
    """Validations since the last improvement (drives early stopping)."""
    best_class_dice: dict[str, float] = field(default_factory=dict)
    """Per-class validation score at ``best_epoch``, by class name."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One ``metrics.csv`` row per completed epoch."""

    def best_mean_dice(self) -> float:
        """Mean validation Dice at ``best_epoch`` whatever the selection metric (0 before the first validation).

        From the epoch's ``history`` row; ``best_score`` itself when that row is missing and the score is Dice.
        """
        row = next((r for r in self.history if r.get("epoch") == self.best_epoch), {})
        dice = row.get("val_dice_mean")
        if isinstance(dice, (int, float)):
            return float(dice)
        return max(self.best_score, 0.0) if self.best_metric == "dice" and self.best_epoch > 0 else 0.0


@dataclass
class Checkpoint:
    """A trained model and, for a run still training, its :class:`TrainState`."""

    model: dict[str, torch.Tensor]
    """The network's ``state_dict()``."""
    config: dict[str, Any]
    """The resolved config (``config_to_dict``) the network was trained with."""
    class_names: list[str]
    """Class names by label value (index 0 is background)."""
    in_channels: int
    """Input channels (image files per case)."""
    epoch: int
    """Epochs completed when this was saved."""
    modality: Any = None
    """The datalist's ``"modality"`` (or ``data.modality``), as given."""
    qc_reference: dict[str, Any] | None = None
    """The stored form of the training data's QC reference (:class:`medunet.qc.reference.QCReference`: ranges of
    spacings, intensities and class volumes QC compares new cases with); None for a checkpoint older than QC."""
    medunet_version: str = ""
    """The medunet version that wrote it."""
    train_state: TrainState | None = None
    """Optimisation state for ``--resume``; None in a model-only checkpoint."""
    format: int = FORMAT_VERSION
    """On-disk format number; a newer number than this medunet knows is refused."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def labels(self) -> dict[int, str]:
        """Class names by label value."""
        return dict(enumerate(self.class_names))

    def without_train_state(self) -> Checkpoint:
        """The same model without what only resuming needs (smaller; what an export ships)."""
        return replace(self, train_state=None)

    def to_dict(self) -> dict[str, Any]:
        """The stored form: a flat dict of tensors and plain values (``weights_only``-loadable)."""
        stored: dict[str, Any] = {
            "format": self.format,
            "medunet_version": self.medunet_version,
            "epoch": int(self.epoch),
            "model": self.model,
            "config": self.config,
            "labels": {str(i): name for i, name in enumerate(self.class_names)},
            "in_channels": int(self.in_channels),
            "modality": self.modality,
        }
        if self.qc_reference is not None:
            stored["qc_reference"] = self.qc_reference
        if self.train_state is not None:
            ts = self.train_state
            stored.update(
                optimizer=ts.optimizer, scheduler=ts.scheduler, scaler=ts.scaler, rng=ts.rng, best_score=float(ts.best_score),
                best_metric=str(ts.best_metric), best_epoch=int(ts.best_epoch), stale_validations=int(ts.stale_validations),
                best_class_dice=dict(ts.best_class_dice), history=list(ts.history),
            )
        return stored

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any], *, source: str = "checkpoint") -> Checkpoint:
        """Rebuild a checkpoint from its stored form.

        Raises:
            CheckpointError: keys are missing or the format is newer than this medunet reads.
        """
        missing = [k for k in REQUIRED_KEYS if k not in stored]
        if missing:
            raise CheckpointError(f"{source} is not a medunet checkpoint (missing {missing})")
        if int(stored["format"]) > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {source} has format {stored['format']}; this medunet reads up to {FORMAT_VERSION}; upgrade medunet"
            )
        labels = stored["labels"]
        try:
            class_names = [str(labels[str(i)]) for i in range(len(labels))]
        except (KeyError, TypeError):
            raise CheckpointError(f"{source}: its class labels are not numbered 0..{len(labels) - 1}") from None
        train_state = None
        best_key = next((k for k in _BEST_SCORE_KEYS if k in stored), None)
        if best_key is not None and all(k in stored for k in _TRAIN_STATE_KEYS):
            train_state = TrainState(
                optimizer=stored["optimizer"], scheduler=stored["scheduler"], rng=stored["rng"], scaler=stored.get("scaler"),
                best_score=float(stored[best_key]), best_metric=_best_metric(stored), best_epoch=int(stored["best_epoch"]),
                stale_validations=int(stored["stale_validations"]),
                best_class_dice={str(k): float(v) for k, v in stored.get("best_class_dice", {}).items()},
                history=list(stored["history"]),
            )
        return cls(
            model=stored["model"], config=stored["config"], class_names=class_names, in_channels=int(stored["in_channels"]),
            epoch=int(stored["epoch"]), modality=stored.get("modality"),
            qc_reference=stored.get("qc_reference", stored.get("fingerprint")),  # "fingerprint": its name before 0.2
            medunet_version=str(stored.get("medunet_version", "")), train_state=train_state, format=int(stored["format"]),
        )


def _best_metric(stored: Mapping[str, Any]) -> str:
    """The stored ``best_metric``; for a checkpoint older than it, the selection metric of its config (Dice before IoU selection)."""
    if "best_metric" in stored:
        return str(stored["best_metric"])
    train = stored["config"].get("train") if isinstance(stored["config"], Mapping) else None
    return str(train.get("selection_metric", "dice")) if isinstance(train, Mapping) else "dice"


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> Path:
    """Write ``checkpoint`` to ``path`` via a temporary file and rename: a crash keeps the previous file."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(checkpoint.to_dict(), tmp)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as RuntimeError
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise CheckpointError(f"cannot write checkpoint {path} ({reason}); the previous one is intact") from exc
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the best (else last) checkpoint of a run folder."""
    path = Path(path)
    if path.is_dir():
        chosen = run_checkpoint(path)
        if chosen is None:
            raise CheckpointError(f"run folder {path} has no {BEST_CHECKPOINT} or {LAST_CHECKPOINT}; has training finished an epoch?")
        return chosen
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def fold_checkpoints(path: str | Path, folds: Sequence[int] | None = None) -> dict[int, Path]:
    """The checkpoint of each fold of a cross-validation folder (``fold_<k>/best.pt``, else ``last.pt``), by fold index.

    Without ``folds`` every fold that has a checkpoint is used (an empty dict when ``path``
    holds no ``fold_<k>`` folders); with ``folds`` each named fold must have one.

    Raises:
        CheckpointError: a requested fold is missing, or ``folds`` was given for something that is not a cross-validation folder.
    """
    path = Path(path)
    found: dict[int, Path] = {}
    if path.is_dir():
        for child in path.iterdir():
            index = fold_index(child.name)
            if index is not None and child.is_dir():
                chosen = run_checkpoint(child)
                if chosen is not None:
                    found[index] = chosen
    found = dict(sorted(found.items()))
    if folds is None:
        expected = _fold_count(path / SPLITS_FILE)
        if found and expected > len(found):
            log.warning("%s: only folds %s of %d have a checkpoint; the ensemble uses those", path, sorted(found), expected)
        return found
    if not found:
        raise CheckpointError(f"--folds needs a cross-validation folder holding {FOLD_DIRS}/{BEST_CHECKPOINT}; "
                              f"{path} has none")
    missing = sorted(set(folds) - set(found))
    if missing:
        raise CheckpointError(f"{path} has no checkpoint for fold(s) {missing}; available folds: {sorted(found)}")
    return {k: found[k] for k in sorted(set(folds))}


def _fold_count(splits: Path) -> int:
    """Number of folds in a ``splits.json`` (0 when absent or unreadable: it only informs a warning)."""
    try:
        raw = json.loads(splits.read_text())
    except (OSError, ValueError):
        return 0
    return len(raw) if isinstance(raw, list) else 0


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a medunet checkpoint (a file or a run folder's best/last) with ``weights_only=True``.

    Raises:
        CheckpointError: missing, truncated, unsafe (pickled objects), or not a medunet checkpoint.
    """
    path = resolve_checkpoint(path)
    try:
        stored = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() and "unsupported global" in str(exc).lower():
            raise CheckpointError(
                f"checkpoint {path} holds objects that are not plain weights and config; refusing to load it"
            ) from exc
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({type(exc).__name__})") from exc
    except Exception as exc:  # torch's unpickler raises many types on junk input; all mean "unusable file"
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path} is not a medunet checkpoint (missing everything)")
    return Checkpoint.from_dict(stored, source=str(path))


def capture_rng() -> dict[str, Any]:
    """The state of every random generator, as tensors and plain values."""
    # the global RandomState is an MT19937: its legacy state is this tuple, never the dict numpy's stubs also allow
    kind, keys, pos, has_gauss, gauss = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    state: dict[str, Any] = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
