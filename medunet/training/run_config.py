"""The config a training run uses, and the data check before it starts.

``medunet train`` and ``medunet crossval`` (and any script) resolve a run's config the same way:

- ``resume``: the config saved in the run's ``last.pt`` plus the overrides;
- no config file and a new run: a plan computed from the data (``plan.yaml`` and ``fingerprint.json``
  written into the run folder) plus the overrides;
- no config file for an existing run: the preset of the datalist's modality (CT or MRI) plus the overrides;
- a config file: that YAML plus the overrides; when ``medunet plan`` wrote it, the fingerprint beside it
  (``<stem>.fingerprint.json``) is copied into the new run as ``fingerprint.json``, so the run keeps its
  planning facts (the model card of ``medunet export`` reports them).

Command-line flags (``--device``, ``--allow-outside-root``) become overrides too, so every setting is
read once, by the config parser.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from medunet.config import Config, DataConfig, apply_overrides, config_from_dict, load_config, read_yaml
from medunet.errors import ConfigError, DataError
from medunet.io.atomic import atomic_write_text
from medunet.io.datalist import Datalist, DatalistSource, datalist_file, load_datalist, split_cases
from medunet.model.layout import CONFIG_FILE, LAST_CHECKPOINT, SPLITS_FILE
from medunet.qc.reference import SharedRows, ct_input, reference_cases
from medunet.training.cases import class_names_up_to, label_maxima

log = logging.getLogger("medunet")

#: The planning fingerprint of a run (or cross-validation) folder, when it was planned or trained with a plan.
FINGERPRINT_FILE = "fingerprint.json"
#: Words in a datalist's "modality" that mean an MR acquisition (the MRI preset is then used without -c).
_MR_WORDS = ("MR", "T1", "T2", "FLAIR", "ADC", "DWI")


def run_overrides(overrides: Sequence[str], *, device: str | None = None, allow_outside_root: bool = False) -> list[str]:
    """``--set`` overrides with the command-line flags added as overrides (flags win, being last)."""
    extra = list(overrides)
    if device:
        extra += [f"train.device={device}", f"inference.device={device}"]
    if allow_outside_root:
        extra.append("data.allow_outside_root=true")
    return extra


def overridden_data(overrides: Sequence[str]) -> DataConfig:
    """The data settings the overrides alone give, read by the config parser (e.g. ``allow_outside_root=yes`` is true).

    Planning needs ``data.allow_outside_root`` before there is a config to apply the overrides to.
    """
    data = apply_overrides({}, overrides).get("data") or {}
    return config_from_dict({"data": data}).data


def datalist_modality(datalist: DatalistSource) -> str:
    """ "MRI" when the datalist's "modality" names an MR sequence, else "CT" (the default preset)."""
    try:
        decoded = datalist.raw if isinstance(datalist, Datalist) else json.loads(Path(datalist).read_text())
        modality = decoded.get("modality")
    except (OSError, ValueError, AttributeError):
        return "CT"  # the datalist itself is checked, with a proper error, when training starts
    text = " ".join(map(str, modality.values())) if isinstance(modality, dict) else str(modality or "")
    return "MRI" if any(word in text.upper() for word in _MR_WORDS) else "CT"


def resolve_training_config(
    datalist: DatalistSource,
    run_dir: Path,
    *,
    config_path: Path | None = None,
    overrides: Sequence[str] = (),
    device: str | None = None,
    resume: bool = False,
    allow_outside_root: bool = False,
    gpu_memory: float | None = None,
    qc_rows: SharedRows | None = None,
    known_labels: Mapping[Path, float] | None = None,
) -> Config:
    """The config ``medunet train DATALIST -o RUN_DIR`` trains with (see the module docstring for the rules).

    When it plans, the planning pass also fills ``qc_rows`` for the cases the run's QC reference will
    likely read (:func:`expect_reference_rows`), so the trainer need not read them again. ``known_labels``:
    the data check's highest value per label file (:func:`check_before_training`), for the class count
    of a datalist without "labels".

    Raises:
        ConfigError: ``config_path`` given with ``resume``, or a bad config/override.
        DataError: planning could not read the data.
    """
    extra = run_overrides(overrides, device=device, allow_outside_root=allow_outside_root)
    if resume:
        if config_path is not None:
            raise ConfigError("--resume continues with the run's saved config; change it with --set instead of -c")
        from medunet.model.checkpoint import load_checkpoint

        saved = load_checkpoint(run_dir / LAST_CHECKPOINT).config
        return config_from_dict(apply_overrides(saved, extra))
    if config_path is not None:
        config = load_config(config_path, extra)
        if not (run_dir / LAST_CHECKPOINT).exists():  # a new run (an existing one is refused by the trainer, and keeps its files)
            keep_plan_fingerprint(config_path, run_dir)
        return config
    if (run_dir / LAST_CHECKPOINT).exists():  # an existing run (the trainer refuses it without --resume)
        return load_config(None, extra, modality=datalist_modality(datalist))
    return _planned_config(datalist, run_dir, extra, gpu_memory=gpu_memory, qc_rows=qc_rows, known_labels=known_labels)


def keep_plan_fingerprint(config_path: Path, run_dir: Path) -> Path | None:
    """Copy the planning fingerprint beside a plan (``medunet plan -o X.yaml`` writes ``X.fingerprint.json``) into the run.

    Written atomically as ``run_dir/fingerprint.json``, where a planned run (no -c) has it too; a config
    without a fingerprint beside it copies nothing. Returns the copy, or None.
    """
    from medunet.planning.plan_yaml import fingerprint_path

    planned = fingerprint_path(config_path)
    if not planned.is_file():
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("the plan's fingerprint %s is kept in the run as fingerprint.json", planned)
    atomic_write_text(run_dir / FINGERPRINT_FILE, planned.read_text())
    return run_dir / FINGERPRINT_FILE


def _planned_config(
    datalist: DatalistSource, run_dir: Path, extra: Sequence[str], *, gpu_memory: float | None, qc_rows: SharedRows | None,
    known_labels: Mapping[Path, float] | None = None,
) -> Config:
    """Plan a config from the data into ``run_dir/plan.yaml`` and apply the overrides to it."""
    from medunet.planning.api import load_planned_config, plan_datalist

    data = overridden_data(extra)  # a mistyped key or value fails before any data is read
    if qc_rows is not None:
        expect_reference_rows(qc_rows, load_datalist(datalist, allow_outside_root=data.allow_outside_root), data, known_labels)
    planned = plan_datalist(datalist, run_dir / "plan.yaml", fingerprint_to=run_dir / FINGERPRINT_FILE, overwrite=True,
                            allow_outside_root=data.allow_outside_root, gpu_memory_gb=gpu_memory, qc_rows=qc_rows)
    log.info("no -c given: planned a config from the data (%s; --set overrides apply on top); edit it and pass -c to change it",
             planned.plan_path)
    config, note = load_planned_config(planned.plan_path, list(extra))
    if note:
        log.warning(note)
    return config


def expect_reference_rows(
    qc_rows: SharedRows, datalist: Datalist, data: DataConfig, known_labels: Mapping[Path, float] | None = None
) -> None:
    """Name, in ``qc_rows``, the cases a new run's QC reference will read, as far as the data settings tell.

    They are the reference's choice among the run's training cases: the "training" list when the datalist has
    a "validation" list, else its seeded split. The class count is the datalist's "labels", else the one the trainer
    will find from the training labels when ``known_labels`` (the data check's highest value per label file) covers
    them all (nothing is expected otherwise), the CT flag the CT-ness of its first channel
    or of the normalisation the overrides set. A plan or a fold that ends up choosing otherwise just reads
    the cases not covered (:meth:`SharedRows.row` checks the case, the CT flag and the class count).
    """
    num_classes = len(datalist.labels) if datalist.labels else _found_classes(datalist, data, known_labels or {})
    if not num_classes or len(datalist.training) < 2:
        return
    train = list(datalist.training)
    if not datalist.validation:
        train = split_cases(train, val_fraction=data.val_fraction, seed=data.split_seed)[0]
    ct = ct_input(data.normalization, datalist.modality)  # as the trainer's is_ct(config, datalist.modality)
    qc_rows.expect(reference_cases(train), ct=ct, num_classes=num_classes)


def _found_classes(datalist: Datalist, data: DataConfig, known: Mapping[Path, float]) -> int | None:
    """The class count :func:`~medunet.training.cases.resolve_labels` finds without declared labels, or None when unknown."""
    if data.labels:
        return len(data.labels)
    if not datalist.training or any(c.label is None or c.label not in known for c in datalist.training):
        return None
    return len(class_names_up_to(max(int(known[c.label]) for c in datalist.training if c.label is not None)))


def resolve_crossval_config(
    datalist: Path,
    root: Path,
    *,
    config_path: Path | None = None,
    overrides: Sequence[str] = (),
    device: str | None = None,
    allow_outside_root: bool = False,
) -> Config:
    """A new cross-validation in ``root``: as :func:`resolve_training_config`; a restart: its saved config.yaml plus overrides.

    Raises:
        ConfigError: ``root`` holds a single run, or ``config_path`` is given for a restart.
    """
    if (root / LAST_CHECKPOINT).exists():
        raise ConfigError(f"{root} holds a single training run ({LAST_CHECKPOINT}); choose another -o for cross-validation")
    saved = root / CONFIG_FILE
    if not (saved.is_file() and (root / SPLITS_FILE).is_file()):
        return resolve_training_config(datalist, root, config_path=config_path, overrides=overrides, device=device,
                                       allow_outside_root=allow_outside_root)
    if config_path is not None:
        raise ConfigError(f"{root} holds a cross-validation that continues with its saved {CONFIG_FILE}; change it with --set, not -c")
    extra = run_overrides(overrides, device=device, allow_outside_root=allow_outside_root)
    return config_from_dict(apply_overrides(read_yaml(saved), extra))


def check_before_training(
    datalist: DatalistSource,
    *,
    config_path: Path | None = None,
    overrides: Sequence[str] = (),
    allow_outside_root: bool = False,
    progress: bool = False,
    show: Callable[[str], None] | None = None,
) -> dict[Path, float]:
    """Run the datalist check (as ``medunet check``) and refuse to train when it finds errors.

    Returns the highest value of every label file it read (:func:`~medunet.training.cases.label_maxima`),
    so that finding the classes need not read them again.

    The check reads ``data.labels`` and ``data.allow_outside_root`` from the run's config file and
    overrides, as training will. ``show`` receives the formatted findings, when there are any.

    Raises:
        ConfigError: a broken config file or override (before any data is read).
        DataError: the check found errors; the first one is the message, the others were shown.
    """
    from medunet.check import check_datalist

    extra = run_overrides(overrides, allow_outside_root=allow_outside_root)
    data = load_config(config_path, extra).data
    labels = {int(k): v for k, v in data.labels.items()} if data.labels else None
    report = check_datalist(datalist, allow_outside_root=data.allow_outside_root, labels=labels, progress=progress)
    if report.findings and show is not None:
        show(report.format_findings(limit=40))
    if not report.ok:  # the first error as the one-line reason; all of them were shown
        datalist = datalist_file(datalist)
        first, more = report.errors[0], len(report.errors) - 1
        raise DataError(
            f"{first.message}{f' (and {more} more error(s), listed above)' if more else ''}. Nothing was trained: fix the "
            f"data (`medunet check {datalist} --json check.json` gives the full report) or pass --skip-check",
            case=first.case,
            path=str(datalist.parent / first.path) if first.path else None,  # report paths are relative to the datalist
        )
    log.info("data check: %s", report.summary_line())
    return label_maxima(report.cases, datalist_file(datalist).parent)
