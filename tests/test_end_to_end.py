"""End to end, through the command line: the shared trained model infers on the input grid; resume exactly; MRI learns."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import MIN_TEST_DICE, Dataset, mean_test_dice, sets

from medunet.cli import main
from medunet.evaluation import dice_per_class
from medunet.synthetic import write_dataset

PRESETS = Path(__file__).resolve().parents[1] / "configs"
TINY = [
    "--set", "data.target_spacing=[2.0,2.0,2.5]",
    "--set", "augmentation.patch_size=[32,32,32]",
    "--set", "model.features=[8,16,32,64]",
    "--set", "inference.sw_batch_size=2",
    "--set", "optim.lr=0.003",
    "--device", "cpu",
]


#: As small as the claim allows: the shared CT model's size (tests/conftest.py SIZE), not the 8-16-32-64 network for 15 epochs.
MRI_SIZE = (
    "augmentation.patch_size=[32,32,24]",
    "model.features=[4,8,16]",
    "train.max_epochs=6",
    "train.iterations_per_epoch=16",
    "train.val_every=3",
    "optim.lr=0.02",
    "optim.warmup_epochs=1",
)


def read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), num_train=8, num_test=2, shape=(40, 40, 32), num_classes=2)


def test_train_learns_and_infer_lands_on_the_input_grid(trained_run: Path, trained_predictions: Path, dataset: Dataset) -> None:
    """The shared plain model (``medunet train -c configs/ct.yaml``, tests/conftest.py): its run folder, and
    ``medunet infer`` of it on the test images, checked against nibabel, SimpleITK and the reference labels."""
    run, preds = trained_run, trained_predictions
    for name in ("config.yaml", "metrics.csv", "train_curve.png", "best.pt", "last.pt", "log.txt", "split.json"):
        assert (run / name).is_file(), name
    rows = read_metrics(run)
    epochs = torch.load(run / "last.pt", weights_only=True)["config"]["train"]["max_epochs"]
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    best = max(float(r["val_dice_mean"]) for r in rows if r["val_dice_mean"])
    assert best > 0.8, f"validation Dice {best:.3f} does not prove learning"
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    split = json.loads((run / "split.json").read_text())
    assert split["validation"] and not set(split["validation"]) & set(split["training"])

    for name, image_path, label_path in dataset.test_cases:
        mask_path = preds / f"{name}.nii.gz"
        image, mask = nib.load(image_path), nib.load(mask_path)
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
        assert mask.get_data_dtype() == np.uint8
        itk_image, itk_mask = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(mask_path))
        assert itk_mask.GetSize() == itk_image.GetSize()
        np.testing.assert_allclose(itk_mask.GetOrigin(), itk_image.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(itk_mask.GetDirection(), itk_image.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(itk_mask.GetSpacing(), itk_image.GetSpacing(), atol=1e-6)
        reference = np.asarray(nib.load(label_path).dataobj)
        predicted = np.asarray(mask.dataobj)
        assert set(np.unique(predicted)) <= {0, 1, 2}
        organ, vessel = dice_per_class(predicted, reference, 3)
        assert organ > 0.8 and vessel > 0.8, (name, organ, vessel)  # measured 0.85-0.96 on every case
    assert mean_test_dice(preds, dataset) >= MIN_TEST_DICE
    report = json.loads((preds / "inference_report.json").read_text())
    assert [c["error"] for c in report["cases"]] == [None] * len(dataset.test_cases)


@pytest.mark.slow
def test_resume_continues_exactly_where_training_stopped(small_data: Path, tmp_path: Path) -> None:
    common = [*TINY, "--set", "optim.scheduler=constant", "--set", "train.val_every=2",
              "--set", "augmentation.samples_per_volume=1", "--set", "model.features=[4,8,16]"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(["-q", "train", str(small_data), "-o", str(straight), *common, "--set", "train.max_epochs=4"]) == 0
    assert main(["-q", "train", str(small_data), "-o", str(interrupted), *common, "--set", "train.max_epochs=2"]) == 0
    assert main(["-q", "train", str(small_data), "-o", str(interrupted), "--resume", "--set", "train.max_epochs=4"]) == 0

    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(interrupted / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), f"weights differ after resume: {key}"
    losses_a = [r["train_loss"] for r in read_metrics(straight)]
    losses_b = [r["train_loss"] for r in read_metrics(interrupted)]
    assert losses_a == losses_b and len(losses_a) == 4


def test_resume_without_a_run_is_a_clear_error(small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["train", str(small_data), "-o", str(tmp_path / "none"), "--resume"])
    assert status == 1
    err = capsys.readouterr().err
    assert "last.pt" in err and "Traceback" not in err


@pytest.mark.slow
def test_mri_preset_learns_on_multichannel_mri(tmp_path: Path) -> None:
    """Two MRI sequences per case (z-scored per channel by the MRI preset) train and infer end to end."""
    from medunet.synthetic import save_nifti

    datalist = write_dataset(tmp_path / "mri", num_train=8, num_test=1, shape=(40, 40, 32), modality="MRI")
    spec = json.loads(datalist.read_text())
    rng = np.random.default_rng(0)
    for entry in spec["training"] + spec["test"]:
        first = datalist.parent / entry["image"]
        image, body = nib.load(first), np.asarray(nib.load(first).dataobj) > 0
        organ = np.asarray(nib.load(datalist.parent / entry["label"]).dataobj) == 1 if "label" in entry else None
        if organ is None:
            organ = np.asarray(nib.load(datalist.parent / "labelsTs" / first.name).dataobj) == 1
        # a second sequence with the opposite contrast (organ darker than the body) and its own noise
        t2 = body * (250.0 + rng.normal(0.0, 20.0, body.shape)) - organ * 150.0
        second = first.with_name(first.name.replace(".nii.gz", "_t2.nii.gz"))
        save_nifti(np.clip(t2, 0.0, None).astype(np.float32), image.affine, second)
        entry["image"] = [entry["image"], str(second.relative_to(datalist.parent))]
    spec["modality"] = {"0": "T1", "1": "T2"}
    datalist.write_text(json.dumps(spec))
    run = tmp_path / "run"
    # the shared CT model's size (tests/conftest.py: 96 steps of a 4-8-16 network reach a test Dice of 0.93)
    status = main(["-q", "train", str(datalist), "-o", str(run), "-c", str(PRESETS / "mri.yaml"), *TINY, *sets(MRI_SIZE)])
    assert status == 0
    state = torch.load(run / "best.pt", weights_only=True)
    assert state["in_channels"] == 2 and state["config"]["data"]["normalization"] == "zscore"
    best = max(float(r["val_dice_mean"]) for r in read_metrics(run) if r["val_dice_mean"])
    assert best > 0.8, f"validation Dice {best:.3f} does not prove learning"
    preds = tmp_path / "preds"
    assert main(["-q", "infer", "-m", str(run), "-i", str(datalist), "-o", str(preds)]) == 0
    mask = nib.load(preds / Path(spec["test"][0]["image"][0]).name)
    image = nib.load(datalist.parent / spec["test"][0]["image"][0])
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)


def test_resume_with_more_epochs_follows_the_new_schedule(small_data: Path, tmp_path: Path) -> None:
    """A finished cosine run resumed with a larger max_epochs continues on the new curve, not at the old minimum."""
    from medunet.config import OptimConfig
    from medunet.training.optim import lr_factor

    run = tmp_path / "run"
    common = [*TINY, "--set", "augmentation.samples_per_volume=1", "--set", "model.features=[4,8,16]", "--set", "train.val_every=9"]
    assert main(["-q", "train", str(small_data), "-o", str(run), *common, "--set", "train.max_epochs=1"]) == 0
    assert main(["-q", "train", str(small_data), "-o", str(run), "--resume", "--set", "train.max_epochs=4"]) == 0
    saved = torch.load(run / "last.pt", weights_only=True)["config"]["optim"]
    cfg = OptimConfig(**{k: v for k, v in saved.items() if k in ("lr", "min_lr", "scheduler", "warmup_epochs", "poly_power")})
    lrs = [float(r["lr"]) for r in read_metrics(run)]
    expected = [cfg.lr * lr_factor(cfg, epoch, 4) for epoch in range(1, 4)]
    assert lrs[1:] == pytest.approx(expected, rel=1e-4), (lrs, expected)  # metrics.csv keeps 6 significant digits
    assert lrs[1] > 10 * cfg.min_lr  # not stuck at the finished run's floor
