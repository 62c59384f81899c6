"""The service's audit log: JSON lines, one event a line, appended and fsynced before the call returns.

Each line holds the time (UTC, ISO 8601), the event and only the fields listed in :data:`AUDIT_FIELDS`: ids,
UIDs, AE titles, the peer address, model, destination, state and a short detail. Any other field is refused, so
a patient attribute (name, ID, birth date) cannot be written by mistake.

Example line::

    {"time": "2026-05-09T07:35:25.120Z", "event": "association_released", "association_id": "a1b2", "calling_ae": "CT1",
     "peer_ip": "10.1.2.3", "instances": 212}
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

#: The fields an audit event may carry besides its time and name.
AUDIT_FIELDS = frozenset({
    "association_id", "job_id", "delivery_id", "study_instance_uid", "series_instance_uid", "sop_instance_uid",
    "calling_ae", "called_ae", "peer_ip", "model", "route", "destination", "state", "instances", "attempt", "detail",
})


def _utc(at: float) -> str:
    moment = datetime.datetime.fromtimestamp(at, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class AuditLog:
    """Append-only JSON-lines audit log, safe to share between the threads of one process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, event: str, *, now: float | None = None, **fields: Any) -> dict[str, Any]:
        """Append one event (fields from :data:`AUDIT_FIELDS` only; None values are left out) and fsync it; the record."""
        unknown = sorted(set(fields) - AUDIT_FIELDS)
        if unknown:
            raise ValueError(f"audit fields {unknown} are not allowed (only {sorted(AUDIT_FIELDS)}): the audit log holds no patient attributes")
        record: dict[str, Any] = {"time": _utc(time.time() if now is None else now), "event": event}
        record.update({k: v for k, v in fields.items() if v is not None})
        line = json.dumps(record, ensure_ascii=False, sort_keys=False, default=str) + "\n"
        with self._lock:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(descriptor, line.encode("utf-8"))
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        return record

    def read(self) -> list[dict[str, Any]]:
        """Every event so far (for tests and the runbook's checks)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
