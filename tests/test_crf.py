"""Dense 3D CRF: hand-made phantoms whose truth is known, the bilateral grid against the exact filter, and the Segmenter."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medunet.config import CrfConfig, load_config
from medunet.errors import ConfigError, DataError
from medunet.inference.segmenter import Segmenter
from medunet.model.networks import build_network
from medunet.postprocessing.crf import BilateralGrid, dense_crf, gaussian_filter
from medunet.synthetic import grid_affine, make_phantom, save_nifti

SPACING = (1.0, 1.0, 1.5)


def phantom(shape: tuple[int, int, int] = (30, 30, 20)) -> tuple[np.ndarray, np.ndarray]:
    """(truth, image): an ellipsoid (class 1) around a smaller one (class 2), distinct intensities plus noise."""
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    centre = [n / 2 for n in shape]
    r2 = lambda a, b, c: ((x - centre[0]) / a) ** 2 + ((y - centre[1]) / b) ** 2 + ((z - centre[2]) / c) ** 2  # noqa: E731
    truth = np.zeros(shape, np.int64)
    truth[r2(10, 9, 6) < 1] = 1
    truth[r2(4, 4, 3) < 1] = 2
    image = np.choose(truth, [0.1, 0.5, 0.85]) + np.random.default_rng(1).normal(0, 0.04, shape)
    return truth, image.astype(np.float32)


def noisy_probabilities(truth: np.ndarray, *, confidence: float, noise: float, seed: int = 0) -> torch.Tensor:
    logits = confidence * np.eye(3)[truth].transpose(3, 0, 1, 2) + np.random.default_rng(seed).normal(0, noise, (3, *truth.shape))
    return torch.softmax(torch.tensor(logits, dtype=torch.float32), dim=0)


def dice(labels: np.ndarray, truth: np.ndarray, k: int) -> float:
    a, b = labels == k, truth == k
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_crf_cleans_up_noisy_probabilities() -> None:
    truth, image = phantom()
    probs = noisy_probabilities(truth, confidence=2.0, noise=1.2)
    refined = dense_crf(probs, image, spacing=SPACING, config=CrfConfig())
    assert refined.shape == probs.shape
    torch.testing.assert_close(refined.sum(0), torch.ones(truth.shape), atol=1e-5, rtol=0)
    before = probs.argmax(0).numpy()
    after = refined.argmax(0).numpy()
    for k in (1, 2):
        assert dice(after, truth, k) > dice(before, truth, k) + 0.15, k
    assert dice(after, truth, 1) > 0.95


def test_the_image_edges_matter() -> None:
    """A thin bright plate predicted with little confidence: the appearance kernel keeps it, smoothness alone erases it."""
    shape = (20, 20, 16)
    truth = np.zeros(shape, np.int64)
    truth[:, :, 7:9] = 1  # 2 voxels (3 mm) thick
    image = np.where(truth == 1, 0.8, 0.2).astype(np.float32) + np.random.default_rng(2).normal(0, 0.02, shape).astype(np.float32)
    logits = 0.6 * np.eye(2)[truth].transpose(3, 0, 1, 2) + np.random.default_rng(3).normal(0, 0.5, (2, *shape))
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float32), dim=0)
    smooth_only = CrfConfig(spatial_sigma_mm=4.0, spatial_weight=4.0, bilateral_weight=0.0)
    with_image = CrfConfig(spatial_sigma_mm=4.0, spatial_weight=1.0, bilateral_weight=4.0, bilateral_sigma_mm=6.0, intensity_sigma=0.1)
    plate = lambda cfg: dice(dense_crf(probs, image, spacing=SPACING, config=cfg).argmax(0).numpy(), truth, 1)  # noqa: E731
    assert plate(with_image) > 0.95
    assert plate(smooth_only) < 0.5


def test_bilateral_grid_matches_the_exact_bilateral_filter() -> None:
    """On a small volume, against the O(N^2) normalised bilateral filter with the widths the grid is documented to give (x1.15)."""
    rng = np.random.default_rng(0)
    shape, spacing, sigma, intensity_sigma = (10, 9, 7), (1.0, 1.2, 2.0), 3.0, 0.15
    feature = np.where(np.arange(10)[:, None, None] < 5, 0.2, 0.7) + rng.normal(0, 0.03, shape)
    values = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    approx = BilateralGrid(torch.tensor(feature, dtype=torch.float32), spacing, sigma, intensity_sigma).filter(values).numpy()
    points = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1).reshape(-1, 3)
    intensity = feature.reshape(-1)
    scale = 1.15**2
    weights = np.exp(-((points[:, None] - points[None]) ** 2).sum(-1) / (2 * sigma**2 * scale)
                     - (intensity[:, None] - intensity[None]) ** 2 / (2 * intensity_sigma**2 * scale))
    exact = (weights @ values.numpy().reshape(2, -1).T / weights.sum(1, keepdims=True)).T.reshape(2, *shape)
    assert np.abs(approx - exact).max() < 0.03
    assert np.abs(values.numpy() - exact).mean() > 0.1  # the filter does something the check can see


def test_gaussian_filter_is_normalised_and_in_millimetres() -> None:
    constant = torch.full((2, 12, 10, 8), 0.3)
    torch.testing.assert_close(gaussian_filter(constant, [2.0, 3.0, 1.0]), constant)
    impulse = torch.zeros(1, 41, 5, 5)
    impulse[0, 20, 2, 2] = 1.0
    spread = gaussian_filter(impulse, [4.0, 0.0, 0.0])[0, :, 2, 2]
    std = float(torch.sqrt((spread * (torch.arange(41) - 20.0) ** 2).sum() / spread.sum()))
    assert abs(std - 4.0) < 0.1


def test_settings_and_inputs_are_checked() -> None:
    with pytest.raises(ConfigError, match="intensity_sigma"):
        CrfConfig(intensity_sigma=0.0)
    with pytest.raises(ConfigError, match="iterations"):
        load_config(None, ["postprocessing.crf.iterations=0"])
    with pytest.raises(DataError, match="same grid"):
        dense_crf(torch.rand(2, 4, 4, 4), torch.rand(4, 4, 5), spacing=(1, 1, 1), config=CrfConfig())
    with pytest.raises(DataError, match="spacing"):
        dense_crf(torch.rand(2, 4, 4, 4), torch.rand(4, 4, 4), spacing=(1, 0, 1), config=CrfConfig())


def test_segmenter_with_crf_writes_the_mask_on_the_exact_input_grid(tmp_path: Path) -> None:
    torch.manual_seed(0)
    overrides = ["inference.roi_size=[32,32,32]", "inference.sw_batch_size=2", "data.target_spacing=[2.0,2.0,2.5]",
                 "data.ct_window=[-200,300]", "model.features=[4,8,16]", "postprocessing.crf.enabled=true"]
    config = load_config(None, overrides)
    model = build_network(config.model, in_channels=1, out_channels=3)
    segmenter = Segmenter(model, config, class_names=["background", "a", "b"], in_channels=1, device=torch.device("cpu"))
    image, _ = make_phantom((30, 26, 14), seed=4, num_classes=3)
    affine = grid_affine((1.3, 0.9, 3.1), axcodes="PIL", origin=(5.0, -12.0, 40.0), oblique_deg=15.0)
    source = save_nifti(image, affine, tmp_path / "ct.nii.gz")
    out = segmenter.predict_file(source, tmp_path / "mask.nii.gz", report=tmp_path / "report.json")
    mask, reference = nib.load(out), nib.load(source)
    assert mask.shape == reference.shape
    np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-6)
    assert json.loads((tmp_path / "report.json").read_text())["seconds"]["crf"] > 0  # it ran (its time is reported per stage)


def test_segmenter_mask_is_the_argmax_of_dense_crf_on_the_network_probabilities(tmp_path: Path) -> None:
    """On an input already on the network grid (RAS, target spacing, no crop), the written mask must be exactly the argmax
    of ``dense_crf`` applied to ``Segmenter.probabilities``, and differ from the argmax without the CRF."""
    torch.manual_seed(0)
    overrides = ["inference.roi_size=[32,32,32]", "inference.sw_batch_size=2", "data.target_spacing=[2.0,2.0,2.5]",
                 "data.ct_window=[-200,300]", "model.features=[4,8,16]", "data.crop_foreground=false",
                 "postprocessing.crf.enabled=true"]
    config = load_config(None, overrides)
    model = build_network(config.model, in_channels=1, out_channels=3)
    segmenter = Segmenter(model, config, class_names=["background", "a", "b"], in_channels=1, device=torch.device("cpu"))
    image, _ = make_phantom((30, 26, 14), seed=4, num_classes=3)
    source = save_nifti(image, grid_affine((2.0, 2.0, 2.5), axcodes="RAS"), tmp_path / "ct.nii.gz")
    written = nib.load(segmenter.predict_file(source, tmp_path / "mask.nii.gz", report=tmp_path / "report.json"))
    mask = np.asarray(written.dataobj)

    pre = segmenter.prepare(source).data["image"]
    assert tuple(pre.shape[1:]) == image.shape  # preprocessing kept the grid: the mask is comparable voxel for voxel
    np.testing.assert_allclose(np.asarray(pre.affine), written.affine, atol=1e-5)
    probs = segmenter.probabilities(torch.as_tensor(pre)[None])[0]
    refined = dense_crf(probs, torch.as_tensor(pre), spacing=(2.0, 2.0, 2.5), config=config.postprocessing.crf)
    expected, without_crf = refined.argmax(0).numpy(), probs.argmax(0).numpy()
    assert int((expected != without_crf).sum()) > 50  # the CRF changes this untrained network's labels: the check can fail
    np.testing.assert_array_equal(mask, expected)
    assert json.loads((tmp_path / "report.json").read_text())["seconds"]["crf"] > 0
