"""k-fold splits and `medunet crossval` end to end on a tiny synthetic dataset (real, very short trainings)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import Dataset, copy_run

from medunet.cli import main
from medunet.errors import ConfigError, DataError
from medunet.evaluation import dice_per_class
from medunet.synthetic import write_dataset
from medunet.training.splits import check_folds, make_folds, prepare_folds, read_splits

PRESETS = Path(__file__).resolve().parents[1] / "configs"
#: A network and patch small enough that 2 folds x 2 epochs take seconds on a shared CPU.
TINY = [
    "-c", str(PRESETS / "ct.yaml"),
    "--set", "data.target_spacing=[2.0,2.0,2.5]",
    "--set", "augmentation.patch_size=[32,32,32]",
    "--set", "augmentation.samples_per_volume=1",
    "--set", "model.features=[4,8,16]",
    "--set", "inference.sw_batch_size=2",
    "--set", "optim.lr=0.003",
    "--set", "train.val_every=1",
    "--device", "cpu",
]

NAMES = [f"case_{i:02d}" for i in range(11)]


# --------------------------------------------------------------------------- splits


def test_folds_are_deterministic_complete_and_disjoint() -> None:
    folds = make_folds(NAMES, 3, seed=7)
    assert [f.as_dict() for f in folds] == [f.as_dict() for f in make_folds(NAMES, 3, seed=7)]
    validated = [n for f in folds for n in f.val]
    assert sorted(validated) == sorted(NAMES)  # every case validated exactly once
    for fold in folds:
        assert not set(fold.train) & set(fold.val)
        assert sorted(fold.train + fold.val) == sorted(NAMES)
    assert sorted(len(f.val) for f in folds) == [3, 4, 4]


def test_folds_do_not_depend_on_datalist_order_but_on_the_seed() -> None:
    shuffled = list(NAMES)
    random.Random(3).shuffle(shuffled)
    assert [f.as_dict() for f in make_folds(shuffled, 5, seed=0)] == [f.as_dict() for f in make_folds(NAMES, 5, seed=0)]
    assert [f.val for f in make_folds(NAMES, 5, seed=1)] != [f.val for f in make_folds(NAMES, 5, seed=0)]


def test_too_many_folds_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="at least 12"):
        make_folds(NAMES, 12, seed=0)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([{"train": ["case_00", "ghost"], "val": ["case_01"]}], r"fold 0: \"train\" names cases .*ghost"),
        ([{"train": ["case_00", "case_01"], "val": ["case_01"]}], r"fold 0: cases both trained on and validated on: \['case_01'\]"),
        ([{"train": ["case_00"]}], r"fold 0 must be"),
        ([{"train": ["case_00"], "val": []}], r"\"val\" must be a non-empty list"),
        ({"train": [], "val": []}, "JSON list"),
    ],
)
def test_user_splits_are_checked(tmp_path: Path, raw: object, message: str) -> None:
    path = tmp_path / "my_splits.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=message) as excinfo:
        read_splits(path, NAMES)
    assert str(path) in str(excinfo.value)


def test_crossval_splits_may_not_validate_a_case_twice(tmp_path: Path) -> None:
    raw = [{"train": ["case_00"], "val": ["case_01", "case_02"]}, {"train": ["case_01"], "val": ["case_02"]}]
    assert len(check_folds(raw, NAMES, path=tmp_path)) == 2  # fine for training single folds
    with pytest.raises(DataError, match="'case_02' is validated by folds 0 and 1"):
        check_folds(raw, NAMES, path=tmp_path, disjoint_validation=True)


def test_saved_splits_are_reused_and_contradictions_refused(tmp_path: Path) -> None:
    first = prepare_folds(tmp_path, NAMES, folds=3, seed=0)
    again = prepare_folds(tmp_path, list(reversed(NAMES)), seed=99)  # a later call: the saved file wins
    assert [f.as_dict() for f in again] == [f.as_dict() for f in first]
    assert json.loads((tmp_path / "splits.json").read_text()) == [f.as_dict() for f in first]
    with pytest.raises(ConfigError, match="holds 3 folds but --folds 5"):
        prepare_folds(tmp_path, NAMES, folds=5)


# --------------------------------------------------------------------------- the CLI, end to end


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("cvdata"), num_train=4, num_test=1, shape=(32, 32, 24), num_classes=3)


@pytest.fixture(scope="module")
def crossval_run(crossval_root: Path) -> Path:
    """The session's ``medunet crossval --folds 2`` folder (tests/conftest.py), read-only."""
    return crossval_root


def training_cases(dataset: Path) -> dict[str, Path]:
    entries = json.loads(dataset.read_text())["training"]
    return {Path(e["image"]).name.removesuffix(".nii.gz"): dataset.parent / e["image"] for e in entries}


@pytest.mark.slow
def test_crossval_trains_every_fold_and_predicts_every_case_once_on_its_grid(crossval_run: Path, dataset: Dataset) -> None:
    root, cases = crossval_run, training_cases(dataset.datalist)
    splits = json.loads((root / "splits.json").read_text())
    assert len(splits) == 2 and sorted(n for f in splits for n in f["val"]) == sorted(cases)
    for k, fold in enumerate(splits):
        assert (root / f"fold_{k}" / "best.pt").is_file()
        state = torch.load(root / f"fold_{k}" / "last.pt", weights_only=True)
        assert state["epoch"] == state["config"]["train"]["max_epochs"]
        assert json.loads((root / f"fold_{k}" / "split.json").read_text())["validation"] == fold["val"]

    predicted = sorted(p.name.removesuffix(".nii.gz") for p in (root / "oof").iterdir())
    assert predicted == sorted(cases)  # each training case exactly once
    labels = {Path(e["image"]).name.removesuffix(".nii.gz"): dataset.root / e["label"]
              for e in json.loads(dataset.datalist.read_text())["training"]}
    for name, image_path in cases.items():
        image, mask = nib.load(image_path), nib.load(root / "oof" / f"{name}.nii.gz")
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
        predicted_labels = np.asarray(mask.dataobj)
        assert set(np.unique(predicted_labels)) <= {0, 1, 2}
        # out-of-fold: each case predicted by the fold that did not train on it, and still well
        reference = np.asarray(nib.load(labels[name]).dataobj)
        assert dice_per_class(predicted_labels, reference, 3).mean() > 0.75, name

    with open(root / "oof_eval" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({r["case"] for r in rows}) == sorted(cases) and {r["class"] for r in rows} == {"organ", "vessel"}
    decision = json.loads((root / "postprocessing.json").read_text())
    assert set(decision["postprocessing"]["classes"]) == {"organ", "vessel"}
    assert decision["cases"] == len(cases)
    assert decision["mean_dice_after"] >= decision["mean_dice_before"] > 0.8
    summary = json.loads((root / "crossval.json").read_text())
    assert summary["folds"] == 2 and summary["cases"] == len(cases)


@pytest.mark.slow
def test_crossval_restart_skips_finished_folds(crossval_run: Path, dataset: Dataset, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = copy_run(crossval_run, tmp_path / "cv")
    checkpoints = {p: p.stat().st_mtime_ns for p in root.glob("fold_*/last.pt")}
    assert main(["crossval", str(dataset.datalist), "-o", str(root), "--device", "cpu"]) == 0
    assert {p: p.stat().st_mtime_ns for p in root.glob("fold_*/last.pt")} == checkpoints
    err = capsys.readouterr().err
    assert "fold 0: finished" in err and "fold 1: finished" in err
    assert main(["crossval", str(dataset.datalist), "-o", str(root), "-c", "x.yaml"]) == 1  # restart keeps its config


def test_train_fold_errors_are_one_clear_line(small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "splits.json"
    bad.write_text(json.dumps([{"train": ["phantom_000"], "val": ["nobody"]}]))
    assert main(["train", str(small_data), "-o", str(tmp_path / "a"), "--fold", "0", "--splits", str(bad)]) == 1
    assert "nobody" in capsys.readouterr().err
    assert main(["train", str(small_data), "-o", str(tmp_path / "b"), "--fold", "4", "--folds", "3", "--device", "cpu"]) == 1
    assert "holds folds 0..2" in capsys.readouterr().err
    assert main(["train", str(small_data), "-o", str(tmp_path / "c"), "--folds", "3"]) == 2  # --folds needs --fold

    spec = json.loads(small_data.read_text())
    spec["validation"] = spec["training"][:1]
    spec["training"] = spec["training"][1:]
    with_validation = small_data.parent / "with_validation.json"
    with_validation.write_text(json.dumps(spec))
    assert main(["train", str(with_validation), "-o", str(tmp_path / "d"), "--fold", "0"]) == 1
    err = capsys.readouterr().err
    assert '"validation" list' in err and "Traceback" not in err
    assert main(["crossval", str(with_validation), "-o", str(tmp_path / "e")]) == 1


def test_crossval_checks_the_data_before_any_fold_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_dataset(tmp_path / "data", num_train=4, num_test=0, shape=(24, 24, 16), num_classes=3)
    first_label = data.parent / json.loads(data.read_text())["training"][0]["label"]
    label = nib.load(first_label)
    values = np.asarray(label.dataobj).copy()
    values[0, 0, 0] = 9  # not a class of this 3-class datalist
    nib.save(nib.Nifti1Image(values, label.affine, label.header), first_label)

    root = tmp_path / "cv"
    assert main(["crossval", str(data), "-o", str(root), *TINY, "--set", "train.max_epochs=1"]) == 1
    err = capsys.readouterr().err
    assert "9 (1 voxels)" in err and "--skip-check" in err
    assert not list(root.glob("fold_*"))  # nothing trained


@pytest.mark.slow
def test_an_interrupted_fold_resumes_and_the_crf_candidate_pass_lands_on_every_grid(small_data: Path, tmp_path: Path) -> None:
    """Fold 0 stopped after one epoch (`train --fold`), then `crossval` with the CRF search on (tiny, 2 epochs)."""
    root = tmp_path / "cv"
    assert main(["-q", "train", str(small_data), "-o", str(root), "--fold", "0", "--folds", "2", *TINY,
                 "--set", "train.max_epochs=1"]) == 0
    assert main(["-q", "crossval", str(small_data), "-o", str(root), *TINY, "--set", "train.max_epochs=2",
                 "--set", "postprocessing.crf.search=true"]) == 0
    with open(root / "fold_0" / "metrics.csv") as handle:  # fold 0 resumed after its first epoch
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == [1, 2]
    for name, image_path in training_cases(small_data).items():  # the dense CRF's candidate masks: same cases, same grids
        image, refined = nib.load(image_path), nib.load(root / "oof_crf" / f"{name}.nii.gz")
        assert refined.shape == image.shape
        np.testing.assert_allclose(refined.affine, image.affine, atol=1e-5)
    decision = json.loads((root / "postprocessing.json").read_text())
    (crf,) = [c for c in decision["candidates"] if c["operation"] == "dense_crf"]
    assert decision["postprocessing"]["crf"]["enabled"] is crf["chosen"]
    assert crf["chosen"] is (crf["mean_dice"] > decision["mean_dice_before"] and
                             all(crf["class_dice"][n] >= decision["dice_before"][n] - 1e-6 for n in decision["dice_before"]))
    assert decision["mean_dice_after"] >= decision["mean_dice_before"]
    assert json.loads((root / "qc.json").read_text())["source"].startswith("calibrated on 4 out-of-fold cases")
