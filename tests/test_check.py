"""`medunet check`: every bad case of a datalist reported in one run, with the right severity and a useful message."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medunet.check import CheckReport, check_datalist
from medunet.cli import EXIT_ERROR, main
from medunet.errors import DataError
from medunet.synthetic import grid_affine, save_nifti, write_dataset

SHAPE = (16, 16, 12)
PRESETS = Path(__file__).resolve().parents[1] / "configs"


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


def save_with_sform(array: np.ndarray, sform: np.ndarray, path: Path) -> None:
    """A file whose sform (what readers use) is degenerate, e.g. a zero spacing, which nibabel cannot make a qform of."""
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    header.set_qform(grid_affine(), code=1)
    header.set_sform(sform, code=1)
    nib.save(nib.Nifti1Image(array, None, header), str(path))


def corrupt_ct_dataset(root: Path) -> Path:
    """A 3-class CT datalist with one problem per training case (phantom_001..017), clean cases around them."""
    datalist = write_dataset(root, num_train=19, num_test=3, shape=SHAPE, num_classes=3)
    raw = json.loads(datalist.read_text())
    tr, ts = root / "imagesTr", root / "imagesTs"
    lab = root / "labelsTr"

    def image(i: int) -> Path:
        return tr / f"phantom_{i:03d}.nii.gz"

    def label(i: int) -> Path:
        return lab / f"phantom_{i:03d}.nii.gz"

    image(1).unlink()                                             # missing file
    data = image(2).read_bytes()
    image(2).write_bytes(data[: len(data) // 2])                  # truncated gzip
    img, aff = load(image(3))
    save_nifti(np.stack([img, img], axis=-1), aff, image(3))      # 4D
    shutil.copy(image(4), tr / "phantom_004_b.nii.gz")            # 2 channels, 1 declared
    raw["training"][4]["image"] = ["imagesTr/phantom_004.nii.gz", "imagesTr/phantom_004_b.nii.gz"]
    seg, aff = load(label(5))
    save_nifti(seg[:, :, :-2], aff, label(5))                     # label shape
    seg, aff = load(label(6))
    shifted = aff.copy()
    shifted[:3, 3] += (5.0, 0.0, 0.0)
    save_nifti(seg, shifted, label(6))                            # label origin 5 mm off
    seg, aff = load(label(7))
    flipped = aff.copy()
    flipped[:3, 0] *= -1
    save_nifti(seg, flipped, label(7))                            # label direction flipped
    seg, aff = load(label(8))
    seg[:2, :2, :2] = 7
    save_nifti(seg, aff, label(8))                                # label value 7 (8 voxels), 3 classes
    seg, aff = load(label(9))
    save_nifti(np.zeros_like(seg), aff, label(9))                 # all background
    img, aff = load(image(10))
    img[0, 0, :5] = np.nan
    img[1, 0, 0] = np.inf
    save_nifti(img, aff, image(10))                               # 6 non-finite voxels
    sheared = grid_affine((1.5, 1.5, 2.5))
    sheared[0, 2] = 0.8                                           # gantry tilt
    for path in (image(11), label(11)):
        save_nifti(load(path)[0], sheared, path)
    for path in (image(12), label(12)):
        save_with_sform(load(path)[0], grid_affine((1.5, 1.5, 0.0)), path)  # spacing 0
    for path in (image(13), label(13)):
        save_nifti(load(path)[0], grid_affine((1.5, 1.5, 50.0)), path)      # spacing 50 mm
    img, aff = load(image(14))
    img[3, 3, 3] = 30000.0
    save_nifti(img, aff, image(14))                               # CT max 30000
    shutil.copy(image(0), image(15))                              # duplicate of phantom_000's image (and label)
    shutil.copy(label(0), label(15))
    seg, aff = load(label(16))
    save_nifti(seg.astype(np.float32) * 0.5, aff, label(16))      # non-integer label values
    raw["validation"] = [raw["training"].pop(18)]                 # a clean validation case
    raw["test"].append("imagesTr/phantom_000.nii.gz")             # the same file listed twice
    img, aff = load(ts / "phantom_021.nii.gz")
    img[2, 2, 2] = np.nan
    save_nifti(img, aff, ts / "phantom_021.nii.gz")               # test images get the image checks
    datalist.write_text(json.dumps(raw, indent=2))
    return datalist


@pytest.fixture(scope="module")
def ct_datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return corrupt_ct_dataset(tmp_path_factory.mktemp("check-ct"))


@pytest.fixture(scope="module")
def ct_report(ct_datalist: Path) -> CheckReport:
    return check_datalist(ct_datalist, workers=2)


def findings_of(report: CheckReport, case: str, section: str = "training") -> list:
    (summary,) = [c for c in report.cases if c.name == case and c.section == section]
    return summary.findings


@pytest.mark.parametrize(
    ("case", "severity", "code", "path_part", "message_parts"),
    [
        ("phantom_001", "error", "missing_file", "imagesTr/phantom_001", ["does not exist"]),
        ("phantom_002", "error", "truncated", "imagesTr/phantom_002", ["truncated or corrupt"]),
        ("phantom_003", "error", "not_3d", "imagesTr/phantom_003", ["4D", "(16, 16, 12, 2)"]),
        ("phantom_004", "error", "channel_count", "imagesTr/phantom_004", ["2 image channel(s)", "declares 1 (CT)"]),
        ("phantom_005", "error", "label_shape_mismatch", "labelsTr/phantom_005", ["(16, 16, 10) vs (16, 16, 12)"]),
        ("phantom_006", "error", "label_origin_mismatch", "labelsTr/phantom_006", ["5 mm apart", " vs "]),
        ("phantom_007", "error", "label_direction_mismatch", "labelsTr/phantom_007", ["axes RPS vs LPS"]),
        ("phantom_008", "error", "label_values", "labelsTr/phantom_008", ["classes 0..2", "7 (8 voxels)"]),
        ("phantom_009", "warning", "empty_label", "labelsTr/phantom_009", ["all background"]),
        ("phantom_010", "error", "non_finite", "imagesTr/phantom_010", ["6 NaN/Inf voxels"]),
        ("phantom_011", "error", "sheared_affine", "imagesTr/phantom_011", ["gantry tilt", "resample"]),
        ("phantom_012", "error", "invalid_spacing", "imagesTr/phantom_012", ["(1.5, 1.5, 0) mm"]),
        ("phantom_013", "warning", "implausible_spacing", "imagesTr/phantom_013", ["(1.5, 1.5, 50) mm", "0.05..20"]),
        ("phantom_014", "warning", "ct_intensity_range", "imagesTr/phantom_014", ["..30000", "slope/intercept"]),
        ("phantom_015", "warning", "duplicate_image", "imagesTr/phantom_015", ["'phantom_000'"]),
        ("phantom_016", "error", "label_values", "labelsTr/phantom_016", ["0.5 (", "classes 0..2"]),
    ],
)
def test_each_problem_is_found_with_severity_code_and_message(
    ct_report: CheckReport, case: str, severity: str, code: str, path_part: str, message_parts: list[str]
) -> None:
    matching = [f for f in findings_of(ct_report, case) if f.code == code]
    assert matching, f"{case}: no {code} in {[f.code for f in findings_of(ct_report, case)]}"
    finding = matching[0]
    assert finding.severity == severity and finding.case == case
    assert finding.path is not None and path_part in finding.path
    for part in message_parts:
        assert part in finding.message, finding.message
    assert ";" in finding.message  # what is wrong; how to fix it


def test_the_origin_message_names_both_origins(ct_report: CheckReport) -> None:
    (origin,) = [f for f in findings_of(ct_report, "phantom_006") if f.code == "label_origin_mismatch"]
    image_origin = (-30.0 + 6, 20.0, -15.0 - 12)
    assert f"vs ({image_origin[0]:.4g}, {image_origin[1]:.4g}, {image_origin[2]:.4g}) mm" in origin.message


def test_all_bad_cases_reported_in_one_run_and_clean_ones_are_ok(ct_report: CheckReport) -> None:
    status = {(c.name, c.section): c.status for c in ct_report.cases}
    assert status[("phantom_000", "training")] == "ok"
    assert status[("phantom_017", "training")] == "ok"
    assert status[("phantom_018", "validation")] == "ok"
    assert status[("phantom_019", "test")] == "ok"
    bad = {name for (name, section), s in status.items() if s == "error" and section == "training"}
    assert bad == {f"phantom_{i:03d}" for i in (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 16)}
    warned = {name for (name, section), s in status.items() if s == "warning" and section == "training"}
    assert warned == {f"phantom_{i:03d}" for i in (9, 13, 14, 15)}
    assert not ct_report.ok
    # one finding per problem: a missing or unreadable file does not also raise grid or value findings
    assert [f.code for f in findings_of(ct_report, "phantom_001")] == ["missing_file"]
    assert [f.code for f in findings_of(ct_report, "phantom_003")] == ["not_3d"]


def test_test_images_get_image_checks_and_a_file_listed_twice_is_named(ct_report: CheckReport) -> None:
    assert [(f.code, f.severity) for f in findings_of(ct_report, "phantom_021", "test")] == [("non_finite", "error")]
    (twice,) = findings_of(ct_report, "phantom_000", "test")
    assert (twice.code, twice.severity) == ("file_listed_twice", "warning")
    assert "'phantom_000' (training)" in twice.message and twice.path == "imagesTr/phantom_000.nii.gz"


def test_cli_table_json_report_and_exit_status(ct_datalist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report_path = tmp_path / "out" / "check.json"
    assert main(["-q", "check", str(ct_datalist), "--json", str(report_path), "--workers", "2"]) == EXIT_ERROR
    out = capsys.readouterr().out
    assert re.search(r"phantom_008 +training +error +16x16x12 +1.5x1.5x2.5 +1 +1\n", out)
    assert re.search(r"phantom_000 +training +ok +16x16x12 +1.5x1.5x2.5 +1 +0\n", out)
    assert "ERROR   phantom_008: label_values: label values outside the classes 0..2: 7 (8 voxels)" in out
    assert "23 cases: 5 ok, 5 with warnings, 13 with errors" in out

    report = json.loads(report_path.read_text())
    assert report["datalist"] == str(ct_datalist)
    assert report["declared"] == {"labels": {"0": "background", "1": "organ", "2": "vessel"}, "channels": ["CT"]}
    assert report["counts"]["cases"] == 23 and report["counts"]["validation"] == 1 and report["counts"]["test"] == 4
    assert report["counts"]["errors"] == len([f for f in report["findings"] if f["severity"] == "error"]) >= 13
    cases = {(c["case"], c["list"]): c for c in report["cases"]}
    label8 = cases[("phantom_008", "training")]["label"]["values"]
    assert label8["7"] == 8 and sum(label8.values()) == int(np.prod(SHAPE))
    ct14 = cases[("phantom_014", "training")]
    assert ct14["images"][0]["max"] == 30000.0 and ct14["images"][0]["min"] < -900
    assert set(ct14["images"][0]["percentiles"]) == {"0.5", "50", "99.5"}
    assert ct14["shape"] == list(SHAPE) and ct14["spacing_mm"] == [1.5, 1.5, 2.5] and ct14["channels"] == 1
    assert cases[("phantom_010", "training")]["images"][0]["nonfinite_voxels"] == 6
    assert {"severity", "code", "case", "path", "message"} == set(report["findings"][0])
    assert not list(report_path.parent.glob(".*tmp*"))  # written atomically: no temporary left


def test_clean_dataset_exits_0_and_warnings_alone_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    datalist = write_dataset(tmp_path / "clean", num_train=3, num_test=1, shape=SHAPE)
    img, aff = load(datalist.parent / "imagesTr" / "phantom_002.nii.gz")
    save_nifti(img[..., None], aff, datalist.parent / "imagesTr" / "phantom_002.nii.gz")  # X x Y x Z x 1 is 3D
    assert main(["-q", "check", str(datalist)]) == 0
    assert "4 cases: 4 ok, 0 with warnings, 0 with errors (0 errors, 0 warnings)" in capsys.readouterr().out
    seg, aff = load(datalist.parent / "labelsTr" / "phantom_001.nii.gz")
    save_nifti(np.zeros_like(seg), aff, datalist.parent / "labelsTr" / "phantom_001.nii.gz")
    assert main(["-q", "check", str(datalist)]) == 0
    out = capsys.readouterr().out
    assert "WARNING phantom_001: empty_label" in out and "(0 errors, 1 warning)" in out


def test_a_datalist_that_cannot_be_parsed_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "d.json"
    broken.write_text("{not json")
    assert main(["check", str(broken)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "medunet: error:" in err and "not valid JSON" in err and "Traceback" not in err
    with pytest.raises(DataError, match="outside the datalist's folder"):
        broken.write_text(json.dumps({"training": [{"image": "../x.nii.gz", "label": "../x.nii.gz"}]}))
        check_datalist(broken)


def test_mri_channels_grids_intensities_and_no_header_text(tmp_path: Path) -> None:
    datalist = write_dataset(tmp_path, num_train=5, num_test=0, shape=SHAPE, modality="MRI")
    raw = json.loads(datalist.read_text())
    raw["modality"] = {"0": "T1", "1": "FLAIR"}
    tr = tmp_path / "imagesTr"
    for i, entry in enumerate(raw["training"]):
        second = f"imagesTr/flair_{i}.nii.gz"
        img, aff = load(tmp_path / entry["image"])
        if i == 2:
            aff = aff.copy()
            aff[:3, 3] += (0.0, 0.0, 3.0)  # FLAIR not registered to T1
        save_nifti(img * 1.1, aff, tmp_path / second)
        entry["image"] = [entry["image"], second]
    raw["training"][1]["image"] = raw["training"][1]["image"][:1]  # a case without its FLAIR
    img, aff = load(tr / "phantom_003.nii.gz")
    img[0, 0, 0] = -50.0
    save_nifti(img, aff, tr / "phantom_003.nii.gz")  # negative MR values
    blank = nib.Nifti1Image(np.full(SHAPE, 7.0, np.float32), load(tr / "phantom_004.nii.gz")[1])
    blank.header["descrip"] = b"Doe^Jane 1970-01-01"  # header text must never reach the report
    nib.save(blank, str(tr / "phantom_004.nii.gz"))  # constant image
    datalist.write_text(json.dumps(raw))

    report = check_datalist(datalist)
    got = {(f.case, f.code, f.severity) for f in report.findings}
    assert got == {
        ("phantom_001", "channel_count", "error"),
        ("phantom_002", "channel_origin_mismatch", "error"),
        ("phantom_003", "mri_negative_values", "warning"),
        ("phantom_004", "constant_image", "warning"),
    }
    (negative,) = [f for f in report.findings if f.code == "mri_negative_values"]
    assert negative.message.startswith("1 negative voxels (min -50)")
    (channel,) = [f for f in report.findings if f.code == "channel_count"]
    assert "declares 2 (T1, FLAIR)" in channel.message
    assert "Doe" not in json.dumps(report.to_json()) and "Doe" not in report.format_table()


def test_threads_and_processes_give_the_same_report(ct_datalist: Path, ct_report: CheckReport) -> None:
    def comparable(report: CheckReport) -> dict:
        out = report.to_json()
        del out["seconds"]
        return out

    assert comparable(check_datalist(ct_datalist, workers=2, executor="process")) == comparable(ct_report)
    assert comparable(check_datalist(ct_datalist, workers=1)) == comparable(ct_report)


def test_a_clean_20_case_dataset_checks_quickly(tmp_path: Path) -> None:
    datalist = write_dataset(tmp_path, num_train=20, num_test=0, shape=SHAPE)
    start = time.perf_counter()
    report = check_datalist(datalist)
    elapsed = time.perf_counter() - start
    assert report.ok and not report.findings and len(report.cases) == 20
    assert elapsed < 5.0, f"checking 20 tiny cases took {elapsed:.1f} s"


def test_train_refuses_a_broken_datalist_before_training_and_skip_check_skips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    datalist = write_dataset(tmp_path / "data", num_train=3, num_test=0, shape=SHAPE, num_classes=2)
    label = datalist.parent / "labelsTr" / "phantom_001.nii.gz"
    seg, aff = load(label)
    seg[0, 0, 0] = 9
    save_nifti(seg, aff, label)
    args = ["-c", str(PRESETS / "ct.yaml"), "--device", "cpu", "--set", "train.max_epochs=1"]

    run = tmp_path / "run"
    assert main(["train", str(datalist), "-o", str(run), *args]) == EXIT_ERROR
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("medunet: error:")]
    assert "phantom_001" in line and "9 (1 voxels)" in line and "medunet check" in line and "--skip-check" in line
    assert "ERROR   phantom_001: label_values" in err  # the findings are listed above the error line
    assert not run.exists()  # nothing was planned, cached or trained

    skipped = tmp_path / "skipped"
    assert main(["train", str(datalist), "-o", str(skipped), *args, "--skip-check"]) == EXIT_ERROR
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("medunet: error:")]
    # the trainer started (its log exists) and its own loader refused the label; no check ran
    assert "label values outside the classes 0..1: 9 (1 voxels)" in line and "--skip-check" not in line
    assert "label_values" not in err
    assert (skipped / "log.txt").is_file() and not (skipped / "last.pt").exists()


def test_the_pre_training_check_uses_labels_and_path_rules_from_the_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a datalist without "labels" and with absolute paths; the -c file names 2 classes and allows the paths
    datalist = write_dataset(tmp_path / "data", num_train=3, num_test=0, shape=SHAPE, num_classes=2)
    spec = json.loads(datalist.read_text())
    spec.pop("labels", None)
    for entry in spec["training"]:
        entry["image"] = str(datalist.parent / entry["image"])
        entry["label"] = str(datalist.parent / entry["label"])
    datalist.write_text(json.dumps(spec))
    label = datalist.parent / "labelsTr" / "phantom_001.nii.gz"
    seg, aff = load(label)
    seg[0, 0, 0] = 2  # a class the config does not have
    save_nifti(seg, aff, label)
    config = tmp_path / "cfg.yaml"
    config.write_text('data:\n  labels: {"0": background, "1": organ}\n  allow_outside_root: true\n')

    run = tmp_path / "run"
    assert main(["train", str(datalist), "-o", str(run), "-c", str(config), "--device", "cpu"]) == EXIT_ERROR
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("medunet: error:")]
    # not "outside the datalist's folder" (the file allows it) but the label value the file's classes rule out
    assert "phantom_001" in line and "2 (1 voxels)" in line and "--skip-check" in line, line
    assert not run.exists()


def test_dicom_series_folders_are_checked_like_files(tmp_path: Path) -> None:
    from medunet.io.image import read_image
    from medunet.synthetic import make_phantom, write_dicom_series

    raw: dict = {"labels": {"0": "background", "1": "organ"}, "modality": {"0": "CT"}, "training": []}
    for name in ("good", "gap"):
        volume, seg = make_phantom(SHAPE, seed=3)
        files = write_dicom_series(volume, grid_affine((1.0, 1.0, 2.0)), tmp_path / name, seed=1)
        grid = read_image(tmp_path / name)  # the reader's own grid: the label must sit on it
        save_nifti(seg, grid.affine, tmp_path / f"{name}_label.nii.gz")
        raw["training"].append({"image": name, "label": f"{name}_label.nii.gz"})
        if name == "gap":
            files[5].unlink()  # a missing slice
    datalist = tmp_path / "dataset.json"
    datalist.write_text(json.dumps(raw))
    report = check_datalist(datalist)
    assert [(f.case, f.code) for f in report.findings] == [("gap", "dicom_series")]
    assert "slice" in report.findings[0].message
    (good,) = [c for c in report.cases if c.name == "good"]
    assert good.status == "ok" and good.shape == SHAPE and good.images[0].minimum is not None


@pytest.mark.parametrize(
    "values",
    [
        np.array([0, 1, 1, 2, 255, 0, 3] * 50, dtype=np.uint8),
        np.array([-1, 0, 5, 5, -1024, 3000] * 40, dtype=np.int16),
        np.array([0.0, 0.5, 1.0, 2.0, 1.5, 0.0, 100000.0] * 30, dtype=np.float32),
    ],
)
def test_label_value_counts_are_exact_across_chunks(values: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    from medunet.check import inspect

    monkeypatch.setattr(inspect, "_CHUNK", 37)  # many chunks, values split across their borders
    expected = dict(zip(*np.unique(values, return_counts=True)))
    assert inspect._value_counts(values) == {float(v): int(n) for v, n in expected.items()}
