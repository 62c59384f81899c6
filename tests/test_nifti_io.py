"""Tests of medunet.io.nifti and medunet.io.atomic: the array + affine contract and safe writing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medunet.errors import DataError, GeometryError, OutputExistsError
from medunet.io.atomic import atomic_path, atomic_write_text
from medunet.io.geometry import same_grid, spacing_of
from medunet.io.image import load_volume
from medunet.io.nifti import label_dtype, mask_image, write_mask
from medunet.synthetic import grid_affine

SHAPE = (10, 12, 8)
OBLIQUE = grid_affine((0.8, 0.9, 2.5), axcodes="LPS", origin=(12.5, -40.0, 7.25), oblique_deg=12.0)


def save(array: np.ndarray, path: Path, affine: np.ndarray = OBLIQUE, *, qform_code: int = 1, sform_code: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.header.set_qform(affine, code=qform_code)
    image.header.set_sform(affine, code=sform_code)
    nib.save(image, str(path))
    return path


def ramp(shape: tuple[int, ...] = SHAPE, offset: float = 0.0) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) + offset


def assert_only(folder: Path, expected: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == expected


# --- load_volume -------------------------------------------------------------------------


def test_load_volume_channel_first_with_file_affine(tmp_path: Path) -> None:
    array = ramp()
    path = save(array, tmp_path / "img.nii.gz")
    volume, reference = load_volume(path, case="c1")
    assert isinstance(volume, MetaTensor)
    assert tuple(volume.shape) == (1, *SHAPE)
    assert volume.dtype == torch.float32
    np.testing.assert_array_equal(volume[0].numpy(), array)
    file_affine = nib.load(str(path)).affine
    np.testing.assert_array_equal(volume.affine.numpy(), file_affine)  # exactly the file's affine
    np.testing.assert_allclose(file_affine, OBLIQUE, atol=1e-5)
    np.testing.assert_array_equal(reference.affine, file_affine)
    assert reference.shape == SHAPE


def test_load_volume_from_in_memory_image() -> None:
    image = nib.Nifti1Image(ramp(), OBLIQUE)
    volume, reference = load_volume(image)
    assert reference is image
    np.testing.assert_array_equal(volume.affine.numpy(), image.affine)


def test_load_volume_applies_scaling(tmp_path: Path) -> None:
    image = nib.Nifti1Image(np.arange(8, dtype=np.int16).reshape(2, 2, 2), np.eye(4))
    image.header.set_slope_inter(2.0, -1000.0)
    nib.save(image, str(tmp_path / "ct.nii.gz"))
    volume, _ = load_volume(tmp_path / "ct.nii.gz")
    np.testing.assert_allclose(volume[0].numpy().ravel(), np.arange(8) * 2.0 - 1000.0)


def test_load_volume_multichannel_in_order(tmp_path: Path) -> None:
    t1 = save(ramp(), tmp_path / "t1.nii.gz")
    flair = save(ramp(offset=1000.0), tmp_path / "flair.nii")
    volume, _ = load_volume([t1, flair], case="p")
    assert tuple(volume.shape) == (2, *SHAPE)
    assert float(volume[0].min()) == 0.0
    assert float(volume[1].min()) == 1000.0


def test_trailing_singleton_4d_accepted(tmp_path: Path) -> None:
    array = ramp()
    path = save(array[..., None], tmp_path / "img4d.nii.gz")
    assert nib.load(str(path)).shape == (*SHAPE, 1)
    volume, _ = load_volume(path)
    assert tuple(volume.shape) == (1, *SHAPE)
    np.testing.assert_array_equal(volume[0].numpy(), array)


def test_true_4d_refused(tmp_path: Path) -> None:
    path = save(np.zeros((*SHAPE, 2), np.float32), tmp_path / "dwi.nii.gz")
    with pytest.raises(DataError, match="4D") as info:
        load_volume(path, case="case_7")
    assert "case_7" in str(info.value)
    assert str(path) in str(info.value)


def test_2d_refused(tmp_path: Path) -> None:
    path = save(np.zeros((16, 16), np.float32), tmp_path / "slice.nii.gz")
    with pytest.raises(DataError, match="2D") as info:
        load_volume(path, case="case_8")
    assert "case_8" in str(info.value)
    assert str(path) in str(info.value)


def test_nan_voxels_refused_with_count(tmp_path: Path) -> None:
    array = ramp()
    array[0, 0, 0] = array[1, 2, 3] = np.nan
    array[4, 4, 4] = np.inf
    path = save(array, tmp_path / "nan.nii.gz")
    with pytest.raises(DataError, match="3 NaN/Inf voxels") as info:
        load_volume(path, case="c")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["big.nii.gz", "big.nii"])
def test_truncated_file_refused_quickly(tmp_path: Path, name: str) -> None:
    array = np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32)  # barely compressible
    path = save(array, tmp_path / name)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    start = time.perf_counter()
    with pytest.raises(DataError, match="truncated|corrupt|cannot read") as info:
        load_volume(path, case="trunc")
    assert time.perf_counter() - start < 5.0
    assert str(path) in str(info.value)
    assert "trunc" in str(info.value)


def test_header_declaring_huge_volume_refused_before_reading(tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 3000))  # 2.7e12 voxels declared (dims are int16)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\x00" * 4 + b"\x00" * 64)  # header, empty extension flag, a few bytes
    start = time.perf_counter()
    with pytest.raises(DataError, match="more than medunet accepts") as info:
        load_volume(path, case="h")
    assert time.perf_counter() - start < 5.0
    assert str(path) in str(info.value)


def test_sheared_affine_refused_rotated_accepted(tmp_path: Path) -> None:
    sheared = grid_affine((1.0, 1.0, 2.0))
    sheared[0, 2] = 0.3  # gantry tilt: the slice axis leans into x
    path = save(ramp(), tmp_path / "tilt.nii.gz", sheared, qform_code=0, sform_code=1)
    with pytest.raises(DataError, match="sheared") as info:
        load_volume(path, case="tilt")
    assert str(path) in str(info.value)
    load_volume(save(ramp(), tmp_path / "oblique.nii.gz"))  # a rotated (oblique) grid is orthogonal: fine


def test_zero_byte_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty") as info:
        load_volume(path, case="z")
    assert str(path) in str(info.value)


def test_garbage_with_nifti_name_refused(tmp_path: Path) -> None:
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(b"this is not a nifti file at all" * 20)
    with pytest.raises(DataError, match="cannot read NIfTI header") as info:
        load_volume(path)
    assert str(path) in str(info.value)
    cause = info.value.__cause__  # nibabel's own error stays attached, for --debug's traceback
    assert cause is not None and f"({type(cause).__name__}" in str(info.value)


@pytest.mark.parametrize("name", ["scan.mha", "scan.nrrd", "scan.nii.zip", "scan"])
def test_non_nifti_extension_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x00" * 400)
    with pytest.raises(DataError, match="not a NIfTI") as info:
        load_volume(path)
    assert str(path) in str(info.value)


def test_missing_file_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        load_volume(tmp_path / "gone.nii.gz", case="g")
    assert str(tmp_path / "gone.nii.gz") in str(info.value)


def test_channel_shape_mismatch_refused(tmp_path: Path) -> None:
    t1 = save(ramp(), tmp_path / "t1.nii.gz")
    flair = save(ramp((10, 12, 9)), tmp_path / "flair.nii.gz")
    with pytest.raises(DataError, match="channel grid differs") as info:
        load_volume([t1, flair], case="p")
    assert str(flair) in str(info.value)
    assert "(10, 12, 9)" in str(info.value)


def test_channel_affine_mismatch_refused(tmp_path: Path) -> None:
    shifted = OBLIQUE.copy()
    shifted[:3, 3] += (0.0, 0.0, 5.0)
    t1 = save(ramp(), tmp_path / "t1.nii.gz")
    flair = save(ramp(), tmp_path / "flair.nii.gz", shifted)
    with pytest.raises(DataError, match="channel grid differs") as info:
        load_volume([t1, flair], case="p")
    assert str(flair) in str(info.value)


def test_same_grid_tolerance() -> None:
    a = grid_affine((1.0, 1.0, 3.0))
    b = a.copy()
    b[0, 3] += 1e-4
    assert same_grid(a, b)
    b[0, 3] += 0.5
    assert not same_grid(a, b)
    np.testing.assert_allclose(spacing_of(OBLIQUE), (0.8, 0.9, 2.5))


# --- label dtype and masks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_classes, dtype", [(2, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (70000, np.uint32)]
)
def test_label_dtype(num_classes: int, dtype: type) -> None:
    assert label_dtype(num_classes) == np.dtype(dtype)
    assert np.iinfo(label_dtype(num_classes)).max >= num_classes - 1


@pytest.mark.parametrize("qform_code, sform_code", [(1, 1), (1, 2), (2, 0), (0, 1), (1, 4)])
def test_write_mask_keeps_grid_and_codes(tmp_path: Path, qform_code: int, sform_code: int) -> None:
    ref_path = save(ramp(), tmp_path / "in" / "img.nii.gz", qform_code=qform_code, sform_code=sform_code)
    reference = nib.load(str(ref_path))
    labels = (ramp() % 3).astype(np.int64)
    out = write_mask(labels, reference, tmp_path / "out" / "mask.nii.gz", num_classes=3)
    assert out == tmp_path / "out" / "mask.nii.gz"
    assert_only(tmp_path / "out", {"mask.nii.gz"})  # no temporary files left behind

    written = nib.load(str(out))
    assert written.shape == SHAPE
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)
    assert np.asanyarray(written.dataobj).dtype == np.uint8
    np.testing.assert_array_equal(written.affine, reference.affine)
    assert int(written.header["qform_code"]) == qform_code
    assert int(written.header["sform_code"]) == sform_code
    np.testing.assert_allclose(written.header.get_qform(), reference.header.get_qform(), atol=1e-6)
    np.testing.assert_allclose(written.header.get_sform(), reference.header.get_sform(), atol=1e-6)
    # the label file reads back on the same grid through medunet itself
    volume, _ = load_volume(out)
    np.testing.assert_array_equal(volume.affine.numpy(), load_volume(ref_path)[0].affine.numpy())


def test_write_mask_from_4d_singleton_reference(tmp_path: Path) -> None:
    reference = nib.load(str(save(ramp()[..., None], tmp_path / "img.nii.gz")))
    out = write_mask(np.ones(SHAPE, np.uint8), reference, tmp_path / "mask.nii.gz", num_classes=2)
    assert nib.load(str(out)).shape == SHAPE


def test_write_mask_many_classes_uses_wider_dtype(tmp_path: Path) -> None:
    reference = nib.load(str(save(ramp(), tmp_path / "img.nii.gz")))
    labels = np.full(SHAPE, 299, dtype=np.int64)
    out = write_mask(labels, reference, tmp_path / "mask.nii.gz", num_classes=300)
    written = nib.load(str(out))
    assert written.get_data_dtype() == np.uint16
    assert int(np.asanyarray(written.dataobj).max()) == 299


def test_write_mask_refuses_existing_file(tmp_path: Path) -> None:
    reference = nib.load(str(save(ramp(), tmp_path / "img.nii.gz")))
    target = tmp_path / "out" / "mask.nii.gz"
    write_mask(np.zeros(SHAPE, np.uint8), reference, target, num_classes=2)
    before = target.read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        write_mask(np.ones(SHAPE, np.uint8), reference, target, num_classes=2)
    assert target.read_bytes() == before
    assert_only(tmp_path / "out", {"mask.nii.gz"})
    write_mask(np.ones(SHAPE, np.uint8), reference, target, num_classes=2, overwrite=True)
    assert int(np.asanyarray(nib.load(str(target)).dataobj).min()) == 1
    assert_only(tmp_path / "out", {"mask.nii.gz"})


def test_mask_shape_mismatch_is_geometry_error(tmp_path: Path) -> None:
    reference = nib.load(str(save(ramp(), tmp_path / "img.nii.gz")))
    with pytest.raises(GeometryError, match="differs"):
        mask_image(np.zeros((10, 12, 9), np.uint8), reference, num_classes=2)
    with pytest.raises(GeometryError):
        write_mask(np.zeros((12, 10, 8), np.uint8), reference, tmp_path / "out" / "mask.nii.gz", num_classes=2)
    assert not (tmp_path / "out" / "mask.nii.gz").exists()
    if (tmp_path / "out").exists():
        assert_only(tmp_path / "out", set())


# --- atomic writing ---------------------------------------------------------------------------------


def test_atomic_path_keeps_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "result.nii.gz"
    target.write_bytes(b"previous content")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path
            assert tmp.name.endswith(".nii.gz")  # writers that pick the format from the suffix still work
            tmp.write_bytes(b"half a fi")
            raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"previous content"
    assert_only(tmp_path, {"result.nii.gz"})


def test_atomic_path_keeps_old_file_on_keyboard_interrupt(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert_only(tmp_path, {"a.txt"})


def test_atomic_path_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert_only(tmp_path / "sub", {"a.txt"})


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_write_honours_umask(tmp_path: Path, umask: int) -> None:
    # a temp file is created 0600; the written file must get the umask's mode (0644, 0640), as a plain write does
    previous = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        atomic_write_text(tmp_path / "atomic.txt", "x")
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert plain.stat().st_mode & 0o777 == expected
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == expected


def test_truncated_uncompressed_nifti_is_refused_before_reading(tmp_path: Path) -> None:
    from medunet.errors import DataError
    from medunet.io.nifti import read_nifti

    path = tmp_path / "short.nii"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        read_nifti(path, case="c1")
