"""Which cases and classes a training run uses: class names, and the train/validation split."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medunet.config import Config
from medunet.errors import ConfigError, DataError
from medunet.io.datalist import Case, Datalist, split_cases
from medunet.io.nifti import read_nifti
from medunet.model.layout import SPLIT_FILE
from medunet.training import distributed as dist
from medunet.training.records import write_split
from medunet.training.splits import Fold

if TYPE_CHECKING:
    from medunet.check.findings import CaseSummary

log = logging.getLogger("medunet")


def resolve_labels(datalist: Datalist, config: Config, known: Mapping[Path, float] | None = None) -> dict[int, str]:
    """Class names: the datalist's "labels", else data.labels, else found from the training labels.

    ``known`` maps label files to their highest value as the data check found it (:func:`label_maxima`):
    those files are not read again.
    """
    if datalist.labels:
        return datalist.labels
    if config.data.labels:
        return {int(k): v for k, v in config.data.labels.items()}
    highest = 0
    for case in datalist.training:
        highest = max(highest, _highest_label(case, known or {}))
    log.warning("no \"labels\" in the datalist or config; found classes 0..%d in the training labels", highest)
    return class_names_up_to(highest)


def class_names_up_to(highest: int) -> dict[int, str]:
    """The class names of labels whose highest value is ``highest`` when no names are declared."""
    return {i: ("background" if i == 0 else f"class_{i}") for i in range(max(highest, 1) + 1)}


def _highest_label(case: Case, known: Mapping[Path, float]) -> int:
    assert case.label is not None
    if case.label in known:
        return int(known[case.label])
    data = np.asarray(read_nifti(case.label, case=case.name, check_grid=False).dataobj)
    return int(np.nanmax(data)) if data.size else 0


def label_maxima(cases: Iterable[CaseSummary], root: Path) -> dict[Path, float]:
    """The highest value of every label file a passed data check read (its ``training`` and ``validation`` cases).

    Only from a check without errors: there every label value is a finite, non-negative integer, so
    ``int`` of it is what reading the file and taking ``nanmax`` gives.
    """
    return {root / c.label.path: c.label.highest for c in cases if c.label is not None and c.label.highest is not None}


def split_for_run(
    datalist: Datalist, config: Config, run_dir: Path, resume: bool, fold: Fold | None = None
) -> tuple[list[Case], list[Case]]:
    """Training and validation cases: a cross-validation fold, the datalist's lists, the saved split on resume, or a new seeded split."""
    if fold is not None:
        if datalist.validation:
            raise ConfigError(f'{datalist.path} has a "validation" list, which fixes the split; it cannot be combined with folds')
        by_name = {c.name: c for c in datalist.training}
        missing = sorted(set(fold.train + fold.val) - set(by_name))
        if missing:
            raise DataError(f"fold {fold.index} names cases the datalist does not have: {missing[:5]}", path=str(datalist.path))
        train, val = [by_name[n] for n in fold.train], [by_name[n] for n in fold.val]
        if dist.is_main():
            write_split(run_dir, fold.train, fold.val, seed=config.data.split_seed, source=f"fold {fold.index}")
        return train, val
    if datalist.validation:
        train, val = list(datalist.training), list(datalist.validation)
        if dist.is_main():
            write_split(run_dir, [c.name for c in train], [c.name for c in val], seed=config.data.split_seed, source="datalist")
        return train, val
    saved = run_dir / SPLIT_FILE
    if resume and saved.is_file():
        names = set(json.loads(saved.read_text())["validation"])
        return [c for c in datalist.training if c.name not in names], [c for c in datalist.training if c.name in names]
    train, val = split_cases(datalist.training, val_fraction=config.data.val_fraction, seed=config.data.split_seed)
    if dist.is_main():
        write_split(run_dir, [c.name for c in train], [c.name for c in val], seed=config.data.split_seed, source="random")
    return train, val
