"""Checkpoints: saved atomically, loaded safely.

A checkpoint holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``: a file carrying a pickle payload is refused and
runs nothing. It holds everything ``infer`` needs (weights, resolved config,
label names, channel count) and everything ``--resume`` needs (optimizer,
scheduler, scaler, RNG states, history).
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medunet.errors import CheckpointError
from medunet.io.atomic import atomic_path

log = logging.getLogger("medunet")

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "model", "config", "labels", "in_channels", "epoch")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` via a temporary file and rename: a crash keeps the previous file."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as RuntimeError
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise CheckpointError(f"cannot write checkpoint {path} ({reason}); the previous one is intact") from None
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the best (else last) checkpoint of a run folder."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"run folder {path} has no best.pt or last.pt; has training finished an epoch?")
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
            match = re.fullmatch(r"fold_(\d+)", child.name)
            if match and child.is_dir():
                chosen = next((child / n for n in ("best.pt", "last.pt") if (child / n).is_file()), None)
                if chosen is not None:
                    found[int(match.group(1))] = chosen
    found = dict(sorted(found.items()))
    if folds is None:
        expected = _fold_count(path / "splits.json")
        if found and expected > len(found):
            log.warning("%s: only folds %s of %d have a checkpoint; the ensemble uses those", path, sorted(found), expected)
        return found
    if not found:
        raise CheckpointError(f"--folds needs a cross-validation folder holding fold_<k>/best.pt; {path} has none")
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


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a medunet checkpoint with ``weights_only=True`` and check its contents.

    Raises:
        CheckpointError: missing, truncated, unsafe (pickled objects), or not a medunet checkpoint.
    """
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() and "unsupported global" in str(exc).lower():
            raise CheckpointError(
                f"checkpoint {path} holds objects that are not plain weights and config; refusing to load it"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({type(exc).__name__})") from None
    except Exception as exc:  # torch's unpickler raises many types on junk input; all mean "unusable file"
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a medunet checkpoint (missing {[k for k in REQUIRED_KEYS if k not in state] if isinstance(state, dict) else 'everything'})")
    if state["format"] > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {state['format']}; this medunet reads up to {FORMAT_VERSION}; upgrade medunet")
    return state


def capture_rng() -> dict[str, Any]:
    """The state of every random generator, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
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
