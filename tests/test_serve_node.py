"""medunet serve's DICOM node and senders with real peers on loopback: dcmtk's storescu/echoscu, pynetdicom, Orthanc.

Also the deterministic result UIDs that make a re-created SEG/RTSTRUCT the same instance for a PACS.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from orthanc import PASSWORD, USER, Orthanc, free_port, needs_orthanc
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless, RLELossless
from pynetdicom import AE

from medunet.errors import ConfigError, SendError
from medunet.inference.outputs import write_outputs
from medunet.io.dicom import read_series
from medunet.io.dicom_seg import ObjectUids, result_uids, write_dicom_seg
from medunet.io.rtstruct import write_rtstruct
from medunet.net.dicomweb import PASSWORD_ENV, USER_ENV
from medunet.serve.receiver import INCOMING, DicomNode, discard_unreleased, is_image
from medunet.serve.records import ReceivedInstance
from medunet.serve.sender import send_dicom, send_folder, send_stowrs
from medunet.synthetic import grid_affine, make_phantom, write_dicom_series

CLASSES = ["background", "organ", "vessel"]
needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed (Debian package dcmtk)")
needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed (Debian package dicom3tools)")


class Sink:
    """Records every on_released call; optionally fails, as a store that cannot write would."""

    def __init__(self, *, fail: bool = False) -> None:
        self.calls: list[tuple[str, str, str, list[ReceivedInstance]]] = []
        self.fail = fail

    def on_released(self, association_id: str, calling_ae: str, peer_ip: str, instances: Sequence[ReceivedInstance]) -> None:
        if self.fail:
            raise OSError("database is locked")
        self.calls.append((association_id, calling_ae, peer_ip, list(instances)))


def series(folder: Path, *, seed: int = 3, shape: tuple[int, int, int] = (16, 16, 5), syntax: str = ExplicitVRLittleEndian,
           modality: str = "CT") -> tuple[list[Path], np.ndarray]:
    """A small synthetic CT series in ``syntax`` (re-encoded with pydicom's encoders when compressed); (files, labels)."""
    image, labels = make_phantom(shape, seed=seed, num_classes=3)
    paths = write_dicom_series(image, grid_affine((1.5, 1.5, 2.5), axcodes="LPS", origin=(0.0, 0.0, 10.0 * seed)), folder,
                               seed=seed, modality=modality, series_description=f"synthetic {seed}")
    if syntax != ExplicitVRLittleEndian:
        for path in paths:
            ds = pydicom.dcmread(path)
            if syntax == ImplicitVRLittleEndian:
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
                ds.save_as(path, implicit_vr=True, little_endian=True)
            else:
                ds.compress(syntax)
                ds.save_as(path)
    return paths, labels


def dataset_bytes(path: Path) -> bytes:
    """A DICOM file's bytes after its file meta group (what travels over the network, as encoded)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    meta_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL, explicit VR little endian
    return data[144 + meta_length:]


def wait_until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[DicomNode, Sink, list[tuple[str, dict[str, object]]]]]:
    sink, audit = Sink(), []
    server = DicomNode(tmp_path / "storage", sink, ae_title="MEDUNET", port=0, allowed_calling_aes=["SENDER", "OTHERSENDER"],
                       min_free_mb=0, timeout=10, on_event=lambda event, **fields: audit.append((event, fields)))
    server.start()
    try:
        yield server, sink, audit
    finally:
        server.stop()


#: storescu's option proposing each transfer syntax (it proposes a compressed one only when told).
PROPOSE = {ExplicitVRLittleEndian: "-xe", ImplicitVRLittleEndian: "-xi", RLELossless: "-xr", JPEGLSLossless: "-xt"}


def storescu(node: DicomNode, files: Sequence[Path], *, aet: str = "SENDER", propose: str = "-xe") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["storescu", propose, "-aet", aet, "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, files)],
                          capture_output=True, text=True, timeout=60)


def leftover_files(node: DicomNode) -> list[Path]:
    return [p for p in (node.storage / INCOMING).rglob("*") if p.is_file()]


@needs_dcmtk
def test_storescu_series_arrive_once_byte_for_byte_in_their_transfer_syntax(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, sink, audit = node
    sent: list[Path] = []
    for seed, syntax in enumerate(PROPOSE, start=1):  # one association per transfer syntax
        files = series(tmp_path / f"s{seed}", seed=seed, syntax=syntax)[0]
        run = storescu(server, files, propose=PROPOSE[syntax])
        assert run.returncode == 0, run.stderr
        assert len(sink.calls) == seed  # each released association: one call
        sent += files
    instances = [i for call in sink.calls for i in call[3]]
    assert {(calling, peer) for _, calling, peer, _ in sink.calls} == {("SENDER", "127.0.0.1")}
    folder_of = {i.sop_instance_uid: aid for aid, _, _, call in sink.calls for i in call}
    by_uid = {i.sop_instance_uid: i for i in instances}
    assert len(by_uid) == len(instances) == len(sent)
    for path in sent:
        original = pydicom.dcmread(path, stop_before_pixels=True)
        got = by_uid[str(original.SOPInstanceUID)]
        assert got.path == server.storage / INCOMING / folder_of[got.sop_instance_uid] / f"{original.SOPInstanceUID}.dcm"
        received = pydicom.dcmread(got.path, stop_before_pixels=True)
        assert received.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID  # not re-encoded
        assert dataset_bytes(got.path) == dataset_bytes(path)  # byte for byte as the peer sent it
        assert (got.series_instance_uid, got.modality, got.series_description) == (
            original.SeriesInstanceUID, "CT", original.SeriesDescription)
        assert got.slice_thickness == 2.5 and got.slice_position is not None and is_image(got)
    # a compressed instance as stored still decodes
    rle = next(i for i in instances if pydicom.dcmread(i.path, stop_before_pixels=True).file_meta.TransferSyntaxUID == RLELossless)
    assert pydicom.dcmread(rle.path).pixel_array.shape == (16, 16)
    assert not [p for p in leftover_files(server) if p.name.startswith(".")]  # no temporary names left
    events = [e for e, _ in audit]
    assert events == ["association-accepted", "association-released"] * len(PROPOSE)
    assert "Phantom" not in repr(audit)  # no patient attribute in the audit


@needs_dcmtk
def test_echo_and_refusals_give_the_dicom_reason(node, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    server, sink, audit = node
    echo = subprocess.run(["echoscu", "-aet", "SENDER", "-aec", "MEDUNET", "127.0.0.1", str(server.port)],
                          capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    files, _ = series(tmp_path / "s", seed=1)
    with caplog.at_level(logging.WARNING, logger="medunet"):
        run = storescu(server, files, aet="STRANGER")
    assert run.returncode != 0 and "Calling AE Title Not Recognized" in run.stderr
    assert "rejected the association from STRANGER" in caplog.text and "calling AE title not recognised" in caplog.text
    assert not sink.calls and not leftover_files(server)
    assert ("association-rejected", "STRANGER") in [(e, f.get("calling_ae")) for e, f in audit]


@needs_dcmtk
def test_peer_allow_list_and_disk_watermark_refuse_new_associations(tmp_path: Path) -> None:
    for options, reason in ((dict(allowed_peers=["10.0.0.0/8"]), "No Reason"), (dict(min_free_mb=1e12), "Temporary Congestion")):
        sink = Sink()
        with DicomNode(tmp_path / "storage", sink, port=0, **options) as server:  # type: ignore[arg-type]
            echo = subprocess.run(["echoscu", "127.0.0.1", str(server.port)], capture_output=True, text=True, timeout=30)
        assert echo.returncode != 0 and reason.lower() in echo.stderr.lower(), echo.stderr
        assert not sink.calls
    with pytest.raises(ConfigError, match="allowed peer"):
        DicomNode(tmp_path, Sink(), allowed_peers=["not-an-address"])


def scu(node: DicomNode, *, aet: str = "SENDER") -> object:
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.88.11", ExplicitVRLittleEndian)  # Basic Text SR
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.66.4", ExplicitVRLittleEndian)  # Segmentation
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    return assoc


def test_an_aborted_or_dropped_association_leaves_nothing(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, sink, audit = node
    files, _ = series(tmp_path / "s", seed=2)
    assoc = scu(server)
    for path in files[:3]:
        assert assoc.send_c_store(path).Status == 0x0000  # type: ignore[attr-defined]
    assert len(leftover_files(server)) == 3
    assoc.abort()  # type: ignore[attr-defined]
    wait_until(lambda: server.active_associations == 0)
    assoc = scu(server)  # the connection just drops (a sender killed mid-series)
    assert assoc.send_c_store(files[0]).Status == 0x0000  # type: ignore[attr-defined]
    assoc.dul.socket.socket.close()  # type: ignore[attr-defined]
    wait_until(lambda: server.active_associations == 0)
    assoc.kill()  # type: ignore[attr-defined]
    assert not sink.calls and not leftover_files(server)
    assert [e for e, _ in audit].count("association-aborted") == 2


def test_disk_crossing_the_watermark_mid_association_answers_out_of_resources(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, sink, _ = node
    files, _ = series(tmp_path / "s", seed=4)
    free = itertools.chain([1e6] * 3, itertools.repeat(0.0))  # the association's check, two stores, then a full disk
    server.min_free_mb = 100.0
    server.free_mb = lambda: next(free)  # type: ignore[method-assign]
    assoc = scu(server)
    statuses = [int(assoc.send_c_store(p).Status) for p in files]  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    assert statuses == [0x0000, 0x0000, 0xA700, 0xA700, 0xA700]
    assert len(sink.calls) == 1 and len(sink.calls[0][3]) == 2  # what was stored is released; the sender resends the rest


def non_image(folder: Path, source: Path, labels: np.ndarray) -> list[Path]:
    """A Basic Text SR and a SEG of the series in ``source``'s folder."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    ref = pydicom.dcmread(source, stop_before_pixels=True)
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    sr.SOPInstanceUID = generate_uid()
    sr.file_meta.MediaStorageSOPClassUID, sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPClassUID, sr.SOPInstanceUID
    sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.Modality = ref.StudyInstanceUID, generate_uid(), "SR"
    folder.mkdir(parents=True, exist_ok=True)
    sr.save_as(folder / "sr.dcm", enforce_file_format=True)
    seg = write_dicom_seg(labels, read_series(source.parent), CLASSES, folder / "seg.dcm", model_name="t")
    return [folder / "sr.dcm", seg]


def test_non_image_objects_are_stored_and_flagged(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, sink, _ = node
    files, labels = series(tmp_path / "s", seed=5)
    objects = non_image(tmp_path / "objects", files[0], labels)
    assoc = scu(server)
    assert [int(assoc.send_c_store(p).Status) for p in [*objects, files[0]]] == [0, 0, 0]  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    instances = sink.calls[0][3]
    assert sorted((i.modality, is_image(i)) for i in instances) == [("CT", True), ("SEG", False), ("SR", False)]
    assert all(i.path.exists() for i in instances)


def test_a_failing_store_makes_the_peer_send_again_and_leftovers_are_discarded(tmp_path: Path) -> None:
    files, _ = series(tmp_path / "s", seed=6, shape=(8, 8, 2))
    with DicomNode(tmp_path / "storage", Sink(fail=True), port=0, min_free_mb=0) as server:
        assoc = scu(server)
        assert assoc.send_c_store(files[0]).Status == 0  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
        assert not assoc.is_released  # type: ignore[attr-defined]  # the sender sees a failed association
        wait_until(lambda: server.active_associations == 0)
        assert not leftover_files(server)
    crashed = tmp_path / "storage" / INCOMING
    (crashed / "recorded").mkdir()
    (crashed / "never-recorded").mkdir()
    (crashed / "never-recorded" / "x.dcm").write_bytes(b"half")
    assert discard_unreleased(tmp_path / "storage", lambda aid: aid == "recorded") == ["never-recorded"]
    assert sorted(p.name for p in crashed.iterdir()) == ["recorded"]


def test_more_associations_than_allowed_are_rejected_as_busy(tmp_path: Path) -> None:
    with DicomNode(tmp_path / "storage", Sink(), port=0, max_associations=1, min_free_mb=0) as server:
        first = scu(server)
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(CTImageStorage)
        second = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title)
        assert second.is_rejected and second.acceptor.primitive.diagnostic == 0x02  # local limit exceeded
        first.release()  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------ senders


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    if not Path("/usr/sbin/Orthanc").exists() and shutil.which("Orthanc") is None:
        pytest.skip("Orthanc is not installed (Debian package orthanc)")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), dicom_aet="PACS")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A SEG and an RTSTRUCT of a synthetic series, with deterministic UIDs."""
    folder = tmp_path_factory.mktemp("results")
    files, labels = series(folder / "ct", seed=7)
    uids = result_uids("job-7/model")
    source = read_series(folder / "ct")
    seg = write_dicom_seg(labels, source, CLASSES, folder / "r.seg.dcm", model_name="t", uids=uids.seg)
    rt = write_rtstruct(labels, source, CLASSES, folder / "r.rtstruct.dcm", model_name="t", uids=uids.rtstruct)
    return seg, rt


def orthanc_holds(pacs: Orthanc, sop_uid: str) -> int:
    answer = pacs.http.post(f"{pacs.base}/tools/lookup", data=sop_uid, timeout=10)
    answer.raise_for_status()
    return sum(1 for item in answer.json() if item["Type"] == "Instance")


@needs_orthanc
def test_send_dicom_stores_in_orthanc_once_even_when_sent_twice(pacs: Orthanc, results: tuple[Path, Path]) -> None:
    seg, rt = results
    before = len(pacs.instances())
    for _ in range(2):
        sent = send_dicom("PACS", "127.0.0.1", pacs.dicom_port, [seg, rt], calling_ae="MEDUNET", timeout=10)
        assert [r.ok for r in sent] == [True, True] and {r.status for r in sent} == {0x0000}, sent
    for path in (seg, rt):
        assert orthanc_holds(pacs, str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)) == 1
    assert len(pacs.instances()) == before + 2
    stored = pacs.rest(f"/instances/{pacs.http.post(f'{pacs.base}/tools/lookup', data=sent[0].sop_instance_uid).json()[0]['ID']}/file")
    assert hd.seg.segread(pydicom.filebase.DicomBytesIO(stored)).number_of_segments == 2  # type: ignore[arg-type]


@needs_orthanc
def test_send_dicom_to_a_down_or_refusing_destination_is_one_clear_error(pacs: Orthanc, results: tuple[Path, Path]) -> None:
    with pytest.raises(SendError, match=r"cannot reach PACS@127\.0\.0\.1:\d+: connection refused"):
        send_dicom("PACS", "127.0.0.1", free_port(), [results[0]], timeout=5)
    with pytest.raises(SendError, match="NOT-ORTHANC@.* (rejected|aborted) the association.*; check that it knows calling AE"):
        send_dicom("NOT-ORTHANC", "127.0.0.1", pacs.dicom_port, [results[0]], timeout=5)  # Orthanc checks the called AE
    with DicomNode(pacs.folder / "node", Sink(), port=0, allowed_calling_aes=["SOMEONE"], min_free_mb=0) as node:
        with pytest.raises(SendError, match="rejected the association .*Calling AE title not recognised"):
            send_dicom("MEDUNET", "127.0.0.1", node.port, [results[0]], calling_ae="MEDUNET", timeout=5)


@needs_orthanc
def test_send_stowrs_stores_through_dicomweb(pacs: Orthanc, results: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    sent = send_stowrs(pacs.dicomweb, list(results), timeout=10)
    assert all(r.ok for r in sent) and len(sent) == 2
    assert all(orthanc_holds(pacs, r.sop_instance_uid) == 1 for r in sent)


def test_send_folder_is_atomic_and_idempotent(results: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    for _ in range(2):
        sent = send_folder(out, list(results))
        assert all(r.ok for r in sent)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{r.sop_instance_uid}.dcm" for r in sent)  # no temporary left, one file per instance
    assert all((out / f"{r.sop_instance_uid}.dcm").read_bytes() == r.path.read_bytes() for r in sent)


def test_a_reader_never_sees_half_a_folder_copy(results: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for path in out.glob("*.dcm") if out.exists() else []:
                try:
                    seen.add(len(path.read_bytes()))
                except FileNotFoundError:
                    pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    for _ in range(20):
        send_folder(out, [results[0]])
    stop.set()
    watcher.join()
    assert seen <= {results[0].stat().st_size}


# ------------------------------------------------------------------------------------------ result UIDs


def written_uids(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    return str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def test_result_uids_are_deterministic_valid_and_default_random(tmp_path: Path) -> None:
    assert result_uids("job-1") == result_uids("job-1") and result_uids("job-1") != result_uids("job-2")
    uids = result_uids("job-1")
    every = [uids.seg.series_instance_uid, uids.seg.sop_instance_uid, uids.rtstruct.series_instance_uid, uids.rtstruct.sop_instance_uid]
    assert len(set(every)) == 4 and all(pydicom.uid.UID(u).is_valid for u in every)
    with pytest.raises(ConfigError, match="not a valid DICOM UID"):
        ObjectUids("1.2.x", "1.2.3")
    files, labels = series(tmp_path / "ct", seed=8)
    source = read_series(tmp_path / "ct")
    for writer, kind in ((write_dicom_seg, "seg"), (write_rtstruct, "rtstruct")):
        fixed = [written_uids(writer(labels, source, CLASSES, tmp_path / f"{kind}{i}.dcm", model_name="t",  # type: ignore[operator]
                                     uids=getattr(uids, kind))) for i in range(2)]
        expected = (getattr(uids, kind).series_instance_uid, getattr(uids, kind).sop_instance_uid)
        assert fixed == [expected, expected]
        random = [written_uids(writer(labels, source, CLASSES, tmp_path / f"{kind}r{i}.dcm", model_name="t")) for i in range(2)]  # type: ignore[operator]
        assert random[0] != random[1] and expected not in random


@needs_dciodvfy
def test_objects_with_derived_uids_validate(results: tuple[Path, Path]) -> None:
    for path in results:
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
        assert not errors, "\n".join(errors)
    assert hd.seg.segread(results[0]).SOPInstanceUID == result_uids("job-7/model").seg.sop_instance_uid


def test_write_outputs_threads_the_uids(monkeypatch: pytest.MonkeyPatch) -> None:
    """``write_outputs(uids=...)`` hands each DICOM writer its own pair (checked without running a model)."""
    import medunet.inference.outputs as outputs

    got: dict[str, object] = {}
    monkeypatch.setattr(outputs, "source_series", lambda result, formats: "series")
    monkeypatch.setattr(outputs, "write_dicom_seg", lambda *a, uids=None, **k: got.setdefault("seg", uids) and Path("s"))
    monkeypatch.setattr(outputs, "write_rtstruct", lambda *a, uids=None, **k: got.setdefault("rtstruct", uids) and Path("r"))

    class Result:
        labels = np.zeros((2, 2, 2), dtype=np.uint8)

    uids = result_uids("job-9")
    write_outputs(Result(), {"dicom-seg": Path("a"), "rtstruct": Path("b")}, class_names=CLASSES, model_name="t", uids=uids)  # type: ignore[arg-type]
    assert got == {"seg": uids.seg, "rtstruct": uids.rtstruct}
