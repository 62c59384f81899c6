"""k-fold cross-validation splits: made once, saved as ``splits.json``, reused by every fold.

The file is a JSON list with one entry per fold (the layout nnU-Net uses)::

    [
      {"train": ["case_a", "case_c", ...], "val": ["case_b", ...]},   # fold 0
      ...
    ]

Generated splits sort the case names, shuffle them with ``data.split_seed`` and deal
them round-robin into ``k`` validation sets, so the same cases and seed give the same
folds whatever order the datalist lists them in, every case is validated exactly once
and fold sizes differ by at most one case. A user may supply their own file (e.g.
grouping the scans of one patient into one fold); it is checked before anything trains.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medunet.errors import ConfigError, DataError
from medunet.io.atomic import atomic_write_text
from medunet.io.datalist import Datalist, DatalistSource, load_datalist, read_json
from medunet.model.layout import SPLITS_FILE

log = logging.getLogger("medunet")

DEFAULT_FOLDS = 5


@dataclass(frozen=True)
class Fold:
    """One fold: the case names it trains on and the case names it validates on."""

    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]

    def as_dict(self) -> dict[str, list[str]]:
        """The fold as written in ``splits.json``."""
        return {"train": list(self.train), "val": list(self.val)}


def make_folds(names: Sequence[str], folds: int, *, seed: int) -> list[Fold]:
    """Deterministic k-fold split of case names (independent of their order).

    Raises:
        ConfigError: fewer than 2 folds, or more folds than cases.
    """
    unique = sorted(set(names))
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    if folds > len(unique):
        raise ConfigError(f"{folds} folds need at least {folds} training cases, the datalist has {len(unique)}; use fewer --folds")
    order = list(unique)
    random.Random(seed).shuffle(order)
    result = []
    for k in range(folds):
        val = set(order[k::folds])
        result.append(Fold(k, tuple(n for n in unique if n not in val), tuple(sorted(val))))
    return result


def check_folds(raw: Any, known: Sequence[str], *, path: Path, disjoint_validation: bool = False) -> list[Fold]:
    """Parse and check splits read from JSON against the datalist's training case names.

    Every fold needs non-empty "train" and "val" lists of known names that do not overlap.
    With ``disjoint_validation`` (cross-validation) no case may be validated by two folds,
    since its out-of-fold prediction would then be ambiguous.

    Raises:
        DataError: naming the file, the fold and the offending case names.
    """
    if not isinstance(raw, list) or not raw:
        raise DataError('splits must be a JSON list of {"train": [...], "val": [...]} objects, one per fold', path=str(path))
    known_set = set(known)
    folds: list[Fold] = []
    validated_by: dict[str, int] = {}
    for k, entry in enumerate(raw):
        if not isinstance(entry, dict) or set(entry) != {"train", "val"}:
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise DataError(f'fold {k} must be {{"train": [...], "val": [...]}}, got {got}', path=str(path))
        lists = {}
        for key in ("train", "val"):
            names = entry[key]
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise DataError(f'fold {k}: "{key}" must be a non-empty list of case names', path=str(path))
            if len(set(names)) != len(names):
                raise DataError(f'fold {k}: "{key}" lists a case twice: {sorted({n for n in names if names.count(n) > 1})}', path=str(path))
            unknown = sorted(set(names) - known_set)
            if unknown:
                raise DataError(
                    f'fold {k}: "{key}" names cases the datalist\'s "training" list does not have: {unknown[:5]}'
                    f"{' ...' if len(unknown) > 5 else ''} (case names are image file names without .nii.gz)",
                    path=str(path),
                )
            lists[key] = names
        overlap = sorted(set(lists["train"]) & set(lists["val"]))
        if overlap:
            raise DataError(f"fold {k}: cases both trained on and validated on: {overlap[:5]}; remove them from one list", path=str(path))
        if disjoint_validation:
            for name in lists["val"]:
                if name in validated_by:
                    raise DataError(
                        f"case {name!r} is validated by folds {validated_by[name]} and {k}; in cross-validation each case "
                        "may be validated by one fold only",
                        path=str(path),
                    )
                validated_by[name] = k
        folds.append(Fold(k, tuple(lists["train"]), tuple(lists["val"])))
    return folds


def read_splits(path: Path, known: Sequence[str], *, disjoint_validation: bool = False) -> list[Fold]:
    """Read and check a splits file (see :func:`check_folds`)."""
    path = Path(path)
    return check_folds(read_json(path, what="splits file"), known, path=path, disjoint_validation=disjoint_validation)


def write_splits(path: Path, folds: Sequence[Fold]) -> None:
    """Save folds as ``splits.json`` (atomically)."""
    atomic_write_text(Path(path), json.dumps([f.as_dict() for f in folds], indent=2) + "\n")


def prepare_folds(
    root: Path,
    names: Sequence[str],
    *,
    folds: int | None = None,
    seed: int = 0,
    splits_file: Path | None = None,
    disjoint_validation: bool = False,
) -> list[Fold]:
    """The folds of a cross-validation folder: its ``splits.json``, else made (or read from ``splits_file``) and saved.

    Once ``root/splits.json`` exists it is the truth: every later fold and restart uses it,
    so changing the seed or the datalist's order cannot silently mix two different splits.

    Raises:
        ConfigError: ``folds`` or ``splits_file`` contradicts the saved ``splits.json``.
        DataError: a splits file names unknown cases or overlaps train and validation.
    """
    saved = Path(root) / SPLITS_FILE
    if saved.is_file():
        result = read_splits(saved, names, disjoint_validation=disjoint_validation)
        if folds is not None and folds != len(result):
            raise ConfigError(f"{saved} holds {len(result)} folds but --folds {folds} was given; drop --folds or use another -o")
        if splits_file is not None and Path(splits_file).resolve() != saved.resolve():
            given = read_splits(Path(splits_file), names, disjoint_validation=disjoint_validation)
            if [f.as_dict() for f in given] != [f.as_dict() for f in result]:
                raise ConfigError(f"{splits_file} differs from the splits already saved in {saved}; use another -o for new splits")
        return result
    if splits_file is not None:
        result = read_splits(Path(splits_file), names, disjoint_validation=disjoint_validation)
        if folds is not None and folds != len(result):
            raise ConfigError(f"{splits_file} holds {len(result)} folds but --folds {folds} was given; drop --folds")
        source = f"from {splits_file}"
    else:
        result = make_folds(names, folds or DEFAULT_FOLDS, seed=seed)
        source = f"seed {seed}"
    unvalidated = sorted(set(names) - {n for f in result for n in f.val})
    if unvalidated:
        log.warning("%d training case(s) are in no fold's validation set and get no out-of-fold prediction", len(unvalidated))
    Path(root).mkdir(parents=True, exist_ok=True)
    write_splits(saved, result)
    log.info("saved %d folds (%s) to %s", len(result), source, saved)
    return result


def select_fold(folds: Sequence[Fold], index: int, *, root: Path) -> Fold:
    """Fold ``index``, or a ConfigError naming the valid range."""
    if not 0 <= index < len(folds):
        raise ConfigError(f"--fold {index} does not exist: {Path(root) / SPLITS_FILE} holds folds 0..{len(folds) - 1}")
    return folds[index]


def datalist_folds(
    datalist: Datalist,
    root: Path,
    *,
    folds: int | None = None,
    seed: int = 0,
    splits_file: Path | None = None,
    disjoint_validation: bool = False,
) -> list[Fold]:
    """:func:`prepare_folds` for a datalist's "training" cases.

    Raises:
        ConfigError: the datalist has its own "validation" list (it fixes the split, so folds would contradict it).
    """
    if datalist.validation:
        raise ConfigError(
            f'{datalist.path} has a "validation" list, which fixes the split; cross-validation folds split "training" '
            'themselves: move those cases into "training" or train without --fold'
        )
    return prepare_folds(
        root, [c.name for c in datalist.training], folds=folds, seed=seed, splits_file=splits_file,
        disjoint_validation=disjoint_validation,
    )


def fold_for_training(
    datalist_path: DatalistSource, root: Path, *, fold: int, folds: int | None, seed: int, splits_file: Path | None, allow_outside_root: bool
) -> Fold:
    """The fold ``medunet train --fold`` trains: from ``root/splits.json``, made and saved on first use.

    Raises:
        ConfigError: the datalist has a "validation" list, or ``fold``/``folds`` do not fit the saved splits.
        DataError: an unreadable datalist or an invalid splits file.
    """
    datalist = load_datalist(datalist_path, allow_outside_root=allow_outside_root)
    folds_list = datalist_folds(datalist, root, folds=folds, seed=seed, splits_file=splits_file)
    return select_fold(folds_list, fold, root=root)
