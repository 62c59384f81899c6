"""Per-case quality control: clean phantoms pass, each kind of corrupted input is flagged with a reason naming it.

One tiny network is really trained on tiny CT phantoms (module fixture), so the probabilities QC reads
are a trained model's and the training reference is the one the trainer stores in the checkpoint.
The corrupted inputs are built here from the same phantoms (:func:`medunet.synthetic.corrupt_phantom`).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medunet.cli import EXIT_QC_REVIEW, main
from medunet.config import load_config
from medunet.inference.segmenter import Segmenter
from medunet.model.checkpoint import load_checkpoint, save_checkpoint
from medunet.qc.calibrate import auroc, calibrate, spearman
from medunet.qc.decide import QC_FILE, Thresholds, decide, load_thresholds, save_thresholds
from medunet.qc.reference import KIND
from medunet.qc.signals import mask_signals, noise_sigma, uncertainty_signals
from medunet.synthetic import (
    CANARY_IDENTIFIERS,
    corrupt_phantom,
    grid_affine,
    make_phantom,
    save_nifti,
    write_dataset,
    write_dicom_series,
)
from medunet.training.trainer import train

SHAPE = (32, 32, 24)
SPACING = (2.0, 2.0, 3.0)
PRESETS = Path(__file__).resolve().parents[1] / "configs"
#: What each corruption's reasons must name (the test of "flagged for the right reason").
NAMED = {
    "mri_contrast": "modality",
    "heavy_noise": "noise",
    "half_cut": "field of view",
    "hu_offset": "units",
    "unit_scaled": "units",
    "constant": "constant",
    "head": "body part",
    "thick_slices": "spacing",
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny network trained for real (one epoch of many steps) on tiny CT phantoms."""
    root = tmp_path_factory.mktemp("qc")
    datalist = write_dataset(root / "data", num_train=6, num_test=3, shape=SHAPE, spacing=SPACING, seed=0)
    config = load_config(PRESETS / "ct.yaml", overrides=[
        "data.target_spacing=[2.0,2.0,3.0]", "augmentation.patch_size=[32,32,24]", "augmentation.samples_per_volume=1",
        "augmentation.rotate_prob=0", "augmentation.scale_prob=0", "augmentation.foreground_ratio=0.9",
        "model.features=[4,8,16]", "inference.sw_batch_size=2", "optim.lr=0.01", "optim.scheduler=constant",
        "train.max_epochs=1", "train.iterations_per_epoch=60", "train.device=cpu", "train.amp=off",
    ])
    train(datalist, root / "run", config, progress=False)
    return root


@pytest.fixture(scope="module")
def segmenter(run_dir: Path) -> Segmenter:
    return Segmenter.from_checkpoint(run_dir / "run", device="cpu")


def _clean(root: Path, index: int) -> Path:
    return root / "data" / "imagesTs" / f"phantom_{6 + index:03d}.nii.gz"


# --------------------------------------------------------------------------- the training reference


def test_training_stores_a_compact_reference_in_the_checkpoint(run_dir: Path) -> None:
    saved = load_checkpoint(run_dir / "run")
    reference = saved.fingerprint
    assert reference is not None and reference["kind"] == KIND
    assert reference["ct"] is True and reference["channels"] == 1
    assert reference["spacing_mm"]["min"] == pytest.approx(list(SPACING))
    assert reference["classes"]["1"]["present"] == 1.0 and reference["classes"]["1"]["volume_ml"]["min"] > 0
    assert len(json.dumps(reference)) < 5000  # ranges and medians, not per-case data


# --------------------------------------------------------------------------- clean and corrupted inputs


def test_clean_phantoms_stay_ok(segmenter: Segmenter, run_dir: Path) -> None:
    for index in range(3):
        _, qc = segmenter.predict_with_qc(_clean(run_dir, index))
        assert qc["flag"] == "ok", qc["reasons"]
        assert 0.0 <= qc["score"] <= 1.0 and qc["score"] >= segmenter.qc_thresholds.score_review
        assert qc["signals"]["checks"] == "all"


@pytest.mark.parametrize("kind", sorted(NAMED))
def test_each_corrupted_kind_is_flagged_with_a_reason_naming_it(segmenter: Segmenter, tmp_path: Path, kind: str) -> None:
    image, spacing = corrupt_phantom(kind, SHAPE, SPACING, seed=100)
    path = save_nifti(image, grid_affine(spacing, axcodes="LPS"), tmp_path / f"{kind}.nii.gz")
    _, qc = segmenter.predict_with_qc(path)
    assert qc["flag"] == "review"
    assert any(NAMED[kind] in reason for reason in qc["reasons"]), qc["reasons"]
    clean = segmenter.predict_with_qc(save_nifti(make_phantom(SHAPE, seed=100)[0], grid_affine(SPACING), tmp_path / "c.nii.gz"))[1]
    assert qc["score"] < clean["score"]


# --------------------------------------------------------------------------- signals on known arrays


def test_noise_estimate_recovers_white_noise() -> None:
    rng = np.random.default_rng(0)
    image = 100.0 + rng.normal(0.0, 20.0, (40, 40, 40))
    assert noise_sigma(image, threshold=0.0, stride=1) == pytest.approx(20.0, rel=0.1)
    assert noise_sigma(image, threshold=0.0, stride=2) == pytest.approx(20.0, rel=0.1)


def test_mask_signals_count_volume_pieces_and_border_contact() -> None:
    labels = np.zeros((20, 20, 10), dtype=np.uint8)
    labels[2:6, 2:6, 2:6] = 1  # 64 voxels
    labels[10:14, 10:14, 2:6] = 1  # a second piece
    labels[15:20, 0:3, 0:2] = 2  # touches three faces
    signals = mask_signals(labels, (2.0, 2.0, 2.0), 3, min_component_ml=0.1)
    assert signals["1"] == {"volume_ml": pytest.approx(128 * 8 / 1000), "components": 2, "touches_border": False}
    assert signals["2"]["touches_border"] is True and signals["2"]["components"] == 1


def test_expected_dice_is_high_for_sharp_and_low_for_doubtful_probabilities() -> None:
    sharp = torch.zeros(2, 10, 10, 10)
    sharp[1, 3:7, 3:7, 3:7] = 1.0
    sharp[0] = 1.0 - sharp[1]
    doubtful = sharp * 0.2 + 0.4  # every voxel 0.4 / 0.6
    assert uncertainty_signals(sharp)["expected_dice_min"] == pytest.approx(1.0)
    low = uncertainty_signals(doubtful)
    assert low["expected_dice_min"] < 0.5 and low["entropy"] > 0.9 and low["margin"] == pytest.approx(0.2, abs=1e-5)


# --------------------------------------------------------------------------- outputs and the command line


@pytest.mark.parametrize(("axcodes", "oblique"), [("LPS", 0.0), ("RAS", 25.0)])
def test_uncertainty_map_lies_on_the_input_grid(run_dir: Path, tmp_path: Path, axcodes: str, oblique: float) -> None:
    affine = grid_affine((1.8, 2.1, 3.2), axcodes=axcodes, origin=(12.0, -30.0, 40.0), oblique_deg=oblique)
    source = save_nifti(make_phantom((30, 34, 20), seed=3)[0], affine, tmp_path / "in" / "ct.nii.gz")
    code = main(["infer", "-m", str(run_dir / "run"), "-i", str(source), "-o", str(tmp_path / "out"), "--uncertainty-map", "--device", "cpu"])
    assert code == 0
    written = nib.load(tmp_path / "out" / "ct_uncertainty.nii.gz")
    reference = nib.load(source)
    assert written.shape == reference.shape
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-5)
    values = np.asarray(written.dataobj)
    assert values.dtype == np.float32 and 0.0 <= values.min() and values.max() <= 1.0 and values.max() > 0.0


def test_qc_fail_exits_4_writes_every_mask_and_summarises(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "clean.nii.gz").write_bytes(_clean(run_dir, 0).read_bytes())
    image, spacing = corrupt_phantom("heavy_noise", SHAPE, SPACING, seed=7)
    save_nifti(image, grid_affine(spacing), folder / "noisy.nii.gz")
    out = tmp_path / "out"
    code = main(["infer", "-m", str(run_dir / "run"), "-i", str(folder), "-o", str(out), "--qc-fail", "--device", "cpu"])
    assert code == EXIT_QC_REVIEW
    assert (out / "clean.nii.gz").is_file() and (out / "noisy.nii.gz").is_file()
    report = json.loads((out / "inference_report.json").read_text())
    flags = {c["case"]: c["qc"]["flag"] for c in report["cases"]}
    assert flags == {"clean": "ok", "noisy": "review"}
    assert report["qc"]["ok"] == 1 and report["qc"]["review"] == 1 and "noise" in report["qc"]["review_reasons"]
    printed = capsys.readouterr().out
    assert "QC: 1 ok, 1 to review (" in printed and "noise 1" in printed
    code = main(["infer", "-m", str(run_dir / "run"), "-i", str(folder), "-o", str(out), "--no-qc", "--overwrite", "--device", "cpu"])
    report = json.loads((out / "inference_report.json").read_text())
    assert code == 0 and all(c["qc"] is None for c in report["cases"]) and report["qc"]["without_qc"] == 2


def test_patient_identifiers_never_reach_qc_records_or_reports(run_dir: Path, tmp_path: Path) -> None:
    image, _ = corrupt_phantom("half_cut", SHAPE, SPACING, seed=4)  # flagged, so reasons are written
    write_dicom_series(image, grid_affine(SPACING, axcodes="LPS"), tmp_path / "dicom" / "case",
                       patient_name=CANARY_IDENTIFIERS["PatientName"], patient_id=CANARY_IDENTIFIERS["PatientID"])
    out = tmp_path / "out"
    assert main(["infer", "-m", str(run_dir / "run"), "-i", str(tmp_path / "dicom"), "-o", str(out), "--device", "cpu"]) == 0
    text = (out / "inference_report.json").read_text()
    assert '"review"' in text
    for value in (CANARY_IDENTIFIERS["PatientName"], CANARY_IDENTIFIERS["PatientID"], "Canary", "CANARY"):
        assert value not in text


def test_a_model_without_reference_falls_back_to_uncertainty_and_says_so(run_dir: Path, tmp_path: Path) -> None:
    old = load_checkpoint(run_dir / "run")
    old.fingerprint = None
    save_checkpoint(old, tmp_path / "old.pt")
    segmenter = Segmenter.from_checkpoint(tmp_path / "old.pt", device="cpu")
    _, qc = segmenter.predict_with_qc(_clean(run_dir, 1))
    assert qc["signals"]["checks"].startswith("uncertainty only") and "input" in qc["signals"]
    assert qc["flag"] in ("ok", "review") and 0.0 <= qc["score"] <= 1.0


# --------------------------------------------------------------------------- calibration


def test_ranking_measures_on_known_values() -> None:
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 0.0
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)


def test_calibration_separates_bad_cases_and_is_stored_with_the_model(run_dir: Path, tmp_path: Path) -> None:
    dice = [0.92, 0.9, 0.91, 0.89, 0.93, 0.5, 0.45]
    records = [decide({"uncertainty": {"expected_dice_min": d - 0.05}}, None, ["background", "organ"]) for d in dice]
    thresholds = calibrate(records, dice)
    assert 0.45 < thresholds.score_review <= 0.84  # between the bad cases' scores and the good ones'
    assert thresholds.achieved["bad_cases"] == 2 and thresholds.achieved["bad_flagged"] == 2
    assert thresholds.achieved["good_flagged"] == 0 and thresholds.achieved["auroc"] == 1.0
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "best.pt").write_bytes((run_dir / "run" / "best.pt").read_bytes())
    save_thresholds(thresholds, folder / QC_FILE)
    assert load_thresholds(folder / QC_FILE) == thresholds
    assert Segmenter.from_checkpoint(folder, device="cpu").qc_thresholds.score_review == thresholds.score_review
    assert Segmenter.from_checkpoint(folder / "best.pt", device="cpu").qc_thresholds == Thresholds()
