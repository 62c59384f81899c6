"""The REST API of ``medunet serve`` (uvicorn on a loopback port, real HTTP) and its audit log."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from serve_support import instances

from medunet.errors import ServeError
from medunet.serve.api import ApiServer, ModelInfo, create_app, render_metrics
from medunet.serve.audit import AuditLog
from medunet.serve.records import DeliveryItem, ReceivedInstance
from medunet.serve.store import Counts, JobStore

#: Patient attributes of the received series: none may appear in any output.
PATIENT = {"PatientName": "DOE^JANE", "PatientID": "PID-4711-X", "PatientBirthDate": "19610203"}


@dataclass
class Service:
    url: str
    store: JobStore
    alive: dict[str, bool]
    ids: dict[str, int]
    storage: Path


def received_from_dataset(path: Path) -> ReceivedInstance:
    """What a receiver hands the store for a stored file: technical attributes only."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ReceivedInstance(ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, path, ds.Modality,
                            ds.get("BodyPartExamined", ""), ds.get("SeriesDescription", ""), float(ds.ImagePositionPatient[2]), None)


def write_slice(path: Path, index: int) -> Path:
    ds = pydicom.Dataset()
    ds.SOPInstanceUID, ds.SOPClassUID = f"1.2.826.0.1.7.{index}", "1.2.840.10008.5.1.4.1.1.2"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.1", "1.2.826.0.1.2"
    ds.Modality, ds.BodyPartExamined, ds.SeriesDescription = "CT", "ABDOMEN", "Venous"
    ds.ImagePositionPatient = [0.0, 0.0, 2.5 * index]
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def populate(store: JobStore, storage: Path) -> dict[str, int]:
    """Jobs in every interesting state: done (with a sent delivery), failed, review, queued."""
    patient_series = [received_from_dataset(write_slice(storage / f"{i}.dcm", i)) for i in range(3)]
    store.record_association("assoc-1", "CT1", "127.0.0.1", patient_series, now=100.0)
    for n, series in enumerate(["1.5.1", "1.5.2", "1.5.3"]):
        store.record_association(f"assoc-{n + 2}", "CT1", "127.0.0.1", instances(series, 2), now=100.0)
    jobs = {f.series_instance_uid: store.enqueue(f.series_instance_uid, ["liver"], now=111.0)[0].id
            for f in store.complete_series(10, now=110.0)}
    done, failed, review = jobs["1.2.826.0.1.2"], jobs["1.5.1"], jobs["1.5.2"]
    claimed = [store.claim("w1", None, 60, now=112.0) for _ in range(3)]
    assert [job.id for job in claimed if job is not None] == [done, failed, review]
    store.finish(done, "accept", "/r/done", [DeliveryItem("pacs", "1.2.826.0.1.9", "/r/done/seg.dcm")], now=120.0)
    [delivery] = store.due_deliveries(worker="s", now=121.0)
    store.delivery_sent(delivery.id, now=125.0)
    store.fail(failed, "GeometryError: the mask is off the grid", now=120.0)
    store.finish(review, "review", "/r/review", [], now=130.0)
    return {"done": done, "failed": failed, "review": review, "queued": jobs["1.5.3"]}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    storage = tmp_path_factory.mktemp("serve")
    store = JobStore.connect(f"sqlite:///{storage / 'jobs.sqlite'}")
    ids = populate(store, storage)
    alive = {"receiver": True, "workers": True}
    models = [ModelInfo("liver", "/models/liver", "cpu", loaded=True, classes=("background", "liver"))]
    app = create_app(store, models, storage=storage, min_free_disk_mb=1,
                     liveness={name: (lambda name=name: alive[name]) for name in alive})
    server = ApiServer(app).start()
    yield Service(f"http://127.0.0.1:{server.port}", store, alive, ids, storage)
    server.stop()
    store.close()


def test_health_reports_each_part_and_fails_when_one_is_down(service: Service) -> None:
    reply = requests.get(f"{service.url}/health", timeout=5)
    body = reply.json()
    assert reply.status_code == 200 and body["ok"] and body["database"] and body["disk_ok"] and body["disk_free_mb"] > 0
    service.alive["workers"] = False
    try:
        reply = requests.get(f"{service.url}/health", timeout=5)
        assert reply.status_code == 503 and reply.json()["components"] == {"receiver": True, "workers": False}
    finally:
        service.alive["workers"] = True


def test_jobs_are_listed_filtered_and_paged(service: Service) -> None:
    listed = requests.get(f"{service.url}/jobs", timeout=5).json()["jobs"]
    assert [j["id"] for j in listed] == sorted(service.ids.values(), reverse=True)
    failed = requests.get(f"{service.url}/jobs", params={"state": "failed"}, timeout=5).json()["jobs"]
    assert [j["id"] for j in failed] == [service.ids["failed"]] and failed[0]["error"].startswith("GeometryError")
    page = requests.get(f"{service.url}/jobs", params={"limit": 2, "offset": 1}, timeout=5).json()["jobs"]
    assert [j["id"] for j in page] == [j["id"] for j in listed[1:3]]
    assert requests.get(f"{service.url}/jobs", params={"limit": 0}, timeout=5).status_code == 422


def test_a_job_shows_its_timeline_qc_and_deliveries(service: Service) -> None:
    job = requests.get(f"{service.url}/jobs/{service.ids['done']}", timeout=5).json()
    assert job["job"]["state"] == "done" and job["job"]["qc_decision"] == "accept"
    assert [e["event"] for e in job["events"]] == ["queued", "running", "sending", "sent", "done"]
    assert job["deliveries"][0]["destination"] == "pacs" and job["deliveries"][0]["state"] == "sent"
    review = requests.get(f"{service.url}/jobs/{service.ids['review']}", timeout=5).json()
    assert review["job"]["state"] == "review"
    assert requests.get(f"{service.url}/jobs/9999", timeout=5).status_code == 404


def test_retry_requeues_a_failed_job_only(service: Service) -> None:
    assert requests.post(f"{service.url}/jobs/{service.ids['done']}/retry", timeout=5).status_code == 409
    assert requests.post(f"{service.url}/jobs/9999/retry", timeout=5).status_code == 404
    reply = requests.post(f"{service.url}/jobs/{service.ids['failed']}/retry", timeout=5)
    assert reply.status_code == 200 and reply.json()["state"] == "queued"
    job = service.store.claim("w1", None, 60)
    assert job is not None
    service.store.fail(job.id, "GeometryError: the mask is off the grid")  # back as it was for the other tests


def test_models_are_listed(service: Service) -> None:
    models = requests.get(f"{service.url}/models", timeout=5).json()["models"]
    assert models == [{"name": "liver", "path": "/models/liver", "device": "cpu", "folds": None, "loaded": True,
                       "classes": ["background", "liver"]}]


def test_metrics_are_prometheus_text(service: Service) -> None:
    reply = requests.get(f"{service.url}/metrics", timeout=5)
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = dict(line.rsplit(" ", 1) for line in reply.text.splitlines() if line and not line.startswith("#"))
    assert samples["medunet_serve_instances_received_total"] == "9"
    assert samples['medunet_serve_jobs{state="done"}'] == "1" and samples['medunet_serve_jobs{state="queued"}'] == "1"
    assert samples['medunet_serve_jobs{state="failed"}'] == "1" and samples['medunet_serve_deliveries{state="sent"}'] == "1"
    assert samples['medunet_serve_stage_seconds_count{stage="run"}'] == "2"  # done and review
    assert float(samples['medunet_serve_stage_seconds{stage="total",quantile="0.5"}']) == pytest.approx(27.5)
    assert "# TYPE medunet_serve_stage_seconds summary" in reply.text


def test_metrics_of_an_empty_store_are_valid() -> None:
    text = render_metrics(Counts(jobs={"queued": 0}), {"run": []})
    assert 'medunet_serve_stage_seconds{stage="run",quantile="0.5"} NaN' in text
    assert 'medunet_serve_stage_seconds_count{stage="run"} 0' in text and text.endswith("\n")


def test_no_patient_attribute_leaves_the_service(service: Service, tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    first = received_from_dataset(service.storage / "0.dcm")
    audit.write("association_released", association_id="assoc-1", calling_ae="CT1", called_ae="MEDUNET", peer_ip="127.0.0.1",
                instances=3, now=100.0)
    audit.write("series_complete", series_instance_uid=first.series_instance_uid, study_instance_uid=first.study_instance_uid, now=110.0)
    audit.write("job_done", job_id=service.ids["done"], model="liver", destination="pacs", sop_instance_uid="1.2.826.0.1.9", now=125.0)
    with pytest.raises(ValueError, match="no patient attributes"):
        audit.write("oops", patient_name="DOE^JANE")
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["time"].endswith("Z") for line in lines)
    assert json.loads(lines[0]) == {"time": "1970-01-01T00:01:40.000Z", "event": "association_released", "association_id": "assoc-1",
                                    "calling_ae": "CT1", "called_ae": "MEDUNET", "peer_ip": "127.0.0.1", "instances": 3}
    database = [p.read_bytes().decode("latin-1") for p in service.storage.glob("jobs.sqlite*")]  # with the WAL
    outputs = [(tmp_path / "audit.jsonl").read_text(), *database]
    for path in ("/health", "/jobs", f"/jobs/{service.ids['done']}", "/models", "/metrics"):
        outputs.append(requests.get(f"{service.url}{path}", timeout=5).text)
    for value in PATIENT.values():
        assert not any(value in text or value.replace("^", " ") in text for text in outputs), value


def test_a_missing_extra_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    store = JobStore.connect(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(ServeError, match=r"^the medunet serve REST API needs fastapi, which is not installed: pip install 'medunet\[serve\]'$"):
        create_app(store, [])
    store.close()
