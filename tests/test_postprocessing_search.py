"""Post-processing chosen by validation: hand-made predictions whose right answer is known."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medunet.config import ClassPostprocessing, CrfConfig, PostprocessingConfig
from medunet.errors import CheckpointError, ConfigError, DataError, GeometryError
from medunet.evaluation import dice_per_class
from medunet.io.datalist import Case
from medunet.postprocessing.operations import postprocess_labels
from medunet.postprocessing.search import (
    SearchCase,
    confusion_dice,
    crop_to_foreground,
    load_choice,
    load_search_cases,
    save_choice,
    search_postprocessing,
    threshold_candidates,
    validated_postprocessing,
)
from medunet.synthetic import grid_affine, save_nifti

SPACING = (1.0, 1.0, 2.0)
SHAPE = (40, 40, 20)
NAMES = {0: "background", 1: "liver", 2: "kidney"}


def ball(centre: tuple[int, int, int], radius_mm: float) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, s) for s in SHAPE)]
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, SPACING)) <= radius_mm**2


def case(name: str, prediction: np.ndarray, reference: np.ndarray) -> SearchCase:
    return SearchCase(name, prediction.astype(np.uint8), reference.astype(np.uint8), SPACING)


def organ_cases(n: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    """References with one big 'liver' ball; predictions equal to the reference (per-case shifts)."""
    pairs = []
    for i in range(n):
        ref = np.zeros(SHAPE, np.uint8)
        ref[ball((18 + i, 20, 10), 9.0)] = 1
        pairs.append((ref.copy(), ref))
    return pairs


def test_confusion_dice_matches_monai_dice_and_empty_convention() -> None:
    rng = np.random.default_rng(0)
    pred, ref = rng.integers(0, 3, SHAPE), rng.integers(0, 3, SHAPE)
    pred[pred == 2] = 0  # class 2 predicted nowhere
    np.testing.assert_allclose(confusion_dice(pred, ref, 3), dice_per_class(pred, ref, 3), atol=1e-6)
    empty = np.zeros(SHAPE, np.uint8)
    assert confusion_dice(empty, empty, 3).tolist() == [1.0, 1.0]  # nothing to find, nothing found


def test_spurious_blob_makes_keep_largest_win() -> None:
    cases = []
    for i, (pred, ref) in enumerate(organ_cases()):
        pred[ball((34, 34, 3), 2.5)] = 1  # a false island far from the organ
        cases.append(case(f"c{i}", pred, ref))
    choice = search_postprocessing(cases, {0: "background", 1: "liver"})
    assert choice.settings["liver"].keep_largest
    assert choice.dice_before["liver"] < 0.999
    assert choice.dice_after["liver"] == pytest.approx(1.0)  # the island was the only error
    kept = [c for c in choice.candidates if c["chosen"]]
    assert [(c["class"], c["operation"]) for c in kept] == [("liver", "keep_largest")]


def test_true_second_component_is_not_deleted_but_small_specks_are() -> None:
    """Two true kidneys: keeping the largest would delete one, so it is refused; a tiny speck is removed by size."""
    cases = []
    for i in range(3):
        ref = np.zeros(SHAPE, np.uint8)
        ref[ball((10, 20, 10), 6.0 + i)] = 1
        ref[ball((30, 20, 10), 5.0)] = 1
        pred = ref.copy()
        pred[ball((20, 36, 3), 1.0)] = 1  # a speck of a few voxels
        cases.append(case(f"c{i}", pred, ref))
    choice = search_postprocessing(cases, {0: "background", 1: "kidney"})
    chosen = choice.settings["kidney"]
    assert not chosen.keep_largest
    assert chosen.min_size_mm3 > 0
    smallest_true = min(np.count_nonzero(ball((30, 20, 10), 5.0)), np.count_nonzero(ball((10, 20, 10), 6.0))) * np.prod(SPACING)
    assert chosen.min_size_mm3 < smallest_true  # no threshold that could delete a real kidney
    assert choice.dice_after["kidney"] == pytest.approx(1.0)
    refused = [c for c in choice.candidates if c["operation"] == "keep_largest"]
    assert len(refused) == 1 and not refused[0]["chosen"] and refused[0]["mean_dice"] < choice.dice_before["kidney"]


def test_holes_make_fill_holes_win_and_untouched_classes_stay_off() -> None:
    cases = []
    for i, (pred, ref) in enumerate(organ_cases()):
        ref[ball((30, 30, 10), 4.0)] = 2  # a kidney predicted perfectly: nothing can help it
        pred[ball((30, 30, 10), 4.0)] = 2
        pred[ball((18 + i, 20, 10), 3.0)] = 0  # an enclosed hole in the liver prediction
        cases.append(case(f"c{i}", pred, ref))
    choice = search_postprocessing(cases, NAMES)
    assert choice.settings["liver"].fill_holes
    assert choice.dice_after["liver"] == pytest.approx(1.0) and choice.dice_before["liver"] < 0.99
    assert choice.settings["kidney"] == ClassPostprocessing()  # no gain, so nothing is switched on
    assert choice.dice_after["kidney"] == choice.dice_before["kidney"] == pytest.approx(1.0)
    assert choice.mean_after > choice.mean_before


def test_an_operation_that_hurts_one_case_more_than_it_helps_another_is_refused() -> None:
    """Case 1 has a spurious island (keep-largest helps a little); case 2 has a real second piece (it hurts a lot)."""
    (p1, r1), (p2, r2) = organ_cases(2)
    p1[ball((34, 34, 3), 1.5)] = 1
    r2[ball((34, 34, 16), 4.0)] = 1
    p2[ball((34, 34, 16), 4.0)] = 1
    choice = search_postprocessing([case("a", p1, r1), case("b", p2, r2)], {0: "background", 1: "liver"})
    assert not choice.settings["liver"].keep_largest


def test_dense_crf_is_kept_only_when_its_out_of_fold_masks_score_better(tmp_path: Path) -> None:
    """CRF masks that fix a liver rim (and keep the kidney) are kept, the morphology search then runs on them; CRF masks
    that help the liver but lose kidney voxels are refused; the kept decision switches the CRF on at inference."""
    plain, better, worse = [], [], []
    for i, (pred, ref) in enumerate(organ_cases()):
        ref[ball((30, 30, 10), 4.0)] = 2
        pred[ball((30, 30, 10), 4.0)] = 2
        rough = pred.copy()
        rough[(ref == 1) & ~ball((18 + i, 20, 10), 7.0)] = 0  # the network misses the liver's rim
        rough[ball((34, 34, 3), 2.5)] = 1  # and adds an island the CRF does not remove
        plain.append(case(f"c{i}", rough, ref))
        fixed = pred.copy()
        fixed[ball((34, 34, 3), 2.5)] = 1
        better.append(case(f"c{i}", fixed, ref))
        lossy = fixed.copy()
        lossy[ball((30, 30, 10), 4.0) & ~ball((30, 30, 10), 3.5)] = 0  # a thin kidney shell lost
        worse.append(case(f"c{i}", lossy, ref))
    settings = CrfConfig(spatial_sigma_mm=2.5)
    kept = search_postprocessing(plain, NAMES, crf_cases=better, crf=settings)
    assert kept.crf == replace(settings, enabled=True)
    assert kept.settings["liver"].keep_largest and kept.dice_after["liver"] == pytest.approx(1.0)  # searched on the CRF's masks
    refused = search_postprocessing(plain, NAMES, crf_cases=worse, crf=settings)
    assert refused.crf is not None and not refused.crf.enabled
    (candidate,) = [c for c in refused.candidates if c["operation"] == "dense_crf"]
    assert not candidate["chosen"] and candidate["mean_dice"] > refused.mean_before  # better on average, but a class dropped
    assert search_postprocessing(plain, NAMES).crf is None  # not a candidate without CRF masks
    with pytest.raises(DataError, match="same cases"):
        search_postprocessing(plain, NAMES, crf_cases=better[:2], crf=settings)

    save_choice(kept, tmp_path / "postprocessing.json")
    section = validated_postprocessing(tmp_path / "postprocessing.json", list(NAMES.values()), [])
    assert section is not None and section["crf"]["enabled"] is True and section["crf"]["spatial_sigma_mm"] == 2.5
    save_choice(refused, tmp_path / "postprocessing.json")
    assert validated_postprocessing(tmp_path / "postprocessing.json", list(NAMES.values()), [])["crf"]["enabled"] is False


def test_thresholds_come_from_the_smallest_reference_component() -> None:
    ref = np.zeros(SHAPE, np.uint8)
    ref[5:7, 5:7, 5:7] = 1  # 8 voxels x 2 mm3 = 16 mm3
    ref[20:30, 20:30, 5:10] = 1
    assert threshold_candidates([case("a", ref, ref)], 1) == [1.6, 4.0, 8.0]
    assert threshold_candidates([case("a", ref, ref)], 2) == []  # no reference component, nothing to derive from


def test_cropping_keeps_every_operation_exact() -> None:
    rng = np.random.default_rng(1)
    pred = np.zeros(SHAPE, np.uint8)
    pred[10:25, 12:30, 4:15] = rng.integers(0, 3, (15, 18, 11))
    ref = np.zeros(SHAPE, np.uint8)
    ref[12:24, 14:28, 5:14] = 1
    config = PostprocessingConfig(classes={"liver": ClassPostprocessing(keep_largest=True, fill_holes=True),
                                           "kidney": ClassPostprocessing(min_size_mm3=6.0, fill_holes=True)})
    full = confusion_dice(postprocess_labels(pred, spacing=SPACING, config=config, class_names=NAMES), ref, 3)
    cp, cr = crop_to_foreground(pred, ref)
    assert cp.size < pred.size
    np.testing.assert_allclose(confusion_dice(postprocess_labels(cp, spacing=SPACING, config=config, class_names=NAMES), cr, 3), full)


def test_json_round_trip_and_loading_rules(tmp_path: Path) -> None:
    cases = []
    for i, (pred, ref) in enumerate(organ_cases()):
        pred[ball((34, 34, 3), 2.5)] = 1
        cases.append(case(f"c{i}", pred, ref))
    choice = search_postprocessing(cases, {0: "background", 1: "liver"})
    path = save_choice(choice, tmp_path / "postprocessing.json")
    saved = json.loads(path.read_text())  # plain JSON with the decision and its evidence
    assert saved["postprocessing"]["classes"]["liver"]["keep_largest"] is True
    assert saved["dice_after"]["liver"] > saved["dice_before"]["liver"]
    assert {c["operation"] for c in saved["candidates"]} >= {"keep_largest", "fill_holes"}
    assert load_choice(path, ["background", "liver"])["classes"]["liver"]["keep_largest"] is True

    section = validated_postprocessing(tmp_path / "postprocessing.json", ["background", "liver"], [])
    assert section is not None and section["classes"]["liver"]["keep_largest"] is True
    assert validated_postprocessing(tmp_path / "postprocessing.json", ["background", "liver"], ["postprocessing.classes.liver.fill_holes=true"]) is None
    assert validated_postprocessing(tmp_path / "elsewhere" / "postprocessing.json", ["background", "liver"], []) is None
    with pytest.raises(CheckpointError, match="liver"):
        load_choice(path, ["background", "spleen"])
    path.write_text('{"postprocessing": {"classes": {"liver": {"keep_larges": true}}}}')
    with pytest.raises(ConfigError, match="keep_larges"):
        load_choice(path, ["background", "liver"])


def test_reading_out_of_fold_predictions_checks_the_grid(tmp_path: Path) -> None:
    affine = grid_affine(SPACING, axcodes="LPS")
    ref = np.zeros(SHAPE, np.uint8)
    ref[ball((20, 20, 10), 6.0)] = 1
    label = save_nifti(ref, affine, tmp_path / "labels" / "a.nii.gz")
    image = save_nifti(ref.astype(np.float32), affine, tmp_path / "images" / "a.nii.gz")
    save_nifti(ref, affine, tmp_path / "oof" / "a.nii.gz")
    loaded = load_search_cases(tmp_path / "oof", [Case("a", (image,), label)])
    assert loaded[0].spacing == pytest.approx(SPACING)
    assert loaded[0].prediction.shape == loaded[0].reference.shape
    shifted = affine.copy()
    shifted[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(ref, shifted), str(tmp_path / "oof" / "a.nii.gz"))
    with pytest.raises(GeometryError, match="'a'"):
        load_search_cases(tmp_path / "oof", [Case("a", (image,), label)])
