"""`medunet plan`: the fingerprint's statistics, each planning rule, the memory model against a measurement,
the commented YAML, automatic planning in `medunet train`, and a planned config that trains well."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medunet.cli import EXIT_ERROR, main
from medunet.config import ModelConfig, config_from_dict, load_config
from medunet.io.datalist import load_datalist
from medunet.planning.fingerprint import compute_fingerprint
from medunet.planning.memory import GIB, USABLE_FRACTION, saved_activation_elements, training_step_memory
from medunet.planning.plan_yaml import write_plan
from medunet.planning.planner import crop_ratios, make_plan
from medunet.synthetic import add_second_sequence, as_stored, grid_affine, make_phantom, save_nifti, write_dataset

#: (stored axis codes, order of the RAS axes along the stored voxel axes)
PERMUTED = ("PIR", (1, 2, 0))


def write_spacings_dataset(root: Path, spacings: list[tuple[float, float, float]], shape: tuple[int, int, int]) -> Path:
    """One case per RAS spacing; every other case is stored permuted (PIR) so spacings must be reoriented."""
    entries = []
    for i, spacing in enumerate(spacings):
        image, label = make_phantom(shape, seed=i)
        codes, order = PERMUTED if i % 2 else ("RAS", (0, 1, 2))
        affine = grid_affine([spacing[a] for a in order], axcodes=codes)
        name = f"case_{i:02d}.nii.gz"
        save_nifti(as_stored(image, codes), affine, root / "imagesTr" / name)
        save_nifti(as_stored(label, codes), affine, root / "labelsTr" / name)
        entries.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    path = root / "dataset.json"
    path.write_text(json.dumps({"labels": {"0": "background", "1": "organ"}, "modality": {"0": "CT"}, "training": entries}))
    return path


def fake_fingerprint(shape: tuple[int, ...], spacing: tuple[float, ...], *, cases: int = 50, volumes: tuple[float, ...] = (100.0,)) -> dict:
    """A fingerprint of a large dataset, without writing it (for the patch/topology rules at realistic sizes)."""
    summary = {"median": list(spacing), "percentile_10": list(spacing), "min": list(spacing), "max": list(spacing)}
    shapes = {"median": list(shape), "percentile_10": list(shape), "min": list(shape), "max": list(shape)}
    classes = {"0": {"name": "background", "volume_ml_median": 5000.0}}
    classes.update({str(k + 1): {"name": f"c{k + 1}", "volume_ml_median": v} for k, v in enumerate(volumes)})
    case = {"spacing": list(spacing), "shape": list(shape), "shape_cropped_body": list(shape), "shape_cropped_nonzero": list(shape)}
    return {
        "modality": "CT", "orientation": "RAS", "channels": 1, "spacing": summary, "shape": shapes,
        "shape_cropped_body": shapes, "shape_cropped_nonzero": shapes,
        "intensity": [{"samples": 1000, "mean": 60.0, "std": 40.0, "percentile_00_5": -40.0, "percentile_99_5": 180.0}],
        "zero_fraction_median": 0.0, "zero_background": False, "classes": classes, "cases": [case] * cases,
    }


# --------------------------------------------------------------------------- fingerprint and spacing


def test_target_spacing_is_the_median_and_the_coarse_axis_takes_its_10th_percentile(tmp_path: Path) -> None:
    z = [2.0, 2.5, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 6.0]
    xy = [0.7, 0.75, 0.8, 0.8, 0.8, 0.8, 0.85, 0.9, 0.9, 1.0]
    spacings = [(a, a * 1.1, b) for a, b in zip(xy, z)]
    fp = compute_fingerprint(load_datalist(write_spacings_dataset(tmp_path, spacings, (20, 20, 8))))
    # PIR-stored cases were reoriented: each case's spacing comes back in RAS order
    np.testing.assert_allclose([c["spacing"] for c in fp["cases"]], spacings, atol=1e-5)
    plan = make_plan(fp, gpu_memory_gb=1)
    target = plan.values["data"]["target_spacing"]
    assert target[:2] == pytest.approx([np.median(xy), np.median([a * 1.1 for a in xy])], abs=1e-3)
    assert np.median(z) / np.median(xy) > 3  # anisotropic: z takes its 10th percentile, not the median
    assert target[2] == pytest.approx(np.percentile(z, 10), abs=1e-3) and target[2] < np.median(z)
    assert "10th percentile" in plan.comments["data.target_spacing"]
    assert plan.values["augmentation"]["rotate_range_deg"] == [0.0, 0.0, 30.0]  # in-plane rotation only
    assert plan.values["augmentation"]["scale_prob"] == 0.0

    iso = compute_fingerprint(load_datalist(write_spacings_dataset(tmp_path / "iso", spacings[:3], (20, 20, 8))))
    iso["spacing"]["median"] = [1.0, 1.2, 1.5]  # not anisotropic: plain median
    assert make_plan(iso, gpu_memory_gb=1).values["data"]["target_spacing"] == [1.0, 1.2, 1.5]


def test_ct_normalisation_uses_foreground_percentiles_and_the_crop_matches_monai(tmp_path: Path) -> None:
    from medunet.transforms import preprocessing

    datalist = write_dataset(tmp_path, num_train=4, num_test=0, shape=(24, 24, 16))
    cases = load_datalist(datalist).training
    fp = compute_fingerprint(load_datalist(datalist))
    foreground = np.concatenate([
        np.asarray(nib.load(c.image[0]).dataobj)[np.asarray(nib.load(c.label).dataobj) > 0] for c in cases
    ]).astype(np.float64)
    stats = fp["intensity"][0]
    assert stats["samples"] == foreground.size
    assert stats["percentile_00_5"] == pytest.approx(np.percentile(foreground, 0.5))
    assert stats["percentile_99_5"] == pytest.approx(np.percentile(foreground, 99.5))
    assert (stats["mean"], stats["std"]) == pytest.approx((foreground.mean(), foreground.std()))

    config = make_plan(fp, gpu_memory_gb=1).config()
    low, high = config.data.window()
    assert config.data.normalization == "ct_clip_zscore"
    assert (low, high) == pytest.approx(np.percentile(foreground, [0.5, 99.5]), abs=0.05)
    assert (config.data.ct_mean, config.data.ct_std) == pytest.approx((foreground.mean(), foreground.std()), abs=0.01)
    # the preprocessing chain clips to [low, high] and z-scores; its crop is the one the fingerprint predicted
    chain = preprocessing(config, num_classes=2, in_channels=1, with_label=True)
    out = chain(cases[0].as_dict())
    values, raw = out["image"].numpy(), np.asarray(nib.load(cases[0].image[0]).dataobj)  # same grid: no interpolation
    for got, raw_value in ((values.min(), raw.min()), (values.max(), raw.max())):
        assert got == pytest.approx((np.clip(raw_value, low, high) - config.data.ct_mean) / config.data.ct_std, abs=1e-4)
    assert list(values.shape[1:]) == fp["cases"][0]["shape_cropped_body"] != fp["cases"][0]["shape"]


def test_mri_zscore_is_within_nonzero_voxels_only_for_zero_background_images(tmp_path: Path) -> None:
    datalist = write_dataset(tmp_path, num_train=3, num_test=0, shape=(24, 24, 16), modality="MRI")
    fp = compute_fingerprint(load_datalist(datalist))
    assert fp["zero_background"] and fp["zero_fraction_median"] > 0.5
    data = make_plan(fp, gpu_memory_gb=1).values["data"]
    assert (data["modality"], data["normalization"], data["zscore_nonzero"]) == ("MRI", "zscore", True)

    rng = np.random.default_rng(0)
    for case in load_datalist(datalist).training:  # a raw scanner image: a noise floor instead of exact zeros
        image = nib.load(case.image[0])
        noisy = np.asarray(image.dataobj) + np.abs(rng.normal(0.0, 5.0, image.shape)) + 0.1
        save_nifti(noisy.astype(np.float32), image.affine, case.image[0])
    fp = compute_fingerprint(load_datalist(datalist))
    assert not fp["zero_background"]
    plan = make_plan(fp, gpu_memory_gb=1)
    assert plan.values["data"]["zscore_nonzero"] is False and "raw images" in plan.comments["data.zscore_nonzero"]


# --------------------------------------------------------------------------- patch, batch, topology


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((512, 512, 200), (0.78, 0.78, 2.5)), ((320, 320, 20), (0.6, 0.6, 3.6)), ((140, 170, 140), (1.0, 1.0, 1.0))],
)
def test_patch_fits_the_stride_and_the_median_shape_and_strides_stop_on_coarse_axes(shape: tuple, spacing: tuple) -> None:
    plan = make_plan(fake_fingerprint(shape, spacing), gpu_memory_gb=8)
    model = plan.config().model
    patch = plan.values["augmentation"]["patch_size"]
    total = model.total_stride()
    assert all(p % t == 0 for p, t in zip(patch, total)), (patch, total)
    assert all(p <= math.ceil(s / t) * t for p, s, t in zip(patch, shape, total))
    current = list(spacing)  # replay the downsampling: an axis is only halved while within 2x of the finest
    for stride, kernel in zip(model.level_strides()[1:], model.level_kernels()[1:]):
        for axis in range(3):
            if stride[axis] == 2:
                assert current[axis] <= 2 * min(current) + 1e-9
        current = [c * s for c, s in zip(current, stride)]
        assert all(k == 3 or c > 2 * min(current) for k, c in zip(kernel, current))
    sizes = [p // t for p, t in zip(patch, total)]
    assert min(sizes) >= 1 and plan.values["train"]["batch_size"] * 2 >= 2
    if max(spacing) / min(spacing) > 3:
        assert model.level_strides()[1][2] == 1 and model.level_kernels()[0][2] == 1  # z: no pooling, no z-kernel at the top
    estimate = plan.memory
    assert estimate is not None and estimate.total <= USABLE_FRACTION * 8 * GIB


def test_a_smaller_gpu_budget_gives_a_smaller_patch_or_network() -> None:
    fp = fake_fingerprint((512, 512, 200), (0.78, 0.78, 2.5))
    big, small = make_plan(fp, gpu_memory_gb=8), make_plan(fp, gpu_memory_gb=2)
    big_patch, small_patch = (np.prod(p.values["augmentation"]["patch_size"]) for p in (big, small))
    assert small_patch < big_patch and small.values["model"]["features"][0] < big.values["model"]["features"][0]
    assert small.memory is not None and small.memory.total <= USABLE_FRACTION * 2 * GIB < big.memory.total  # type: ignore[union-attr]


def test_batch_grows_with_memory_but_covers_at_most_5_percent_of_the_dataset() -> None:
    fp = fake_fingerprint((64, 64, 64), (1.0, 1.0, 1.0), cases=400)
    batch = make_plan(fp, gpu_memory_gb=24).values["train"]["batch_size"] * 2
    patch = np.prod(make_plan(fp, gpu_memory_gb=24).values["augmentation"]["patch_size"])
    assert batch > 2 and batch * patch <= 0.05 * 400 * 64**3


def test_rare_classes_get_more_patch_centres() -> None:
    ratios, why = crop_ratios(fake_fingerprint((64, 64, 64), (1, 1, 1), volumes=(400.0, 2.0)), 0.67)
    assert ratios is not None and ratios[2] > ratios[1] and sum(ratios) == pytest.approx(1.0, abs=0.01)
    assert "2 mL" in why
    assert crop_ratios(fake_fingerprint((64, 64, 64), (1, 1, 1), volumes=(40.0, 35.0)), 0.67)[0] is None


def test_planned_class_ratios_reach_the_crop_and_a_wrong_length_is_a_clear_error() -> None:
    from medunet.config import AugmentationConfig
    from medunet.errors import ConfigError
    from medunet.transforms import crop_ratios as transform_ratios

    assert transform_ratios(AugmentationConfig(class_ratios=(0.33, 0.2, 0.47)), 3) == [0.33, 0.2, 0.47]
    assert transform_ratios(AugmentationConfig(), 3) == pytest.approx([0.33, 0.335, 0.335])
    with pytest.raises(ConfigError, match="one value per class"):
        transform_ratios(AugmentationConfig(class_ratios=(1.0, 1.0)), 3)


def test_labels_without_foreground_cannot_be_planned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    datalist = write_dataset(tmp_path, num_train=2, num_test=0, shape=(16, 16, 8))
    for case in load_datalist(datalist).training:
        label = nib.load(case.label)
        save_nifti(np.zeros(label.shape, np.uint8), label.affine, case.label)
    assert main(["plan", str(datalist), "-o", str(tmp_path / "p.yaml")]) == EXIT_ERROR
    assert "foreground" in capsys.readouterr().err and not (tmp_path / "p.yaml").exists()


# --------------------------------------------------------------------------- the memory model against measurements


def saved_tensor_bytes(model: ModelConfig, patch: tuple[int, int, int], batch: int, in_channels: int, classes: int) -> int:
    """Bytes autograd keeps for backward in one forward + loss (each storage once, parameters excluded)."""
    from medunet.model.networks import build_network
    from medunet.training.trainer import DeepSupervisionLoss

    torch.manual_seed(0)
    net = build_network(model, in_channels=in_channels, out_channels=classes).train()
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(batch, in_channels, *patch)
    y = torch.randint(0, classes, (batch, 1, *patch))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        DeepSupervisionLoss(config_from_dict({}), classes)(net(x), y).backward()
    return sum(seen.values())


@pytest.mark.parametrize(
    ("features", "strides", "patch", "in_channels", "classes"),
    [
        ((8, 16, 32, 64), None, (32, 32, 32), 1, 2),
        ((8, 16, 32), ((1, 1, 1), (2, 2, 1), (2, 2, 2)), (48, 48, 16), 2, 3),
        ((4, 8, 16, 32, 32), None, (32, 32, 32), 1, 4),
    ],
)
def test_activation_estimate_matches_the_bytes_autograd_saves(features, strides, patch, in_channels, classes) -> None:  # noqa: ANN001
    model = ModelConfig(features=features, strides=strides)
    measured = saved_tensor_bytes(model, patch, 2, in_channels, classes)
    estimated = saved_activation_elements(model, patch, in_channels, classes) * 2 * 4  # batch 2, fp32 on CPU
    assert 0.9 <= estimated / measured <= 1.2, f"estimate {estimated / 1e6:.1f} MB vs measured {measured / 1e6:.1f} MB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to measure the peak of a real training step")
def test_step_estimate_matches_cuda_peak_memory() -> None:
    from medunet.model.networks import build_network
    from medunet.training.trainer import DeepSupervisionLoss

    model, patch, batch = ModelConfig(features=(32, 64, 128, 256, 320)), (128, 128, 128), 2
    net = build_network(model, in_channels=1, out_channels=3).cuda().train()
    optimizer = torch.optim.AdamW(net.parameters())
    loss_fn = DeepSupervisionLoss(config_from_dict({}), 3)
    x, y = torch.randn(batch, 1, *patch, device="cuda"), torch.randint(0, 3, (batch, 1, *patch), device="cuda")
    for _ in range(2):  # the second step has the optimizer state allocated
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    estimate = training_step_memory(model, patch, batch, in_channels=1, out_channels=3, activation_bytes=2)
    assert 0.7 <= estimate.total / torch.cuda.max_memory_allocated() <= 1.5


# --------------------------------------------------------------------------- the YAML and the commands


def test_plan_yaml_round_trips_and_explains_each_choice(tmp_path: Path) -> None:
    datalist = write_dataset(tmp_path / "data", num_train=3, num_test=0, shape=(24, 24, 16), spacing=(0.8, 0.8, 3.0))
    fp = compute_fingerprint(load_datalist(datalist))
    plan = make_plan(fp, gpu_memory_gb=2)
    path, json_path = write_plan(plan, fp, tmp_path / "mydata.yaml")
    assert json_path == tmp_path / "mydata.fingerprint.json" and json.loads(json_path.read_text())["num_cases"] == 3
    assert load_config(path) == plan.config()
    lines = {line.split(":")[0].strip(): line for line in path.read_text().splitlines() if not line.startswith("#")}
    assert "# median spacing (0.8, 0.8, 3)" in lines["target_spacing"]
    assert "percentiles of" in lines["ct_window"] and "#" in lines["patch_size"] and "#" in lines["strides"]
    assert "#" not in lines["lr"]  # not planned: a plain default
    assert yaml.safe_load(path.read_text())["model"]["strides"] == plan.values["model"]["strides"]


def test_plan_command_prints_a_summary_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    datalist = write_dataset(tmp_path / "data", num_train=3, num_test=0, shape=(24, 24, 16))
    out = tmp_path / "configs" / "mine.yaml"
    assert main(["plan", str(datalist), "-o", str(out), "--gpu-memory", "2", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "target_spacing" in printed and "patch_size" in printed and str(out) in printed
    assert (tmp_path / "configs" / "mine.fingerprint.json").is_file()
    assert main(["plan", str(datalist), "-o", str(out)]) == EXIT_ERROR
    assert "--overwrite" in capsys.readouterr().err
    assert main(["plan", str(datalist), "-o", str(out), "--overwrite", "--modality", "MRI"]) == 0
    assert load_config(out).data.normalization == "zscore"


def test_train_without_a_config_plans_into_the_run_folder(tmp_path: Path) -> None:
    datalist = write_dataset(tmp_path / "data", num_train=4, num_test=0, shape=(24, 24, 16))
    run = tmp_path / "run"
    status = main(["-q", "train", str(datalist), "-o", str(run), "--device", "cpu", "--gpu-memory", "0.5",
                   "--set", "train.max_epochs=1", "--set", "train.iterations_per_epoch=1"])
    assert status == 0
    planned, used = load_config(run / "plan.yaml"), load_config(run / "config.yaml")
    assert (run / "fingerprint.json").is_file() and planned.data.normalization == "ct_clip_zscore"
    assert used.augmentation.patch_size == planned.augmentation.patch_size and used.model == planned.model
    assert (used.train.max_epochs, used.train.iterations_per_epoch) == (1, 1)  # --set applies on top of the plan


def plan_and_train(datalist: Path, tmp_path: Path, *, epochs: int) -> tuple:
    """`medunet plan` (a 1 GB budget: a CPU-sized network), then train with only the training length set."""
    plan_path = tmp_path / "plan.yaml"
    assert main(["plan", str(datalist), "-o", str(plan_path), "--gpu-memory", "1"]) == 0
    run = tmp_path / "run"
    assert main(["-q", "train", str(datalist), "-o", str(run), "-c", str(plan_path), "--device", "cpu",
                 "--set", f"train.max_epochs={epochs}", "--set", "train.iterations_per_epoch=20"]) == 0
    with open(run / "metrics.csv") as handle:
        best = max(float(r["val_dice_mean"]) for r in csv.DictReader(handle) if r["val_dice_mean"])
    return load_config(plan_path), best


@pytest.mark.slow
def test_planned_config_trains_well_on_anisotropic_two_sequence_mri(tmp_path: Path) -> None:
    """The plan alone (only the training length set) reaches validation Dice > 0.8."""
    datalist = add_second_sequence(
        write_dataset(tmp_path / "data", num_train=8, num_test=0, shape=(40, 40, 16), spacing=(0.9, 0.9, 3.6), modality="MRI")
    )
    config, best = plan_and_train(datalist, tmp_path, epochs=5)
    assert config.data.zscore_nonzero and config.augmentation.rotate_range_deg == (0.0, 0.0, 30.0)
    assert config.model.level_strides()[1] == (2, 2, 1)  # in-plane first
    assert best > 0.8, f"validation Dice {best:.3f} from the planned config"


@pytest.mark.slow
def test_planned_config_trains_well_on_isotropic_ct(tmp_path: Path) -> None:
    """A second, different dataset: single-channel CT at 2 mm isotropic, clipped and z-scored from its foreground."""
    datalist = write_dataset(tmp_path / "data", num_train=8, num_test=0, shape=(32, 32, 32), spacing=(2.0, 2.0, 2.0))
    config, best = plan_and_train(datalist, tmp_path, epochs=8)
    assert config.data.normalization == "ct_clip_zscore" and config.model.level_strides()[1] == (2, 2, 2)
    assert best > 0.8, f"validation Dice {best:.3f} from the planned config"
