"""DICOM RTSTRUCT output: its contours, read back with pydicom and rasterised on the source slices, give the mask back.

The reader here is independent of the writer: it places each contour on the image named by its
ContourImageSequence using only that file's ImagePositionPatient / ImageOrientationPatient /
PixelSpacing, fills it at pixel centres (skimage.draw.polygon) and combines a slice's contours
by exclusive-or, as planning systems do with nested contours.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from skimage.draw import polygon

from medunet import __version__
from medunet.cli import main
from medunet.errors import GeometryError, OutputExistsError
from medunet.io.dicom import read_series
from medunet.io.rtstruct import write_rtstruct
from medunet.synthetic import grid_affine, make_phantom, write_dicom_series

CLASSES = ["background", "body", "core"]
LEAK = "LEAKCANARY"  # planted in attributes an RTSTRUCT must not copy
PATIENT = "PATIENTCANARY"  # planted in patient attributes it must copy


def shapes_mask(shape: tuple[int, int, int] = (28, 24, 12)) -> np.ndarray:
    """Class 1: a thick-walled box with a hole through every slice; class 2: a block inside the hole (an island in the hole),
    a single voxel and a strip touching the volume's border."""
    labels = np.zeros(shape, np.uint8)
    labels[3:22, 4:20, 2:10] = 1
    labels[7:17, 8:16, 2:10] = 0  # the hole
    labels[10:14, 10:14, 3:9] = 2  # island inside the hole
    labels[25, 2, 5] = 2  # one voxel
    labels[:, 22:, 11] = 2  # along the border
    return labels


def make_series(folder: Path, labels: np.ndarray, *, axcodes: str = "LPS", oblique_deg: float = 0.0) -> Path:
    image = np.where(labels > 0, 60.0, -800.0) + np.random.default_rng(0).normal(0, 5, labels.shape)
    affine = grid_affine((1.1, 0.9, 2.5), axcodes=axcodes, origin=(12.0, -30.0, 45.0), oblique_deg=oblique_deg)
    paths = write_dicom_series(image, affine, folder, patient_name=f"{PATIENT}^Anna", patient_id=f"{PATIENT}-ID")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.InstitutionName = f"{LEAK} Hospital"
        ds.StationName = f"{LEAK}ST"
        ds.OperatorsName = f"{LEAK}^Op"
        ds.ReferringPhysicianName = f"{LEAK}^Ref"
        ds.DeviceSerialNumber = f"{LEAK}SN"
        ds.save_as(path)
    return folder


def source_files(folder: Path) -> list[pydicom.Dataset]:
    """The series' headers in InstanceNumber order (write_dicom_series puts voxel slice k, as (rows, columns), in file k)."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in folder.iterdir()]
    return sorted(headers, key=lambda d: int(d.InstanceNumber))


def rasterise(rtstruct: Path, folder: Path) -> dict[str, np.ndarray]:
    """ROI name -> (slice, row, column) mask on the source images, from the contours alone."""
    images = source_files(folder)
    by_uid = {str(d.SOPInstanceUID): k for k, d in enumerate(images)}
    ds = pydicom.dcmread(rtstruct)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    result = {}
    for roi in ds.ROIContourSequence:
        volume = np.zeros((len(images), int(images[0].Rows), int(images[0].Columns)), bool)
        for contour in roi.get("ContourSequence", []):
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            k = by_uid[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            image = images[k]
            points = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
            assert len(points) == int(contour.NumberOfContourPoints)
            origin = np.asarray([float(v) for v in image.ImagePositionPatient])
            iop = np.asarray([float(v) for v in image.ImageOrientationPatient])
            row_spacing, column_spacing = (float(v) for v in image.PixelSpacing)
            offsets = points - origin
            normal = np.cross(iop[:3], iop[3:])
            np.testing.assert_allclose(offsets @ normal, 0.0, atol=1e-3)  # the contour lies in its image's plane
            columns, rows = offsets @ iop[:3] / column_spacing, offsets @ iop[3:] / row_spacing
            filled = np.zeros(volume.shape[1:], bool)
            filled[polygon(rows, columns, filled.shape)] = True
            volume[k] ^= filled  # nested contours: exclusive-or
        result[names[int(roi.ReferencedROINumber)]] = volume
    return result


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


@pytest.mark.parametrize("axcodes,oblique", [("LPS", 0.0), ("PIR", 0.0), ("LPS", 20.0)])
def test_contours_rasterise_back_to_the_mask(tmp_path: Path, axcodes: str, oblique: float) -> None:
    labels = shapes_mask()
    folder = make_series(tmp_path / "series", labels, axcodes=axcodes, oblique_deg=oblique)
    path = write_rtstruct(labels, read_series(folder), CLASSES, tmp_path / "rs.dcm", model_name="tiny")
    frames = np.transpose(labels, (2, 1, 0))  # (slice, row, column) in file order
    masks = rasterise(path, folder)
    assert list(masks) == ["body", "core"]
    for label, name in ((1, "body"), (2, "core")):
        assert dice(masks[name], frames == label) >= 0.98, name
        assert np.array_equal(masks[name], frames == label), name  # the 0.5 iso-line: exact at pixel centres, holes included


def test_labels_in_another_voxel_order_give_the_same_contours(tmp_path: Path) -> None:
    labels = make_phantom((28, 24, 12), seed=3, num_classes=3)[1]
    folder = make_series(tmp_path / "series", labels)
    series = read_series(folder)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(labels, series.image.affine))  # RAS voxel order
    assert nib.aff2axcodes(canonical.affine) != nib.aff2axcodes(series.image.affine)
    reordered = dataclasses.replace(series, image=nib.Nifti1Image(np.zeros(canonical.shape, np.float32), canonical.affine))
    a = rasterise(write_rtstruct(labels, series, CLASSES, tmp_path / "a.dcm", model_name="t"), folder)
    b = rasterise(write_rtstruct(np.asarray(canonical.dataobj), reordered, CLASSES, tmp_path / "b.dcm", model_name="t"), folder)
    frames = np.transpose(labels, (2, 1, 0))
    for label, name in ((1, "body"), (2, "core")):
        assert np.array_equal(a[name], b[name]) and dice(a[name], frames == label) >= 0.98


def test_references_names_and_no_identifying_equipment(tmp_path: Path) -> None:
    labels = shapes_mask()
    labels[labels == 2] = 0  # "core" absent: still an ROI, without contours
    folder = make_series(tmp_path / "series", labels)
    series = read_series(folder)
    path = write_rtstruct(labels, series, {0: "background", 1: "body", 2: "core"}, tmp_path / "rs.dcm", model_name="hn-v2")
    ds = pydicom.dcmread(path)
    source = series.datasets[0]
    assert (ds.SOPClassUID, ds.Modality) == ("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT")
    assert [(int(r.ROINumber), r.ROIName, r.ROIGenerationAlgorithm) for r in ds.StructureSetROISequence] == [
        (1, "body", "AUTOMATIC"), (2, "core", "AUTOMATIC")]
    assert "ContourSequence" in ds.ROIContourSequence[0] and "ContourSequence" not in ds.ROIContourSequence[1]
    assert [int(o.ReferencedROINumber) for o in ds.RTROIObservationsSequence] == [1, 2]
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == source.FrameOfReferenceUID == ds.FrameOfReferenceUID
    study = frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == source.StudyInstanceUID == ds.StudyInstanceUID
    referenced = study.RTReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series.series_uid != ds.SeriesInstanceUID
    assert sorted(str(i.ReferencedSOPInstanceUID) for i in referenced.ContourImageSequence) == sorted(
        str(d.SOPInstanceUID) for d in series.datasets)
    assert (ds.Manufacturer, ds.SoftwareVersions) == ("medunet", __version__)
    raw = path.read_bytes()
    assert PATIENT.encode() in raw and LEAK.encode() not in raw  # filed with its patient; no site, station, operator, device
    assert ds.ReferringPhysicianName == ""


def test_refuses_off_grid_and_keeps_existing_output(tmp_path: Path) -> None:
    labels = shapes_mask()
    folder = make_series(tmp_path / "series", labels)
    series = read_series(folder)
    moved = series.image.affine.copy()
    moved[0, 3] += 3.0  # not a whole number of voxels
    with pytest.raises(GeometryError, match="not on the source series"):
        write_rtstruct(labels, dataclasses.replace(series, image=nib.Nifti1Image(labels, moved)), CLASSES, tmp_path / "x.dcm",
                       model_name="t")
    with pytest.raises(GeometryError, match="resampled"):
        write_rtstruct(labels, dataclasses.replace(series, resampled=True), CLASSES, tmp_path / "x.dcm", model_name="t")
    assert not (tmp_path / "x.dcm").exists()
    out = write_rtstruct(labels, series, CLASSES, tmp_path / "out" / "rs.dcm", model_name="t")
    first = out.read_bytes()
    with pytest.raises(OutputExistsError):
        write_rtstruct(np.zeros_like(labels), series, CLASSES, out, model_name="t")
    assert out.read_bytes() == first and sorted(p.name for p in out.parent.iterdir()) == ["rs.dcm"]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed (Debian package dicom3tools; .ci/run installs it)")
def test_dciodvfy_finds_no_errors(tmp_path: Path) -> None:
    labels = shapes_mask()
    folder = make_series(tmp_path / "series", labels, oblique_deg=20.0)
    path = write_rtstruct(labels, read_series(folder), CLASSES, tmp_path / "rs.dcm", model_name="tiny")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, "\n".join(errors)
    assert "RTStructureSet" in lines  # it recognised the IOD it checked


def test_infer_writes_an_rtstruct_that_matches_the_nifti_mask(trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The session's trained model (tests/conftest.py) on a CT phantom series like the ones it learned from."""
    image, labels = make_phantom((48, 48, 32), seed=21, num_classes=3)
    folder = tmp_path / "ct_case"
    affine = grid_affine((1.5, 1.5, 2.5), axcodes="LPS", origin=(12.0, -30.0, 45.0))
    write_dicom_series(image, affine, folder, patient_name=f"{PATIENT}^Anna", patient_id=f"{PATIENT}-ID")
    out = tmp_path / "out"
    args = ["infer", "-m", str(trained_run), "-i", str(folder), "-o", str(out), "--device", "cpu"]
    assert main([*args, "--output-format", "nifti,rtstruct,dicom-seg"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ct_case.nii.gz", "ct_case.rtstruct.dcm", "ct_case.seg.dcm", "inference_report.json"]
    predicted = np.asarray(nib.load(out / "ct_case.nii.gz").dataobj)  # read_series keeps write order here: the phantom's voxel order
    for label, name in ((1, "organ"), (2, "vessel")):
        assert dice(predicted == label, labels == label) >= 0.8, name  # the model segments the series it was given
    mask = np.transpose(predicted, (2, 1, 0))
    masks = rasterise(out / "ct_case.rtstruct.dcm", folder)
    assert set(masks) == {"organ", "vessel"}
    for label, name in ((1, "organ"), (2, "vessel")):
        assert dice(masks[name], mask == label) >= 0.98, name
    assert PATIENT not in caplog.text
    assert main([*args, "--output-format", "rtstruct"]) == 1  # exists: kept without --overwrite
