"""The command line as a user meets it: exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medunet.cli import EXIT_ERROR, EXIT_PARTIAL, main
from medunet.synthetic import grid_affine, save_nifti, write_dataset

FAST = [
    "--set", "data.target_spacing=[3.0,3.0,3.0]",
    "--set", "augmentation.patch_size=[16,16,16]",
    "--set", "model.features=[4,8,16]",
    "--set", "train.max_epochs=1",
    "--device", "cpu",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("cli-data"), num_train=4, num_test=2, shape=(24, 24, 16))


@pytest.fixture(scope="module")
def run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli-run") / "run"
    assert main(["-q", "train", str(dataset), "-o", str(run_dir), *FAST]) == 0
    return run_dir


def copy_dataset(dataset: Path, tmp_path: Path) -> Path:
    """A writable copy of the datalist and its files, to corrupt."""
    import shutil

    target = tmp_path / "data"
    shutil.copytree(dataset.parent, target)
    return target / dataset.name


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("medunet: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "medunet demo" in out and "medunet train" in out and "medunet infer" in out
    assert main(["infer", "--help"]) == 0
    assert "Examples" in capsys.readouterr().out


def test_unknown_config_key_suggests_the_right_one(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["train", str(dataset), "-o", str(tmp_path / "r"), "--set", "train.max_epoch=3"])
    assert status == EXIT_ERROR
    line = one_line_error(capsys)
    assert "train.max_epoch" in line and "did you mean 'max_epochs'" in line
    assert not (tmp_path / "r").exists()


def test_unknown_model_lists_valid_names(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["train", str(dataset), "-o", str(tmp_path / "r"), *FAST, "--set", "model.name=vnet"])
    assert status == EXIT_ERROR
    line = one_line_error(capsys)
    assert "vnet" in line and "dynunet" in line and "segresnet" in line


def test_missing_datalist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(tmp_path / "nope.json"), "-o", str(tmp_path / "r")]) == EXIT_ERROR
    assert "nope.json" in one_line_error(capsys)


def test_empty_training_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps({"training": []}))
    assert main(["train", str(datalist), "-o", str(tmp_path / "r")]) == EXIT_ERROR
    assert "empty" in one_line_error(capsys)


@pytest.mark.parametrize(
    ("corruption", "expected"),
    [
        ("label_255", "255"),
        ("label_half", "0.5"),
        ("nan_image", "NaN"),
        ("shape_mismatch", "label grid differs"),
        ("affine_mismatch", "label grid differs"),
        ("truncated", "truncated or corrupt"),
        ("image_2d", "2D"),
        ("image_4d", "4D"),
        ("missing_file", "does not exist"),
    ],
)
def test_bad_training_data_is_named_and_nothing_is_trained(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], corruption: str, expected: str
) -> None:
    datalist = copy_dataset(dataset, tmp_path)
    entry = json.loads(datalist.read_text())["training"][1]
    image_path, label_path = datalist.parent / entry["image"], datalist.parent / entry["label"]
    image, label = nib.load(image_path), nib.load(label_path)
    img, lab = np.asarray(image.dataobj), np.asarray(label.dataobj)
    bad_file = label_path
    if corruption == "label_255":
        lab = lab.copy()
        lab[0, 0, 0] = 255
        save_nifti(lab.astype(np.uint8), label.affine, label_path)
    elif corruption == "label_half":
        lab = lab.astype(np.float32)
        lab[0, 0, 0] = 0.5
        save_nifti(lab, label.affine, label_path)
    elif corruption == "nan_image":
        img = img.astype(np.float32)
        img[1, 1, 1] = np.nan
        save_nifti(img, image.affine, image_path)
        bad_file = image_path
    elif corruption == "shape_mismatch":
        save_nifti(lab[:-2], label.affine, label_path)
    elif corruption == "affine_mismatch":
        shifted = label.affine.copy()
        shifted[:3, 3] += 5.0
        save_nifti(lab, shifted, label_path)
    elif corruption == "truncated":
        raw = image_path.read_bytes()
        image_path.write_bytes(raw[: len(raw) // 2])
        bad_file = image_path
    elif corruption == "image_2d":
        save_nifti(img[:, :, 0], image.affine, image_path)
        bad_file = image_path
    elif corruption == "image_4d":
        save_nifti(np.stack([img, img], axis=-1), image.affine, image_path)
        bad_file = image_path
    elif corruption == "missing_file":
        image_path.unlink()
        bad_file = image_path
    run_dir = tmp_path / "run"
    status = main(["train", str(datalist), "-o", str(run_dir), *FAST])
    assert status == EXIT_ERROR
    line = one_line_error(capsys)
    assert expected in line
    assert bad_file.name in line
    if corruption != "missing_file":
        assert "phantom_001" in line  # the case is named
    assert not (run_dir / "last.pt").exists() and not (run_dir / "best.pt").exists()


def test_infer_refuses_to_overwrite_then_overwrites(run: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preds = tmp_path / "preds"
    image = dataset.parent / "imagesTs" / "phantom_004.nii.gz"
    assert main(["-q", "infer", "-m", str(run), "-i", str(image), "-o", str(preds)]) == 0
    first = (preds / "phantom_004.nii.gz").read_bytes()
    capsys.readouterr()
    assert main(["-q", "infer", "-m", str(run), "-i", str(image), "-o", str(preds)]) == EXIT_ERROR
    assert "--overwrite" in one_line_error(capsys)
    assert (preds / "phantom_004.nii.gz").read_bytes() == first
    assert main(["-q", "infer", "-m", str(run / "last.pt"), "-i", str(image), "-o", str(preds), "--overwrite", "--preview"]) == 0
    assert (preds / "phantom_004_preview.png").is_file()


def test_batch_with_one_corrupt_file_is_a_partial_failure(run: Path, dataset: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("phantom_004.nii.gz", "phantom_005.nii.gz"):
        (inputs / name).write_bytes((dataset.parent / "imagesTs" / name).read_bytes())
    (inputs / "broken.nii.gz").write_bytes(gzip.compress(b"\x00" * 100))
    preds = tmp_path / "preds"
    assert main(["-q", "infer", "-m", str(run), "-i", str(inputs), "-o", str(preds)]) == EXIT_PARTIAL
    assert sorted(p.name for p in preds.glob("*.nii.gz")) == ["phantom_004.nii.gz", "phantom_005.nii.gz"]
    report = json.loads((preds / "inference_report.json").read_text())
    errors = {c["case"]: c["error"] for c in report["cases"]}
    assert errors["phantom_004"] is None and errors["phantom_005"] is None
    assert "broken.nii.gz" in errors["broken"]
    assert not [p for p in preds.iterdir() if ".tmp" in p.name]


def test_same_file_names_in_two_folders_never_collide(run: Path, dataset: Path, tmp_path: Path) -> None:
    source = dataset.parent / "imagesTs" / "phantom_004.nii.gz"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "ct.nii.gz").write_bytes(source.read_bytes())
    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps({"test": ["a/ct.nii.gz", "b/ct.nii.gz"]}))
    preds = tmp_path / "preds"
    assert main(["-q", "infer", "-m", str(run), "-i", str(datalist), "-o", str(preds)]) == 0
    assert sorted(p.name for p in preds.glob("*.nii.gz")) == ["a_ct.nii.gz", "b_ct.nii.gz"]


def test_run_folder_is_not_silently_reused(run: Path, dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(dataset), "-o", str(run), *FAST]) == EXIT_ERROR
    assert "--resume" in one_line_error(capsys)


def test_infer_with_a_pickle_payload_checkpoint_is_refused(tmp_path: Path, dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # noqa: ANN204 - runs only if someone unpickles unsafely
            return (Path.touch, (marker,))

    torch.save({"format": 1, "model": {}, "config": {}, "labels": {}, "in_channels": 1, "epoch": 1, "x": Payload()},
               tmp_path / "evil.pt")
    image = dataset.parent / "imagesTs" / "phantom_004.nii.gz"
    assert main(["infer", "-m", str(tmp_path / "evil.pt"), "-i", str(image), "-o", str(tmp_path / "p")]) == EXIT_ERROR
    assert "refusing" in one_line_error(capsys)
    assert not marker.exists()


def test_datalist_escaping_its_folder_is_refused(tmp_path: Path, dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    datalist = inner / "d.json"
    rel = Path("..") / "outside.nii.gz"
    save_nifti(np.zeros((8, 8, 8), np.float32), grid_affine(), tmp_path / "outside.nii.gz")
    datalist.write_text(json.dumps({"training": [{"image": str(rel), "label": str(rel)}] * 2}))
    assert main(["train", str(datalist), "-o", str(tmp_path / "r")]) == EXIT_ERROR
    assert "--allow-outside-root" in one_line_error(capsys)


def test_non_finite_loss_stops_training_and_names_the_cases(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    datalist = copy_dataset(dataset, tmp_path)
    for entry in json.loads(datalist.read_text())["training"]:
        image = nib.load(datalist.parent / entry["image"])
        huge = np.where(np.asarray(image.dataobj) > -500, 3e38, 0.0).astype(np.float32)  # finite, but overflows in the network
        save_nifti(huge, image.affine, datalist.parent / entry["image"])
    run_dir = tmp_path / "run"
    status = main(["train", str(datalist), "-o", str(run_dir), *FAST, "--set", "data.normalization=none"])
    assert status == EXIT_ERROR
    line = one_line_error(capsys)
    assert "loss became" in line and "phantom_" in line and "optim.lr" in line
    assert not (run_dir / "best.pt").exists() and not (run_dir / "last.pt").exists()
    assert "loss became" in (run_dir / "log.txt").read_text()


@pytest.mark.parametrize(
    ("modality", "preset"),
    [({"0": "CT"}, "CT"), ("CT", "CT"), ({"0": "T1", "1": "FLAIR"}, "MRI"), ({"0": "MRI"}, "MRI"), (None, "CT")],
)
def test_without_config_the_datalist_modality_picks_the_preset(tmp_path: Path, modality: object, preset: str) -> None:
    from medunet.config import load_config
    from medunet.training.run_config import datalist_modality

    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps({"modality": modality, "training": []}))
    assert datalist_modality(datalist) == preset
    expected = "zscore" if preset == "MRI" else "ct_window"
    assert load_config(None, modality=preset).data.normalization == expected


def test_per_class_postprocessing_by_name_reaches_inference(run: Path, dataset: Path, tmp_path: Path) -> None:
    image = dataset.parent / "imagesTs" / "phantom_004.nii.gz"
    plain, cleaned = tmp_path / "plain", tmp_path / "cleaned"
    assert main(["-q", "infer", "-m", str(run), "-i", str(image), "-o", str(plain)]) == 0
    # no organ component can be larger than the whole volume: removing smaller ones empties the class
    assert main(["-q", "infer", "-m", str(run), "-i", str(image), "-o", str(cleaned),
                 "--set", "postprocessing.classes.organ.min_size_mm3=1e12"]) == 0
    before = np.asarray(nib.load(plain / image.name).dataobj)
    after = np.asarray(nib.load(cleaned / image.name).dataobj)
    assert (before == 1).any(), "the tiny model should predict some organ voxels"
    assert not (after == 1).any()
    assert np.array_equal(after[before != 1], before[before != 1])
