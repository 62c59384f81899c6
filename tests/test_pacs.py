"""A real PACS round trip (Orthanc + its DICOMweb plugin on loopback) and ``infer --output-format dicom-seg``.

One tiny model is trained for the module (a real, short training); the SEG stored in Orthanc
must equal a direct local run of the same model on the same series, voxel for voxel.
"""

from __future__ import annotations

import base64
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from orthanc import ORTHANC, PASSWORD, PLUGIN, USER, Orthanc, free_port, needs_orthanc

from medunet.cli import main
from medunet.errors import PacsError
from medunet.net.dicomweb import PASSWORD_ENV, USER_ENV, DicomWebPacs, PacsConnection
from medunet.synthetic import grid_affine, make_phantom, write_dicom_series

NO_MODEL = Path("no-such-run")  # connection and login are checked before the model is loaded

@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    if ORTHANC is None or PLUGIN is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (Debian packages orthanc, orthanc-dicomweb)")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def model(trained_run: Path) -> Path:
    """The session's trained model (tests/conftest.py: ``medunet train -c configs/ct.yaml``), read-only."""
    return trained_run


def ct_series(folder: Path, seed: int) -> tuple[Path, str]:
    """A synthetic CT series (shuffled names, per-slice rescale); returns (folder, StudyInstanceUID)."""
    image, _ = make_phantom((32, 32, 24), seed=seed, num_classes=3)
    affine = grid_affine((1.5, 1.5, 2.5), axcodes="LPS", origin=(20.0, -10.0, 30.0 + seed))
    paths = write_dicom_series(image, affine, folder, seed=seed)
    return folder, str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture(scope="module")
def stored_series(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder, study = ct_series(tmp_path_factory.mktemp("ct") / "series", seed=11)
    orthanc.upload(sorted(folder.iterdir()))
    return folder, study


@pytest.fixture
def login(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)


def decoded_on_mask(seg_bytes: bytes, mask_path: Path, scratch: Path) -> np.ndarray:
    """A SEG decoded by highdicom, put on the NIfTI mask's grid by highdicom (permute/flip/pad only)."""
    scratch.write_bytes(seg_bytes)
    volume = hd.seg.segread(scratch).get_volume(combine_segments=True)
    mask = nib.load(mask_path)
    reference = hd.Volume(np.asarray(mask.dataobj), np.diag([-1.0, -1.0, 1.0, 1.0]) @ mask.affine, coordinate_system="PATIENT")
    return volume.match_geometry(reference).array


def assert_no_secret(text: str) -> None:
    assert PASSWORD not in text
    assert base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in text


@pytest.mark.slow  # the session's trained model
@needs_orthanc
def test_round_trip_stores_a_seg_identical_to_a_local_run(
    orthanc: Orthanc, model: Path, stored_series: tuple[Path, str], login: None, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    folder, study = stored_series
    caplog.set_level(logging.DEBUG)  # urllib3, requests and dicomweb-client debug logs must not carry the login either
    status = main(["pacs", "--url", orthanc.dicomweb, "-m", str(model), "--study", study, "--timeout", "30", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "stored SEG" in out
    assert_no_secret(out + err + caplog.text)

    segs = orthanc.seg_files(study)
    assert len(segs) == 1
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(segs[0]))
    source = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    assert seg.StudyInstanceUID == study and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["organ", "vessel"]

    preds = tmp_path / "local"  # the same model on the same series, directly
    assert main(["-q", "infer", "-m", str(model), "-i", str(folder), "-o", str(preds), "--device", "cpu"]) == 0
    mask_path = preds / f"{folder.name}.nii.gz"
    local = np.asarray(nib.load(mask_path).dataobj)
    assert len(np.unique(local)) == 3  # both segments present: the comparison below is not about an empty mask
    assert np.array_equal(decoded_on_mask(segs[0], mask_path, tmp_path / "stored.dcm"), local)


@needs_orthanc
def test_wrong_password_is_a_clear_error_and_stores_nothing(
    orthanc: Orthanc, stored_series: tuple[Path, str], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, study = stored_series
    before = orthanc.instances()
    wrong = "wrong-CANARY-pw"
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, wrong)
    assert main(["pacs", "--url", orthanc.dicomweb, "-m", str(NO_MODEL), "--study", study, "--device", "cpu"]) == 1
    out, err = capsys.readouterr()
    assert "HTTP 401" in err and PASSWORD_ENV in err
    assert wrong not in out + err
    monkeypatch.delenv(USER_ENV)
    monkeypatch.delenv(PASSWORD_ENV)
    assert main(["pacs", "--url", orthanc.dicomweb, "-m", str(NO_MODEL), "--study", study]) == 1  # no login at all
    assert "HTTP 401" in capsys.readouterr().err
    assert orthanc.instances() == before


@pytest.mark.slow  # the session's trained model
@needs_orthanc
def test_unknown_study_or_series_and_a_broken_series_store_nothing(
    orthanc: Orthanc, model: Path, stored_series: tuple[Path, str], login: None, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, study = stored_series
    broken, broken_study = ct_series(tmp_path / "broken", seed=12)
    files = sorted(broken.iterdir(), key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))
    files[10].unlink()  # a missing slice: the series must be refused, after retrieval, before anything is stored
    orthanc.upload(files[:10] + files[11:])
    before = orthanc.instances()
    base = ["pacs", "--url", orthanc.dicomweb, "-m", str(model), "--device", "cpu"]

    assert main([*base, "--study", "1.2.3.4.5.6.7.8.9"]) == 1
    assert "was not found" in capsys.readouterr().err
    assert main([*base, "--study", study, "--series", "1.2.3.4"]) == 1
    assert "series 1.2.3.4 is not in study" in capsys.readouterr().err
    assert main([*base, "--study", broken_study]) == 1
    assert "missing" in capsys.readouterr().err.lower()
    assert orthanc.instances() == before


def test_unreachable_server_fails_fast_with_a_clear_error(login: None, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    assert main(["pacs", "--url", f"http://127.0.0.1:{port}/dicom-web", "-m", str(NO_MODEL), "--study", "1.2.3", "--retries", "1"]) == 1
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert "cannot connect" in err and "connection refused" in err and "2 attempt(s)" in err
    assert_no_secret(err)


def test_a_silent_server_times_out_within_the_timeout(login: None, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as silent:  # accepts connections (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
        started = time.monotonic()
        assert main(["pacs", "--url", url, "-m", str(NO_MODEL), "--study", "1.2.3", "--timeout", "1"]) == 1
        elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 4
    assert "no answer" in capsys.readouterr().err


def test_credentials_belong_in_the_environment_not_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PacsError, match=USER_ENV) as caught:
        DicomWebPacs(PacsConnection(f"http://{USER}:{PASSWORD}@127.0.0.1:1/dicom-web"))
    assert_no_secret(str(caught.value))
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(PacsError, match=PASSWORD_ENV):
        PacsConnection.from_environment("http://127.0.0.1:1/dicom-web")
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    connection = PacsConnection.from_environment("http://127.0.0.1:1/dicom-web")
    assert_no_secret(repr(connection) + repr(DicomWebPacs(connection)))


@pytest.mark.slow  # the session's trained model
def test_infer_writes_a_seg_and_a_nifti_that_agree(model: Path, tmp_path: Path) -> None:
    folder, _ = ct_series(tmp_path / "ct_case", seed=13)
    both, nifti_only = tmp_path / "both", tmp_path / "nifti"
    args = ["-q", "infer", "-m", str(model), "-i", str(folder), "--device", "cpu"]
    assert main([*args, "-o", str(both), "--output-format", "nifti,dicom-seg"]) == 0
    assert main([*args, "-o", str(nifti_only)]) == 0
    mask_path = both / "ct_case.nii.gz"
    mask = np.asarray(nib.load(mask_path).dataobj)
    assert np.array_equal(mask, np.asarray(nib.load(nifti_only / "ct_case.nii.gz").dataobj))  # one prediction, either path
    assert np.array_equal(decoded_on_mask((both / "ct_case.seg.dcm").read_bytes(), mask_path, tmp_path / "x.dcm"), mask)
    seg_only = tmp_path / "seg"
    assert main([*args, "-o", str(seg_only), "--output-format", "dicom-seg"]) == 0
    assert sorted(p.name for p in seg_only.iterdir()) == ["ct_case.seg.dcm", "inference_report.json"]
    assert main([*args, "-o", str(seg_only), "--output-format", "dicom-seg"]) == 1  # exists: kept without --overwrite


@pytest.mark.slow  # the session's trained model
def test_dicom_seg_output_needs_dicom_input(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image, _ = make_phantom((24, 24, 16), seed=1)
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image, np.eye(4)), nifti)
    assert main(["infer", "-m", str(model), "-i", str(nifti), "-o", str(tmp_path / "out"), "--output-format", "dicom-seg"]) == 1
    assert "needs a DICOM series input" in capsys.readouterr().err
    assert main(["infer", "-m", str(model), "-i", str(nifti), "-o", str(tmp_path / "out"), "--output-format", "nifti,rtstruct"]) == 1
    assert "rtstruct output needs a DICOM series input" in capsys.readouterr().err
    assert main(["infer", "-m", str(model), "-i", str(nifti), "-o", str(tmp_path / "out"), "--output-format", "rt-struct"]) == 2
    assert not (tmp_path / "out").exists()
