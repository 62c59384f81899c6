"""Fold ensembles at inference: averaged probabilities, fold selection, refusal of mismatched folds, validated post-processing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import Dataset

from medunet.cli import main
from medunet.config import ClassPostprocessing, PostprocessingConfig
from medunet.errors import CheckpointError
from medunet.inference.segmenter import Segmenter
from medunet.io.geometry import spacing_of
from medunet.model.checkpoint import fold_checkpoints, load_checkpoint, save_checkpoint
from medunet.model.sliding import inference_dtype, predict_probabilities
from medunet.postprocessing.operations import postprocess_labels


@pytest.fixture(scope="module")
def folds_run(crossval_root: Path, dataset: Dataset) -> tuple[Path, Path]:
    """The session's 2-fold ``medunet crossval`` folder (tests/conftest.py) and its datalist: trained fold models as users get them."""
    return crossval_root, dataset.datalist


def test_ensemble_probabilities_are_the_mean_of_the_folds(folds_run: tuple[Path, Path]) -> None:
    root = folds_run[0]
    ensemble = Segmenter.from_checkpoint(root)
    assert len(ensemble.models) == 2 and "folds 0, 1" in ensemble.source
    x = torch.randn(1, 1, 40, 36, 28, generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    amp = inference_dtype(ensemble.config, cpu)  # the ensemble's own precision (bf16 on CPUs that have it natively)
    per_fold = [predict_probabilities(m, x, ensemble.config, device=cpu, amp=amp) for m in ensemble.models]
    assert not torch.allclose(per_fold[0], per_fold[1], atol=1e-3)  # two different models, or the test proves nothing
    averaged = ensemble.probabilities(x)
    torch.testing.assert_close(averaged, (per_fold[0] + per_fold[1]) / 2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(averaged.sum(dim=1), torch.ones(1, 40, 36, 28), atol=1e-5, rtol=1e-5)
    single = Segmenter.from_checkpoint(root, folds=[1])
    assert len(single.models) == 1
    torch.testing.assert_close(single.probabilities(x), per_fold[1], atol=1e-6, rtol=1e-5)


def test_infer_with_folds_selects_and_lands_on_the_input_grid(folds_run: tuple[Path, Path], tmp_path: Path) -> None:
    # without crossval's postprocessing.json, which applies to the folder, not to a fold opened on its own
    root, datalist = tmp_path / "cv", folds_run[1]
    shutil.copytree(folds_run[0], root, ignore=shutil.ignore_patterns("cache", "postprocessing.json"))
    runs = {"all": ["-m", str(root)], "fold1": ["-m", str(root), "--folds", "1"], "single": ["-m", str(root / "fold_1")]}
    for name, args in runs.items():
        assert main(["-q", "infer", *args, "-i", str(datalist), "-o", str(tmp_path / name), "--device", "cpu"]) == 0
    image_path = datalist.parent / json.loads(datalist.read_text())["test"][0]["image"]
    image = nib.load(image_path)
    masks = {name: nib.load(tmp_path / name / image_path.name) for name in runs}
    for mask in masks.values():
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
    # --folds 1 on the crossval folder is exactly fold 1's own model
    np.testing.assert_array_equal(np.asarray(masks["fold1"].dataobj), np.asarray(masks["single"].dataobj))
    assert main(["-q", "infer", "-m", str(root), "--folds", "0,3", "-i", str(datalist), "-o", str(tmp_path / "x")]) == 1
    assert main(["-q", "infer", "-m", str(root), "--folds", "a", "-i", str(datalist), "-o", str(tmp_path / "y")]) == 2


def test_mismatched_folds_are_refused(folds_run: tuple[Path, Path], tmp_path: Path) -> None:
    root = tmp_path / "cv"
    shutil.copytree(folds_run[0], root, ignore=shutil.ignore_patterns("cache"))
    path = root / "fold_1" / "best.pt"
    state = load_checkpoint(path)
    spacing = state.config["data"]["target_spacing"]
    state.config["data"]["target_spacing"] = [1.0, 1.0, 1.0]
    save_checkpoint(state, path)
    with pytest.raises(CheckpointError, match="data.target_spacing"):
        Segmenter.from_checkpoint(root)
    assert len(Segmenter.from_checkpoint(root, folds=[0]).models) == 1  # a matching subset still loads
    state.config["data"]["target_spacing"] = spacing
    state.class_names = ["background", "spleen", "vessel"]
    save_checkpoint(state, path)
    with pytest.raises(CheckpointError, match="classes"):
        Segmenter.from_checkpoint(root)
    with pytest.raises(CheckpointError, match="--folds needs a cross-validation folder"):
        fold_checkpoints(root / "fold_0", [0])


def test_postprocessing_json_is_applied_at_inference_and_explicit_settings_win(folds_run: tuple[Path, Path], tmp_path: Path) -> None:
    root = tmp_path / "cv"
    shutil.copytree(folds_run[0], root, ignore=shutil.ignore_patterns("cache", "postprocessing.json"))
    datalist = folds_run[1]
    image_path = datalist.parent / json.loads(datalist.read_text())["test"][0]["image"]
    off = ("postprocessing.default={}", "postprocessing.classes={}")
    raw = np.asarray(Segmenter.from_checkpoint(root, overrides=off).predict(image_path).dataobj)
    assert (raw == 2).any()

    # a trained model may leave nothing for keep-largest to remove, so the vessel rule (drop components under
    # 1 litre) is one that must change the mask: proof that the file is applied, not just parsed
    chosen = {"organ": {"keep_largest": True, "fill_holes": True, "min_size_mm3": 0.0}, "vessel": {"min_size_mm3": 1e6}}
    (root / "postprocessing.json").write_text(json.dumps({"postprocessing": {"classes": chosen}}))
    segmenter = Segmenter.from_checkpoint(root)
    rules = {"organ": ClassPostprocessing(keep_largest=True, fill_holes=True), "vessel": ClassPostprocessing(min_size_mm3=1e6)}
    assert segmenter.config.postprocessing.classes == rules
    applied = np.asarray(segmenter.predict(image_path).dataobj)
    expected = postprocess_labels(
        raw, spacing=spacing_of(nib.load(image_path).affine), class_names={0: "background", 1: "organ", 2: "vessel"},
        config=PostprocessingConfig(classes=rules),
    )
    np.testing.assert_array_equal(applied, expected)
    assert not (applied == 2).any(), "the vessel rule removes every vessel component"

    explicit = Segmenter.from_checkpoint(root, overrides=["postprocessing.classes.organ.min_size_mm3=1"])
    assert explicit.config.postprocessing.classes["organ"] == ClassPostprocessing(min_size_mm3=1.0)


def test_a_fold_without_checkpoint_is_left_out(folds_run: tuple[Path, Path], tmp_path: Path) -> None:
    root = tmp_path / "cv"
    shutil.copytree(folds_run[0], root, ignore=shutil.ignore_patterns("cache", "fold_0"))
    (root / "fold_0").mkdir()  # e.g. still preprocessing its first epoch
    segmenter = Segmenter.from_checkpoint(root)
    assert len(segmenter.models) == 1 and "folds 1" in segmenter.source
    with pytest.raises(CheckpointError, match=r"fold\(s\) \[0\]"):
        Segmenter.from_checkpoint(root, folds=[0, 1])
