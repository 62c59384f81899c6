"""``medunet serve`` end to end with real parts on loopback: storescu sends a CT series, Orthanc receives the SEG and RTSTRUCT.

Also a kill drill (``kill -9`` of the service process after receive, while running, while sending) and a
destination that is down, then comes back.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from orthanc import Orthanc, free_port, needs_orthanc
from serve_support import SERVE_PATIENT, ct_series, db_rows, kill_drill, serve_config, storescu, wait_for
from test_dicom_seg import decoded_on

from medunet.cli import main
from medunet.io.dicom_seg import result_uids
from medunet.serve.config import serve_config_from_dict
from medunet.serve.service import PARTIAL, RESULTS, Service

pytestmark = [pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed (Debian package dcmtk)"), needs_orthanc]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), dicom_aet="PACS")
    try:
        yield server
    finally:
        server.stop()


def lookup(pacs: Orthanc, uid: str) -> list[str]:
    answer = pacs.http.post(f"{pacs.base}/tools/lookup", data=uid, timeout=10)
    answer.raise_for_status()
    return [item["ID"] for item in answer.json() if item["Type"] == "Instance"]


def api_jobs(port: int) -> list[dict[str, object]]:
    session = requests.Session()
    session.trust_env = False
    return list(session.get(f"http://127.0.0.1:{port}/jobs", timeout=5).json()["jobs"])


def pacs_destination(pacs: Orthanc, port: int | None = None) -> dict[str, object]:
    return {"pacs": {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": port or pacs.dicom_port,
                     "formats": ["dicom-seg", "rtstruct"]}}


@pytest.mark.slow  # the session's trained model (tests/conftest.py)
def test_a_series_sent_with_storescu_comes_back_to_orthanc_as_the_mask_medunet_infer_gives(
        trained_run: Path, pacs: Orthanc, tmp_path: Path) -> None:
    folder, study, series = ct_series(tmp_path / "in" / "case", seed=61)
    node_port, api_port = free_port(), free_port()
    config = serve_config_from_dict(serve_config(tmp_path / "storage", trained_run, pacs_destination(pacs), node_port=node_port,
                                                 api_port=api_port, lease_seconds=30))
    service = Service(config).start()
    try:
        assert storescu(node_port, folder)
        assert wait_for(lambda: [j["state"] for j in api_jobs(api_port)] == ["done"], 60.0, 0.1), api_jobs(api_port)
        job = api_jobs(api_port)[0]
    finally:
        service.stop()
    uids = result_uids(f"{series}/organs/{job['id']}")
    assert len(lookup(pacs, uids.seg.sop_instance_uid)) == 1 and len(lookup(pacs, uids.rtstruct.sop_instance_uid)) == 1
    [seg_bytes] = pacs.seg_files(study)
    (tmp_path / "pacs.seg.dcm").write_bytes(seg_bytes)
    assert main(["-q", "infer", "-m", str(trained_run), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "infer"), "--device", "cpu"]) == 0
    mask = tmp_path / "infer" / "case.nii.gz"
    assert np.array_equal(decoded_on(tmp_path / "pacs.seg.dcm", mask), np.asarray(nib.load(mask).dataobj))
    audit = (tmp_path / "storage" / "audit.jsonl").read_text()
    assert "association-released" in audit and "job-done" in audit and series in audit
    assert not any(value in audit for value in SERVE_PATIENT)
    assert not list((tmp_path / "storage" / RESULTS).glob(f"*{PARTIAL}"))


@pytest.mark.slow
def test_a_destination_that_is_down_gets_the_results_once_it_is_back(trained_run: Path, tmp_path: Path) -> None:
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    stored: list[str] = []

    def on_store(event: evt.Event) -> int:
        stored.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    folder, _, series = ct_series(tmp_path / "in", seed=62)
    node_port, api_port, down_port = free_port(), free_port(), free_port()
    destination = {"tps": {"kind": "dicom", "ae_title": "TPS", "host": "127.0.0.1", "port": down_port, "formats": ["dicom-seg"]}}
    config = serve_config_from_dict(serve_config(tmp_path / "storage", trained_run, destination, node_port=node_port, api_port=api_port,
                                                 lease_seconds=30, first_delay_s=0.5))
    service = Service(config).start()
    scp = None
    try:
        assert storescu(node_port, folder)
        failed = "SELECT attempts, last_error FROM deliveries WHERE state = 'pending' AND attempts >= 2"
        assert wait_for(lambda: bool(db_rows(tmp_path / "storage", failed)), 60.0, 0.1)
        assert [j["state"] for j in api_jobs(api_port)] == ["sending"]
        assert "connection refused" in str(db_rows(tmp_path / "storage", failed)[0][1])
        ae = AE(ae_title="TPS")
        ae.supported_contexts = AllStoragePresentationContexts
        scp = ae.start_server(("127.0.0.1", down_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert wait_for(lambda: [j["state"] for j in api_jobs(api_port)] == ["done"], 30.0, 0.1)
        job = api_jobs(api_port)[0]
    finally:
        service.stop()
        if scp is not None:
            scp.shutdown()
    assert stored == [result_uids(f"{series}/organs/{job['id']}").seg.sop_instance_uid]
    log = (tmp_path / "storage" / "audit.jsonl").read_text()
    assert "delivery-failed" in log and "delivery-sent" in log


@pytest.mark.slow
def test_kill_minus_9_after_receive_while_running_and_while_sending_loses_nothing_and_sends_nothing_twice(
        trained_run: Path, pacs: Orthanc, tmp_path: Path) -> None:
    result = kill_drill(trained_run, tmp_path, pacs.dicom_port, 3, free_port=free_port)
    assert result["all_done"] and result["exit_code"] == 0, result
    storage = tmp_path / "storage"
    for study, series in result["series"]:  # type: ignore[attr-defined]
        jobs = db_rows(storage, f"SELECT id, state FROM jobs WHERE series_uid = '{series}'")
        done = [job_id for job_id, state in jobs if state == "done"]
        assert len(done) == 1 and all(state in ("done", "superseded") for _, state in jobs), jobs
        assert len(pacs.seg_files(study)) == 1
        assert len(lookup(pacs, result_uids(f"{series}/organs/{done[0]}").seg.sop_instance_uid)) == 1
    assert not list((storage / RESULTS).glob(f"*{PARTIAL}"))
    assert not db_rows(storage, "SELECT 1 FROM deliveries WHERE state != 'sent'")
    print("kill drill:", {k: v for k, v in result.items() if k != "series"})
