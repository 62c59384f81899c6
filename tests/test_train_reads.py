"""How often a ``medunet train`` run reads each image before training starts (check, plan, classes, QC reference).

Every ``nibabel.load`` is counted up to the dataset cache (``Trainer._prepare_data``, stopped there). The data
check reads every file once; planning (no ``-c``) reads the training cases once more and computes the QC
reference's rows from those arrays; with ``-c`` the QC reference reads its own cases. Finding the classes of a
datalist without "labels" reuses the check's label values, so it reads nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import nibabel as nib
import pytest
from click.testing import CliRunner

from medunet.cli import cli
from medunet.io.datalist import load_datalist
from medunet.qc.reference import reference_cases, training_reference
from medunet.synthetic import write_dataset
from medunet.training import trainer as trainer_module
from medunet.training.cases import resolve_labels, split_for_run

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ct.yaml"


class _Stop(Exception):
    """Ends the run where the dataset cache would start reading."""


def _pre_training_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, with_config: bool) -> tuple[Counter[str], Any]:
    datalist = write_dataset(tmp_path / "data", num_train=8, num_test=2, shape=(24, 24, 20))
    raw = json.loads(datalist.read_text())
    del raw["labels"]  # the classes are found from the labels: the case that used to read them again
    datalist.write_text(json.dumps(raw))
    reads: Counter[str] = Counter()
    real_load = nib.load
    seen: list[Any] = []

    def counting_load(path: Any, *args: Any, **kwargs: Any) -> Any:
        reads[str(path)] += 1
        return real_load(path, *args, **kwargs)

    def stop(self: Any, *args: Any) -> None:
        seen.append(self)
        raise _Stop

    monkeypatch.setattr(nib, "load", counting_load)
    monkeypatch.setattr(trainer_module.Trainer, "_prepare_data", stop)
    args = ["train", str(datalist), "-o", str(tmp_path / "run"), "--set", "train.device=cpu"]
    result = CliRunner().invoke(cli, [*args, *(["-c", str(CONFIG)] if with_config else [])])
    assert isinstance(result.exception, _Stop), result.output
    monkeypatch.setattr(nib, "load", real_load)
    return reads, seen[0]


def _same_as_reading_everything(trainer: Any) -> None:
    """The classes and QC reference equal those computed by reading the files afresh."""
    config = trainer.config
    datalist = load_datalist(trainer.datalist.path, allow_outside_root=config.data.allow_outside_root)
    labels = resolve_labels(datalist, config)
    assert [labels[i] for i in sorted(labels)] == trainer.class_names == ["background", "class_1", "class_2"][: len(labels)]
    train_cases, _ = split_for_run(datalist, config, trainer.run_dir, resume=True)
    fresh = training_reference(train_cases, config, trainer.class_names, datalist.modality)
    assert fresh == trainer.qc_reference


@pytest.mark.parametrize("with_config", [True, False], ids=["with_-c", "planned"])
def test_pre_training_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_config: bool) -> None:
    reads, trainer = _pre_training_reads(tmp_path, monkeypatch, with_config=with_config)
    datalist = trainer.datalist
    files = [str(p) for c in datalist.training for p in [*c.image, c.label]] + [str(p) for c in datalist.test for p in c.image]
    assert set(reads) == set(files)
    training = files[: 2 * len(datalist.training)]
    chosen = reference_cases(split_for_run(datalist, trainer.config, trainer.run_dir, resume=True)[0])
    reference = [str(p) for c in chosen for p in [*c.image, c.label]]
    expected = Counter(files)  # the check: every file once (test labels are not checked)
    expected.update(reference if with_config else training)  # the QC reference's cases, or the planning fingerprint
    assert reads == expected
    assert sum(reads.values()) == (30 if with_config else 34)  # 18 files; was 38 and 54 before the check's values were shared
    _same_as_reading_everything(trainer)
