"""Every mask medunet writes lies exactly on its input's grid.

No training: an "oracle" network maps the preprocessed, CT-windowed input to logits
that mark bright voxels as class 1, so the expected mask is known from the input
itself. Synthetic CT volumes (air, a body ellipsoid, an off-centre bright marker) are
written with many grids (RAS, LPS, LAS, permuted PIR, 30 degree oblique, strongly
anisotropic; qform/sform code variants) and each mask is checked against the input
with two independent readers, nibabel and SimpleITK: same shape, affine, qform/sform
and codes, same origin/spacing/direction, an unsigned integer label type, and the
marker found at the same place in world space.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from medunet.config import Config, load_config
from medunet.errors import DataError, OutputExistsError
from medunet.inference.segmenter import Segmenter
from medunet.synthetic import grid_affine

SHAPE = (40, 36, 24)
HU_AIR, HU_BODY, HU_MARKER = -1000.0, 0.0, 600.0
WINDOW = (-200.0, 400.0)
#: Halfway between body and marker, in HU and after windowing (the marker is clipped to the window top).
THRESHOLD_HU = (HU_BODY + min(HU_MARKER, WINDOW[1])) / 2.0
THRESHOLD_NORM = (THRESHOLD_HU - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
#: Marker centre as a fraction of the volume, away from the centre along every axis (a flip moves it far).
MARKER_CENTRE = (0.70, 0.28, 0.66)
MARKER_MM = 6.0
CLASS_NAMES = ["background", "marker"]
ATOL = 1e-5

BASE_OVERRIDES = [
    "inference.roi_size=[32,32,32]",
    "inference.sw_batch_size=2",
    "inference.overlap=0.25",
    "data.target_spacing=[1.3,1.3,1.7]",
    f"data.ct_window=[{WINDOW[0]},{WINDOW[1]}]",
    "data.orientation=RAS",
]


# --------------------------------------------------------------------------- helpers


class Oracle(nn.Module):
    """Deterministic 'network': background logit 0, marker logit gain * (x - threshold) of one channel."""

    def __init__(self, channel: int = 0, threshold: float = THRESHOLD_NORM, gain: float = 50.0) -> None:
        super().__init__()
        self.channel = channel
        self.threshold = threshold
        self.gain = gain
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert x.ndim == 5, x.shape
        fg = self.gain * (x[:, self.channel : self.channel + 1] - self.threshold)
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


def make_config(*extra: str) -> Config:
    return load_config(None, overrides=[*BASE_OVERRIDES, *extra])


def make_segmenter(*extra: str, in_channels: int = 1, channel: int = 0) -> Segmenter:
    return Segmenter(
        Oracle(channel=channel),
        make_config(*extra),
        class_names=CLASS_NAMES,
        in_channels=in_channels,
        device=torch.device("cpu"),
    )


def phantom(spacing: Sequence[float], *, centre: Sequence[float] = MARKER_CENTRE) -> np.ndarray:
    """Air, a body ellipsoid (0 HU) and a bright block (~MARKER_MM wide, >= 2 voxels per axis) inside it."""
    size = np.asarray(SHAPE, dtype=float)
    grids = np.ogrid[tuple(slice(0, s) for s in SHAPE)]
    body = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, (size - 1) / 2, size * 0.46, strict=True)) <= 1.0
    image = np.full(SHAPE, HU_AIR, dtype=np.int16)
    image[body] = HU_BODY
    half = [max(1, int(round(MARKER_MM / s / 2))) for s in spacing]
    middle = [int(round(f * (n - 1))) for f, n in zip(centre, SHAPE, strict=True)]
    block = tuple(slice(m - h, m + h) for m, h in zip(middle, half, strict=True))
    assert body[block].all(), "marker must lie inside the body"
    image[block] = HU_MARKER
    return image


def save_image(array: np.ndarray, affine: np.ndarray, path: Path, *, qform_code: int = 1, sform_code: int = 1) -> Path:
    """Write ``array`` with ``affine`` as qform and sform, with the given codes."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    image.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    loaded = nib.load(str(path))
    assert int(loaded.header["qform_code"]) == qform_code and int(loaded.header["sform_code"]) == sform_code
    return path


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Centroid of a boolean voxel mask, in world (RAS) mm through ``affine``."""
    ijk = np.argwhere(mask).mean(axis=0)
    return nib.affines.apply_affine(affine, ijk)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


def sitk_world_centroid_ras(image: sitk.Image, value: int = 1) -> np.ndarray:
    """Centroid of voxels == value through SimpleITK's own index-to-world transform, as RAS mm."""
    array = sitk.GetArrayFromImage(image)  # (k, j, i)
    kji = np.argwhere(array == value).mean(axis=0)
    ijk = [float(v) for v in kji[::-1]]
    lps = np.asarray(image.TransformContinuousIndexToPhysicalPoint(ijk))
    return lps * np.array([-1.0, -1.0, 1.0])


def assert_same_header_grid(mask_path: Path, image_path: Path) -> np.ndarray:
    """Shape, affine, qform/sform and codes (nibabel), origin/spacing/direction/size (SimpleITK), label type."""
    # ---- nibabel
    image = nib.load(str(image_path))
    mask = nib.load(str(mask_path))
    assert mask.shape == image.shape[:3]
    np.testing.assert_allclose(mask.affine, image.affine, rtol=0, atol=ATOL)
    image_q, image_qcode = image.header.get_qform(coded=True)
    mask_q, mask_qcode = mask.header.get_qform(coded=True)
    image_s, image_scode = image.header.get_sform(coded=True)
    mask_s, mask_scode = mask.header.get_sform(coded=True)
    assert (mask_qcode, mask_scode) == (image_qcode, image_scode)
    if image_qcode:
        np.testing.assert_allclose(mask_q, image_q, rtol=0, atol=ATOL)
    if image_scode:
        np.testing.assert_allclose(mask_s, image_s, rtol=0, atol=ATOL)
    np.testing.assert_allclose(mask.header.get_zooms()[:3], image.header.get_zooms()[:3], rtol=0, atol=ATOL)
    assert mask.get_data_dtype() == np.uint8
    labels = np.asarray(mask.dataobj)
    assert labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= {0, 1}

    # ---- SimpleITK, an independent reader
    s_image = sitk.ReadImage(str(image_path))
    s_mask = sitk.ReadImage(str(mask_path))
    assert s_mask.GetSize() == s_image.GetSize() == tuple(image.shape[:3])
    np.testing.assert_allclose(s_mask.GetOrigin(), s_image.GetOrigin(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(s_mask.GetSpacing(), s_image.GetSpacing(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(s_mask.GetDirection(), s_image.GetDirection(), rtol=0, atol=ATOL)
    assert s_mask.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(s_mask).transpose(2, 1, 0), labels)
    return labels


def assert_on_grid(mask_path: Path, image_path: Path, *, min_dice: float = 0.8, cross_reader: bool = True) -> np.ndarray:
    """All geometry checks of a written mask against its input file; returns the mask array.

    ``cross_reader=False`` skips comparing nibabel's world with SimpleITK's, for headers whose
    world the two readers legitimately disagree on (both codes 0).
    """
    labels = assert_same_header_grid(mask_path, image_path)
    image = nib.load(str(image_path))
    mask = nib.load(str(mask_path))

    # ---- the marker is where the input says it is (nibabel)
    truth = np.asarray(image.dataobj) > THRESHOLD_HU
    found = labels == 1
    assert truth.any() and found.any(), "the marker must be present in the input and found in the mask"
    assert dice(found, truth) > min_dice, f"Dice {dice(found, truth):.3f}"
    tolerance = 0.5 * float(max(image.header.get_zooms()[:3]))
    truth_world = world_centroid(truth, image.affine)
    found_world = world_centroid(found, mask.affine)
    assert np.linalg.norm(found_world - truth_world) <= tolerance, (found_world, truth_world)

    # ---- and where SimpleITK says it is, through ITK's own index-to-world transform
    s_image = sitk.ReadImage(str(image_path))
    s_mask = sitk.ReadImage(str(mask_path))
    s_found_world = sitk_world_centroid_ras(s_mask)
    s_truth_world = sitk_world_centroid_ras(_as_uint8(s_image, sitk.GetArrayFromImage(s_image) > THRESHOLD_HU))
    assert np.linalg.norm(s_found_world - s_truth_world) <= tolerance, (s_found_world, s_truth_world)
    if cross_reader:
        # both readers put the input's marker and the mask's marker at the same world points
        np.testing.assert_allclose(s_found_world, found_world, rtol=0, atol=1e-3)
        np.testing.assert_allclose(s_truth_world, truth_world, rtol=0, atol=1e-3)
        assert np.linalg.norm(s_found_world - truth_world) <= tolerance
    return labels


def _as_uint8(reference: sitk.Image, array_kji: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(array_kji.astype(np.uint8))
    out.CopyInformation(reference)
    return out


@dataclasses.dataclass(frozen=True)
class Grid:
    spacing: tuple[float, float, float]
    axcodes: str = "RAS"
    oblique_deg: float = 0.0
    origin: tuple[float, float, float] = (-23.5, 41.0, -12.25)

    def affine(self) -> np.ndarray:
        return grid_affine(self.spacing, axcodes=self.axcodes, origin=self.origin, oblique_deg=self.oblique_deg)


GRIDS = {
    "RAS": Grid((1.0, 1.2, 1.5)),
    "LPS": Grid((1.1, 0.9, 1.6), "LPS", origin=(31.0, 17.5, -40.0)),
    "LAS": Grid((1.0, 1.0, 2.0), "LAS", origin=(20.0, -10.0, 5.0)),
    "PIR": Grid((1.2, 1.5, 0.9), "PIR", origin=(-7.0, 60.0, 12.0)),
    "oblique30": Grid((1.0, 1.1, 1.4), oblique_deg=30.0),
    "oblique30_LPS": Grid((1.2, 1.0, 1.5), "LPS", oblique_deg=-30.0, origin=(15.0, -5.0, 33.0)),
    "anisotropic": Grid((0.7, 0.7, 5.0)),
    "anisotropic_PIR": Grid((0.7, 5.0, 0.7), "PIR", origin=(3.0, 50.0, -9.0)),
}

#: (qform_code, sform_code) variants, run on the oblique grid (the hardest for a quaternion qform).
CODES = {"q1s1": (1, 1), "qform_only": (1, 0), "sform_only": (0, 1), "q1s2": (1, 2), "q2s4": (2, 4)}


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return make_segmenter()


def write_case(tmp_path: Path, grid: Grid, *, qform_code: int = 1, sform_code: int = 1, name: str = "ct") -> Path:
    return save_image(
        phantom(grid.spacing), grid.affine(), tmp_path / "in" / f"{name}.nii.gz", qform_code=qform_code, sform_code=sform_code
    )


def check_all_entry_points(seg: Segmenter, image_path: Path, out_dir: Path, *, min_dice: float = 0.8) -> np.ndarray:
    """predict_file(path), predict(path) and predict(in-memory image) all give the same on-grid mask."""
    written = seg.predict_file(image_path, out_dir / "mask.nii.gz")
    assert written == out_dir / "mask.nii.gz"
    labels = assert_on_grid(written, image_path, min_dice=min_dice)

    reference = nib.load(str(image_path))
    from_path = seg.predict(image_path)
    assert isinstance(from_path, nib.Nifti1Image)
    assert from_path.shape == reference.shape[:3]
    np.testing.assert_allclose(from_path.affine, reference.affine, rtol=0, atol=ATOL)
    assert from_path.header.get_qform(coded=True)[1] == reference.header.get_qform(coded=True)[1]
    assert from_path.header.get_sform(coded=True)[1] == reference.header.get_sform(coded=True)[1]
    assert from_path.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(from_path.dataobj), labels)
    # what a user does with the returned image: save it, then read it with both readers
    nib.save(from_path, str(out_dir / "from_path.nii.gz"))
    np.testing.assert_array_equal(assert_on_grid(out_dir / "from_path.nii.gz", image_path, min_dice=min_dice), labels)

    in_memory = nib.Nifti1Image(np.asarray(reference.dataobj), reference.affine, reference.header)
    from_memory = seg.predict(in_memory)
    np.testing.assert_allclose(from_memory.affine, in_memory.affine, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(np.asarray(from_memory.dataobj), labels)
    nib.save(from_memory, str(out_dir / "from_memory.nii.gz"))
    assert_on_grid(out_dir / "from_memory.nii.gz", image_path, min_dice=min_dice)
    return labels


def no_temp_files(folder: Path, expected: set[str]) -> None:
    names = {p.name for p in folder.iterdir()}
    assert names == expected, f"unexpected files in {folder}: {sorted(names - expected)}"


# --------------------------------------------------------------------------- orientations and grids


@pytest.mark.parametrize("grid_name", list(GRIDS))
def test_mask_lies_on_input_grid(segmenter: Segmenter, tmp_path: Path, grid_name: str) -> None:
    image_path = write_case(tmp_path, GRIDS[grid_name])
    out = tmp_path / "out"
    out.mkdir()
    check_all_entry_points(segmenter, image_path, out)
    no_temp_files(out, {"mask.nii.gz", "from_path.nii.gz", "from_memory.nii.gz"})


@pytest.mark.parametrize("codes", list(CODES))
def test_qform_sform_codes_are_kept(segmenter: Segmenter, tmp_path: Path, codes: str) -> None:
    qform_code, sform_code = CODES[codes]
    image_path = write_case(tmp_path, GRIDS["oblique30"], qform_code=qform_code, sform_code=sform_code)
    out = tmp_path / "out"
    out.mkdir()
    check_all_entry_points(segmenter, image_path, out)


def test_unknown_qform_and_sform_codes(segmenter: Segmenter, tmp_path: Path) -> None:
    """Both codes 0: each reader falls back to its own default world (nibabel: pixdim with x flipped,
    ITK: identity directions), so only per-reader agreement of mask and input is required."""
    image_path = write_case(tmp_path, GRIDS["oblique30"], qform_code=0, sform_code=0)
    out = tmp_path / "out"
    out.mkdir()
    written = segmenter.predict_file(image_path, out / "mask.nii.gz")
    assert_on_grid(written, image_path, cross_reader=False)


def test_all_air_volume_gives_empty_mask_on_grid(segmenter: Segmenter, tmp_path: Path) -> None:
    """Nothing survives the foreground crop: the mask is still written, empty, on the input grid."""
    grid = GRIDS["oblique30_LPS"]
    image_path = save_image(np.full(SHAPE, HU_AIR, dtype=np.int16), grid.affine(), tmp_path / "in" / "air.nii.gz")
    out = tmp_path / "out"
    written = segmenter.predict_file(image_path, out / "mask.nii.gz")
    labels = assert_same_header_grid(written, image_path)
    assert not labels.any()
    no_temp_files(out, {"mask.nii.gz"})


def test_resampling_really_happens(tmp_path: Path) -> None:
    """Guard for the whole file: the network sees the target spacing, not the input grid."""
    grid = GRIDS["anisotropic"]
    image_path = write_case(tmp_path, grid)
    seg = make_segmenter()
    data = seg._preprocess({"image": [image_path], "case": None})
    pre = data["image"]
    np.testing.assert_allclose(nib.affines.voxel_sizes(np.asarray(pre.affine)), [1.3, 1.3, 1.7], atol=1e-6)
    # foreground crop is active too (air is cropped away), so the inverse must also undo a crop
    assert pre.shape[1:] != SHAPE


# --------------------------------------------------------------------------- config paths


@pytest.mark.parametrize("grid_name", ["oblique30_LPS", "anisotropic"])
def test_no_resampling_path(tmp_path: Path, grid_name: str) -> None:
    seg = make_segmenter("data.target_spacing=null")
    assert seg.config.data.target_spacing is None
    image_path = write_case(tmp_path, GRIDS[grid_name])
    out = tmp_path / "out"
    out.mkdir()
    labels = check_all_entry_points(seg, image_path, out, min_dice=0.99)
    # no interpolation at all: the mask is exactly the thresholded input
    truth = np.asarray(nib.load(str(image_path)).dataobj) > THRESHOLD_HU
    np.testing.assert_array_equal(labels == 1, truth)


@pytest.mark.parametrize("grid_name", ["PIR", "oblique30", "anisotropic"])
def test_label_resampling_path(tmp_path: Path, grid_name: str) -> None:
    seg = make_segmenter("inference.resample_probabilities=false")
    assert seg.config.inference.resample_probabilities is False
    image_path = write_case(tmp_path, GRIDS[grid_name])
    out = tmp_path / "out"
    out.mkdir()
    check_all_entry_points(seg, image_path, out, min_dice=0.7)


def test_no_foreground_crop_path(tmp_path: Path) -> None:
    seg = make_segmenter("data.crop_foreground=false")
    image_path = write_case(tmp_path, GRIDS["LPS"])
    out = tmp_path / "out"
    out.mkdir()
    check_all_entry_points(seg, image_path, out)


# --------------------------------------------------------------------------- multi-channel


def test_multichannel_input_uses_first_channel_and_its_grid(tmp_path: Path) -> None:
    grid = GRIDS["oblique30_LPS"]
    first = save_image(phantom(grid.spacing), grid.affine(), tmp_path / "in" / "ct_0000.nii.gz")
    # second channel: same grid, its bright block in the mirrored corner; the oracle must ignore it
    mirrored = tuple(1.0 - f for f in MARKER_CENTRE)
    second = save_image(phantom(grid.spacing, centre=mirrored), grid.affine(), tmp_path / "in" / "ct_0001.nii.gz")
    seg = make_segmenter(in_channels=2, channel=0)
    out = tmp_path / "out"
    written = seg.predict_file([first, second], out / "mask.nii.gz")
    labels = assert_on_grid(written, first)
    np.testing.assert_array_equal(np.asarray(seg.predict([first, second]).dataobj), labels)
    in_memory = [nib.load(str(first)), nib.load(str(second))]
    np.testing.assert_array_equal(np.asarray(seg.predict(in_memory).dataobj), labels)
    # swapping the channels moves the marker to the second file's block
    swapped = seg.predict_file([second, first], out / "swapped.nii.gz")
    assert_on_grid(swapped, second)
    no_temp_files(out, {"mask.nii.gz", "swapped.nii.gz"})


def test_multichannel_grid_mismatch_is_refused(tmp_path: Path) -> None:
    grid = GRIDS["RAS"]
    first = save_image(phantom(grid.spacing), grid.affine(), tmp_path / "in" / "a.nii.gz")
    moved = grid.affine()
    moved[:3, 3] += 5.0
    second = save_image(phantom(grid.spacing), moved, tmp_path / "in" / "b.nii.gz")
    seg = make_segmenter(in_channels=2)
    with pytest.raises(DataError, match="grid differs"):
        seg.predict_file([first, second], tmp_path / "out" / "mask.nii.gz")
    assert not (tmp_path / "out" / "mask.nii.gz").exists()
    with pytest.raises(DataError, match="channel"):
        seg.predict(first)  # one channel given, two expected


# --------------------------------------------------------------------------- writing


def test_predict_file_refuses_to_overwrite(segmenter: Segmenter, tmp_path: Path) -> None:
    image_path = write_case(tmp_path, GRIDS["LAS"])
    out = tmp_path / "out"
    out.mkdir()
    target = out / "mask.nii.gz"
    target.write_bytes(b"not a mask")
    with pytest.raises(OutputExistsError):
        segmenter.predict_file(image_path, target)
    assert target.read_bytes() == b"not a mask"
    no_temp_files(out, {"mask.nii.gz"})

    assert segmenter.predict_file(image_path, target, overwrite=True) == target
    assert_on_grid(target, image_path)
    first = target.read_bytes()
    with pytest.raises(OutputExistsError):
        segmenter.predict_file(image_path, target)
    assert target.read_bytes() == first
    segmenter.predict_file(image_path, target, overwrite=True)
    assert_on_grid(target, image_path)
    no_temp_files(out, {"mask.nii.gz"})


def test_uncompressed_output_and_new_folder(segmenter: Segmenter, tmp_path: Path) -> None:
    image_path = write_case(tmp_path, GRIDS["PIR"])
    out = tmp_path / "new" / "folder"
    written = segmenter.predict_file(image_path, out / "mask.nii")
    assert written.read_bytes()[344:348] == b"n+1\x00"  # single-file NIfTI-1, uncompressed
    assert_on_grid(written, image_path)
    no_temp_files(out, {"mask.nii"})


def test_failed_prediction_leaves_no_file(tmp_path: Path) -> None:
    image_path = write_case(tmp_path, GRIDS["RAS"])

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    seg = Segmenter(Broken(), make_config(), class_names=CLASS_NAMES, in_channels=1, device=torch.device("cpu"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        seg.predict_file(image_path, out / "mask.nii.gz")
    no_temp_files(out, set())


# --------------------------------------------------------------------------- sheared affines


def sheared_case(tmp_path: Path) -> Path:
    affine = GRIDS["oblique30"].affine()
    affine[0, 1] += 0.3  # voxel axes no longer orthogonal: no qform, no ITK direction can express this
    return save_image(phantom(GRIDS["oblique30"].spacing), affine, tmp_path / "in" / "sheared.nii.gz", qform_code=1, sform_code=1)


def test_sheared_affine_is_refused(segmenter: Segmenter, tmp_path: Path) -> None:
    """A sheared grid (gantry tilt) cannot be written faithfully (qform and ITK drop shear): refuse it."""
    image_path = sheared_case(tmp_path)
    output = tmp_path / "out" / "mask.nii.gz"
    with pytest.raises(DataError, match="sheared") as excinfo:
        segmenter.predict_file(image_path, output)
    assert str(image_path) in str(excinfo.value)
    assert not output.exists()


# --------------------------------------------------------------------------- the oracle itself


def test_oracle_is_called_and_threshold_is_halfway(segmenter: Segmenter, tmp_path: Path) -> None:
    assert THRESHOLD_NORM == pytest.approx(2.0 / 3.0)  # body 0 HU -> 1/3, marker clipped to 400 HU -> 1
    model = segmenter.model
    assert isinstance(model, Oracle)
    before = model.calls
    segmenter.predict(write_case(tmp_path, GRIDS["RAS"]))
    assert model.calls > before
