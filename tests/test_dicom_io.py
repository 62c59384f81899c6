"""DICOM series in: slices ordered by position, rescale applied per slice, geometry checked or resampled.

Every series here is written by ``medunet.synthetic.write_dicom_series`` (shuffled, extension-less
file names; per-slice RescaleSlope/Intercept with uint16 values above 32767) and then, where a test
needs it, edited with pydicom to break one thing: a missing slice, uneven spacing, gantry tilt,
mixed orientations or sizes, a multi-frame object, a second series. SimpleITK's GDCM-based series
reader is the independent reference for voxel values and world positions.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from medunet.cli import main
from medunet.errors import DataError
from medunet.io.datalist import load_datalist
from medunet.io.dicom import list_series, read_series
from medunet.io.image import DicomSource, load_volume, read_image
from medunet.synthetic import CANARY_IDENTIFIERS as CANARIES
from medunet.synthetic import grid_affine, make_phantom, save_nifti, write_dicom_series

SHAPE = (40, 36, 12)
SPACING = (0.8, 0.9, 2.5)
#: The largest RescaleSlope write_dicom_series picks is 1/8: values come back within half of it.
VALUE_ATOL = 1 / 16 + 1e-6



def volume(shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> np.ndarray:
    return make_phantom(shape, seed=seed)[0].astype(np.float64)


def write_series(
    folder: Path, *, axcodes: str = "LPS", oblique: float = 0.0, shape=SHAPE, **kwargs
) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    image = volume(shape)
    affine = grid_affine(SPACING, axcodes=axcodes, origin=(12.0, -30.0, 40.0), oblique_deg=oblique)
    return image, affine, write_dicom_series(image, affine, folder, **kwargs)


def edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def in_written_order(read: nib.Nifti1Image, written_affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The read volume re-indexed onto the written volume's voxel order, using only the two affines."""
    mapping = np.linalg.inv(written_affine) @ read.affine  # read voxel -> written voxel
    assert np.allclose(mapping[:3, :3], np.round(mapping[:3, :3]), atol=1e-4), "not the same grid up to axis flips"
    grid = np.indices(read.shape).reshape(3, -1)
    target = np.rint(mapping[:3, :3] @ grid + mapping[:3, 3:]).astype(int)
    out = np.full(shape, np.nan)
    out[tuple(target)] = np.asarray(read.dataobj).reshape(-1)
    return out


def sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def sitk_world_ras(image: sitk.Image, index: tuple[int, int, int]) -> np.ndarray:
    return np.asarray(image.TransformIndexToPhysicalPoint(index)) * np.array([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- reading the right volume


@pytest.mark.parametrize(("axcodes", "oblique"), [("LPS", 0.0), ("RAS", 25.0), ("PIR", 0.0), ("RAI", 0.0)])
def test_series_reads_back_the_written_volume(tmp_path: Path, axcodes: str, oblique: float) -> None:
    image, affine, files = write_series(tmp_path / "ct", axcodes=axcodes, oblique=oblique)
    series = read_series(tmp_path / "ct")
    assert series.image.shape == SHAPE
    assert series.image.get_data_dtype() == np.float32
    assert int(series.image.header["qform_code"]) == 1 and int(series.image.header["sform_code"]) == 1
    back = in_written_order(series.image, affine, SHAPE)
    np.testing.assert_allclose(back, image, atol=VALUE_ATOL)
    # headers come sorted along the slice normal, like the volume's third axis
    normal = np.cross(*np.reshape([float(v) for v in series.datasets[0].ImageOrientationPatient], (2, 3)))
    positions = [float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)) for ds in series.datasets]
    assert positions == sorted(positions) and len(positions) == SHAPE[2]
    assert all("PixelData" not in ds for ds in series.datasets)


def test_a_third_axis_against_the_normal_is_read_in_normal_order(tmp_path: Path) -> None:
    """RAI slices run opposite to the slice normal: the reader reverses them, and the world stays put."""
    _, affine, _ = write_series(tmp_path / "ct", axcodes="RAI")
    series = read_series(tmp_path / "ct")
    mapping = np.linalg.inv(affine) @ series.image.affine
    assert np.allclose(mapping[:3, :3], np.diag([1.0, 1.0, -1.0]), atol=1e-6)


def test_world_positions_and_values_match_simpleitk(tmp_path: Path) -> None:
    write_series(tmp_path / "ct", axcodes="LPS", oblique=30.0)
    series = read_series(tmp_path / "ct")
    reference = sitk_series(tmp_path / "ct")
    assert reference.GetSize() == series.image.shape
    np.testing.assert_allclose(sitk.GetArrayFromImage(reference).transpose(2, 1, 0), series.image.get_fdata(), atol=1e-3)
    for index in [(0, 0, 0), (39, 0, 0), (0, 35, 0), (0, 0, 11), (17, 9, 5), (39, 35, 11)]:
        ours = (series.image.affine @ np.r_[index, 1.0])[:3]
        np.testing.assert_allclose(ours, sitk_world_ras(reference, index), atol=1e-4)


def test_rescale_is_per_slice_and_never_overflows(tmp_path: Path) -> None:
    image, affine, files = write_series(tmp_path / "ct", axcodes="LPS")
    headers = [pydicom.dcmread(p) for p in files]
    assert len({(float(ds.RescaleSlope), float(ds.RescaleIntercept)) for ds in headers}) > 1, "slices must differ in rescale"
    assert all(int(ds.PixelRepresentation) == 0 for ds in headers)  # uint16
    assert max(int(ds.pixel_array.max()) for ds in headers) > 32767  # would wrap if read as int16
    series = read_series(tmp_path / "ct")
    np.testing.assert_allclose(in_written_order(series.image, affine, SHAPE), image, atol=VALUE_ATOL)
    assert series.image.get_fdata().min() < -900  # air survives the negative intercepts


def test_signed_pixels_without_rescale(tmp_path: Path) -> None:
    image, affine, files = write_series(tmp_path / "ct", rescale_per_slice=False)
    assert int(pydicom.dcmread(files[0]).PixelRepresentation) == 1
    back = in_written_order(read_series(tmp_path / "ct").image, affine, SHAPE)
    np.testing.assert_allclose(back, np.rint(image), atol=1e-6)


def test_order_comes_from_positions_not_names_or_instance_numbers(tmp_path: Path) -> None:
    _, _, files = write_series(tmp_path / "ct", shuffle_names=False)
    expected = read_series(tmp_path / "ct").image.get_fdata()
    for k, path in enumerate(files):  # reversed names, constant InstanceNumber
        edit(path, lambda ds: setattr(ds, "InstanceNumber", 1))
        path.rename(tmp_path / "ct" / f"z{len(files) - k:03d}.dcm")
    (tmp_path / "ct" / "README.txt").write_text("not DICOM; ignored")
    np.testing.assert_array_equal(read_series(tmp_path / "ct").image.get_fdata(), expected)


# --------------------------------------------------------------------------- refusing what cannot be represented


def test_missing_slice_is_refused_then_resampled(tmp_path: Path) -> None:
    image, affine, files = write_series(tmp_path / "ct", axcodes="LPS")
    files[5].unlink()
    with pytest.raises(DataError, match=r"about 1 slice\(s\) missing") as err:
        read_series(tmp_path / "ct", case="c1")
    assert str(tmp_path / "ct") in str(err.value) and "allow_resample" in str(err.value)
    series = read_series(tmp_path / "ct", allow_resample=True)
    assert series.resampled and series.image.shape == SHAPE
    back = in_written_order(series.image, affine, SHAPE)
    kept = [k for k in range(SHAPE[2]) if k != 5]
    np.testing.assert_allclose(back[:, :, kept], image[:, :, kept], atol=VALUE_ATOL)
    np.testing.assert_allclose(back[:, :, 5], (image[:, :, 4] + image[:, :, 6]) / 2, atol=VALUE_ATOL)


def test_uneven_spacing_is_refused_then_resampled(tmp_path: Path) -> None:
    image, affine, files = write_series(tmp_path / "ct", axcodes="RAS")
    # move the last four slices 1 mm further along the third axis: one 3.5 mm gap among 2.5 mm ones
    for path in files[8:]:
        edit(
            path,
            lambda ds: setattr(
                ds,
                "ImagePositionPatient",
                [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], str(float(ds.ImagePositionPatient[2]) + 1.0)],
            ),
        )
    with pytest.raises(DataError, match="uneven slice spacing"):
        read_series(tmp_path / "ct")
    series = read_series(tmp_path / "ct", allow_resample=True)
    assert series.image.shape[2] == 12  # round(28.5 mm span / 2.5 mm) + 1
    np.testing.assert_allclose(np.linalg.norm(series.image.affine[:3, 2]), 2.5, atol=1e-6)
    np.testing.assert_allclose(series.image.get_fdata()[:, :, :8], image[:, :, :8], atol=VALUE_ATOL)
    # 20 mm after the first slice lies 5/7 of the way from written slice 7 (17.5 mm) to slice 8 (now 21 mm)
    np.testing.assert_allclose(series.image.get_fdata()[:, :, 8], 2 / 7 * image[:, :, 7] + 5 / 7 * image[:, :, 8], atol=0.1)


def test_gantry_tilt_is_refused_then_resampled_onto_an_orthogonal_grid(tmp_path: Path) -> None:
    """Slices of a known linear field, each shifted along its column direction as a 10 degree tilt would."""
    shape, spacing, tilt = (32, 30, 8), np.array([1.0, 1.2, 3.0]), np.tan(np.radians(10.0))
    affine = grid_affine(tuple(spacing), axcodes="LPS", origin=(-5.0, 8.0, -20.0))
    shift_mm = tilt * spacing[2]  # in-plane shift per slice, along voxel axis 1 (rows)

    def field(points: np.ndarray) -> np.ndarray:
        return 2.0 * points[..., 0] - 3.0 * points[..., 1] + 5.0 * points[..., 2] + 100.0

    grid = np.indices(shape).astype(float)
    world = np.einsum("ij,j...->...i", affine[:3, :3], grid) + affine[:3, 3]
    world += np.einsum("i,...->...i", affine[:3, 1] / spacing[1], shift_mm * grid[2])
    files = write_dicom_series(field(world), affine, tmp_path / "ct", rescale_per_slice=False)
    col_lps = np.array([-1.0, -1.0, 1.0]) * affine[:3, 1] / spacing[1]
    for k, path in enumerate(files):

        def move(ds: pydicom.Dataset, k: int = k) -> None:
            ds.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(ds.ImagePositionPatient, float) + k * shift_mm * col_lps]

        edit(path, move)
    with pytest.raises(DataError, match="gantry tilt of about 10 degrees"):
        read_series(tmp_path / "ct")
    series = read_series(tmp_path / "ct", allow_resample=True)
    out = series.image
    assert abs(np.dot(out.affine[:3, 1], out.affine[:3, 2])) < 1e-9, "the result grid must be orthogonal"
    inside = np.zeros(shape, dtype=bool)
    inside[:, 6:-6, :] = True  # away from the edges the shift moved out of the field of view
    expected = field(np.einsum("ij,j...->...i", out.affine[:3, :3], grid) + out.affine[:3, 3])
    np.testing.assert_allclose(out.get_fdata()[inside], np.rint(expected[inside]), atol=1.0)


def test_mixed_orientation_size_multiframe_and_duplicates_are_refused(tmp_path: Path) -> None:
    _, _, files = write_series(tmp_path / "orient")
    edit(files[3], lambda ds: setattr(ds, "ImageOrientationPatient", ["1", "0", "0", "0", "0", "-1"]))
    with pytest.raises(DataError, match="mixes slice orientations"):
        read_series(tmp_path / "orient")

    image, affine, files = write_series(tmp_path / "size")
    uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, 2] * SHAPE[2]
    write_dicom_series(volume((20, 18, 2)), shifted, tmp_path / "size" / "more", series_uid=uid)
    with pytest.raises(DataError, match="mixes slice sizes"):
        read_series(tmp_path / "size")

    _, _, files = write_series(tmp_path / "dup")
    shutil.copy(files[2], tmp_path / "dup" / "copy_of_slice")
    edit(tmp_path / "dup" / "copy_of_slice", lambda ds: setattr(ds, "SOPInstanceUID", pydicom.uid.generate_uid()))
    with pytest.raises(DataError, match="share a position"):
        read_series(tmp_path / "dup")

    _, _, files = write_series(tmp_path / "mf", shape=(16, 16, 3))

    def make_multiframe(ds: pydicom.Dataset) -> None:
        ds.NumberOfFrames = 3
        ds.PixelData = ds.PixelData * 3

    edit(files[0], make_multiframe)
    for extra in files[1:]:
        extra.unlink()
    with pytest.raises(DataError, match="multi-frame DICOM is not supported"):
        read_series(tmp_path / "mf")
    assert list_series(tmp_path / "mf")[0].multi_frame


def test_several_series_need_a_choice(tmp_path: Path) -> None:
    write_series(tmp_path / "mix", series_description="axial 2.5mm")
    locator = write_dicom_series(
        volume((16, 16, 3)), grid_affine((2.0, 2.0, 5.0)), tmp_path / "mix" / "loc", series_description="localizer"
    )
    loc_uid = pydicom.dcmread(locator[0]).SeriesInstanceUID
    infos = list_series(tmp_path / "mix")
    assert [(i.description, i.num_slices) for i in infos] == [("axial 2.5mm", 12), ("localizer", 3)]
    with pytest.raises(DataError) as err:
        read_series(tmp_path / "mix")
    message = str(err.value)
    assert "2 image series" in message and "--series" in message
    assert all(i.series_uid in message for i in infos) and "'localizer', 3 slice(s)" in message
    assert read_series(tmp_path / "mix", series_uid=loc_uid).image.shape == (16, 16, 3)
    assert read_image(DicomSource(tmp_path / "mix", series_uid=infos[0].series_uid)).shape == SHAPE
    with pytest.raises(DataError, match="no series 1.2.3.4 here"):
        read_series(tmp_path / "mix", series_uid="1.2.3.4")


def test_unreadable_folders_give_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no DICOM files"):
        read_series(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        read_series(tmp_path / "nowhere")
    _, _, files = write_series(tmp_path / "bad", shape=(16, 16, 3))
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) - 300])  # truncated pixel data
    with pytest.raises(DataError, match="cannot"):
        read_series(tmp_path / "bad")
    with pytest.raises(DataError, match="single DICOM file; give the folder"):
        read_image(files[0])
    _, _, files = write_series(tmp_path / "huge", shape=(16, 16, 3))
    for path in files:  # a corrupt header declaring 60000 x 60000 pixels must not allocate 40 GB
        edit(path, lambda ds: (setattr(ds, "Rows", 60000), setattr(ds, "Columns", 60000)))
    with pytest.raises(DataError, match="declares 60000 x 60000 x 3 voxels"):
        read_series(tmp_path / "huge")


# --------------------------------------------------------------------------- compressed transfer syntaxes


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=["rle", "jpeg2000", "jpegls"])
def test_compressed_series_read_like_uncompressed(tmp_path: Path, syntax: pydicom.uid.UID) -> None:
    if syntax == JPEGLSLossless:
        pytest.importorskip("jpeg_ls", reason="encoding JPEG-LS needs pyjpegls (installed with highdicom); decoding does not")
    _, _, files = write_series(tmp_path / "ct", shape=(40, 36, 4))
    expected = read_series(tmp_path / "ct").image.get_fdata()
    for path in files:
        edit(path, lambda ds: ds.compress(syntax))
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_series(tmp_path / "ct").image.get_fdata(), expected)


# --------------------------------------------------------------------------- everywhere an image path is accepted


def test_datalist_image_may_be_a_dicom_folder(tmp_path: Path) -> None:
    image, affine, _ = write_series(tmp_path / "data" / "dicom" / "case_a")
    label = (image > 100).astype(np.uint8)
    save_nifti(label, affine, tmp_path / "data" / "labels" / "case_a.nii.gz")
    (tmp_path / "data" / "dataset.json").write_text(
        '{"labels": {"0": "background", "1": "organ"}, "training": [{"image": "dicom/case_a", "label": "labels/case_a.nii.gz"}]}'
    )
    datalist = load_datalist(tmp_path / "data" / "dataset.json")
    case = datalist.training[0]
    assert case.name == "case_a" and case.image[0].is_dir()
    tensor, reference = load_volume(list(case.image), case=case.name)
    assert tuple(tensor.shape) == (1, *SHAPE)
    np.testing.assert_allclose(reference.affine, read_series(case.image[0]).image.affine)
    from medunet.transforms import LoadCased

    loaded = LoadCased(num_classes=2, in_channels=1)(case.as_dict())  # the training loader's first step: label on the DICOM grid
    assert int(loaded["label"].sum()) == int(label.sum())


# --------------------------------------------------------------------------- no patient identifiers anywhere


def plant_canaries(files: list[Path]) -> None:
    def change(ds: pydicom.Dataset) -> None:
        for keyword, value in CANARIES.items():
            setattr(ds, keyword, value)

    for path in files:
        edit(path, change)


def test_no_patient_identifiers_in_listing_logs_or_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = logging.getLogger("medunet")
    logger.addHandler(caplog.handler)  # the CLI stops "medunet" records from reaching the root logger caplog listens on
    _, _, files = write_series(
        tmp_path / "ct", shape=(20, 20, 6), patient_name=CANARIES["PatientName"], patient_id=CANARIES["PatientID"]
    )
    plant_canaries(files)
    texts = []
    assert main(["dicom", "ls", str(tmp_path / "ct")]) == 0
    assert main(["--debug", "dicom", "ls", "--json", str(tmp_path / "ct")]) == 0
    caplog.set_level(logging.DEBUG, logger="medunet")  # after main(), which sets the level from its flags
    read_series(tmp_path / "ct")
    files[2].unlink()  # now broken: a missing slice, then also a second series
    write_dicom_series(volume((20, 20, 3)), grid_affine(), tmp_path / "ct" / "other", patient_name=CANARIES["PatientName"])
    for kwargs in ({}, {"series_uid": "9.9"}, {"series_uid": str(pydicom.dcmread(files[0]).SeriesInstanceUID)}):
        with pytest.raises(DataError) as err:
            read_series(tmp_path / "ct", **kwargs)
        texts.append(str(err.value))
    read_series(tmp_path / "ct", series_uid=str(pydicom.dcmread(files[0]).SeriesInstanceUID), allow_resample=True)
    assert main(["dicom", "ls", str(tmp_path / "ct")]) == 0
    logger.removeHandler(caplog.handler)
    captured = capsys.readouterr()
    texts += [captured.out, captured.err, caplog.text]
    assert "missing" in texts[2] and "2 image series" in texts[0]
    assert "read DICOM series" in caplog.text and "resampled onto a regular grid" in caplog.text  # the logs were captured
    for text in texts:
        for value in CANARIES.values():
            for fragment in {value, value.replace("^", " "), value.split("^")[0]}:
                assert fragment not in text, f"{fragment!r} leaked into: {text[:200]}"
