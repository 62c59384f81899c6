"""Tests of medunet.training.run_config: which config a training run (or cross-validation) uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medunet.errors import ConfigError, DataError
from medunet.synthetic import write_dataset
from medunet.training.run_config import overridden_data, resolve_crossval_config, resolve_training_config


def outside_root_datalist(tmp_path: Path) -> Path:
    """A datalist whose image and label paths are absolute (outside its folder): refused unless allowed."""
    source = write_dataset(tmp_path / "data", num_train=3, num_test=0, shape=(24, 24, 20))
    entries = json.loads(source.read_text())
    for case in entries["training"]:
        case["image"] = str(source.parent / case["image"])
        case["label"] = str(source.parent / case["label"])
    datalist = tmp_path / "lists" / "dataset.json"
    datalist.parent.mkdir()
    datalist.write_text(json.dumps(entries))
    return datalist


def test_allow_outside_root_set_as_yes_is_honoured_by_planning(tmp_path: Path) -> None:
    # the planner must read --set data.allow_outside_root as the config parser does (YAML: yes is true)
    datalist = outside_root_datalist(tmp_path)
    with pytest.raises(DataError, match="outside"):
        resolve_training_config(datalist, tmp_path / "refused", gpu_memory=8.0)
    run = tmp_path / "run"
    config = resolve_training_config(datalist, run, overrides=["data.allow_outside_root=yes", "train.max_epochs=3"], gpu_memory=8.0)
    assert (run / "plan.yaml").is_file() and (run / "fingerprint.json").is_file()
    assert config.data.allow_outside_root is True
    assert config.train.max_epochs == 3


@pytest.mark.parametrize(("text", "expected"), [("yes", True), ("on", True), ("true", True), ("True", True),
                                                ("no", False), ("off", False), ("false", False)])
def test_overridden_data_reads_booleans_as_the_config_parser_does(text: str, expected: bool) -> None:
    assert overridden_data([f"data.allow_outside_root={text}"]).allow_outside_root is expected
    assert overridden_data(["train.max_epochs=2"]).allow_outside_root is False


@pytest.mark.parametrize("override", ["data.allow_outside_root=1", "data.allow_outside_rot=true"])
def test_overridden_data_refuses_what_the_config_refuses(override: str) -> None:
    with pytest.raises(ConfigError, match="allow_outside_ro"):
        overridden_data([override])


def test_config_file_plus_overrides_and_flags(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("train:\n  max_epochs: 7\n  device: cuda\n")
    config = resolve_training_config(tmp_path / "unused.json", tmp_path / "run", config_path=config_file,
                                     overrides=["optim.lr=0.01"], device="cpu", allow_outside_root=True)
    assert (config.train.max_epochs, config.optim.lr, config.train.device, config.inference.device) == (7, 0.01, "cpu", "cpu")
    assert config.data.allow_outside_root is True
    assert not (tmp_path / "run").exists()  # nothing planned


def test_a_plans_fingerprint_is_kept_in_the_run(tmp_path: Path) -> None:
    """`medunet plan -o plan.yaml` writes plan.fingerprint.json beside it; `train -c plan.yaml` keeps it as fingerprint.json."""
    plan = tmp_path / "plan.yaml"
    plan.write_text("train:\n  max_epochs: 7\n")
    (tmp_path / "plan.fingerprint.json").write_text('{"format": 1, "num_cases": 12}\n')
    resolve_training_config(tmp_path / "unused.json", tmp_path / "run", config_path=plan)
    assert json.loads((tmp_path / "run" / "fingerprint.json").read_text())["num_cases"] == 12
    resolve_crossval_config(tmp_path / "unused.json", tmp_path / "cv", config_path=plan)
    assert (tmp_path / "cv" / "fingerprint.json").read_text() == (tmp_path / "plan.fingerprint.json").read_text()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "last.pt").write_bytes(b"")  # an existing run (refused later without --resume) is left as it is
    resolve_training_config(tmp_path / "unused.json", tmp_path / "old", config_path=plan)
    assert not (tmp_path / "old" / "fingerprint.json").exists()


def test_resume_refuses_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--resume"):
        resolve_training_config(tmp_path / "d.json", tmp_path / "run", config_path=tmp_path / "c.yaml", resume=True)


def test_existing_run_without_config_uses_the_modality_preset(tmp_path: Path) -> None:
    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps({"modality": {"0": "T2"}, "training": []}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")  # an existing run: not planned again
    config = resolve_training_config(datalist, tmp_path / "run")
    assert config.data.modality == "MRI" and config.data.normalization == "zscore"
    assert not (tmp_path / "run" / "plan.yaml").exists()


def test_crossval_restart_uses_its_saved_config(tmp_path: Path) -> None:
    root = tmp_path / "cv"
    root.mkdir()
    (root / "config.yaml").write_text("train:\n  max_epochs: 5\n")
    (root / "splits.json").write_text("[]")
    config = resolve_crossval_config(tmp_path / "d.json", root, overrides=["optim.lr=0.02"])
    assert (config.train.max_epochs, config.optim.lr) == (5, 0.02)
    with pytest.raises(ConfigError, match="saved config.yaml"):
        resolve_crossval_config(tmp_path / "d.json", root, config_path=root / "config.yaml")
    (root / "last.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="single training run"):
        resolve_crossval_config(tmp_path / "d.json", root)


def test_one_read_of_the_datalist_and_of_the_qc_cases_gives_the_same_plan_and_reference(tmp_path: Path) -> None:
    """`medunet train` without -c: one parse of the datalist for every step, and the QC rows computed while planning."""
    from medunet.io.datalist import load_datalist, split_cases
    from medunet.qc.reference import SharedRows, training_reference

    datalist = write_dataset(tmp_path / "data", num_train=5, num_test=0, shape=(24, 24, 20))
    by_path = resolve_training_config(datalist, tmp_path / "by_path", gpu_memory=8.0)
    parsed = load_datalist(datalist, allow_outside_root=True, need_training=False, require_files=False)
    rows = SharedRows()
    shared = resolve_training_config(parsed, tmp_path / "shared", gpu_memory=8.0, qc_rows=rows)
    assert shared == by_path
    assert (tmp_path / "shared/fingerprint.json").read_text() == (tmp_path / "by_path/fingerprint.json").read_text()
    strict = load_datalist(parsed)
    train = split_cases(strict.training, val_fraction=shared.data.val_fraction, seed=shared.data.split_seed)[0]
    assert set(rows.rows) == set(train) and len(rows.rows) == 4  # the reference's cases, each computed once
    names = ["background", "organ"]
    assert training_reference(train, shared, names, strict.modality, shared=rows) == training_reference(train, shared, names, strict.modality)


def test_a_loose_parse_still_refuses_paths_outside_the_datalist_folder(tmp_path: Path) -> None:
    from medunet.io.datalist import load_datalist

    parsed = load_datalist(outside_root_datalist(tmp_path), allow_outside_root=True, need_training=False, require_files=False)
    with pytest.raises(DataError, match="outside"):
        resolve_training_config(parsed, tmp_path / "refused", gpu_memory=8.0)
