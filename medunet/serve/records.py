"""The typed rows the parts of ``medunet serve`` hand each other: the receiver, the job store, the workers, the sender, the API.

None of them holds a patient attribute (name, ID, birth date...): only UIDs, the series' technical facts, AE
titles, paths and states, so everything here may be logged, audited and shown by the API.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

from medunet.errors import ServeError

#: A job's states, in order: created ``queued`` once its series is stable and routed (the series' own ``receiving``
#: time is the job's ``received_at``), ``running`` on a worker, ``sending`` its results, then ``done`` (all sent, QC
#: accepted), ``review`` (QC flagged it: held, or sent to the review destinations), ``failed`` (inference failed, the
#: worker was lost too often, or a result was dead-lettered) or ``superseded`` (late instances re-opened the series;
#: a newer job replaces it).
JobState = Literal["received", "queued", "running", "sending", "done", "review", "failed", "superseded"]
JOB_STATES: tuple[JobState, ...] = ("received", "queued", "running", "sending", "done", "review", "failed", "superseded")
#: States a job leaves on its own; the others are final (``retry`` brings back a failed one).
ACTIVE_STATES: tuple[JobState, ...] = ("received", "queued", "running", "sending")
#: A series' states: ``receiving`` instances, ``complete`` (stable, awaiting routing), ``queued`` (jobs created), ``skipped`` (no route).
SeriesState = Literal["receiving", "complete", "queued", "skipped"]
#: A delivery's states: ``pending`` (to send, or retrying), ``sent``, ``dead`` (dead-lettered after the last attempt).
DeliveryState = Literal["pending", "sent", "dead"]


@dataclass(frozen=True)
class ReceivedInstance:
    """One stored instance of a released association, as the receiver hands it to :meth:`JobStore.record_association`."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: Path
    """Where the instance was stored, as received."""
    modality: str
    body_part_examined: str
    series_description: str
    slice_position: float | None
    """Position along the slice normal (Image Position Patient projected on the normal), mm; None when absent."""
    slice_thickness: float | None
    """Slice Thickness (0018,0050) in mm; None when absent."""


@dataclass(frozen=True)
class Job:
    """One model's run on one series, as the store holds it."""

    id: int
    series_uid: str
    model: str
    state: JobState
    attempts: int
    """Times the job was started (claimed by a worker)."""
    route: str | None
    """The routing rule that created it."""
    worker: str | None
    """The worker holding (or that last held) it."""
    lease_expires_at: float | None
    received_at: float | None
    """When the series' last instance arrived (UNIX seconds), the start of the job's life."""
    queued_at: float | None
    started_at: float | None
    sending_at: float | None
    finished_at: float | None
    qc_decision: str | None
    error: str | None
    result_dir: str | None


@dataclass(frozen=True)
class Event:
    """One line of a job's timeline."""

    at: float
    event: str
    detail: str | None


@dataclass(frozen=True)
class DeliveryItem:
    """One result file to send to one destination, as a worker hands it to :meth:`JobStore.finish`."""

    destination: str
    item: str
    """What makes it unique at the destination: the SOP Instance UID of a DICOM result, the file's name in a folder."""
    path: str
    """The result file."""


@dataclass(frozen=True)
class Delivery:
    """A result on its way to one destination."""

    id: int
    job_id: int
    destination: str
    item: str
    path: str
    state: DeliveryState
    attempts: int
    """Failed attempts so far."""
    next_attempt_at: float | None
    last_error: str | None
    sent_at: float | None


@dataclass(frozen=True)
class JobDetail:
    """A job with its timeline and its deliveries (``GET /jobs/{id}``)."""

    job: Job
    events: tuple[Event, ...]
    deliveries: tuple[Delivery, ...]


def import_serve_extra(name: str, *, needed_for: str) -> ModuleType:
    """Import a package of the ``medunet[serve]`` extra, or raise a one-line :class:`ServeError` naming the extra."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ServeError(f"{needed_for} needs {name}, which is not installed: pip install 'medunet[serve]'") from None
