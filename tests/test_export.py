"""`medunet export`: packages whose masks equal the checkpoint's, an ONNX file that runs without medunet,
a MONAI Bundle that runs with `python -m monai.bundle run` where medunet cannot be imported, QC that survives
export, a model card that states what is known about the training data, tampered packages refused, failed
exports leaving nothing.

Every claim about a user's model is made on the models conftest.py trains through the CLI (``trained_run``,
``planned_run``, ``crossval_root``). The comparisons run the checkpoint with ``inference.precision=fp32`` and
bake the same into the package: the exported networks compute in float32 (docs/export.md, "Precision").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import NUM_TRAIN, Dataset, copy_run, sets
from scipy import ndimage
from torch import nn

import medunet.inference.stages as stages_module
from medunet.cli import main
from medunet.config import config_from_dict
from medunet.errors import ExportError, PackageError
from medunet.export import writer
from medunet.export.networks import export_onnx
from medunet.inference.segmenter import Segmenter
from medunet.model.checkpoint import load_checkpoint, save_checkpoint
from medunet.model.networks import build_network
from medunet.model.package import read_package, sha256_file
from medunet.synthetic import as_stored, grid_affine, make_phantom, save_nifti, write_dataset

FP32 = ["inference.precision=fp32"]
#: Storage orders of the phantoms: RAS, LPS, permuted axes, and an oblique LPS grid.
STORAGE = {"ras": ("RAS", 0.0), "lps": ("LPS", 0.0), "permuted": ("PIR", 0.0), "oblique": ("LPS", 12.0)}
#: The shared dataset's kind of phantom (conftest.DATA_SHAPE, organ + vessel) at a spacing near its own.
PHANTOM_SHAPE, PHANTOM_SPACING = (48, 48, 32), (1.5, 1.4, 2.4)


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kind of anatomy the shared models were trained on, stored in four orders (RAS, LPS, permuted, oblique)."""
    folder = tmp_path_factory.mktemp("export_scans")
    for i, (name, (axcodes, tilt)) in enumerate(STORAGE.items()):
        image, _ = make_phantom(PHANTOM_SHAPE, seed=100 + i, num_classes=3)
        ras_affine = grid_affine(PHANTOM_SPACING, axcodes="RAS")
        save_nifti(as_stored(image, axcodes), grid_affine(PHANTOM_SPACING, axcodes=axcodes, oblique_deg=tilt, origin=ras_affine[:3, 3]),
                   folder / f"{name}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def pkg(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared plain run exported in all three formats."""
    return writer.export_model(trained_run, tmp_path_factory.mktemp("export_pkg") / "pkg", ["onnx", "torchscript", "bundle"],
                               overrides=FP32)


@pytest.fixture(scope="module")
def ref(trained_run: Path, scans: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``medunet infer`` of the checkpoint on the phantoms: the masks every engine must give."""
    out = tmp_path_factory.mktemp("export_ref") / "ref"
    assert main(["-q", "infer", "-m", str(trained_run), "-i", str(scans), "-o", str(out), *sets(FP32)]) == 0
    return out


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _dice_per_class(a: np.ndarray, b: np.ndarray, num_classes: int) -> list[float]:
    return [2.0 * np.sum((a == k) & (b == k)) / max(np.sum(a == k) + np.sum(b == k), 1) for k in range(1, num_classes)]


def _assert_same_masks(got_dir: Path, ref_dir: Path, scans_dir: Path, names: Sequence[str] = tuple(STORAGE)) -> None:
    """Masks in ``got_dir`` equal those in ``ref_dir`` (Dice >= 0.999 per class), on each input's shape and affine."""
    for name in names:
        image, reference = nib.load(scans_dir / f"{name}.nii.gz"), nib.load(ref_dir / f"{name}.nii.gz")
        got = nib.load(got_dir / f"{name}.nii.gz")  # read back with nibabel, independent of medunet's writer
        assert got.shape == image.shape == reference.shape, name
        np.testing.assert_allclose(got.affine, image.affine, atol=1e-5, err_msg=name)
        expected, labels = np.asarray(reference.dataobj), np.asarray(got.dataobj)
        classes = int(expected.max()) + 1
        assert classes == 3 and np.mean(expected > 0) > 0.01, f"{name}: the checkpoint's mask is trivial, the comparison proves nothing"
        assert min(_dice_per_class(labels, expected, classes)) >= 0.999, name


def _run_bundle(bundle: Path, input_dir: Path, output_dir: Path, scratch: Path) -> None:
    """``python -m monai.bundle run`` in a process where ``import medunet`` fails.

    ``-I -S``: no PYTHONPATH, no current folder, and no site processing, so the editable install's
    path hook (a .pth file) never runs; only the site-packages folder holding monai, torch, numpy,
    nibabel and fire is added, after a folder whose ``medunet`` package raises ImportError (which also
    hides a non-editable install). The script asserts the import fails before running the bundle.
    """
    shadow = scratch / "shadow" / "medunet"
    shadow.mkdir(parents=True, exist_ok=True)
    (shadow / "__init__.py").write_text("raise ImportError('medunet is hidden from this process')\n")
    argv = ["monai.bundle", "run", "--config_file", "configs/inference.json", "--meta_file", "configs/metadata.json",
            "--input_dir", str(input_dir), "--output_dir", str(output_dir)]
    script = (
        "import runpy, sys\n"
        f"sys.path[:0] = [{str(shadow.parent)!r}]\n"
        f"sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
        "try:\n"
        "    import medunet\n"
        "    raise SystemExit('medunet is importable here: the test would prove nothing')\n"
        "except ImportError:\n"
        "    pass\n"
        f"sys.argv = {argv!r}\n"
        "runpy.run_module('monai.bundle', run_name='__main__', alter_sys=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=bundle, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_package_masks_equal_the_checkpoints_in_every_storage_order(pkg: Path, ref: Path, scans: Path, tmp_path: Path,
                                                                    engine: str) -> None:
    assert main(["-q", "infer", "-m", str(pkg), "--engine", engine, "-i", str(scans), "-o", str(tmp_path)]) == 0
    _assert_same_masks(tmp_path, ref, scans)
    report = json.loads((tmp_path / "inference_report.json").read_text())
    assert f"exported package, {engine}" in report["model"]


def test_onnx_is_the_default_engine_and_agrees_on_probabilities(pkg: Path, trained_run: Path) -> None:
    package, checkpoint = Segmenter.from_checkpoint(pkg), Segmenter.from_checkpoint(trained_run, overrides=FP32)
    assert "onnxruntime" in package.source
    for section in ("data", "model", "postprocessing"):  # the package rebuilds the checkpoint's preprocessing exactly
        assert getattr(package.config, section) == getattr(checkpoint.config, section)
    assert package.config.roi_size() == checkpoint.config.roi_size()
    x = torch.rand(1, 1, 44, 40, 36, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(package.probabilities(x), checkpoint.probabilities(x), atol=1e-5, rtol=1e-4)


def test_the_onnx_file_runs_in_a_bare_onnxruntime_session(pkg: Path, trained_run: Path, tmp_path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(pkg / "model.onnx"), full_check=True)
    io = json.loads((pkg / "pipeline.json").read_text())["network_io"]
    saved = load_checkpoint(trained_run / "best.pt")
    model = config_from_dict(saved.config).model
    window_shape = [s * k for s, k in zip(model.total_stride(), (5, 4, 6))]  # another size than the export's window
    window = torch.randn(2, 1, *window_shape, generator=torch.Generator().manual_seed(0))  # batch 2
    np.save(tmp_path / "window.npy", window.numpy())
    script = (
        "import sys, numpy as np, onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(pkg / 'model.onnx')!r}, providers=['CPUExecutionProvider'])\n"
        f"out = s.run([{io['output']['name']!r}], {{{io['input']['name']!r}: np.load({str(tmp_path / 'window.npy')!r})}})[0]\n"
        f"np.save({str(tmp_path / 'logits.npy')!r}, out)\n"
        "assert not any(m.startswith('medunet') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    network = build_network(model, in_channels=saved.in_channels, out_channels=saved.num_classes).eval()
    network.load_state_dict(saved.model)
    with torch.no_grad():
        expected = network(window).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-4, rtol=1e-4)  # documented tolerance


def test_the_bundle_runs_with_monai_bundle_run_without_medunet(pkg: Path, ref: Path, scans: Path, tmp_path: Path) -> None:
    _run_bundle(pkg, scans, tmp_path / "out", tmp_path)
    _assert_same_masks(tmp_path / "out", ref, scans)


def _bundle_equals_infer(run: Path, overrides: Sequence[str], scans: Path, tmp_path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Export ``run`` as a bundle with ``overrides``, run it without medunet, and compare with ``medunet infer`` with them."""
    bundle = writer.export_model(run, tmp_path / "bundle", ["bundle"], overrides=[*FP32, *overrides])
    _run_bundle(bundle, scans, tmp_path / "bundle_out", tmp_path)
    assert main(["-q", "infer", "-m", str(run), "-i", str(scans), "-o", str(tmp_path / "infer_out"), *sets([*FP32, *overrides])]) == 0
    _assert_same_masks(tmp_path / "bundle_out", tmp_path / "infer_out", scans, names)
    return {name: _labels(tmp_path / "infer_out" / f"{name}.nii.gz") for name in names}


def test_the_bundle_keeps_the_largest_component_as_medunet_does(trained_run: Path, tmp_path: Path) -> None:
    """Two bodies side by side: each has an organ, and keep-largest (the shared run's setting) must remove one."""
    halves = [make_phantom(PHANTOM_SHAPE, seed=s, num_classes=3)[0] for s in (200, 201)]
    save_nifti(np.concatenate(halves, axis=0), grid_affine(PHANTOM_SPACING), tmp_path / "scans" / "twins.nii.gz")
    kept = _bundle_equals_infer(trained_run, [], tmp_path / "scans", tmp_path, ["twins"])["twins"]
    assert main(["-q", "infer", "-m", str(trained_run), "-i", str(tmp_path / "scans"), "-o", str(tmp_path / "all"),
                 *sets([*FP32, "postprocessing.default.keep_largest=false"])]) == 0
    everything = _labels(tmp_path / "all" / "twins.nii.gz")
    assert ndimage.label(everything == 1, structure=np.ones((3, 3, 3)))[1] >= 2, "the premise: two organs without keep-largest"
    assert ndimage.label(kept == 1, structure=np.ones((3, 3, 3)))[1] == 1 and np.sum(kept == 1) < np.sum(everything == 1)


@pytest.mark.parametrize("overrides", [["inference.resample_probabilities=false"]], ids=["nearest_labels"])
def test_bundle_branches_give_medunets_masks(trained_run: Path, scans: Path, tmp_path: Path, overrides: list[str]) -> None:
    """Each bundle branch (z-score normalisation, label inversion) equals `medunet infer` of the checkpoint with that setting."""
    _bundle_equals_infer(trained_run, overrides, scans, tmp_path, ["ras", "oblique"])


def test_the_bundle_of_a_planned_run_clips_and_z_scores_as_medunet_does(planned_run: Path, scans: Path, tmp_path: Path) -> None:
    """`medunet plan` picks ct_clip_zscore (the window, then the foreground mean and std) and its own crop rule."""
    assert load_checkpoint(planned_run).config["data"]["normalization"] == "ct_clip_zscore"
    _bundle_equals_infer(planned_run, [], scans, tmp_path, ["lps", "oblique"])


@pytest.fixture(scope="module")
def mri_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A single-sequence MRI model (``-c configs/mri.yaml``: per-case z-score over nonzero voxels) and MRI scans to run it on."""
    root = tmp_path_factory.mktemp("export_mri")
    datalist = write_dataset(root / "data", num_train=8, num_test=0, shape=(40, 40, 32), num_classes=3, modality="MRI", seed=3)
    size = ["data.target_spacing=[2.0,2.0,2.5]", "augmentation.patch_size=[32,32,24]", "model.features=[4,8,16]",
            "train.max_epochs=4", "train.iterations_per_epoch=12", "train.val_every=4", "optim.lr=0.02",
            "optim.warmup_epochs=1", "inference.sw_batch_size=2"]
    run = root / "run"
    assert main(["-q", "train", str(datalist), "-o", str(run), "-c", str(Path(__file__).resolve().parents[1] / "configs" / "mri.yaml"),
                 "--device", "cpu", *sets(size)]) == 0
    scans = root / "scans"
    for i, (name, (axcodes, tilt)) in enumerate(STORAGE.items()):
        image, _ = make_phantom((40, 40, 32), seed=300 + i, num_classes=3, modality="MRI")
        ras_affine = grid_affine(PHANTOM_SPACING, axcodes="RAS")
        save_nifti(as_stored(image, axcodes), grid_affine(PHANTOM_SPACING, axcodes=axcodes, oblique_deg=tilt, origin=ras_affine[:3, 3]),
                   scans / f"{name}.nii.gz")
    return run, scans


@pytest.mark.parametrize("nonzero", [True, False], ids=["nonzero", "whole_volume"])
def test_the_bundle_of_an_mri_model_z_scores_as_medunet_does(mri_run: tuple[Path, Path], tmp_path: Path, nonzero: bool) -> None:
    run, scans = mri_run
    assert load_checkpoint(run).config["data"]["normalization"] == "zscore"
    masks = _bundle_equals_infer(run, [f"data.zscore_nonzero={str(nonzero).lower()}"], scans, tmp_path, ["ras", "permuted", "oblique"])
    assert all(np.isin(m, (1, 2)).any() for m in masks.values())  # the model segments something: the comparison is not of empty masks


def test_a_fold_ensemble_exports_every_fold(crossval_root: Path, tmp_path: Path) -> None:
    package = writer.export_model(crossval_root, tmp_path / "cv_pkg", ["onnx"])
    networks = json.loads((package / "pipeline.json").read_text())["networks"]
    assert [(n["file"], n["fold"]) for n in networks] == [("model_fold0.onnx", 0), ("model_fold1.onnx", 1)]
    exported, original = Segmenter.from_checkpoint(package), Segmenter.from_checkpoint(crossval_root, overrides=FP32)
    assert len(exported.models) == 2
    assert exported.config.postprocessing == original.config.postprocessing  # the validated postprocessing.json is baked in
    x = torch.rand(1, 1, 44, 40, 36, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(exported.probabilities(x), original.probabilities(x), atol=1e-5, rtol=1e-4)
    assert len(Segmenter.from_checkpoint(package, folds=[1]).models) == 1
    with pytest.raises(PackageError, match=r"fold\(s\) \[4\]"):
        read_package(package, folds=[4])


def _assert_same_qc(package: Segmenter, checkpoint: Segmenter, images: Sequence[Path]) -> None:
    for image in images:
        _, want = checkpoint.predict_with_qc(image)
        _, got = package.predict_with_qc(image)
        assert (got.flag, got.checks, got.calibration, got.fired) == (want.flag, want.checks, want.calibration, want.fired), image
        assert abs(got.score - want.score) <= 1e-3, image


def test_a_package_gives_the_checkpoints_qc_records(pkg: Path, trained_run: Path, dataset: Dataset) -> None:
    checkpoint, package = Segmenter.from_checkpoint(trained_run, overrides=FP32), Segmenter.from_checkpoint(pkg)
    assert checkpoint.qc_reference is not None and checkpoint.qc_thresholds.source != "defaults"  # a calibrated run, with a reference
    _assert_same_qc(package, checkpoint, [image for _, image, _ in dataset.test_cases[:2]])
    _, record = package.predict_with_qc(dataset.test_cases[0][1])
    assert record.checks == "all" and "validation cases" in record.calibration
    card = json.loads((pkg / "model_card.json").read_text())
    calibration = json.loads((trained_run / "qc.json").read_text())
    assert card["quality_control"]["calibration"]["temperature"] == calibration["temperature"]
    assert card["quality_control"]["calibration"]["score_review"] == calibration["score_review"]
    assert "temperature" in (pkg / "MODEL_CARD.md").read_text()
    metadata = json.loads((pkg / "configs" / "metadata.json").read_text())
    assert metadata["quality_control"]["file"] in card["files"]  # the bundle points at the checksummed QC file


def test_a_package_from_before_qc_json_still_loads_and_says_so(pkg: Path, dataset: Dataset, tmp_path: Path) -> None:
    """A package written before packages carried QC (no qc.json, no "qc" in pipeline.json) runs, with uncertainty-only QC."""
    old = tmp_path / "old_pkg"
    shutil.copytree(pkg, old)
    (old / "qc.json").unlink()
    pipeline = json.loads((old / "pipeline.json").read_text())
    del pipeline["qc"]
    (old / "pipeline.json").write_text(json.dumps(pipeline))
    card = json.loads((old / "model_card.json").read_text())
    del card["files"]["qc.json"]
    card["files"]["pipeline.json"] = sha256_file(old / "pipeline.json")
    (old / "model_card.json").write_text(json.dumps(card))
    _, record = Segmenter.from_checkpoint(old).predict_with_qc(dataset.test_cases[0][1])
    assert "trained before QC existed" in record.checks and record.calibration.startswith("defaults")


def test_a_crossval_package_gives_the_ensembles_qc_records(crossval_root: Path, dataset: Dataset, tmp_path: Path) -> None:
    package = Segmenter.from_checkpoint(writer.export_model(crossval_root, tmp_path / "cv_pkg", ["onnx"]))
    checkpoint = Segmenter.from_checkpoint(crossval_root, overrides=FP32)
    assert "out-of-fold" in checkpoint.qc_thresholds.source  # the root's qc.json, not a fold's
    _assert_same_qc(package, checkpoint, [dataset.test_cases[0][1]])


def _old_run(trained_run: Path, target: Path) -> Path:
    """A copy of the shared run as a checkpoint from before QC: no QC reference in best.pt, no qc.json."""
    run = copy_run(trained_run, target)
    saved = load_checkpoint(run / "best.pt")
    saved.qc_reference = None
    save_checkpoint(saved, run / "best.pt")
    (run / "last.pt").unlink(missing_ok=True)
    (run / "qc.json").unlink()
    return run


def _card_of(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, Any], str]:
    source = _old_run(request.getfixturevalue("trained_run"), tmp_path / "old") if kind == "old" else request.getfixturevalue(kind)
    package = writer.export_model(source, tmp_path / "pkg", ["onnx"])
    return source, json.loads((package / "model_card.json").read_text()), (package / "MODEL_CARD.md").read_text()


def test_the_card_of_a_plain_run_states_the_qc_reference_and_what_is_unknown(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    run, card, text = _card_of("trained_run", request, tmp_path)
    data = card["training_data"]
    stored = load_checkpoint(run / "best.pt").qc_reference
    assert stored is not None
    reference = data["qc_reference"]
    assert reference["num_cases"] == len(json.loads((run / "split.json").read_text())["training"])
    assert reference["spacing_mm"] == stored["spacing_mm"] and reference["field_of_view_mm"] == stored["extent_mm"]
    assert [c["name"] for c in reference["classes"].values()] == load_checkpoint(run / "best.pt").class_names[1:]
    assert reference["classes"]["1"]["volume_ml"] == stored["classes"]["1"]["volume_ml"]
    assert set(data["unknown"]) == {"planning_fingerprint", "datalist"}  # not planned; the run does not record its datalist
    assert "planning_fingerprint" not in data and "cases" not in json.dumps(list(data))
    assert "Unknown" in text and "planning fingerprint" in text and f"{stored['spacing_mm']['median'][0]:g}" in text


def test_the_card_of_a_planned_run_states_the_planning_fingerprint(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    run, card, text = _card_of("planned_run", request, tmp_path)
    planning = card["training_data"]["planning_fingerprint"]
    assert planning["num_cases"] == NUM_TRAIN and "cases" not in planning  # the datalist's training cases; no per-case records
    assert "qc_reference" in card["training_data"] and set(card["training_data"]["unknown"]) == {"datalist"}
    assert f"| cases | {NUM_TRAIN} |" in text


def test_train_with_a_plan_keeps_the_plans_fingerprint(planned_run: Path) -> None:
    written = planned_run.parent / "plan.fingerprint.json"  # what `medunet plan -o plan.yaml` wrote beside the plan
    assert (planned_run / "fingerprint.json").read_text() == written.read_text()


def test_the_card_of_a_crossval_ensemble_states_its_reference_and_calibration(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    root, card, text = _card_of("crossval_root", request, tmp_path)
    assert card["training_data"]["qc_reference"]["num_cases"] > 0 and "fold 0" in card["training_data"]["sources"]["qc_reference"]
    assert set(card["training_data"]["unknown"]) == {"planning_fingerprint", "datalist"}
    calibration = json.loads((root / "qc.json").read_text())
    assert card["quality_control"]["calibration"]["source"] == calibration["source"] and "out-of-fold" in text


def test_the_card_of_an_old_checkpoint_says_everything_is_unknown(request: pytest.FixtureRequest, dataset: Dataset,
                                                                   tmp_path: Path) -> None:
    run, card, text = _card_of("old", request, tmp_path)
    assert set(card["training_data"]["unknown"]) == {"planning_fingerprint", "qc_reference", "datalist"}
    assert "trained before QC existed" in card["quality_control"]["reference"] and "uncalibrated" in text
    package = Segmenter.from_checkpoint(tmp_path / "pkg")  # its package's QC says what the checkpoint's says
    _assert_same_qc(package, Segmenter.from_checkpoint(run, overrides=FP32), [dataset.test_cases[0][1]])


def test_model_card_and_pipeline_describe_the_package(pkg: Path, trained_run: Path) -> None:
    card = json.loads((pkg / "model_card.json").read_text())
    on_disk = {str(p.relative_to(pkg)) for p in pkg.rglob("*") if p.is_file()}
    assert set(card["files"]) == on_disk - {"model_card.json"}  # every other file is checksummed
    state = load_checkpoint(trained_run / "best.pt").train_state
    assert state is not None
    assert card["validation"]["held_out_validation"]["model"]["class_dice"] == {k: round(v, 4) for k, v in state.best_class_dice.items()}
    assert card["config"]["model"]["features"] == load_checkpoint(trained_run).config["model"]["features"] and {"torch", "monai", "onnxruntime"} <= set(card["software"])
    assert all(name in (pkg / "MODEL_CARD.md").read_text() for name in state.best_class_dice)
    pipeline = json.loads((pkg / "pipeline.json").read_text())
    assert pipeline["schema_version"] == 1 and pipeline["config"]["inference"]["roi_size"] == load_checkpoint(trained_run).config["augmentation"]["patch_size"]
    assert [s["op"] for s in pipeline["steps"]] == ["orient", "resample", "clip_scale", "crop_foreground", "sliding_window", "softmax",
                                                   "invert", "postprocess"]
    assert pipeline["qc"] in card["files"]


@pytest.fixture(scope="module")
def crf_root(crossval_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shared crossval folder whose post-processing decision kept the dense CRF."""
    root = copy_run(crossval_root, tmp_path_factory.mktemp("export_crf") / "cv")
    path = root / "postprocessing.json"
    payload = json.loads(path.read_text()) if path.is_file() else {"postprocessing": {}}
    payload["postprocessing"]["crf"] = {**payload["postprocessing"].get("crf", {}), "enabled": True}
    path.write_text(json.dumps(payload))
    return root


def test_a_bundle_of_a_model_with_the_crf_is_refused(crf_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "export", str(crf_root), "--folds", "0", "-o", str(tmp_path / "b"), "-f", "bundle"]) == 1
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "postprocessing.crf.enabled" in message and "--set postprocessing.crf.enabled=false" in message
    assert not (tmp_path / "b").exists()
    assert main(["-q", "export", str(crf_root), "--folds", "0", "-o", str(tmp_path / "b"), "-f", "bundle",
                 "--set", "postprocessing.crf.enabled=false"]) == 0  # what the message says works


def test_an_onnx_package_keeps_and_runs_the_crf(crf_root: Path, dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = writer.export_model(crf_root, tmp_path / "pkg", ["onnx"], folds=[0])
    ops = [s["op"] for s in json.loads((package / "pipeline.json").read_text())["steps"]]
    assert ops[ops.index("softmax") + 1] == "dense_crf" and ops.index("dense_crf") < ops.index("invert")  # the documented contract
    calls: list[int] = []
    crf = stages_module.dense_crf

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return crf(*args, **kwargs)

    monkeypatch.setattr(stages_module, "dense_crf", counted)
    images = tmp_path / "in"
    images.mkdir()
    name, image, _ = dataset.test_cases[0]
    shutil.copy(image, images / image.name)
    assert main(["-q", "infer", "-m", str(package), "-i", str(images), "-o", str(tmp_path / "pkg_out")]) == 0
    assert calls == [1]  # `medunet infer -m package` ran the CRF
    assert main(["-q", "infer", "-m", str(crf_root), "--folds", "0", "-i", str(images), "-o", str(tmp_path / "ck_out"), *sets(FP32)]) == 0
    got, want = _labels(tmp_path / "pkg_out" / image.name), _labels(tmp_path / "ck_out" / image.name)
    assert min(_dice_per_class(got, want, 3)) >= 0.999 and np.any(want > 0)


def _tamper_network(pkg: Path) -> str:
    data = bytearray((pkg / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (pkg / "model.onnx").write_bytes(bytes(data))
    return "model.onnx"


def _edit_pipeline(pkg: Path) -> str:
    pipeline = json.loads((pkg / "pipeline.json").read_text())
    pipeline["config"]["inference"]["overlap"] = 0.5
    (pkg / "pipeline.json").write_text(json.dumps(pipeline))
    return "pipeline.json"


def _edit_qc(pkg: Path) -> str:
    qc = json.loads((pkg / "qc.json").read_text())
    qc["thresholds"]["score_review"] = 0.0  # would silence every low-confidence flag
    (pkg / "qc.json").write_text(json.dumps(qc))
    return "qc.json"


def _future_schema(pkg: Path) -> str:
    pipeline = json.loads((pkg / "pipeline.json").read_text())
    pipeline["schema_version"] = 99
    (pkg / "pipeline.json").write_text(json.dumps(pipeline))
    return "pipeline.json has schema_version 99"


def _missing_network(pkg: Path) -> str:
    (pkg / "models" / "model.ts").unlink()
    return "models/model.ts is missing"


def _missing_card(pkg: Path) -> str:
    (pkg / "model_card.json").unlink()
    return "model_card.json is missing"


@pytest.mark.parametrize("tamper", [_tamper_network, _edit_pipeline, _edit_qc, _future_schema, _missing_network, _missing_card])
def test_a_tampered_package_is_refused_naming_the_file(pkg: Path, scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        tamper) -> None:  # noqa: ANN001
    copy = tmp_path / "pkg"
    shutil.copytree(pkg, copy)
    named = tamper(copy)
    assert main(["-q", "infer", "-m", str(copy), "-i", str(scans), "-o", str(tmp_path / "out")]) == 1
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and named in message, message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.nii.gz"))  # nothing predicted


def test_bad_exports_end_with_one_line_and_leave_nothing(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty_run").mkdir()
    assert main(["-q", "export", str(tmp_path / "empty_run"), "-o", str(tmp_path / "a")]) == 1
    assert "has no best.pt or last.pt" in capsys.readouterr().err and not (tmp_path / "a").exists()

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    for flags in ([], ["--overwrite"]):  # a folder that is not a package is never replaced
        assert main(["-q", "export", str(trained_run), "-o", str(tmp_path / "busy"), *flags]) == 1
        assert "busy" in capsys.readouterr().err and (tmp_path / "busy" / "notes.txt").read_text() == "mine"

    assert main(["-q", "export", str(trained_run), "-o", str(tmp_path / "b"), "-f", "bundle", "--set", "inference.tta_flips=true"]) == 1
    assert "mirror TTA" in capsys.readouterr().err and not (tmp_path / "b").exists()

    def fail(*_args: Any, **_kwargs: Any) -> float:  # the second network fails after the first was written
        raise ExportError("the network cannot be exported to TorchScript (test)")

    monkeypatch.setattr(writer, "export_torchscript", fail)
    assert main(["-q", "export", str(trained_run), "-o", str(tmp_path / "c"), "-f", "onnx,torchscript"]) == 1
    assert "cannot be exported" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty_run"]  # no package, no temporary folder


class Unexportable(nn.Module):
    """Kept hand-built: the test needs a network with an operator ONNX lacks (SVD), which no trained medunet model has."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svd(x.flatten(2))[0][..., :1].expand_as(x.flatten(2)).reshape(x.shape)


def test_a_network_the_exporter_cannot_trace_is_one_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="cannot be exported to ONNX") as caught:
        export_onnx(Unexportable(), tmp_path / "x.onnx", in_channels=1, window=[8, 8, 8], probe=[12, 8, 8])
    assert "\n" not in str(caught.value) and not (tmp_path / "x.onnx").exists()


def test_export_help_teaches_by_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--help"]) == 0
    text = capsys.readouterr().out
    assert "Examples" in text and "--format" in text and "bundle" in text


def test_onnxruntime_engine_on_a_checkpoint_says_to_export_first(trained_run: Path) -> None:
    with pytest.raises(Exception, match="export first"):
        Segmenter.from_checkpoint(trained_run, overrides=["inference.engine=onnxruntime"])
