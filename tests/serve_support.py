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
