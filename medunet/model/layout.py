"""The names of the files and folders medunet writes for a model: the one place they are spelled.

A run folder (``medunet train -o runs/x``)::

    best.pt  last.pt  split.json  qc.json  [postprocessing.json]  config.yaml  metrics.csv ...

A cross-validation folder (``medunet crossval -o runs/x``)::

    splits.json  fold_0/ ... fold_k/ (run folders)  oof/  oof_crf/  oof_eval/
    postprocessing.json  qc.json  crossval.json  config.yaml

An exported package (``medunet export -o export/x``)::

    pipeline.json  model.onnx | model.ts | model_fold<k>.*  qc.json  model_card.json  MODEL_CARD.md

Every module that reads or writes one of these imports its name from here, so the layout can
be read (and changed) in one file. :mod:`medunet.model.loader` turns any of these sources into a
loaded model.
"""

from __future__ import annotations

import re
from pathlib import Path

#: A run's checkpoint at its best validation score, and after its latest epoch (what ``--resume`` reads).
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
#: The checkpoint inference takes from a run folder: the first of these that exists.
CHECKPOINT_PREFERENCE = (BEST_CHECKPOINT, LAST_CHECKPOINT)
#: A run's training/validation split (case names).
SPLIT_FILE = "split.json"
#: The resolved config of a run or cross-validation folder.
CONFIG_FILE = "config.yaml"
#: QC's calibration (run, cross-validation folder) or its reference and calibration (package).
QC_FILE = "qc.json"
#: The post-processing chosen on out-of-fold predictions; applied when a folder holding it is loaded.
POSTPROCESSING_FILE = "postprocessing.json"

#: A cross-validation folder's folds (made once, reused by every fold and restart).
SPLITS_FILE = "splits.json"
#: A cross-validation folder's summary (per-fold and out-of-fold Dice, what was chosen).
CROSSVAL_FILE = "crossval.json"
#: Out-of-fold masks: plain, refined by the dense CRF (its search candidate), and their evaluation.
OOF_DIR = "oof"
OOF_CRF_DIR = "oof_crf"
OOF_EVAL_DIR = "oof_eval"
_FOLD_PREFIX = "fold_"
_FOLD_NAME = re.compile(rf"{_FOLD_PREFIX}(\d+)")
#: The fold folders, as named in messages.
FOLD_DIRS = f"{_FOLD_PREFIX}<k>"

#: An exported package: what inference needs besides the networks, the model card (also the package's manifest).
PIPELINE_FILE = "pipeline.json"
CARD_FILE = "model_card.json"
CARD_MARKDOWN = "MODEL_CARD.md"


def fold_name(index: int) -> str:
    """The folder name of fold ``index`` in a cross-validation folder (``fold_<index>``)."""
    return f"{_FOLD_PREFIX}{index}"


def fold_dir(root: str | Path, index: int) -> Path:
    """The run folder of fold ``index`` under a cross-validation folder: ``root/fold_<index>``."""
    return Path(root) / fold_name(index)


def fold_index(name: str) -> int | None:
    """The fold index of a folder named ``fold_<k>``; None for any other name."""
    match = _FOLD_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def run_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint inference takes from a run folder (best, else last), or None when it has neither."""
    return next((Path(run_dir) / n for n in CHECKPOINT_PREFERENCE if (Path(run_dir) / n).is_file()), None)


def is_package(path: str | Path) -> bool:
    """Whether ``path`` is an exported package folder (it holds a pipeline.json)."""
    return Path(path).is_dir() and (Path(path) / PIPELINE_FILE).is_file()


def model_name(path: str | Path) -> str:
    """A short name for the model at ``path``: the run folder's name for ``<run>/best.pt``, else the file's stem or the folder's name."""
    path = Path(path)
    if path.suffix == ".pt":
        checkpoint_stems = {Path(n).stem for n in CHECKPOINT_PREFERENCE}
        return path.parent.name if path.stem in checkpoint_stems and path.parent.name else path.stem
    return path.name or "medunet"
