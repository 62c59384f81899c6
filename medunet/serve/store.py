"""The durable job store of ``medunet serve``: one implementation over SQLite (default) or PostgreSQL (several machines).

``JobStore.connect(url)`` opens ``sqlite:///path`` with the standard library (WAL journal, ``synchronous=FULL``,
a busy timeout) or ``postgresql://...`` with psycopg 3, and creates or migrates the schema (table
``schema_version``). The SQL is the same for both; the dialect differs only in placeholders, the identity
column, and the claim: PostgreSQL locks the chosen row with ``FOR UPDATE SKIP LOCKED``, SQLite runs the claim in
``BEGIN IMMEDIATE`` (one writer at a time). Every method is one transaction, so a ``kill -9`` at any moment leaves
the last committed state, from which the service resumes.

Life of a series and its jobs (every method takes ``now``, UNIX seconds, so tests can use a fake clock)::

    record_association(id, calling_ae, peer_ip, instances)   # a RELEASED association: instances, series receiving
    complete_series(stable_seconds)  -> [SeriesFacts]        # silent long enough: complete, awaiting routing
    enqueue(series_uid, models, route=) -> [Job]             # one queued job per model   (or skip(series_uid, reason))
    claim(worker, models, lease_seconds) -> Job | None       # atomic: queued -> running, attempts + 1
    heartbeat(job_id, worker, lease_seconds) -> bool         # renew the lease; False: the job was taken away
    requeue_expired()                                        # lost workers' jobs: back to queued, failed after max attempts
    finish(job_id, qc_decision, result_dir, deliveries)      # running -> sending (no deliveries: done / review)
    fail(job_id, error)                                      # running -> failed
    release(job_id, worker)                                  # running -> queued (a worker shutting down)
    due_deliveries(worker, lease_seconds) -> [Delivery]      # pending and due; leased to this sender
    delivery_sent(id) / delivery_failed(id, error, next_attempt_at)   # dead after max attempts
                                                             # all sent: done (QC accepted) or review; any dead: failed
    retry(job_id)                                            # failed -> queued, or its dead deliveries -> pending
    jobs(state, limit, offset), job(id) -> JobDetail, counts(), stage_durations()
    association_known(id), series_instances(series_uid) -> [(SOP Instance UID, path)]

Rules worth knowing:

- **Late instances.** An instance that arrives for a series already complete, queued or skipped re-opens it
  (``receiving``): its queued and running jobs are superseded (a running worker's ``finish`` then returns False),
  and once the series is stable again it is routed anew and new jobs are queued. Jobs already sending or done are
  left alone. A re-sent instance (same SOP Instance UID) counts as late.
- **Nothing sent twice.** Deliveries are unique per (destination, item), where the item is the result's SOP Instance
  UID (or its file name in a folder). A job that produces an item already sent to a destination does not send it
  again; the delivery row is handed to the newer job, keeping its state. A sender that dies between sending and
  ``delivery_sent`` sends that item again after its lease, with the same SOP Instance UID, which a PACS stores once.
- **Idempotent receipt.** Recording the same association twice records it once.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medunet.errors import ServeError
from medunet.serve.records import (
    JOB_STATES,
    Delivery,
    DeliveryItem,
    DeliveryState,
    Event,
    Job,
    JobDetail,
    ReceivedInstance,
    import_serve_extra,
)
from medunet.serve.routing import SeriesFacts, slice_spacing

#: The schema this code writes; older databases are migrated at connect.
SCHEMA_VERSION = 1

_SCHEMA_V1 = (
    "CREATE TABLE IF NOT EXISTS associations (id TEXT PRIMARY KEY, calling_ae TEXT NOT NULL, peer_ip TEXT NOT NULL, "
    "instances INTEGER NOT NULL, received_at DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS series (uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, modality TEXT NOT NULL, "
    "body_part TEXT NOT NULL, description TEXT NOT NULL, slices INTEGER NOT NULL DEFAULT 0, spacing_mm DOUBLE PRECISION, "
    "state TEXT NOT NULL, reason TEXT, first_received_at DOUBLE PRECISION NOT NULL, last_received_at DOUBLE PRECISION NOT NULL, "
    "completed_at DOUBLE PRECISION, reopened INTEGER NOT NULL DEFAULT 0)",
    "CREATE INDEX IF NOT EXISTS series_state ON series (state, last_received_at)",
    "CREATE TABLE IF NOT EXISTS instances (sop_instance_uid TEXT PRIMARY KEY, sop_class_uid TEXT NOT NULL, "
    "series_uid TEXT NOT NULL REFERENCES series (uid), path TEXT NOT NULL, association_id TEXT NOT NULL REFERENCES associations (id), "
    "slice_position DOUBLE PRECISION, slice_thickness DOUBLE PRECISION, received_at DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid)",
    "CREATE TABLE IF NOT EXISTS jobs (id {identity}, series_uid TEXT NOT NULL REFERENCES series (uid), model TEXT NOT NULL, "
    "route TEXT, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, worker TEXT, lease_expires_at DOUBLE PRECISION, "
    "received_at DOUBLE PRECISION, queued_at DOUBLE PRECISION, started_at DOUBLE PRECISION, sending_at DOUBLE PRECISION, "
    "finished_at DOUBLE PRECISION, qc_decision TEXT, error TEXT, result_dir TEXT)",
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, model, id)",
    "CREATE INDEX IF NOT EXISTS jobs_series ON jobs (series_uid)",
    "CREATE TABLE IF NOT EXISTS events (id {identity}, job_id BIGINT NOT NULL REFERENCES jobs (id), at DOUBLE PRECISION NOT NULL, "
    "event TEXT NOT NULL, detail TEXT)",
    "CREATE INDEX IF NOT EXISTS events_job ON events (job_id, id)",
    "CREATE TABLE IF NOT EXISTS deliveries (id {identity}, job_id BIGINT NOT NULL REFERENCES jobs (id), destination TEXT NOT NULL, "
    "item TEXT NOT NULL, path TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, "
    "next_attempt_at DOUBLE PRECISION, last_error TEXT, sent_at DOUBLE PRECISION, UNIQUE (destination, item))",
    "CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at)",
    "CREATE INDEX IF NOT EXISTS deliveries_job ON deliveries (job_id)",
)
#: Statements that bring a database from version ``index`` to ``index + 1``.
MIGRATIONS: tuple[tuple[str, ...], ...] = (_SCHEMA_V1,)

_JOB_COLUMNS = ("id, series_uid, model, state, attempts, route, worker, lease_expires_at, received_at, queued_at, started_at, "
                "sending_at, finished_at, qc_decision, error, result_dir")
_DELIVERY_COLUMNS = "id, job_id, destination, item, path, state, attempts, next_attempt_at, last_error, sent_at"


@dataclass(frozen=True)
class _Dialect:
    """The little the two databases differ in."""

    name: str
    placeholder: str
    identity: str
    """The auto-numbered primary key column type."""
    lock_suffix: str
    """Appended to a claim's SELECT: lock the chosen rows, skip those another transaction holds."""
    schema_lock: str | None
    """Run first in the migration transaction so concurrent first connections create the schema once."""


_SQLITE = _Dialect("sqlite", "?", "INTEGER PRIMARY KEY AUTOINCREMENT", "", None)
_POSTGRES = _Dialect("postgresql", "%s", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                     " FOR UPDATE OF {table} SKIP LOCKED", "SELECT pg_advisory_xact_lock(7262871)")


@dataclass(frozen=True)
class Counts:
    """How many of each there are (``/metrics``)."""

    jobs: dict[str, int] = field(default_factory=dict)
    """Jobs per state (every state present, 0 when none)."""
    series: dict[str, int] = field(default_factory=dict)
    """Series per state."""
    deliveries: dict[str, int] = field(default_factory=dict)
    """Deliveries per state."""
    instances: int = 0
    """Instances received."""
    associations: int = 0
    """Released associations recorded."""


class _Tx:
    """One open transaction: run SQL written with ``?`` placeholders, get rows as dicts."""

    def __init__(self, connection: Any, dialect: _Dialect) -> None:
        self._connection = connection
        self.dialect = dialect

    def _execute(self, sql: str, params: Sequence[Any]) -> Any:
        if self.dialect.placeholder != "?":
            sql = sql.replace("?", self.dialect.placeholder)
        return self._connection.execute(sql, tuple(params))

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Execute a statement; the number of rows it changed."""
        return int(self._execute(sql, params).rowcount)

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Every row of a query, as column -> value."""
        cursor = self._execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        """The first row of a query, or None."""
        rows = self.all(sql, params)
        return rows[0] if rows else None

    def event(self, job_id: int, now: float, event: str, detail: str | None = None) -> None:
        """Add a line to a job's timeline."""
        self.run("INSERT INTO events (job_id, at, event, detail) VALUES (?, ?, ?, ?)", (job_id, now, event, detail))


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" for _ in values)


def _job(row: dict[str, Any]) -> Job:
    return Job(**row)


def _delivery(row: dict[str, Any]) -> Delivery:
    return Delivery(**row)


def _sqlite_path(url: str) -> Path:
    path = url[len("sqlite:///"):]
    if not path:
        raise ServeError(f"database URL {url!r} names no file: use sqlite:///relative/path or sqlite:////absolute/path")
    return Path(path)


class JobStore:
    """The job queue, series and deliveries in one database (see the module docstring for the life cycle).

    One connection per store, used by one thread at a time (a lock serialises the threads of a process);
    open one store per process. ``max_job_attempts`` bounds how often a job is started before it fails,
    ``max_delivery_attempts`` how often a result is sent before it is dead-lettered.
    """

    def __init__(self, connection: Any, dialect: _Dialect, *, max_job_attempts: int = 3, max_delivery_attempts: int = 5) -> None:
        self._connection = connection
        self._dialect = dialect
        self._lock = threading.RLock()
        self.max_job_attempts = max_job_attempts
        self.max_delivery_attempts = max_delivery_attempts

    @classmethod
    def connect(cls, url: str, *, max_job_attempts: int = 3, max_delivery_attempts: int = 5, busy_timeout_s: float = 30.0) -> JobStore:
        """Open the database at ``url`` (``sqlite:///path`` or ``postgresql://...``) and create or migrate its schema."""
        if url.startswith("sqlite:///"):
            path = _sqlite_path(url)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                connection: Any = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=FULL")
                connection.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
                connection.execute("PRAGMA foreign_keys=ON")
            except sqlite3.Error as exc:
                raise ServeError(f"cannot open the job database {path}: {exc}; check the folder exists and is writable") from None
            dialect = _SQLITE
        elif url.startswith(("postgresql://", "postgres://")):
            psycopg = import_serve_extra("psycopg", needed_for="a postgresql:// job database")
            try:
                connection = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(busy_timeout_s)))
            except psycopg.Error as exc:
                detail = " ".join(str(exc).split())[:200]
                raise ServeError(f"cannot reach the PostgreSQL job database ({detail}); check database.url and that the server runs") from None
            dialect = _POSTGRES
        else:
            raise ServeError(f"database URL must start with sqlite:/// or postgresql://, got {url.split('://')[0]!r}")
        store = cls(connection, dialect, max_job_attempts=max_job_attempts, max_delivery_attempts=max_delivery_attempts)
        store._migrate()
        return store

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._dialect.name

    @contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[_Tx]:
        """One transaction; on SQLite a write one starts with ``BEGIN IMMEDIATE`` (the write lock first, so a claim is atomic)."""
        with self._lock:
            if self._dialect is _SQLITE:
                self._connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield _Tx(self._connection, self._dialect)
                except BaseException:
                    self._connection.execute("ROLLBACK")
                    raise
                self._connection.execute("COMMIT")
            else:
                with self._connection.transaction():
                    yield _Tx(self._connection, self._dialect)

    def _migrate(self) -> None:
        with self._tx() as tx:
            if self._dialect.schema_lock:
                tx.all(self._dialect.schema_lock)
            tx.run("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = tx.one("SELECT MAX(version) AS version FROM schema_version")
            current = int(row["version"]) if row and row["version"] is not None else 0
            if current > SCHEMA_VERSION:
                raise ServeError(f"the job database has schema version {current}, newer than this medunet's {SCHEMA_VERSION}; upgrade medunet")
            for statements in MIGRATIONS[current:]:
                for statement in statements:
                    tx.run(statement.replace("{identity}", self._dialect.identity))
            if current < SCHEMA_VERSION:
                tx.run("DELETE FROM schema_version")
                tx.run("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._connection.close()

    def ping(self) -> bool:
        """Whether the database answers a query."""
        try:
            with self._lock:
                return _Tx(self._connection, self._dialect).one("SELECT 1 AS ok") is not None
        except Exception:  # noqa: BLE001 - any driver error means "not reachable" for /health
            return False

    # ------------------------------------------------------------------ receiving

    def record_association(self, association_id: str, calling_ae: str, peer_ip: str, instances: Sequence[ReceivedInstance],
                           *, now: float | None = None) -> tuple[str, ...]:
        """Record a released association and its instances in one transaction; the series UIDs it touched.

        Call it only for released associations (an aborted one's instances never count). Recording the same
        association again does nothing. A series that was complete, queued or skipped re-opens (see the docstring).
        """
        now = time.time() if now is None else now
        with self._tx() as tx:
            added = tx.run("INSERT INTO associations (id, calling_ae, peer_ip, instances, received_at) VALUES (?, ?, ?, ?, ?) "
                           "ON CONFLICT (id) DO NOTHING", (association_id, calling_ae, peer_ip, len(instances), now))
            if not added:
                return ()
            by_series: dict[str, list[ReceivedInstance]] = {}
            for instance in instances:
                by_series.setdefault(instance.series_instance_uid, []).append(instance)
            for series_uid, members in by_series.items():
                self._touch_series(tx, members[0], now)
                for inst in members:
                    tx.run("INSERT INTO instances (sop_instance_uid, sop_class_uid, series_uid, path, association_id, slice_position, "
                           "slice_thickness, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sop_instance_uid) DO UPDATE SET "
                           "path = excluded.path, association_id = excluded.association_id, received_at = excluded.received_at",
                           (inst.sop_instance_uid, inst.sop_class_uid, series_uid, str(inst.path), association_id,
                            inst.slice_position, inst.slice_thickness, now))
            return tuple(by_series)

    def _touch_series(self, tx: _Tx, first: ReceivedInstance, now: float) -> None:
        """Create the series (receiving), or mark new instances on it, re-opening it and superseding its waiting jobs."""
        if tx.run("INSERT INTO series (uid, study_uid, modality, body_part, description, state, first_received_at, last_received_at) "
                  "VALUES (?, ?, ?, ?, ?, 'receiving', ?, ?) ON CONFLICT (uid) DO NOTHING",
                  (first.series_instance_uid, first.study_instance_uid, first.modality, first.body_part_examined,
                   first.series_description, now, now)):
            return  # new (two receivers recording one new series at once: the second lands below)
        row = tx.one("SELECT state FROM series WHERE uid = ?", (first.series_instance_uid,))
        assert row is not None
        tx.run("UPDATE series SET last_received_at = ? WHERE uid = ?", (now, first.series_instance_uid))
        if row["state"] == "receiving":
            return
        tx.run("UPDATE series SET state = 'receiving', reason = NULL, completed_at = NULL, reopened = reopened + 1 WHERE uid = ?",
               (first.series_instance_uid,))
        waiting = tx.all("SELECT id FROM jobs WHERE series_uid = ? AND state IN ('received', 'queued', 'running')",
                         (first.series_instance_uid,))
        for job in waiting:
            tx.run("UPDATE jobs SET state = 'superseded', finished_at = ?, lease_expires_at = NULL, "
                   "error = 'late instances re-opened the series; a new job follows' WHERE id = ?", (now, job["id"]))
            tx.event(job["id"], now, "superseded", "late instances re-opened the series")

    def complete_series(self, stable_seconds: float, *, now: float | None = None) -> list[SeriesFacts]:
        """Mark series silent for ``stable_seconds`` complete; the facts of every complete series awaiting routing.

        A series stays complete until :meth:`enqueue` or :meth:`skip` routes it, so one left by a crash between
        this call and routing is returned again.
        """
        now = time.time() if now is None else now
        with self._tx() as tx:
            tx.run("UPDATE series SET state = 'complete', completed_at = ? WHERE state = 'receiving' AND last_received_at <= ?",
                   (now, now - stable_seconds))
            found = []
            for row in tx.all("SELECT uid, study_uid, modality, body_part, description FROM series WHERE state = 'complete' "
                              "ORDER BY completed_at, uid"):
                slices = tx.all("SELECT slice_position, slice_thickness FROM instances WHERE series_uid = ?", (row["uid"],))
                spacing = slice_spacing((s["slice_position"] for s in slices), (s["slice_thickness"] for s in slices))
                tx.run("UPDATE series SET slices = ?, spacing_mm = ? WHERE uid = ?", (len(slices), spacing, row["uid"]))
                found.append(SeriesFacts(row["study_uid"], row["uid"], row["modality"], row["body_part"], row["description"],
                                         len(slices), spacing))
            return found

    def enqueue(self, series_uid: str, models: Sequence[str], *, route: str | None = None, now: float | None = None) -> list[Job]:
        """Queue one job per model for a complete series; [] if the series is not complete (already routed elsewhere)."""
        now = time.time() if now is None else now
        with self._tx() as tx:
            if not tx.run("UPDATE series SET state = 'queued' WHERE uid = ? AND state = 'complete'", (series_uid,)):
                return []
            series = tx.one("SELECT last_received_at FROM series WHERE uid = ?", (series_uid,))
            assert series is not None
            jobs = []
            for model in models:
                row = tx.one(f"INSERT INTO jobs (series_uid, model, route, state, received_at, queued_at) VALUES (?, ?, ?, 'queued', ?, ?) "
                             f"RETURNING {_JOB_COLUMNS}", (series_uid, model, route, series["last_received_at"], now))
                assert row is not None
                tx.event(row["id"], now, "queued", f"route {route}" if route else None)
                jobs.append(_job(row))
            return jobs

    def skip(self, series_uid: str, reason: str, *, now: float | None = None) -> bool:
        """Record that no route matched a complete series; False if it was not complete."""
        now = time.time() if now is None else now
        with self._tx() as tx:
            return bool(tx.run("UPDATE series SET state = 'skipped', reason = ? WHERE uid = ? AND state = 'complete'", (reason, series_uid)))

    # ------------------------------------------------------------------ running

    def claim(self, worker: str, models: Sequence[str] | None, lease_seconds: float, *, now: float | None = None) -> Job | None:
        """Take the oldest queued job of one of ``models`` (None: any) for ``worker``; two workers never get the same job."""
        now = time.time() if now is None else now
        with self._tx() as tx:
            where, params = "state = 'queued'", []
            if models is not None:
                if not models:
                    return None
                where += f" AND model IN ({_marks(models)})"
                params = list(models)
            lock = self._dialect.lock_suffix.format(table="jobs")
            row = tx.one(f"SELECT id FROM jobs WHERE {where} ORDER BY id LIMIT 1{lock}", params)
            if row is None:
                return None
            claimed = tx.one(f"UPDATE jobs SET state = 'running', worker = ?, lease_expires_at = ?, attempts = attempts + 1, "
                             f"started_at = ?, error = NULL WHERE id = ? AND state = 'queued' RETURNING {_JOB_COLUMNS}",
                             (worker, now + lease_seconds, now, row["id"]))
            if claimed is None:
                return None
            tx.event(claimed["id"], now, "running", f"worker {worker}, attempt {claimed['attempts']}")
            return _job(claimed)

    def heartbeat(self, job_id: int, worker: str, lease_seconds: float, *, now: float | None = None) -> bool:
        """Renew a running job's lease; False if ``worker`` no longer holds it (requeued, superseded): stop working on it."""
        now = time.time() if now is None else now
        with self._tx() as tx:
            return bool(tx.run("UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND worker = ? AND state = 'running'",
                               (now + lease_seconds, job_id, worker)))

    def requeue_expired(self, *, now: float | None = None) -> list[int]:
        """Jobs whose worker stopped renewing its lease (killed, hung): back to queued, or failed after max attempts."""
        now = time.time() if now is None else now
        with self._tx() as tx:
            lock = self._dialect.lock_suffix.format(table="jobs")
            expired = tx.all(f"SELECT id, worker, attempts FROM jobs WHERE state = 'running' AND lease_expires_at < ? ORDER BY id{lock}", (now,))
            for row in expired:
                if row["attempts"] >= self.max_job_attempts:
                    error = f"worker lost {row['attempts']} times (lease expired, last on {row['worker']}); retry it once the cause is fixed"
                    tx.run("UPDATE jobs SET state = 'failed', error = ?, finished_at = ?, lease_expires_at = NULL WHERE id = ?",
                           (error, now, row["id"]))
                    tx.event(row["id"], now, "failed", error)
                else:
                    tx.run("UPDATE jobs SET state = 'queued', worker = NULL, lease_expires_at = NULL, queued_at = ? WHERE id = ?",
                           (now, row["id"]))
                    tx.event(row["id"], now, "requeued", f"lease of worker {row['worker']} expired")
            return [int(row["id"]) for row in expired]

    def finish(self, job_id: int, qc_decision: str | None, result_dir: str | Path, deliveries: Sequence[DeliveryItem],
               *, worker: str | None = None, now: float | None = None) -> bool:
        """Record a job's results and what to send where: running -> sending (done / review at once with nothing to send).

        False if the job is no longer running (for ``worker``, when given): its lease expired or it was
        superseded, and the result must be discarded.
        """
        now = time.time() if now is None else now
        with self._tx() as tx:
            where, params = "id = ? AND state = 'running'", list[Any]([job_id])
            if worker is not None:
                where, params = where + " AND worker = ?", [job_id, worker]
            if not tx.run(f"UPDATE jobs SET state = 'sending', sending_at = ?, qc_decision = ?, result_dir = ?, lease_expires_at = NULL "
                          f"WHERE {where}", [now, qc_decision, str(result_dir), *params]):
                return False
            for item in deliveries:
                tx.run("INSERT INTO deliveries (job_id, destination, item, path, state, next_attempt_at) VALUES (?, ?, ?, ?, 'pending', ?) "
                       "ON CONFLICT (destination, item) DO UPDATE SET job_id = excluded.job_id, path = excluded.path, "
                       "state = CASE WHEN deliveries.state = 'sent' THEN 'sent' ELSE 'pending' END, "
                       "attempts = CASE WHEN deliveries.state = 'sent' THEN deliveries.attempts ELSE 0 END, "
                       "next_attempt_at = excluded.next_attempt_at", (job_id, item.destination, item.item, item.path, now))
            tx.event(job_id, now, "sending", f"QC {qc_decision or 'none'}, {len(deliveries)} result(s) to send")
            self._settle(tx, job_id, now)
            return True

    def fail(self, job_id: int, error: str, *, worker: str | None = None, now: float | None = None) -> bool:
        """Record that a running job failed (one line saying why); False if it was no longer running (for ``worker``)."""
        now = time.time() if now is None else now
        with self._tx() as tx:
            where, params = "id = ? AND state = 'running'", list[Any]([job_id])
            if worker is not None:
                where, params = where + " AND worker = ?", [job_id, worker]
            if not tx.run(f"UPDATE jobs SET state = 'failed', error = ?, finished_at = ?, lease_expires_at = NULL WHERE {where}",
                          [error, now, *params]):
                return False
            tx.event(job_id, now, "failed", error)
            return True

    # ------------------------------------------------------------------ sending

    def due_deliveries(self, *, worker: str, lease_seconds: float = 300.0, limit: int = 100, now: float | None = None) -> list[Delivery]:
        """Pending deliveries due now, leased to ``worker`` for ``lease_seconds`` so no other sender takes them meanwhile."""
        now = time.time() if now is None else now
        with self._tx() as tx:
            lock = self._dialect.lock_suffix.format(table="deliveries")
            rows = tx.all(f"SELECT id FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at, id "
                          f"LIMIT ?{lock}", (now, limit))
            ids = [row["id"] for row in rows]
            if not ids:
                return []
            tx.run(f"UPDATE deliveries SET next_attempt_at = ? WHERE id IN ({_marks(ids)})", [now + lease_seconds, *ids])
            found = tx.all(f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE id IN ({_marks(ids)}) ORDER BY id", ids)
            return [_delivery(row) for row in found]

    def delivery_sent(self, delivery_id: int, *, now: float | None = None) -> None:
        """Record a delivery as sent; its job becomes done (or review) when nothing of it is left to send."""
        now = time.time() if now is None else now
        with self._tx() as tx:
            row = _delivery_row(tx, delivery_id)
            if tx.run("UPDATE deliveries SET state = 'sent', sent_at = ?, last_error = NULL WHERE id = ? AND state = 'pending'", (now, delivery_id)):
                tx.event(row["job_id"], now, "sent", f"{row['item']} to {row['destination']}")
                self._settle(tx, row["job_id"], now)

    def delivery_failed(self, delivery_id: int, error: str, next_attempt_at: float, *, now: float | None = None) -> DeliveryState:
        """Record a failed send: retried at ``next_attempt_at``, or dead after the last attempt (its job then fails)."""
        now = time.time() if now is None else now
        with self._tx() as tx:
            row = _delivery_row(tx, delivery_id)
            if row["state"] != "pending":
                state_now: DeliveryState = row["state"]
                return state_now
            attempts = row["attempts"] + 1
            state: DeliveryState = "dead" if attempts >= self.max_delivery_attempts else "pending"
            tx.run("UPDATE deliveries SET state = ?, attempts = ?, next_attempt_at = ?, last_error = ? WHERE id = ?",
                   (state, attempts, None if state == "dead" else next_attempt_at, error, delivery_id))
            what = "dead-lettered" if state == "dead" else "send failed"
            tx.event(row["job_id"], now, what, f"{row['item']} to {row['destination']}, attempt {attempts}: {error}")
            self._settle(tx, row["job_id"], now)
            return state

    def _settle(self, tx: _Tx, job_id: int, now: float) -> None:
        """A sending job with nothing left pending: done or review, or failed if a result was dead-lettered."""
        job = tx.one("SELECT state, qc_decision FROM jobs WHERE id = ?", (job_id,))
        if job is None or job["state"] != "sending":
            return
        states = {r["state"]: r["n"] for r in tx.all("SELECT state, COUNT(*) AS n FROM deliveries WHERE job_id = ? GROUP BY state", (job_id,))}
        if states.get("pending"):
            return
        if states.get("dead"):
            error = f"{states['dead']} result(s) dead-lettered after {self.max_delivery_attempts} attempts; fix the destination and retry"
            tx.run("UPDATE jobs SET state = 'failed', error = ?, finished_at = ? WHERE id = ?", (error, now, job_id))
            tx.event(job_id, now, "failed", error)
            return
        final = "review" if job["qc_decision"] == "review" else "done"
        tx.run("UPDATE jobs SET state = ?, finished_at = ? WHERE id = ?", (final, now, job_id))
        tx.event(job_id, now, final, None)

    def retry(self, job_id: int, *, now: float | None = None) -> Job:
        """Retry a failed job: its dead-lettered results are sent again, or (none) it is queued again with fresh attempts."""
        now = time.time() if now is None else now
        with self._tx() as tx:
            row = tx.one("SELECT state FROM jobs WHERE id = ?", (job_id,))
            if row is None:
                raise ServeError(f"no job {job_id}; list the jobs with GET /jobs")
            if row["state"] != "failed":
                raise ServeError(f"job {job_id} is {row['state']}; only a failed job can be retried")
            if tx.run("UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ? WHERE job_id = ? AND state = 'dead'", (now, job_id)):
                tx.run("UPDATE jobs SET state = 'sending', error = NULL, finished_at = NULL WHERE id = ?", (job_id,))
                tx.event(job_id, now, "retry", "dead-lettered results sent again")
            else:
                tx.run("UPDATE jobs SET state = 'queued', attempts = 0, worker = NULL, error = NULL, queued_at = ?, started_at = NULL, "
                       "sending_at = NULL, finished_at = NULL WHERE id = ?", (now, job_id))
                tx.event(job_id, now, "retry", "queued again")
            found = tx.one(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
            assert found is not None
            return _job(found)

    def release(self, job_id: int, worker: str, *, now: float | None = None) -> bool:
        """Hand a running job back to the queue (a worker shutting down); False if ``worker`` no longer held it."""
        now = time.time() if now is None else now
        with self._tx() as tx:
            if not tx.run("UPDATE jobs SET state = 'queued', worker = NULL, lease_expires_at = NULL, queued_at = ? "
                          "WHERE id = ? AND worker = ? AND state = 'running'", (now, job_id, worker)):
                return False
            tx.event(job_id, now, "requeued", f"worker {worker} shut down")
            return True

    # ------------------------------------------------------------------ reading

    def jobs(self, state: str | None = None, limit: int = 50, offset: int = 0) -> list[Job]:
        """Jobs, newest first, optionally of one state."""
        with self._tx(write=False) as tx:
            where, params = ("WHERE state = ?", [state]) if state else ("", [])
            rows = tx.all(f"SELECT {_JOB_COLUMNS} FROM jobs {where} ORDER BY id DESC LIMIT ? OFFSET ?", [*params, limit, offset])
            return [_job(row) for row in rows]

    def job(self, job_id: int) -> JobDetail | None:
        """A job with its timeline and deliveries, or None."""
        with self._tx(write=False) as tx:
            row = tx.one(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
            if row is None:
                return None
            events = tx.all("SELECT at, event, detail FROM events WHERE job_id = ? ORDER BY id", (job_id,))
            deliveries = tx.all(f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE job_id = ? ORDER BY id", (job_id,))
            return JobDetail(_job(row), tuple(Event(**e) for e in events), tuple(_delivery(d) for d in deliveries))

    def association_known(self, association_id: str) -> bool:
        """Whether a released association with this id was recorded (see :func:`medunet.serve.receiver.discard_unreleased`)."""
        with self._tx(write=False) as tx:
            return tx.one("SELECT 1 AS found FROM associations WHERE id = ?", (association_id,)) is not None

    def series_instances(self, series_uid: str) -> list[tuple[str, str]]:
        """(SOP Instance UID, stored file) of every instance of a series, in SOP Instance UID order."""
        with self._tx(write=False) as tx:
            rows = tx.all("SELECT sop_instance_uid, path FROM instances WHERE series_uid = ? ORDER BY sop_instance_uid", (series_uid,))
            return [(str(r["sop_instance_uid"]), str(r["path"])) for r in rows]

    def series_state(self, series_uid: str) -> tuple[str, str | None] | None:
        """A series' state and (when skipped) the reason, or None if it was never received."""
        with self._tx(write=False) as tx:
            row = tx.one("SELECT state, reason FROM series WHERE uid = ?", (series_uid,))
            return None if row is None else (row["state"], row["reason"])

    def counts(self) -> Counts:
        """Jobs, series and deliveries per state; instances and associations received."""
        with self._tx(write=False) as tx:
            def per_state(table: str, states: Sequence[str]) -> dict[str, int]:
                found = {r["state"]: int(r["n"]) for r in tx.all(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")}
                return {s: found.get(s, 0) for s in states} | found

            instances = tx.one("SELECT COUNT(*) AS n FROM instances")
            associations = tx.one("SELECT COUNT(*) AS n FROM associations")
            return Counts(per_state("jobs", JOB_STATES), per_state("series", ("receiving", "complete", "queued", "skipped")),
                          per_state("deliveries", ("pending", "sent", "dead")),
                          int(instances["n"]) if instances else 0, int(associations["n"]) if associations else 0)

    def stage_durations(self, limit: int = 1000) -> dict[str, list[float]]:
        """Seconds per stage of the latest ``limit`` finished jobs: wait (last instance to queued), queue, run, send, total."""
        with self._tx(write=False) as tx:
            rows = tx.all("SELECT received_at, queued_at, started_at, sending_at, finished_at FROM jobs "
                          "WHERE state IN ('done', 'review') ORDER BY finished_at DESC LIMIT ?", (limit,))
        stages = {"wait": ("received_at", "queued_at"), "queue": ("queued_at", "started_at"), "run": ("started_at", "sending_at"),
                  "send": ("sending_at", "finished_at"), "total": ("received_at", "finished_at")}
        found: dict[str, list[float]] = {name: [] for name in stages}
        for row in rows:
            for name, (start, end) in stages.items():
                if row[start] is not None and row[end] is not None:
                    found[name].append(max(0.0, float(row[end]) - float(row[start])))
        return found


def _delivery_row(tx: _Tx, delivery_id: int) -> dict[str, Any]:
    """The delivery's job, destination, item, attempts and state; an unknown id is a :class:`ServeError`."""
    row = tx.one("SELECT job_id, destination, item, attempts, state FROM deliveries WHERE id = ?", (delivery_id,))
    if row is None:
        raise ServeError(f"no delivery {delivery_id} in the job database")
    return row
