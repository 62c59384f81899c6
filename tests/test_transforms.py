"""Tests of medunet.transforms: LoadCased checks, the deterministic preprocessing and the random augmentation."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medunet.config import Config, config_from_dict
from medunet.errors import DataError
from medunet.io.geometry import spacing_of
from medunet.synthetic import as_stored, grid_affine, make_phantom, save_nifti
from medunet.transforms import CLASS_CENTRES, ClassCentresd, LoadCased, augmentation, class_ratios, preprocessing

SHAPE = (24, 24, 16)
SPACING = (1.5, 1.5, 2.5)


def save(array: np.ndarray, affine: np.ndarray, path: Path) -> str:
    return str(save_nifti(array, affine, path))


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask).mean(axis=0)
    return (np.asarray(affine, dtype=np.float64) @ np.append(idx, 1.0))[:3]


@pytest.fixture()
def ct_case(tmp_path: Path) -> dict:
    """A 3-class CT phantom stored LPS (so preprocessing must reorient), with its label."""
    image, label = make_phantom(SHAPE, seed=3, num_classes=3)
    affine = grid_affine(SPACING, axcodes="LPS", origin=(10.0, 20.0, -30.0))
    return {
        "case": "ct_01",
        "image": [save(as_stored(image, "LPS"), affine, tmp_path / "img.nii.gz")],
        "label": save(as_stored(label, "LPS").astype(np.uint8), affine, tmp_path / "lab.nii.gz"),
        "affine": affine,
    }


def cfg(**sections: dict) -> Config:
    return config_from_dict(sections)


# --- LoadCased -------------------------------------------------------------------------------


def test_load_cased_loads_image_and_label(ct_case: dict) -> None:
    d = LoadCased(num_classes=3, in_channels=1)({k: ct_case[k] for k in ("case", "image", "label")})
    assert tuple(d["image"].shape) == (1, *SHAPE)
    assert tuple(d["label"].shape) == (1, *SHAPE)
    assert set(np.unique(d["label"].numpy())) == {0.0, 1.0, 2.0}
    np.testing.assert_array_equal(d["label"].affine.numpy(), d["image"].affine.numpy())
    np.testing.assert_allclose(d["image"].affine.numpy(), ct_case["affine"], atol=1e-5)
    assert d["case"] == "ct_01"


def test_load_cased_refuses_label_values_outside_classes(tmp_path: Path, ct_case: dict) -> None:
    label = np.zeros(SHAPE, np.float32)
    label[:2, 0, 0] = 1.0
    label[0, 1, :3] = 255.0
    label[5, 5, 5:7] = 0.5
    bad = save(label, ct_case["affine"], tmp_path / "bad_label.nii.gz")
    with pytest.raises(DataError) as info:
        LoadCased(num_classes=2, in_channels=1)({"case": "ct_01", "image": ct_case["image"], "label": bad})
    message = str(info.value)
    listed = set(re.findall(r"([-\d.e+]+) \((\d+) voxels\)", message))
    assert listed == {("0.5", "2"), ("255", "3")}  # the valid values 0 and 1 are not listed
    assert "0..1" in message
    assert "ct_01" in message and bad in message


def test_load_cased_refuses_negative_and_too_high_class(ct_case: dict) -> None:
    # the fixture's label has classes 0..2; a 2-class model must refuse class 2
    with pytest.raises(DataError, match=r"2 \(\d+ voxels\)"):
        LoadCased(num_classes=2, in_channels=1)({k: ct_case[k] for k in ("case", "image", "label")})


def test_load_cased_refuses_label_shape_mismatch(tmp_path: Path, ct_case: dict) -> None:
    bad = save(np.zeros((24, 24, 15), np.uint8), ct_case["affine"], tmp_path / "short.nii.gz")
    with pytest.raises(DataError, match="label grid differs") as info:
        LoadCased(num_classes=3, in_channels=1)({"case": "ct_01", "image": ct_case["image"], "label": bad})
    assert "(24, 24, 15)" in str(info.value)
    assert bad in str(info.value)


def test_load_cased_refuses_label_shifted_5mm(tmp_path: Path, ct_case: dict) -> None:
    shifted = ct_case["affine"].copy()
    shifted[:3, 3] += (5.0, 0.0, 0.0)
    bad = save(np.zeros(SHAPE, np.uint8), shifted, tmp_path / "shifted.nii.gz")
    with pytest.raises(DataError, match="label grid differs") as info:
        LoadCased(num_classes=3, in_channels=1)({"case": "ct_01", "image": ct_case["image"], "label": bad})
    assert bad in str(info.value)
    assert "ct_01" in str(info.value)


def test_load_cased_refuses_wrong_channel_count(ct_case: dict) -> None:
    with pytest.raises(DataError, match="1 image channel") as info:
        LoadCased(num_classes=3, in_channels=2)({k: ct_case[k] for k in ("case", "image", "label")})
    assert "expects 2" in str(info.value)
    two = {"case": "ct_01", "image": ct_case["image"] * 2, "label": ct_case["label"]}
    with pytest.raises(DataError, match="2 image channel"):
        LoadCased(num_classes=3, in_channels=1)(two)
    assert tuple(LoadCased(num_classes=3, in_channels=2)(two)["image"].shape) == (2, *SHAPE)


def test_load_cased_without_label_key(ct_case: dict) -> None:
    d = LoadCased(num_classes=3, in_channels=1, keys=("image",))({"case": "c", "image": ct_case["image"][0]})
    assert "label" not in d
    assert tuple(d["image"].shape) == (1, *SHAPE)


# --- preprocessing --------------------------------------------------------------------------


def test_preprocessing_reorients_and_resamples(ct_case: dict) -> None:
    config = cfg(data={"target_spacing": [2.0, 2.0, 3.0]})
    chain = preprocessing(config, num_classes=3, in_channels=1, with_label=True)
    d = chain({k: ct_case[k] for k in ("case", "image", "label")})
    image, label = d["image"], d["label"]
    affine = image.affine.numpy()
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(spacing_of(affine), (2.0, 2.0, 3.0), atol=1e-6)
    np.testing.assert_allclose(np.abs(affine[:3, :3]), np.diag([2.0, 2.0, 3.0]), atol=1e-6)
    np.testing.assert_allclose(label.affine.numpy(), affine, atol=1e-6)
    assert image.shape == label.shape
    assert set(np.unique(label.numpy())) <= {0.0, 1.0, 2.0}
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0

    # the anatomy stays where it was in world coordinates (within a voxel)
    raw = nib.load(ct_case["label"])
    raw_label = np.asanyarray(raw.dataobj)
    for k in (1, 2):
        np.testing.assert_allclose(
            world_centroid(label[0].numpy() == k, affine), world_centroid(raw_label == k, raw.affine), atol=2.0
        )


def test_preprocessing_orientation_option(ct_case: dict) -> None:
    config = cfg(data={"orientation": "LPS", "target_spacing": None, "crop_foreground": False})
    d = preprocessing(config, num_classes=3, in_channels=1, with_label=False)({"case": "c", "image": ct_case["image"]})
    assert nib.aff2axcodes(d["image"].affine.numpy()) == ("L", "P", "S")
    assert "label" not in d


def test_preprocessing_keeps_spacing_when_null(ct_case: dict) -> None:
    config = cfg(data={"target_spacing": None, "crop_foreground": False})
    d = preprocessing(config, num_classes=3, in_channels=1, with_label=True)({k: ct_case[k] for k in ("case", "image", "label")})
    np.testing.assert_allclose(spacing_of(d["image"].affine.numpy()), SPACING, atol=1e-6)
    assert tuple(d["image"].shape[1:]) == SHAPE


def test_ct_window_maps_to_unit_range(tmp_path: Path) -> None:
    hu = np.full((4, 4, 4), -1000.0, np.float32)
    hu[0, 0, :4] = [-160.0, 40.0, 240.0, 3000.0]
    hu[1, 0, 0] = -60.0
    path = save(hu, np.eye(4), tmp_path / "ct.nii.gz")
    config = cfg(data={"ct_window": "soft_tissue", "target_spacing": None, "crop_foreground": False})
    chain = preprocessing(config, num_classes=2, in_channels=1, with_label=False)
    out = chain({"case": "c", "image": [path]})["image"][0].numpy()
    np.testing.assert_allclose(out[0, 0, :4], [0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert out[1, 0, 0] == pytest.approx(0.25)
    assert out[3, 3, 3] == 0.0  # air clipped to 0
    assert out.min() == 0.0 and out.max() == 1.0


def test_ct_window_custom_range(tmp_path: Path) -> None:
    hu = np.array([-200.0, -100.0, 100.0, 300.0, 400.0], np.float32).reshape(5, 1, 1) * np.ones((1, 2, 2), np.float32)
    path = save(hu, np.eye(4), tmp_path / "ct.nii.gz")
    config = cfg(data={"ct_window": [-100, 300], "target_spacing": None, "crop_foreground": False})
    out = preprocessing(config, num_classes=2, in_channels=1, with_label=False)({"case": "c", "image": [path]})["image"]
    np.testing.assert_allclose(out[0, :, 0, 0].numpy(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_zscore_over_nonzero_voxels(tmp_path: Path) -> None:
    t1, _ = make_phantom(SHAPE, seed=1, modality="MRI")
    flair, _ = make_phantom(SHAPE, seed=2, modality="MRI")
    affine = grid_affine(SPACING)
    paths = [save(t1, affine, tmp_path / "t1.nii.gz"), save(flair * 3.0 + 7.0 * (flair > 0), affine, tmp_path / "flair.nii.gz")]
    config = cfg(data={"modality": "MRI", "normalization": "zscore", "target_spacing": None, "crop_foreground": False})
    out = preprocessing(config, num_classes=2, in_channels=2, with_label=False)({"case": "m", "image": paths})["image"].numpy()
    for c, raw in enumerate((t1, flair)):
        inside = raw != 0
        assert inside.sum() > 100 and (~inside).sum() > 100
        assert out[c][inside].mean() == pytest.approx(0.0, abs=1e-4)
        assert out[c][inside].std() == pytest.approx(1.0, abs=1e-3)
        assert np.all(out[c][~inside] == 0.0)  # background stays 0


def test_normalization_none_leaves_intensities(ct_case: dict) -> None:
    config = cfg(data={"normalization": "none", "target_spacing": None, "crop_foreground": False})
    out = preprocessing(config, num_classes=3, in_channels=1, with_label=False)({"case": "c", "image": ct_case["image"]})["image"]
    assert float(out.min()) < -500.0  # still HU


def test_crop_foreground_shrinks_padded_volume(tmp_path: Path) -> None:
    hu = np.full((30, 28, 20), -1000.0, np.float32)
    hu[8:20, 5:15, 4:17] = 50.0  # the "body", surrounded by air
    path = save(hu, grid_affine((1.0, 1.0, 2.0)), tmp_path / "ct.nii.gz")
    config = cfg(data={"target_spacing": None, "crop_foreground": True})
    out = preprocessing(config, num_classes=2, in_channels=1, with_label=False)({"case": "c", "image": [path]})["image"]
    assert tuple(out.shape[1:]) == (12, 10, 13)
    assert bool((out > 0).all())
    # the crop moves the origin onto the first kept voxel
    np.testing.assert_allclose(out.affine.numpy()[:3, 3], [8.0, 5.0, 8.0], atol=1e-6)


def test_crop_foreground_off_keeps_shape(tmp_path: Path) -> None:
    hu = np.full((30, 28, 20), -1000.0, np.float32)
    hu[8:20, 5:15, 4:17] = 50.0
    path = save(hu, np.eye(4), tmp_path / "ct.nii.gz")
    config = cfg(data={"target_spacing": None, "crop_foreground": False})
    out = preprocessing(config, num_classes=2, in_channels=1, with_label=False)({"case": "c", "image": [path]})["image"]
    assert tuple(out.shape[1:]) == (30, 28, 20)


# --- augmentation ---------------------------------------------------------------------------


@pytest.fixture()
def preprocessed(ct_case: dict) -> dict:
    config = cfg(data={"target_spacing": [2.0, 2.0, 2.0]})
    return preprocessing(config, num_classes=3, in_channels=1, with_label=True)(
        {k: ct_case[k] for k in ("case", "image", "label")}
    )


@pytest.mark.parametrize("spatial", [False, True])
def test_augmentation_patches(preprocessed: dict, spatial: bool) -> None:
    probs = {"rotate_prob": 1.0, "scale_prob": 1.0, "elastic_prob": 1.0, "elastic_magnitude": [1.0, 3.0]} if spatial else {}
    config = cfg(augmentation={"patch_size": [16, 16, 8], "samples_per_volume": 3, **probs})
    chain = augmentation(config, num_classes=3)
    chain.set_random_state(seed=0)
    samples = chain(preprocessed)
    assert isinstance(samples, list) and len(samples) == 3
    for s in samples:
        assert tuple(s["image"].shape) == (1, 16, 16, 8)
        assert tuple(s["label"].shape) == (1, 16, 16, 8)
        values = set(np.unique(s["label"].numpy()).tolist())
        assert values <= {0.0, 1.0, 2.0}, values
        assert torch.isfinite(s["image"]).all()
    assert any(set(np.unique(s["label"].numpy()).tolist()) - {0.0} for s in samples)  # foreground-centred crops


def test_augmentation_pads_small_volume(preprocessed: dict) -> None:
    config = cfg(augmentation={"patch_size": [32, 32, 32], "samples_per_volume": 2})
    assert any(s < 32 for s in preprocessed["image"].shape[1:])
    chain = augmentation(config, num_classes=3)
    chain.set_random_state(seed=1)
    samples = chain(preprocessed)
    assert len(samples) == 2
    assert all(tuple(s["image"].shape) == (1, 32, 32, 32) for s in samples)
    assert all(tuple(s["label"].shape) == (1, 32, 32, 32) for s in samples)


def test_augmentation_is_reproducible_with_seed(preprocessed: dict) -> None:
    config = cfg(augmentation={"patch_size": [16, 16, 8], "samples_per_volume": 2})
    a = augmentation(config, num_classes=3).set_random_state(seed=5)(preprocessed)
    b = augmentation(config, num_classes=3).set_random_state(seed=5)(preprocessed)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x["image"].as_tensor(), y["image"].as_tensor())
        torch.testing.assert_close(x["label"].as_tensor(), y["label"].as_tensor())


ALL_AUGMENTATION = {"rotate_prob": 1.0, "scale_prob": 1.0, "elastic_prob": 1.0, "elastic_magnitude": [1.0, 3.0],
                    "intensity_scale_prob": 1.0, "intensity_shift_prob": 1.0, "gamma_prob": 1.0, "noise_prob": 1.0,
                    "blur_prob": 1.0}


def augmented_on(device: torch.device, preprocessed: dict) -> list[dict]:
    config = cfg(augmentation={"patch_size": [16, 16, 8], "samples_per_volume": 2, **ALL_AUGMENTATION})
    return augmentation(config, num_classes=3, device=device).set_random_state(seed=7)(preprocessed)


def test_augmentation_on_a_device_moves_patches_after_the_crop(preprocessed: dict) -> None:
    config = cfg(augmentation={"patch_size": [16, 16, 8]})
    chain = augmentation(config, num_classes=3, device=torch.device("cpu"))
    names = [type(t).__name__ for t in chain.transforms]
    # after the (random) crop, so CacheDataset still caches whole volumes in host memory and only patches move
    crop, to_device = names.index("RandCropByLabelClassesd"), names.index("ToDeviced")
    assert names[crop + 1 : to_device] == ["DeleteItemsd"]  # only the crop's cached centres are dropped in between
    assert "ToDeviced" not in [type(t).__name__ for t in augmentation(config, num_classes=3).transforms]
    # the same random draws as the host chain: moving the patches changes where they are computed, not what
    host = augmentation(cfg(augmentation={"patch_size": [16, 16, 8], "samples_per_volume": 2, **ALL_AUGMENTATION}),
                        num_classes=3).set_random_state(seed=7)(preprocessed)
    for x, y in zip(augmented_on(torch.device("cpu"), preprocessed), host, strict=True):
        torch.testing.assert_close(x["image"].as_tensor(), y["image"].as_tensor())
        torch.testing.assert_close(x["label"].as_tensor(), y["label"].as_tensor())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to run the augmentation on a GPU")
def test_augmentation_on_the_gpu_matches_the_cpu(preprocessed: dict) -> None:
    gpu = augmented_on(torch.device("cuda"), preprocessed)
    cpu = augmented_on(torch.device("cpu"), preprocessed)
    for x, y in zip(gpu, cpu, strict=True):
        assert x["image"].device.type == "cuda" and x["label"].device.type == "cuda"
        torch.testing.assert_close(x["image"].as_tensor().cpu(), y["image"].as_tensor(), atol=1e-4, rtol=1e-4)
        assert (x["label"].as_tensor().cpu() != y["label"].as_tensor()).float().mean() < 1e-3  # nearest ties may differ


def test_class_centres_are_voxels_of_their_class_and_reproducible(preprocessed: dict) -> None:
    label = preprocessed["label"].numpy().reshape(-1)
    centres = ClassCentresd(num_classes=3, max_per_class=50)(preprocessed)[CLASS_CENTRES]
    assert len(centres) == 3
    for c, where in enumerate(centres):
        assert len(where) == min(50, int((label == c).sum())) and len(set(where.tolist())) == len(where)
        assert (label[where.numpy()] == c).all()
    again = ClassCentresd(num_classes=3, max_per_class=50)(preprocessed)[CLASS_CENTRES]
    assert all(torch.equal(a, b) for a, b in zip(centres, again, strict=True))  # cacheable: same case, same subset
    other = ClassCentresd(num_classes=3, max_per_class=50)({**preprocessed, "case": "another"})[CLASS_CENTRES]
    assert not torch.equal(centres[0], other[0])  # random per case, not one fixed lattice
    # a small class keeps all of its voxels
    assert len(ClassCentresd(num_classes=3, max_per_class=10**9)(preprocessed)[CLASS_CENTRES][2]) == int((label == 2).sum())


def test_patches_are_centred_on_cached_class_voxels_and_carry_no_centres(preprocessed: dict) -> None:
    # all weight on class 2: every patch centre must be a class-2 voxel, found from the cached centres
    config = cfg(augmentation={"patch_size": [8, 8, 8], "samples_per_volume": 4, "class_ratios": [0, 0, 1],
                               **{f"{n}_prob": 0.0 for n in ("rotate", "scale", "flip", "intensity_scale", "intensity_shift",
                                                             "gamma", "noise", "blur")}})
    samples = augmentation(config, num_classes=3).set_random_state(seed=3)(preprocessed)
    for sample in samples:
        assert CLASS_CENTRES not in sample
        assert sample["label"][0, 4, 4, 4] == 2  # the centre voxel of an even-sized patch


@pytest.mark.parametrize("num_classes", [1, 2, 3, 5, 14])
@pytest.mark.parametrize("foreground_ratio", [0.0, 0.33, 0.67, 1.0])
def test_class_ratios(num_classes: int, foreground_ratio: float) -> None:
    ratios = class_ratios(num_classes, foreground_ratio)
    assert len(ratios) == num_classes
    assert sum(ratios) == pytest.approx(1.0)
    assert all(r >= 0 for r in ratios)
    if num_classes > 1:
        assert ratios[0] == pytest.approx(1.0 - foreground_ratio)
        assert len(set(ratios[1:])) == 1  # foreground shared equally
