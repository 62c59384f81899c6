"""The library API a hospital service uses: any input kind, DICOM on its own grid, reports, threads, memory, errors.

Most tests use an "oracle" network (a fixed function marking bright voxels) so the expected mask is
known without training; the command-line test trains a tiny real network for one epoch on a datalist
whose images are DICOM folders, then segments a DICOM folder by series UID.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from conftest import Dataset
from scipy import ndimage
from torch import nn

from medunet.cli import EXIT_ERROR, main
from medunet.config import load_config
from medunet.errors import DataError, MedunetError, OutputExistsError
from medunet.evaluation import dice_per_class
from medunet.inference.segmenter import Segmenter
from medunet.io.image import DicomSource
from medunet.runtime import cpu_has_native_bf16
from medunet.synthetic import CANARY_IDENTIFIERS as CANARIES
from medunet.synthetic import grid_affine, make_phantom, save_nifti, write_dicom_series

SHAPE = (36, 32, 16)
SPACING = (0.9, 0.8, 2.0)
WINDOW = (-200.0, 400.0)
CLASS_NAMES = ["background", "marker"]


class Oracle(nn.Module):
    """Marks voxels brighter than 100 HU (after the CT window) as class 1; records how many calls overlap."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.threshold = (100.0 - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
        self.delay = delay
        self.active = 0
        self.max_active = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        time.sleep(self.delay)
        fg = 50.0 * (x[:, :1] - self.threshold)
        self.active -= 1
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


def make_segmenter(*, delay: float = 0.0, roi: int = 32) -> Segmenter:
    config = load_config(
        None,
        overrides=[
            f"inference.roi_size=[{roi},{roi},{roi}]",
            "inference.sw_batch_size=2",
            "data.target_spacing=[1.2,1.2,1.5]",
            f"data.ct_window=[{WINDOW[0]},{WINDOW[1]}]",
        ],
    )
    return Segmenter(Oracle(delay), config, class_names=CLASS_NAMES, in_channels=1, device=torch.device("cpu"))


def ct_volume(shape: tuple[int, int, int] = SHAPE, *, centre: tuple[float, float, float] = (0.7, 0.3, 0.6)) -> np.ndarray:
    """Air, a soft-tissue body and a bright off-centre block (its world position tells a flip apart)."""
    image = np.full(shape, -1000.0)
    image[2:-2, 2:-2, 1:-1] = 20.0
    middle = [int(round(c * (n - 1))) for c, n in zip(centre, shape)]
    image[tuple(slice(m - 3, m + 3) for m in middle[:2]) + (slice(middle[2] - 2, middle[2] + 2),)] = 500.0
    return image


def dicom_case(
    folder: Path, *, oblique: float = 20.0, axcodes: str = "LPS", **kwargs
) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    image = ct_volume()
    affine = grid_affine(SPACING, axcodes=axcodes, origin=(15.0, -40.0, 60.0), oblique_deg=oblique)
    return image, affine, write_dicom_series(image, affine, folder, **kwargs)


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (pages)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * int(__import__("os").sysconf("SC_PAGE_SIZE"))


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return make_segmenter()


# --------------------------------------------------------------------------- geometry and input kinds


def test_dicom_mask_lies_on_the_dicom_grid_as_simpleitk_reads_it(segmenter: Segmenter, tmp_path: Path) -> None:
    dicom_case(tmp_path / "ct")
    out = segmenter.predict_file(tmp_path / "ct", tmp_path / "mask.nii.gz")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "ct")))
    series = reader.Execute()
    mask = sitk.ReadImage(str(out))
    assert mask.GetSize() == series.GetSize()
    np.testing.assert_allclose(mask.GetOrigin(), series.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mask.GetSpacing(), series.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(mask.GetDirection(), series.GetDirection(), atol=1e-5)
    for index in [(0, 0, 0), (35, 31, 15), (7, 20, 3)]:
        np.testing.assert_allclose(
            mask.TransformIndexToPhysicalPoint(index), series.TransformIndexToPhysicalPoint(index), atol=1e-4
        )
    # voxel for voxel, the mask covers what SimpleITK reads as bright in the DICOM series, and at most one voxel more
    # (the round trip through the network's 1.2 x 1.2 x 1.5 mm grid blurs the edges); any shift or flip would break this
    bright = sitk.GetArrayFromImage(series) > 100
    found = sitk.GetArrayFromImage(mask) == 1
    assert bright.sum() > 50
    assert found[bright].all()
    assert not (found & ~ndimage.binary_dilation(bright)).any()


def test_every_input_kind_gives_the_same_mask(segmenter: Segmenter, tmp_path: Path) -> None:
    image, affine, files = dicom_case(tmp_path / "ct", oblique=0.0, rescale_per_slice=False)
    nifti = save_nifti(image.astype(np.float32), affine, tmp_path / "ct.nii.gz")
    results = {
        "dicom folder": segmenter.predict(tmp_path / "ct"),
        "dicom source": segmenter.predict(
            DicomSource(tmp_path / "ct", series_uid=str(pydicom.dcmread(files[0]).SeriesInstanceUID))
        ),
        "nifti path": segmenter.predict(str(nifti)),
        "nibabel image": segmenter.predict(nib.load(str(nifti))),
        "array + affine": segmenter.predict((image, affine)),
        "channel list": segmenter.predict([nifti]),
    }
    reference = results["nifti path"]
    assert int(np.asarray(reference.dataobj).sum()) > 50
    for kind, mask in results.items():
        assert mask.shape == SHAPE, kind
        np.testing.assert_allclose(mask.affine, affine, atol=1e-4, err_msg=kind)
        np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(reference.dataobj), err_msg=kind)


def test_predict_file_writes_a_run_report(segmenter: Segmenter, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, _, files = dicom_case(tmp_path / "ct", patient_name=CANARIES["PatientName"], patient_id=CANARIES["PatientID"])
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in CANARIES.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    logger = logging.getLogger("medunet")
    caplog.set_level(logging.DEBUG, logger="medunet")
    logger.addHandler(caplog.handler)  # the CLI (if a test ran it before) stops "medunet" records reaching the root logger
    written = segmenter.predict_file(tmp_path / "ct", tmp_path / "out" / "mask.nii.gz", report=tmp_path / "out" / "run.json")
    text = (tmp_path / "out" / "run.json").read_text()
    report = json.loads(text)
    assert report["torch_version"] == torch.__version__ and report["medunet_version"]
    assert report["monai_version"] and report["device"] == "cpu" and report["model"] == "dynunet"
    assert report["precision"] == ("bfloat16" if cpu_has_native_bf16() else "float32")  # auto, as trained
    assert report["classes"] == CLASS_NAMES
    assert report["outputs"] == [str(written)] and written.is_file()
    assert report["inputs"] == [{"source": str(tmp_path / "ct"), "kind": "dicom"}]
    assert {"read", "preprocess", "network", "invert_postprocess", "write", "total"} <= set(report["seconds"])
    assert report["seconds"]["total"] >= report["seconds"]["network"] > 0
    logger.removeHandler(caplog.handler)
    assert "read DICOM series" in caplog.text
    for value in CANARIES.values():
        assert value not in text and value not in caplog.text and value.replace("^", " ") not in caplog.text
    with pytest.raises(OutputExistsError):
        segmenter.predict_file(tmp_path / "ct", tmp_path / "other.nii.gz", report=tmp_path / "out" / "run.json")


# --------------------------------------------------------------------------- serving many calls


def test_concurrent_calls_from_threads_give_the_sequential_results(tmp_path: Path) -> None:
    seg = make_segmenter(delay=0.01)
    inputs = []
    for i, (codes, oblique) in enumerate([("LPS", 0.0), ("RAS", 30.0), ("PIR", 0.0), ("LAS", 10.0)]):
        image = ct_volume(centre=(0.3 + 0.1 * i, 0.7 - 0.1 * i, 0.5))
        inputs.append((image, grid_affine(SPACING, axcodes=codes, oblique_deg=oblique)))
    expected = [np.asarray(seg.predict(x).dataobj) for x in inputs]
    results: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for r in range(3):
                k = (t + r) % len(inputs)
                results[(t, r)] = (k, np.asarray(seg.predict(inputs[k]).dataobj))
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) == 12
    for k, mask in results.values():
        np.testing.assert_array_equal(mask, expected[k])
    assert seg.model.max_active == 1, "the documented model: one network call at a time"


def test_memory_does_not_grow_over_hundreds_of_calls() -> None:
    seg = make_segmenter(roi=32)
    image = ct_volume((40, 40, 20), centre=(0.5, 0.5, 0.5))  # 125 kB as float32: a leaked copy per call is 25 MB
    affine = grid_affine((1.2, 1.2, 1.5))  # the network spacing: resampling stays cheap
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker thread, as in a service with one Segmenter per worker; 4x faster on a busy machine
    try:
        for _ in range(20):  # warm-up: allocator pools, lazy imports
            seg.predict((image, affine))
        before = rss_bytes()
        for _ in range(200):
            mask = seg.predict((image, affine))
        growth = rss_bytes() - before
    finally:
        torch.set_num_threads(threads)
    assert int(np.asarray(mask.dataobj).sum()) > 0
    # measured: well under 1 MiB; a leak of 20 kB per call (a sixth of one copy of this volume) would exceed the bound
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 200 calls"


# --------------------------------------------------------------------------- errors a service can route


def test_bad_inputs_raise_medunet_errors(segmenter: Segmenter, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    two = tmp_path / "two"
    dicom_case(two / "a")
    dicom_case(two / "b", series_description="second")
    broken = tmp_path / "broken"
    _, _, files = dicom_case(broken)
    files[4].unlink()
    cases = {
        "missing file": tmp_path / "nope.nii.gz",
        "not an image": tmp_path / "notes.txt",
        "empty folder": tmp_path / "empty",
        "two series": two,
        "missing slice": broken,
        "2D array": (np.zeros((4, 4)), np.eye(4)),
        "bad affine": (np.zeros((4, 4, 4)), np.eye(3)),
        "wrong type": 42,
    }
    for kind, bad in cases.items():
        with pytest.raises(MedunetError) as err:
            segmenter.predict(bad)  # type: ignore[arg-type]
        assert isinstance(err.value, DataError), (kind, type(err.value))
        assert "\n" not in str(err.value), kind


# --------------------------------------------------------------------------- the command line on DICOM


def test_cli_trains_on_dicom_folders_and_segments_a_chosen_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    entries = []
    for i in range(3):
        image, label = make_phantom((24, 24, 12), seed=i)
        affine = grid_affine((1.5, 1.5, 2.5), axcodes=("LPS", "RAS", "LPS")[i], origin=(i, 0.0, -10.0))
        files = write_dicom_series(image, affine, data / f"dicom_{i}", seed=i, patient_name=CANARIES["PatientName"])
        for path in files:
            ds = pydicom.dcmread(path)
            for keyword, value in CANARIES.items():
                setattr(ds, keyword, value)
            ds.save_as(path)
        save_nifti(label, affine, data / "labels" / f"case_{i}.nii.gz")
        entries.append({"image": f"dicom_{i}", "label": f"labels/case_{i}.nii.gz"})
    (data / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "marker"}, "training": entries}))
    fast = [
        "--set",
        "data.target_spacing=[3.0,3.0,3.0]",
        "--set",
        "augmentation.patch_size=[16,16,16]",
        "--set",
        "model.features=[4,8,16]",
        "--set",
        "train.max_epochs=1",
        "--device",
        "cpu",
    ]
    # the pre-flight `medunet check` reads the DICOM folders too, and finds nothing wrong
    assert main(["-q", "train", str(data / "dataset.json"), "-o", str(tmp_path / "run"), *fast]) == 0

    # a folder holding the CT series and a small second series: refused without --series, segmented with it
    mixed = tmp_path / "incoming" / "study"
    image, affine, files = dicom_case(mixed, patient_name=CANARIES["PatientName"], patient_id=CANARIES["PatientID"])
    write_dicom_series(ct_volume((16, 16, 3)), grid_affine((2.0, 2.0, 5.0)), mixed / "loc", series_description="localizer")
    uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    assert main(["-q", "infer", "-m", str(tmp_path / "run"), "-i", str(mixed), "-o", str(tmp_path / "p1")]) == EXIT_ERROR
    report = json.loads((tmp_path / "p1" / "inference_report.json").read_text())
    assert "choose one with --series" in report["cases"][0]["error"]
    assert (
        main(["infer", "-m", str(tmp_path / "run"), "-i", str(mixed), "-o", str(tmp_path / "p2"), "--series", uid, "--preview"])
        == 0
    )
    assert (tmp_path / "p2" / "study_preview.png").is_file()
    assert (
        main(
            ["-q", "infer", "-m", str(tmp_path / "run"), "-i", str(data / "labels"), "-o", str(tmp_path / "p4"), "--series", uid]
        )
        == EXIT_ERROR
    )
    early = capsys.readouterr()
    assert "--series picks a series in a DICOM folder" in early.err
    mask = nib.load(str(tmp_path / "p2" / "study.nii.gz"))
    assert mask.shape == SHAPE
    np.testing.assert_allclose(mask.affine, affine, atol=1e-4)
    # a folder of DICOM series folders: one case per subfolder
    assert main(["-q", "infer", "-m", str(tmp_path / "run"), "-i", str(data), "-o", str(tmp_path / "p3")]) == 0
    assert sorted(p.name for p in (tmp_path / "p3").glob("*.nii.gz")) == [f"dicom_{i}.nii.gz" for i in range(3)]
    captured = capsys.readouterr()
    texts = [early.out, early.err, captured.out, captured.err] + [
        (tmp_path / p / "inference_report.json").read_text() for p in ("p1", "p2", "p3")
    ]
    texts += [(tmp_path / "run" / name).read_text() for name in ("log.txt",) if (tmp_path / "run" / name).exists()]
    for text in texts:
        for value in CANARIES.values():
            assert value not in text and value.replace("^", " ") not in text


# --------------------------------------------------------------------------- a model a user trained


def test_trained_model_through_the_api_equals_medunet_infer(trained_run: Path, trained_predictions: Path, dataset: Dataset) -> None:
    """Segmenter.from_checkpoint on the session's trained run (tests/conftest.py): the CLI's masks, on the input grid, Dice >= 0.8."""
    segmenter = Segmenter.from_checkpoint(trained_run, device="cpu")
    assert segmenter.class_names == ["background", "organ", "vessel"]
    for name, image_path, label_path in dataset.test_cases:
        image = nib.load(image_path)
        mask = segmenter.predict(image_path)
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
        predicted = np.asarray(mask.dataobj)
        np.testing.assert_array_equal(predicted, np.asarray(nib.load(trained_predictions / f"{name}.nii.gz").dataobj))
        assert dice_per_class(predicted, np.asarray(nib.load(label_path).dataobj), 3).min() > 0.8, name
        # an in-memory (array, affine) pair gives the file's mask
        np.testing.assert_array_equal(np.asarray(segmenter.predict((np.asarray(image.dataobj), image.affine)).dataobj), predicted)
