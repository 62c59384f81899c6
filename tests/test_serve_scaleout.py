"""``medunet serve`` on several processes: one ``--receiver-only`` and two ``--worker`` processes share a real PostgreSQL queue.

Every process runs ``python -m medunet serve`` against the same config (one storage folder, one database URL);
storescu sends several CT series to the receiver in one association, so they complete together and the two
workers compete for the queued jobs (claimed with ``FOR UPDATE SKIP LOCKED``). Every job must run once, each
result be delivered once, and both workers must have taken jobs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from orthanc import free_port
from serve_support import ServeProcess, ct_series, database_url, postgres_missing, postgres_server, serve_config, wait_for

from medunet.io.dicom_seg import result_uids

pytestmark = [pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed (Debian package dcmtk)"),
              pytest.mark.skipif(postgres_missing() is not None, reason=str(postgres_missing()))]

SERIES = 4


def rows(url: str, sql: str) -> list[tuple[object, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        return list(connection.execute(sql).fetchall())


@pytest.mark.slow  # the session's trained model (tests/conftest.py)
def test_two_worker_processes_share_one_postgresql_queue_and_process_every_job_exactly_once(trained_run: Path, tmp_path: Path) -> None:
    sent = [ct_series(tmp_path / "series" / str(i), seed=70 + i) for i in range(SERIES)]
    with postgres_server() as admin:
        url = database_url(admin, "scaleout")
        storage, out, node_port, api_port = tmp_path / "storage", tmp_path / "out", free_port(), free_port()
        config = serve_config(storage, trained_run, {"archive": {"kind": "folder", "path": str(out), "formats": ["dicom-seg"]}},
                              node_port=node_port, api_port=api_port, lease_seconds=30)
        config["database"] = {"url": url}
        config_path = tmp_path / "serve.yaml"
        config_path.write_text(yaml.safe_dump(config))
        processes = [ServeProcess(config_path, api_port, tmp_path / "receiver.log", ("--receiver-only",))]
        for name in ("a", "b"):
            port = free_port()
            processes.append(ServeProcess(config_path, port, tmp_path / f"worker-{name}.log", ("--worker", "--api-port", str(port))))
        try:
            for process in processes:
                process.start()
            files = [str(path) for folder, _, _ in sent for path in sorted(folder.iterdir())]
            run = subprocess.run(["storescu", "-aet", "SENDER", "-aec", "MEDUNET", "127.0.0.1", str(node_port), *files],
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, run.stderr
            finished = "SELECT count(*) FROM jobs WHERE state = 'done'"
            done = wait_for(lambda: rows(url, finished)[0][0] >= SERIES, 90.0, 0.2)
            jobs = rows(url, "SELECT id, series_uid, state, attempts, worker FROM jobs ORDER BY id")
            deliveries = rows(url, "SELECT job_id, item, state, attempts FROM deliveries ORDER BY job_id")
        finally:
            codes = [process.terminate() for process in processes]
    logs = {p.log_path.name: p.log_path.read_text()[-2000:] for p in processes}
    assert done and codes == [0, 0, 0], (jobs, codes, logs)
    by_series = {series: [job for job in jobs if job[1] == series] for _, _, series in sent}
    assert all(len(found) == 1 for found in by_series.values()) and len(jobs) == SERIES, jobs
    assert all(state == "done" and attempts == 1 for _, _, state, attempts, _ in jobs), jobs
    workers = {str(worker).rsplit(":", 2)[0] for *_, worker in jobs}
    assert len(workers) == 2, f"one worker process took every job: {jobs}"  # 4 jobs queued at once, each longer than a poll
    assert len(deliveries) == SERIES and all(state == "sent" and attempts == 0 for *_, state, attempts in deliveries), deliveries
    audit = [json.loads(line) for line in (storage / "audit.jsonl").read_text().splitlines()]
    for job_id, series, *_ in jobs:
        seg = result_uids(f"{series}/organs/{job_id}").seg.sop_instance_uid
        assert (out / f"{seg}.dcm").is_file()
        assert sum(1 for record in audit if record["event"] == "delivery-sent" and record.get("sop_instance_uid") == seg) == 1
        assert sum(1 for record in audit if record["event"] == "job-running" and record.get("job_id") == job_id) == 1
    assert sorted(path.name for path in out.iterdir()) == sorted(f"{result_uids(f'{s}/organs/{j}').seg.sop_instance_uid}.dcm"
                                                                 for j, s, *_ in jobs)
    assert all("running (worker id" in text for text in logs.values())
