"""Per-case quality control on the model a user really trains: clean cases pass, each corrupted kind is flagged by the check made for it.

The model is the session's shared plain run (tests/conftest.py: ``medunet train`` through the CLI, calibrated
on its validation cases at the end of training), so the probabilities QC reads, the training reference and
the calibration are those a user gets. Corrupted inputs are built from the same kind of phantom
(:func:`medunet.synthetic.corrupt_phantom`).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import DATA_SHAPE, Dataset, copy_run

from medunet.cli import EXIT_QC_REVIEW, main
from medunet.inference.segmenter import Segmenter
from medunet.model.checkpoint import load_checkpoint, save_checkpoint
from medunet.model.layout import QC_FILE
from medunet.qc.calibrate import TEMPERATURES, auroc, calibrate, spearman
from medunet.qc.decide import QCRecord, Thresholds, decide, load_thresholds, save_thresholds
from medunet.qc.reference import KIND, QCReference, reference_of
from medunet.qc.signals import expected_dice_curve, mask_signals, noise_sigma, uncertainty_signals
from medunet.synthetic import (
    CANARY_IDENTIFIERS,
    CORRUPTIONS,
    corrupt_phantom,
    grid_affine,
    make_phantom,
    save_nifti,
    write_dicom_series,
)

SPACING = (1.5, 1.5, 2.5)
#: The check each corruption must fire (the test of "flagged for the right reason": check names, not words in a sentence).
FIRES = {
    "mri_contrast": "contrast",
    "heavy_noise": "noise",
    "half_cut": "field_of_view",
    "hu_offset": "units",
    "unit_scaled": "units",
    "constant": "constant",
    "head": "contrast",
    "thick_slices": "spacing",
}


@pytest.fixture(scope="module")
def segmenter(trained_run: Path) -> Segmenter:
    return Segmenter.from_checkpoint(trained_run, device="cpu")


# --------------------------------------------------------------------------- the training reference and calibration


def test_training_stores_a_compact_typed_reference_in_the_checkpoint(trained_run: Path) -> None:
    stored = load_checkpoint(trained_run).qc_reference
    assert stored is not None and stored["kind"] == KIND and len(json.dumps(stored)) < 5000  # ranges and medians, not per-case data
    reference = reference_of(stored)
    assert isinstance(reference, QCReference) and QCReference.from_json(reference.to_json()) == reference
    assert reference.ct is True and reference.channels == 1 and reference.num_cases == 8
    assert reference.spacing_mm.min == pytest.approx(list(SPACING))
    assert reference.classes["1"].present == 1.0 and reference.classes["1"].volume_ml is not None


def test_training_ends_by_calibrating_qc_on_its_validation_cases(trained_run: Path) -> None:
    thresholds = load_thresholds(trained_run / QC_FILE)
    assert thresholds.source == "calibrated on 2 validation cases of the run"
    assert thresholds.temperature in TEMPERATURES
    achieved = thresholds.achieved
    assert achieved["cases"] == 2 and achieved["good_flagged"] == 0
    assert achieved["mean_abs_error"] <= achieved["mean_abs_error_uncalibrated"]  # the temperature brings expected Dice to true Dice
    assert 0.05 <= thresholds.score_review <= 0.95


# --------------------------------------------------------------------------- clean and corrupted inputs


def test_every_clean_test_case_of_the_trained_model_is_ok(trained_predictions: Path, dataset: Dataset) -> None:
    report = json.loads((trained_predictions / "inference_report.json").read_text())
    records = {c["case"]: QCRecord.from_json(c["qc"]) for c in report["cases"]}
    assert set(records) == {name for name, _, _ in dataset.test_cases}
    for name, record in records.items():
        assert record.flag == "ok", (name, record.reasons)
        assert record.checks == "all" and record.calibration.startswith("calibrated on 2 validation cases of the run")
        assert record.fired == [] and record.score >= 0.8  # calibrated: the true Dice of these cases is about 0.93
    assert report["qc"] == {"ok": len(records), "review": 0, "without_qc": 0, "review_reasons": {}}
    assert report["qc_calibration"] == next(iter(records.values())).calibration


def test_crossval_calibrates_what_inference_from_its_folder_applies(crossval_root: Path) -> None:
    thresholds = load_thresholds(crossval_root / QC_FILE)
    choice = json.loads((crossval_root / "postprocessing.json").read_text())
    assert thresholds.source == f"calibrated on {choice['cases']} out-of-fold cases"  # no CRF candidate in the shared crossval
    assert thresholds.achieved["cases"] == choice["cases"] and thresholds.temperature in TEMPERATURES
    segmenter = Segmenter.from_checkpoint(crossval_root, device="cpu")
    assert segmenter.qc_thresholds == thresholds and len(segmenter.models) == 2


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_corrupted_kind_fires_its_check(segmenter: Segmenter, tmp_path: Path, kind: str) -> None:
    image, spacing = corrupt_phantom(kind, DATA_SHAPE, SPACING, seed=100, num_classes=3)
    path = save_nifti(image, grid_affine(spacing, axcodes="LPS"), tmp_path / f"{kind}.nii.gz")
    _, qc = segmenter.predict_with_qc(path)
    assert qc.flag == "review" and FIRES[kind] in qc.fired, (qc.fired, qc.reasons)
    clean = segmenter.predict_with_qc(save_nifti(make_phantom(DATA_SHAPE, seed=100, num_classes=3)[0], grid_affine(SPACING),
                                                 tmp_path / "c.nii.gz"))[1]
    assert clean.flag == "ok" and clean.fired == [] and qc.score < clean.score


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


def _sharp_organ_with_faint_lesion_class(lesion_probability: float = 0.001) -> torch.Tensor:
    """Probabilities (3, 20, 20, 20): a sharp organ, and a lesion class at ``lesion_probability`` everywhere (predicted nowhere)."""
    probs = torch.zeros(3, 20, 20, 20)
    probs[1, 5:12, 5:12, 5:12] = 1.0
    probs[2] = lesion_probability
    probs[1] = probs[1] * (1 - lesion_probability)
    probs[0] = 1.0 - probs[1] - probs[2]
    return probs


def _reference(presence: dict[str, float], class_names: list[str]) -> QCReference:
    """A reference for the test probabilities' grid, with the given share of training cases holding each class."""
    from medunet.qc.reference import summarise

    rows = []
    for i in range(10):
        labels = np.zeros((20, 20, 20), dtype=np.int64)
        labels[5:12, 5:12, 5:12] = 1
        if i < presence["2"] * 10:
            labels[14:17, 14:17, 14:17] = 2
        rows.append({"input": {"channels": 1, "spacing_mm": [1.0] * 3, "extent_mm": [20.0] * 3, "body_at_border": [0.0] * 3,
                               "intensity": [{"body_quantiles": [0, 1, 2, 3, 4], "range": [0, 4], "noise": 1.0}]},
                     "mask": mask_signals(labels, (1.0, 1.0, 1.0), len(class_names))})
    return summarise(rows, class_names=class_names, ct=False)


def test_a_correctly_absent_class_does_not_lower_the_score() -> None:
    """Regression: a tumour class at 0.1 % probability everywhere, predicted nowhere, used to give expected Dice 0 and `review`."""
    names = ["background", "organ", "tumour"]
    probs = _sharp_organ_with_faint_lesion_class()
    labels = probs.max(dim=0).indices.numpy()
    uncertainty = uncertainty_signals(probs)
    assert uncertainty["absent"] == ["2"] and "2" not in uncertainty["expected_dice"]
    assert uncertainty["expected_dice_min"] > 0.99
    signals = {"uncertainty": uncertainty, "mask": mask_signals(labels, (1.0, 1.0, 1.0), 3)}
    often_absent = decide(signals, _reference({"2": 0.4}, names), names)
    assert often_absent.flag == "ok" and often_absent.score > 0.99, often_absent.reasons
    always_present = decide(signals, _reference({"2": 1.0}, names), names)  # judged by its presence rate in training
    assert always_present.flag == "review" and always_present.fired == ["empty_class"]
    assert "tumour: predicted empty, present in 100% of training cases" in always_present.reasons[0]


def test_temperature_sharpens_an_under_confident_model_to_its_true_dice() -> None:
    """Probabilities softened by T = 4 from a perfect mask: calibration must find a temperature near 1/4, not stay at 1."""
    logits = torch.zeros(2, 16, 16, 16)
    logits[1, 4:12, 4:12, 4:12] = 6.0
    logits[0] = 6.0 - logits[1]
    soft = torch.softmax(logits / 4.0, dim=0)
    names = ["background", "organ"]
    record = decide({"uncertainty": {**uncertainty_signals(soft), "expected_dice_curve": expected_dice_curve(soft, TEMPERATURES)}},
                    None, names)
    assert record.score < 0.9  # uncalibrated: the model expects far less than the perfect Dice it achieves
    thresholds = calibrate([record] * 3, [[1.0]] * 3, reference=None, class_names=names, source="test cases")
    assert thresholds.temperature < 0.4
    assert uncertainty_signals(soft, temperature=thresholds.temperature)["expected_dice_min"] > 0.98
    assert thresholds.achieved["mean_abs_error"] < 0.02 < thresholds.achieved["mean_abs_error_uncalibrated"]


def test_a_class_the_model_never_predicts_distorts_neither_temperature_nor_threshold() -> None:
    """An organ segmented well (Dice 0.9) and a lesion the model never predicts (Dice 0 where present).

    The expected Dice covers the mask's classes only, so the temperature must be fitted to the organ's
    0.9; fitting it to the case's minimum (0) softened every score and flagged 35 of 40 lesion-free
    cases. The lesion cases are bad, but the score cannot see why: the review threshold must not be
    fitted between their scores and the lesion-free ones' (a chance spread of 0.01 here), which flagged
    9 of 40 new lesion-free cases.
    """
    names = ["background", "organ", "lesion"]
    nearest_one = min(TEMPERATURES, key=lambda t: abs(np.log(t)))
    reference = _reference({"2": 0.3}, names)

    def record(organ_dice: float) -> QCRecord:
        curve = [{"1": round(float(np.clip(organ_dice + 0.3 * np.log(t), 0.0, 1.0)), 4)} for t in TEMPERATURES]
        at_one = curve[TEMPERATURES.index(nearest_one)]
        return decide({"uncertainty": {"expected_dice": at_one, "expected_dice_min": at_one["1"], "absent": ["2"],
                                       "expected_dice_curve": curve}}, reference, names)

    organ = [0.89, 0.895, 0.9, 0.905, 0.91, 0.915]
    records = [record(d) for d in organ]
    per_class = [[d, 0.0] for d in organ[:3]] + [[d, float("nan")] for d in organ[3:]]  # the lesion cases score lowest
    thresholds = calibrate(records, per_class, reference=reference, class_names=names, source="test cases")
    assert thresholds.temperature == nearest_one
    assert thresholds.achieved["mean_abs_error"] < 0.03  # the grid step near T = 1
    assert thresholds.achieved["bad_cases"] == 3 and thresholds.achieved["bad_unseen"] == 3
    assert thresholds.score_review < min(r.score for r in records) - 0.05  # a new lesion-free case at 0.89 stays ok


def _record(expected: float) -> QCRecord:
    """A QC record whose expected Dice is ``expected`` at temperature 1 and the same at every other (for threshold tests)."""
    curve = [{"1": expected}] * len(TEMPERATURES)
    return decide({"uncertainty": {"expected_dice": {"1": expected}, "expected_dice_min": expected, "expected_dice_curve": curve}},
                  None, ["background", "organ"])


def test_calibration_separates_bad_cases_and_is_stored_with_the_model(trained_run: Path, tmp_path: Path) -> None:
    dice = [0.92, 0.9, 0.91, 0.89, 0.93, 0.5, 0.45]
    thresholds = calibrate([_record(d - 0.05) for d in dice], [[d] for d in dice], reference=None, class_names=["background", "organ"],
                           source="test cases")
    assert 0.45 < thresholds.score_review <= 0.84  # between the bad cases' scores and the good ones'
    assert thresholds.achieved["bad_cases"] == 2 and thresholds.achieved["bad_flagged"] == 2
    assert thresholds.achieved["good_flagged"] == 0 and thresholds.achieved["auroc"] == 1.0
    run = copy_run(trained_run, tmp_path / "model")
    save_thresholds(thresholds, run / QC_FILE)
    assert load_thresholds(run / QC_FILE) == thresholds
    assert Segmenter.from_checkpoint(run, device="cpu").qc_thresholds == thresholds
    assert Segmenter.from_checkpoint(run / "best.pt", device="cpu").qc_thresholds == thresholds  # the run folder's, beside it
    (run / QC_FILE).unlink()
    assert Segmenter.from_checkpoint(run, device="cpu").qc_thresholds == Thresholds()


def test_ranking_measures_on_known_values() -> None:
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 0.0
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)


# --------------------------------------------------------------------------- outputs and the command line


@pytest.mark.parametrize(("axcodes", "oblique"), [("LPS", 0.0), ("RAS", 25.0)])
def test_uncertainty_map_lies_on_the_input_grid(trained_run: Path, tmp_path: Path, axcodes: str, oblique: float) -> None:
    affine = grid_affine((1.8, 2.1, 3.2), axcodes=axcodes, origin=(12.0, -30.0, 40.0), oblique_deg=oblique)
    source = save_nifti(make_phantom((30, 34, 20), seed=3)[0], affine, tmp_path / "in" / "ct.nii.gz")
    code = main(["infer", "-m", str(trained_run), "-i", str(source), "-o", str(tmp_path / "out"), "--uncertainty-map", "--device", "cpu"])
    assert code == 0
    written = nib.load(tmp_path / "out" / "ct_uncertainty.nii.gz")
    reference = nib.load(source)
    assert written.shape == reference.shape
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-5)
    values = np.asarray(written.dataobj)
    assert values.dtype == np.float32 and 0.0 <= values.min() and values.max() <= 1.0 and values.max() > 0.0


def test_qc_fail_exits_4_writes_every_mask_and_summarises(trained_run: Path, dataset: Dataset, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "clean.nii.gz").write_bytes(dataset.test_cases[0][1].read_bytes())
    image, spacing = corrupt_phantom("heavy_noise", DATA_SHAPE, SPACING, seed=7, num_classes=3)
    save_nifti(image, grid_affine(spacing), folder / "noisy.nii.gz")
    out = tmp_path / "out"
    code = main(["infer", "-m", str(trained_run), "-i", str(folder), "-o", str(out), "--qc-fail", "--device", "cpu"])
    assert code == EXIT_QC_REVIEW
    assert (out / "clean.nii.gz").is_file() and (out / "noisy.nii.gz").is_file()
    report = json.loads((out / "inference_report.json").read_text())
    flags = {c["case"]: c["qc"]["flag"] for c in report["cases"]}
    assert flags == {"clean": "ok", "noisy": "review"}
    assert report["qc"]["ok"] == 1 and report["qc"]["review"] == 1 and "noise" in report["qc"]["review_reasons"]
    printed = capsys.readouterr().out
    assert "QC: 1 ok, 1 to review (" in printed and "noise 1" in printed
    code = main(["infer", "-m", str(trained_run), "-i", str(folder), "-o", str(out), "--no-qc", "--overwrite", "--device", "cpu"])
    report = json.loads((out / "inference_report.json").read_text())
    assert code == 0 and all(c["qc"] is None for c in report["cases"]) and report["qc"]["without_qc"] == 2


def test_patient_identifiers_never_reach_qc_records_or_reports(trained_run: Path, tmp_path: Path) -> None:
    image, _ = corrupt_phantom("half_cut", DATA_SHAPE, SPACING, seed=4, num_classes=3)  # flagged, so reasons are written
    write_dicom_series(image, grid_affine(SPACING, axcodes="LPS"), tmp_path / "dicom" / "case",
                       patient_name=CANARY_IDENTIFIERS["PatientName"], patient_id=CANARY_IDENTIFIERS["PatientID"])
    out = tmp_path / "out"
    assert main(["infer", "-m", str(trained_run), "-i", str(tmp_path / "dicom"), "-o", str(out), "--device", "cpu"]) == 0
    text = (out / "inference_report.json").read_text()
    assert '"review"' in text
    for value in (CANARY_IDENTIFIERS["PatientName"], CANARY_IDENTIFIERS["PatientID"], "Canary", "CANARY"):
        assert value not in text


def test_a_model_without_reference_falls_back_to_uncertainty_and_says_so(trained_run: Path, dataset: Dataset, tmp_path: Path) -> None:
    old = load_checkpoint(trained_run)
    old.qc_reference = None
    save_checkpoint(old, tmp_path / "old" / "best.pt")  # an older run: no reference, no qc.json
    segmenter = Segmenter.from_checkpoint(tmp_path / "old", device="cpu")
    _, qc = segmenter.predict_with_qc(dataset.test_cases[1][1])
    assert qc.checks.startswith("uncertainty only") and "input" in qc.signals
    assert qc.calibration.startswith("defaults") and qc.fired in ([], ["low_confidence"])


def test_older_checkpoints_stored_the_reference_as_fingerprint(trained_run: Path, tmp_path: Path) -> None:
    """Checkpoints written before the field was named for what it holds still give their reference."""
    stored = torch.load(trained_run / "best.pt", weights_only=True)
    stored["fingerprint"] = stored.pop("qc_reference")
    torch.save(stored, tmp_path / "old.pt")
    assert reference_of(load_checkpoint(tmp_path / "old.pt").qc_reference) == reference_of(load_checkpoint(trained_run).qc_reference)


def test_a_fold_ensemble_reports_its_members_agreement_and_flags_a_broken_fold(crossval_root: Path, dataset: Dataset,
                                                                              tmp_path: Path) -> None:
    """The shared 2-fold ensemble agrees with itself on a clean case; with fold 1's weights scrambled it must say so."""
    image = dataset.test_cases[0][1]
    _, healthy = Segmenter.from_checkpoint(crossval_root, device="cpu").predict_with_qc(image)
    assert healthy.signals["uncertainty"]["member_dice"] > 0.8 and "ensemble_disagreement" not in healthy.fired

    root = copy_run(crossval_root, tmp_path / "cv")
    broken = load_checkpoint(root / "fold_1" / "best.pt")
    generator = torch.Generator().manual_seed(0)
    broken.model = {k: v + v.float().std().nan_to_num(0.1) * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                    for k, v in broken.model.items()}  # a fold whose weights were damaged: noise as large as the weights
    save_checkpoint(broken, root / "fold_1" / "best.pt")
    _, record = Segmenter.from_checkpoint(root, device="cpu").predict_with_qc(image)
    assert record.signals["uncertainty"]["member_dice"] < 0.8
    assert "ensemble_disagreement" in record.fired and record.flag == "review", record.reasons
