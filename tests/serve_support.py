"""Helpers of the ``medunet serve`` tests: fake received instances and a throw-away PostgreSQL server."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from medunet.serve.records import ReceivedInstance

PG_BIN = Path(os.environ.get("MEDUNET_PG_BIN", "/usr/lib/postgresql/15/bin"))


def instances(series: str, count: int, *, study: str = "1.2.3", start: int = 0, spacing: float = 2.5, modality: str = "CT",
              body_part: str = "ABDOMEN", description: str = "Abdomen venous 2.5mm") -> list[ReceivedInstance]:
    """``count`` CT slices of one series, ``spacing`` mm apart, with SOP Instance UIDs ``<series>.<i>``."""
    return [ReceivedInstance(f"{series}.{i}", "1.2.840.10008.5.1.4.1.1.2", study, series, Path(f"/store/{series}/{i}.dcm"),
                             modality, body_part, description, i * spacing, spacing) for i in range(start, start + count)]


def postgres_missing() -> str | None:
    """Why a PostgreSQL server cannot be started here, or None."""
    if not all((PG_BIN / name).exists() for name in ("initdb", "pg_ctl", "postgres")):
        return f"PostgreSQL server binaries not found in {PG_BIN} (Debian package postgresql-15; set MEDUNET_PG_BIN)"
    if os.geteuid() == 0 and (shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode):
        return "running as root without a postgres user to run the server as"
    return None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server on a unix socket in a temporary folder (no TCP), stopped on exit; yields its admin URL."""
    folder = Path(tempfile.mkdtemp(prefix="medunet-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(folder, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"
    try:
        subprocess.run([*prefix, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, timeout=60)
        options = f"-k {folder} -c listen_addresses='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        subprocess.run([*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"],
                       check=True, capture_output=True, timeout=60)
        try:
            yield f"postgresql://postgres@/postgres?host={folder}"
        finally:
            subprocess.run([*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def database_url(admin_url: str, name: str) -> str:
    """A URL whose tables land in a new, empty schema ``name`` (cheaper than a database per test)."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        connection.execute(f'CREATE SCHEMA "{name}"')
    return f"{admin_url}&options=-csearch_path%3D{name}"


# ------------------------------------------------------------------------------------------------ the service, end to end

SERVE_PATIENT = ("Drill^Patient", "DRILL-PID-4711")


def ct_series(folder: Path, seed: int) -> tuple[Path, str, str]:
    """A CT phantom series of the shape the shared test model learned; (folder, study UID, series UID)."""
    import pydicom

    from medunet.synthetic import grid_affine, make_phantom, write_dicom_series

    image, _ = make_phantom((48, 48, 32), seed=seed, num_classes=3)
    paths = write_dicom_series(image, grid_affine((1.5, 1.5, 2.5), axcodes="LPS", origin=(12.0, -30.0, 45.0)), folder, seed=seed,
                               patient_name=SERVE_PATIENT[0], patient_id=SERVE_PATIENT[1], series_description=f"drill {seed}")
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return folder, str(header.StudyInstanceUID), str(header.SeriesInstanceUID)


def storescu(port: int, folder: Path, *, aet: str = "SENDER", called: str = "MEDUNET") -> bool:
    """Send every file of ``folder`` with dcmtk's storescu; whether the association succeeded."""
    run = subprocess.run(["storescu", "-aet", aet, "-aec", called, "127.0.0.1", str(port), *map(str, sorted(folder.iterdir()))],
                         capture_output=True, text=True, timeout=60)
    return run.returncode == 0


def serve_config(storage: Path, model: Path, destinations: dict[str, object], *, node_port: int, api_port: int,
                 lease_seconds: float = 2.0, max_attempts: int = 50, first_delay_s: float = 0.3) -> dict[str, object]:
    """A test service config: CT series to ``model``, results to ``destinations`` (all of them in send_to)."""
    return {"node": {"ae_title": "MEDUNET", "host": "127.0.0.1", "port": node_port, "storage": str(storage), "stable_seconds": 1.0,
                     "min_free_disk_mb": 0},
            "models": {"organs": {"path": str(model), "device": "cpu"}},
            "routes": [{"name": "ct", "match": {"modality": ["CT"]}, "models": ["organs"]}],
            "destinations": destinations, "delivery": {"send_to": list(destinations), "hold_review": False},
            "retry": {"max_attempts": max_attempts, "first_delay_s": first_delay_s, "max_delay_s": 2.0},
            "api": {"host": "127.0.0.1", "port": api_port},
            "workers": {"lease_seconds": lease_seconds, "max_attempts": max_attempts}}


def db_rows(storage: Path, sql: str) -> list[tuple[object, ...]]:
    """Rows of a read-only query on the service's SQLite job database (empty before it exists)."""
    import sqlite3

    path = storage / "jobs.sqlite"
    if not path.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as connection:
            return list(connection.execute(sql).fetchall())
    except sqlite3.OperationalError:
        return []


def api_ok(port: int) -> bool:
    import requests

    try:
        session = requests.Session()
        session.trust_env = False
        return session.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def wait_for(condition, timeout: float, step: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


#: Job states a kill waits for before it strikes ("received": the series is recorded, no job yet).
KILL_MOMENTS = ("received", "running", "sending")


class ServeProcess:
    """``python -m medunet serve -c config`` as a subprocess that the drill kills with SIGKILL and restarts."""

    def __init__(self, config_path: Path, api_port: int, log_path: Path, args: tuple[str, ...] = ()) -> None:
        self.config_path, self.api_port, self.log_path, self.args = config_path, api_port, log_path, args
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 120.0) -> None:
        import sys

        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "medunet", "serve", "-c", str(self.config_path), *self.args], stdout=log,
                                            stderr=subprocess.STDOUT, env=env)
        self.starts += 1
        if not wait_for(lambda: api_ok(self.api_port) or self.process.poll() is not None, timeout, 0.1) or self.process.poll() is not None:
            raise AssertionError(f"medunet serve did not start; its log ends with:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout=60)


def moment_reached(storage: Path, series_uid: str, moment: str) -> bool:
    if moment == "received":
        return bool(db_rows(storage, f"SELECT 1 FROM series WHERE uid = '{series_uid}'"))
    return bool(db_rows(storage, f"SELECT 1 FROM jobs WHERE series_uid = '{series_uid}' AND state = '{moment}'"))


def kill_drill(model: Path, root: Path, pacs_port: int, kills: int, *, free_port) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Send a new series per round, kill -9 the service at the round's moment, restart it; then let everything finish.

    Returns the series (study, series UIDs), the moments hit and missed, and the seconds it took.
    """
    import json
    import time

    import yaml

    started = time.monotonic()
    storage, api_port, node_port = root / "storage", free_port(), free_port()
    destinations = {"pacs": {"kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port, "formats": ["dicom-seg", "rtstruct"]}}
    config_path = root / "serve.yaml"
    config_path.write_text(yaml.safe_dump(serve_config(storage, model, destinations, node_port=node_port, api_port=api_port)))
    service = ServeProcess(config_path, api_port, root / "serve.log")
    service.start()
    sent: list[tuple[str, str]] = []
    hit, missed = [], []
    for round_ in range(kills):
        moment = KILL_MOMENTS[round_ % len(KILL_MOMENTS)]
        folder, study, series = ct_series(root / "series" / str(round_), seed=100 + round_)
        while not storescu(node_port, folder):  # a refused or dropped association is sent again, as a PACS would
            time.sleep(0.5)
        sent.append((study, series))
        (hit if wait_for(lambda s=series, m=moment: moment_reached(storage, s, m), 30.0, 0.01) else missed).append(moment)
        service.kill()
        service.start()
    done = wait_for(lambda: all(db_rows(storage, f"SELECT 1 FROM jobs WHERE series_uid = '{s}' AND state = 'done'") for _, s in sent), 180.0, 0.2)
    code = service.terminate()
    result = {"series": sent, "hit": hit, "missed": missed, "all_done": done, "exit_code": code, "starts": service.starts,
              "seconds": round(time.monotonic() - started, 1), "storage": str(storage)}
    (root / "drill.json").write_text(json.dumps(result, indent=2))
    return result
