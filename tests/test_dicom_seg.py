"""DICOM SEG output: decoded with highdicom it gives back the mask on the source grid; it validates; it leaks nothing."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from medunet import __version__
from medunet.cli import EXIT_QC_REVIEW, main
from medunet.errors import GeometryError, OutputExistsError
from medunet.inference.outputs import DICOM_OUTPUT_SUFFIXES
from medunet.io.dicom import read_series
from medunet.io.dicom_seg import write_dicom_seg
from medunet.io.nifti import write_mask
from medunet.synthetic import grid_affine, make_phantom, write_dicom_series

CLASSES = ["background", "liver", "lesion"]
LEAK = "LEAKCANARY"  # planted in attributes a SEG must not copy
PATIENT = "PATIENTCANARY"  # planted in patient attributes a SEG must copy (to file it with the patient)


def make_series(folder: Path, *, axcodes: str = "LPS", oblique_deg: float = 0.0, shape=(28, 24, 16)) -> tuple[Path, np.ndarray]:
    """A CT series with shuffled names and per-slice rescale, identifying canaries planted; returns (folder, labels)."""
    image, labels = make_phantom(shape, seed=7, num_classes=3)
    affine = grid_affine((1.1, 0.9, 2.5), axcodes=axcodes, origin=(12.0, -30.0, 45.0), oblique_deg=oblique_deg)
    paths = write_dicom_series(image, affine, folder, patient_name=f"{PATIENT}^Anna", patient_id=f"{PATIENT}-ID")
    for path in paths:  # what a scanner adds that a SEG has no reason to carry
        ds = pydicom.dcmread(path)
        ds.InstitutionName = f"{LEAK} Hospital"
        ds.InstitutionAddress = f"{LEAK} Street 1"
        ds.StationName = f"{LEAK}ST"
        ds.OperatorsName = f"{LEAK}^Op"
        ds.PerformingPhysicianName = f"{LEAK}^Perf"
        ds.ReferringPhysicianName = f"{LEAK}^Ref"
        ds.DeviceSerialNumber = f"{LEAK}SN"
        ds.save_as(path)
    return folder, labels


def reference_volume(mask_path: Path) -> hd.Volume:
    """The NIfTI mask as read by nibabel, as a highdicom volume in DICOM patient (LPS) coordinates."""
    mask = nib.load(mask_path)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ mask.affine
    return hd.Volume(np.asarray(mask.dataobj), lps, coordinate_system="PATIENT")


def decoded_on(seg_path: Path, mask_path: Path) -> np.ndarray:
    """The SEG decoded by highdicom and placed on the NIfTI mask's grid by highdicom (permute, flip, pad; no resampling)."""
    seg = hd.seg.segread(seg_path)
    volume = seg.get_volume(combine_segments=True)
    return volume.match_geometry(reference_volume(mask_path)).array


@pytest.mark.parametrize("axcodes,oblique", [("LPS", 0.0), ("RAS", 0.0), ("PIR", 0.0), ("LPS", 25.0)])
def test_seg_decodes_to_the_nifti_mask_on_the_source_grid(tmp_path: Path, axcodes: str, oblique: float) -> None:
    folder, labels = make_series(tmp_path / "series", axcodes=axcodes, oblique_deg=oblique)
    series = read_series(folder)
    mask_path = write_mask(labels, series.image, tmp_path / "mask.nii.gz", num_classes=3)
    seg_path = write_dicom_seg(labels, series, CLASSES, tmp_path / "case.seg.dcm", model_name="tiny")

    assert np.array_equal(decoded_on(seg_path, mask_path), np.asarray(nib.load(mask_path).dataobj))
    # frame by frame against the source files: write_dicom_series puts slice k, as (rows, columns), in file k
    seg = hd.seg.segread(seg_path)
    files = sorted(folder.iterdir(), key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    frames = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    assert np.array_equal(frames, np.transpose(labels, (2, 1, 0)))


def test_seg_attributes_reference_the_source_and_name_the_segments(tmp_path: Path) -> None:
    folder, labels = make_series(tmp_path / "series")
    series = read_series(folder)
    seg_path = write_dicom_seg(labels, series, {0: "background", 1: "liver", 2: "lesion"}, tmp_path / "c.seg.dcm", model_name="liver-v3")
    seg = pydicom.dcmread(seg_path)
    source = series.datasets[0]

    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.SegmentationType == "BINARY"
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "liver"), (2, "lesion")]
    for segment in seg.SegmentSequence:
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentAlgorithmName == "liver-v3"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("liver-v3", __version__)
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        category = segment.SegmentedPropertyCategoryCodeSequence[0]
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "85756007")  # Tissue
        assert (kind.CodingSchemeDesignator, kind.CodeValue) == ("SCT", "85756007")
    assert (seg.Manufacturer, seg.SoftwareVersions) == ("medunet", __version__)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    assert {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == {
        str(d.SOPInstanceUID) for d in series.datasets
    }
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.SeriesInstanceUID != series.series_uid
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert (seg.PatientID, str(seg.PatientName)) == (source.PatientID, str(source.PatientName))
    # every frame references the source slice at its position
    positions = {str(d.SOPInstanceUID): [float(v) for v in d.ImagePositionPatient] for d in series.datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient], positions[uid], atol=1e-3)
    # only slices with foreground are encoded (per segment); the volume still decodes whole
    present = sum(int((labels[:, :, k] == c).any()) for k in range(labels.shape[2]) for c in (1, 2))
    assert int(seg.NumberOfFrames) == present


def test_seg_carries_patient_and_study_but_nothing_else_identifying(tmp_path: Path) -> None:
    folder, labels = make_series(tmp_path / "series")
    seg_path = write_dicom_seg(labels, read_series(folder), CLASSES, tmp_path / "c.seg.dcm", model_name="tiny")
    raw = seg_path.read_bytes()
    assert PATIENT.encode() in raw  # filed with its patient ...
    assert LEAK.encode() not in raw  # ... but no institution, station, operator, physician or device serial
    assert pydicom.dcmread(seg_path).ReferringPhysicianName == ""


def test_all_frames_and_an_empty_mask(tmp_path: Path) -> None:
    folder, labels = make_series(tmp_path / "series")
    series = read_series(folder)
    full = write_dicom_seg(labels, series, CLASSES, tmp_path / "full.seg.dcm", model_name="t", omit_empty_frames=False)
    assert int(pydicom.dcmread(full).NumberOfFrames) == labels.shape[2] * 2
    empty = np.zeros_like(labels)
    mask_path = write_mask(empty, series.image, tmp_path / "empty.nii.gz", num_classes=3)
    seg_path = write_dicom_seg(empty, series, CLASSES, tmp_path / "empty.seg.dcm", model_name="t")
    assert np.array_equal(decoded_on(seg_path, mask_path), empty)


def test_labels_in_another_voxel_order_land_on_the_same_frames(tmp_path: Path) -> None:
    folder, labels = make_series(tmp_path / "series", axcodes="LPS")
    series = read_series(folder)
    direct = write_dicom_seg(labels, series, CLASSES, tmp_path / "a.seg.dcm", model_name="t")
    canonical = nib.as_closest_canonical(nib.Nifti1Image(labels, series.image.affine))  # RAS voxel order
    assert nib.aff2axcodes(canonical.affine) != nib.aff2axcodes(series.image.affine)
    reordered = dataclasses.replace(series, image=nib.Nifti1Image(np.zeros(canonical.shape, np.float32), canonical.affine))
    other = write_dicom_seg(np.asarray(canonical.dataobj), reordered, CLASSES, tmp_path / "b.seg.dcm", model_name="t")
    uids = [str(d.SOPInstanceUID) for d in series.datasets]
    a = hd.seg.segread(direct).get_pixels_by_source_instance(uids, combine_segments=True)
    b = hd.seg.segread(other).get_pixels_by_source_instance(uids, combine_segments=True)
    assert np.array_equal(a, b) and a.any()


def test_refuses_labels_off_the_grid_and_unknown_values(tmp_path: Path) -> None:
    folder, labels = make_series(tmp_path / "series")
    series = read_series(folder)
    with pytest.raises(GeometryError, match="shape"):
        write_dicom_seg(labels[:, :, :-1], series, CLASSES, tmp_path / "x.dcm", model_name="t")
    moved = series.image.affine.copy()
    moved[0, 3] += 3.0  # 3 mm off: not a whole number of voxels
    shifted = nib.Nifti1Image(np.zeros(series.image.shape, np.float32), moved)
    with pytest.raises(GeometryError, match="not on the source series"):
        write_dicom_seg(labels, dataclasses.replace(series, image=shifted), CLASSES, tmp_path / "x.dcm", model_name="t")
    one_voxel = series.image.affine @ np.array([[1, 0, 0, 1.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # a whole voxel off
    with pytest.raises(GeometryError, match="do not cover"):
        write_dicom_seg(labels, dataclasses.replace(series, image=nib.Nifti1Image(labels, one_voxel)), CLASSES, tmp_path / "x.dcm",
                        model_name="t")
    with pytest.raises(GeometryError, match="resampled"):
        write_dicom_seg(labels, dataclasses.replace(series, resampled=True), CLASSES, tmp_path / "x.dcm", model_name="t")
    bad = labels.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(GeometryError, match=r"\[7\]"):
        write_dicom_seg(bad, series, CLASSES, tmp_path / "x.dcm", model_name="t")
    assert not (tmp_path / "x.dcm").exists()


def test_existing_output_is_kept_unless_overwrite(tmp_path: Path) -> None:
    folder, labels = make_series(tmp_path / "series")
    series = read_series(folder)
    out = tmp_path / "out" / "c.seg.dcm"
    write_dicom_seg(labels, series, CLASSES, out, model_name="t")
    first = out.read_bytes()
    with pytest.raises(OutputExistsError):
        write_dicom_seg(labels, series, CLASSES, out, model_name="t")
    assert out.read_bytes() == first
    write_dicom_seg(np.zeros_like(labels), series, CLASSES, out, model_name="t", overwrite=True)
    assert out.read_bytes() != first
    assert sorted(p.name for p in out.parent.iterdir()) == ["c.seg.dcm"]  # no temporary left behind


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed (Debian package dicom3tools; .ci/run installs it)")
@pytest.mark.parametrize("omit_empty", [True, False])
def test_dciodvfy_finds_no_errors(tmp_path: Path, omit_empty: bool) -> None:
    folder, labels = make_series(tmp_path / "series", oblique_deg=25.0)
    seg_path = write_dicom_seg(labels, read_series(folder), CLASSES, tmp_path / "c.seg.dcm", model_name="tiny",
                               omit_empty_frames=omit_empty)
    run = subprocess.run(["dciodvfy", str(seg_path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    warnings = [line for line in lines if line.startswith("Warning")]
    if warnings:
        print("dciodvfy warnings:\n" + "\n".join(warnings))
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, "\n".join(errors)
    assert "Segmentation" in lines  # it recognised the IOD it checked


@pytest.mark.slow  # the session's trained model (tests/conftest.py)
@pytest.mark.parametrize("formats", ["dicom-seg", "rtstruct"])
def test_dicom_outputs_come_from_the_same_stages_with_a_qc_record_per_case(trained_run: Path, tmp_path: Path, formats: str) -> None:
    """`medunet infer --output-format dicom-seg` / `rtstruct`: every case's report record carries QC (the one a NIfTI run gives),
    --qc-fail, --stats and --preview work without a NIfTI output, and the SEG decodes to the NIfTI run's mask and validates."""
    inputs = tmp_path / "series"
    for i, axcodes in enumerate(("LPS", "RAS")):
        image, _ = make_phantom((48, 48, 32), seed=40 + i, num_classes=3)
        write_dicom_series(image, grid_affine((1.5, 1.5, 2.5), axcodes=axcodes, origin=(12.0, -30.0, 45.0)), inputs / f"case_{i}")
    args = ["-q", "infer", "-m", str(trained_run), "-i", str(inputs), "--device", "cpu"]
    nifti, dicom = tmp_path / "nifti", tmp_path / "dicom"
    assert main([*args, "-o", str(nifti), "--stats", str(nifti / "stats.csv")]) == 0
    code = main([*args, "-o", str(dicom), "--output-format", formats, "--qc-fail", "--stats", str(dicom / "stats.csv"), "--preview"])
    report = json.loads((dicom / "inference_report.json").read_text())
    records = {c["case"]: c["qc"] for c in report["cases"]}
    assert sorted(records) == ["case_0", "case_1"] and all(r is not None and r["flag"] in ("ok", "review") for r in records.values())
    assert report["qc"]["without_qc"] == 0 and report["qc_calibration"]
    assert code == (EXIT_QC_REVIEW if report["qc"]["review"] else 0)  # --qc-fail acts on DICOM outputs too
    expected = {c["case"]: c["qc"] for c in json.loads((nifti / "inference_report.json").read_text())["cases"]}
    assert records == expected  # one prediction and one QC record per case, whatever the output format
    assert (dicom / "stats.csv").read_text() == (nifti / "stats.csv").read_text()  # statistics of the mask in memory
    suffix = DICOM_OUTPUT_SUFFIXES[formats]
    assert sorted(p.name for p in dicom.iterdir()) == sorted(
        ["inference_report.json", "stats.csv", *(f"case_{i}{s}" for i in range(2) for s in (suffix, "_preview.png"))])
    for name in records:
        if formats == "dicom-seg":
            mask_path = nifti / f"{name}.nii.gz"
            assert np.array_equal(decoded_on(dicom / f"{name}.seg.dcm", mask_path), np.asarray(nib.load(mask_path).dataobj))
        if shutil.which("dciodvfy") is not None:
            run = subprocess.run(["dciodvfy", str(dicom / f"{name}{suffix}")], capture_output=True, text=True, timeout=60)
            lines = (run.stdout + run.stderr).splitlines()
            assert not [line for line in lines if line.startswith("Error")], "\n".join(lines)
            assert ("Segmentation" if formats == "dicom-seg" else "RTStructureSet") in lines
