"""The product, used as a user uses it, for every kind of run a user can have.

demo-style data -> a trained model -> ``medunet export`` in every format -> ``medunet infer`` from the
checkpoint and from each package -> QC -> ``medunet evaluate``, for a plain run (no plan), a planned run,
a cross-validation ensemble, a resumed run and an older checkpoint without a QC reference. Masks must
agree between engines (Dice >= 0.999), QC must pass every clean test case and flag a corrupted one, and
the model card must state the run's real numbers. This is the test that would have caught export
crashing and QC crying wolf on the first model a new user trained.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_SHAPE, MIN_TEST_DICE, Dataset, cli, copy_run, mean_test_dice, sets

from medunet.evaluation import dice_per_class
from medunet.io.nifti import read_nifti, read_voxels
from medunet.model.checkpoint import load_checkpoint, save_checkpoint
from medunet.synthetic import corrupt_phantom, grid_affine, save_nifti

KINDS = ("plain", "planned", "crossval", "resumed", "older")


@pytest.fixture(scope="module")
def runs(trained_run: Path, planned_run: Path, crossval_root: Path, dataset: Dataset,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every kind of run folder; "resumed" and "older" are made here from the plain run."""
    root = tmp_path_factory.mktemp("product_runs")
    resumed = copy_run(trained_run, root / "resumed")
    cli("train", str(dataset.datalist), "-o", str(resumed), "--resume", "--device", "cpu", *sets(["train.max_epochs=7"]))
    older = root / "older"
    saved = load_checkpoint(trained_run)
    saved.qc_reference = None  # written before QC existed: no reference in the checkpoint, no qc.json beside it
    save_checkpoint(saved, older / "best.pt")
    return {"plain": trained_run, "planned": planned_run, "crossval": crossval_root, "resumed": resumed, "older": older}


def _labels(path: Path) -> np.ndarray:
    return read_voxels(read_nifti(path), case=path.name, path=None, dtype=np.int64)


def _assert_same_masks(a: Path, b: Path, dataset: Dataset) -> None:
    for name, _, _ in dataset.test_cases:
        dice = dice_per_class(_labels(a / f"{name}.nii.gz"), _labels(b / f"{name}.nii.gz"), 3)
        assert dice.min() >= 0.999, (name, dice)


def _report(folder: Path) -> dict:
    return json.loads((folder / "inference_report.json").read_text())


@pytest.mark.parametrize("kind", KINDS)
def test_train_export_infer_qc_evaluate(kind: str, runs: dict[str, Path], dataset: Dataset, tmp_path: Path) -> None:
    """Masks from the checkpoint (fp32, as the exported engines compute) and from each package agree; QC and the card hold."""
    run = runs[kind]
    test_dir = str(dataset.test_dir)
    # the checkpoint (or fold ensemble) itself
    cli("infer", "-m", str(run), "-i", test_dir, "-o", str(tmp_path / "ref"), "--device", "cpu", *sets(["inference.precision=fp32"]))
    assert mean_test_dice(tmp_path / "ref", dataset) >= MIN_TEST_DICE
    reference_records = {c["case"]: c["qc"] for c in _report(tmp_path / "ref")["cases"]}
    for name, record in reference_records.items():
        assert record["flag"] == "ok", (kind, name, record["reasons"])

    # export in every format the run allows; a fold ensemble cannot be one MONAI Bundle network
    formats = "onnx,torchscript" if kind == "crossval" else "onnx,torchscript,bundle"
    pkg = tmp_path / "pkg"
    cli("export", str(run), "-o", str(pkg), "--format", formats, *sets(["inference.precision=fp32"]))  # bf16 autocast would differ
    for engine in ("onnxruntime", "torch"):
        out = tmp_path / f"pkg_{engine}"
        cli("infer", "-m", str(pkg), "-i", test_dir, "-o", str(out), "--device", "cpu", *sets([f"inference.engine={engine}", "inference.precision=fp32"]))
        _assert_same_masks(tmp_path / "ref", out, dataset)
        for case in _report(out)["cases"]:  # the package carries QC: the same verdict as the checkpoint's
            expected = reference_records[case["case"]]
            assert case["qc"]["flag"] == expected["flag"] and case["qc"]["score"] == pytest.approx(expected["score"], abs=2e-3)
            assert case["qc"]["calibration"] == expected["calibration"] and case["qc"]["checks"] == expected["checks"]

    # the model card states what is known, with the run's own numbers, and says what is not
    card = json.loads((pkg / "model_card.json").read_text())
    first = load_checkpoint(run / "fold_0" if kind == "crossval" else run)
    held_out = card["validation"]["held_out_validation"]["fold_0" if kind == "crossval" else "model"]
    assert first.train_state is not None
    assert held_out["class_dice"] == {k: round(v, 4) for k, v in first.train_state.best_class_dice.items()}
    markdown = (pkg / "MODEL_CARD.md").read_text()
    assert "organ" in markdown and "vessel" in markdown
    data = card["training_data"]
    if kind == "older":
        assert "qc_reference" in data["unknown"] and "qc_reference" not in data
    else:  # the training split QC read: 8 of the 10 cases for a single run, 5 for fold 0 of two
        assert data["qc_reference"]["num_cases"] == (5 if kind == "crossval" else 8)
        assert data["qc_reference"]["classes"]["1"]["present_in_cases"] == 1.0
    if kind == "planned":  # `medunet plan` measured the training data: the card states it
        assert data["planning_fingerprint"]["num_cases"] == len(json.loads(dataset.datalist.read_text())["training"])
        assert "planning_fingerprint" not in data["unknown"]
    else:
        assert "planning_fingerprint" in data["unknown"]

    # QC flags a corrupted input, and says which calibration applied
    image, spacing = corrupt_phantom("heavy_noise", DATA_SHAPE, (1.5, 1.5, 2.5), seed=5, num_classes=3)
    noisy = save_nifti(image, grid_affine(spacing), tmp_path / "noisy" / "noisy.nii.gz")
    cli("infer", "-m", str(pkg), "-i", str(noisy), "-o", str(tmp_path / "noisy_out"), "--device", "cpu")
    record = _report(tmp_path / "noisy_out")["cases"][0]["qc"]
    if kind == "older":  # no training reference: only the model's own uncertainty can speak, and the record says so
        assert record["checks"].startswith("uncertainty only") and record["calibration"].startswith("defaults")
    else:
        assert record["flag"] == "review" and "noise" in record["fired"]
        assert record["calibration"].startswith("calibrated on")

    # evaluate the package's masks against the reference labels
    cli("evaluate", "--pred", str(tmp_path / "pkg_onnxruntime"), "--datalist", str(dataset.datalist), "-o", str(tmp_path / "eval"))
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["mean_dice"] >= MIN_TEST_DICE and summary["n_cases"] == len(dataset.test_cases)
    shutil.rmtree(pkg)
