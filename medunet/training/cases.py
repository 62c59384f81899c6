"""Which cases and classes a training run uses: class names, and the train/validation split."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from medunet.config import Config
from medunet.errors import ConfigError, DataError
from medunet.io.datalist import Case, Datalist, split_cases
from medunet.io.nifti import read_nifti
from medunet.model.layout import SPLIT_FILE
from medunet.training import distributed as dist
from medunet.training.records import write_split
from medunet.training.splits import Fold

log = logging.getLogger("medunet")


def resolve_labels(datalist: Datalist, config: Config) -> dict[int, str]:
    """Class names: the datalist's "labels", else data.labels, else found from the training labels."""
    if datalist.labels:
        return datalist.labels
    if config.data.labels:
        return {int(k): v for k, v in config.data.labels.items()}
    highest = 0
    for case in datalist.training:
        assert case.label is not None
        data = np.asarray(read_nifti(case.label, case=case.name, check_grid=False).dataobj)
        highest = max(highest, int(np.nanmax(data)) if data.size else 0)
    log.warning("no \"labels\" in the datalist or config; found classes 0..%d in the training labels", highest)
    return {i: ("background" if i == 0 else f"class_{i}") for i in range(max(highest, 1) + 1)}


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
