"""Run batch inference as three overlapped stages: read + preprocess, predict, write.

While the network works on case *i*, a background thread reads and preprocesses case *i + 1*
and another writes case *i - 1* (gzip, preview, statistics). Queues of one case between the
stages bound the memory to about three cases in flight, whatever the batch size. The stages
are plain functions of a :class:`Job`, so the sequential run (``overlap=False``) executes the
very same code in order and gives identical outputs.

Errors: a :class:`~medunet.errors.MedunetError` in any stage marks that job failed (its later
stages are skipped) and the others go on; any other exception stops the pipeline and is raised
in the caller's thread once the background threads have finished.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from medunet.errors import MedunetError
from medunet.qc.decide import QCRecord

Stage = Callable[["Job"], None]


@dataclass
class Job:
    """One case moving through the stages; each stage fills in its part."""

    name: str
    inputs: list[Any]
    prepared: Any = None
    """The read and preprocessed case (prepare -> predict; freed once predicted)."""
    result: Any = None
    """The case through every stage after the network (predict -> write; freed once written)."""
    qc: QCRecord | None = None
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


_DONE = object()


def _run_stage(stage: Stage, job: Job) -> None:
    """Run one stage on a job unless an earlier stage failed; a MedunetError marks the job failed."""
    if job.error is not None:
        return
    started = time.perf_counter()
    try:
        stage(job)
    except MedunetError as exc:
        job.error = str(exc)
        job.prepared = job.result = None  # free the volumes of a failed case at once
    finally:
        job.seconds += time.perf_counter() - started


def run_jobs(jobs: Iterable[Job], prepare: Stage, predict: Stage, write: Stage, *, overlap: bool = True) -> Iterator[Job]:
    """Run the three stages over ``jobs``; yields each job, in input order, once written (or failed).

    ``overlap=False`` runs every stage of a job before starting the next job, in the caller's thread.
    """
    if not overlap:
        for job in jobs:
            for stage in (prepare, predict, write):
                _run_stage(stage, job)
            yield job
        return
    yield from _Overlapped(prepare, predict, write).run(jobs)


class _Overlapped:
    """Reader and writer threads around the caller's prediction loop, joined by one-slot queues."""

    def __init__(self, prepare: Stage, predict: Stage, write: Stage) -> None:
        self.prepare, self.predict, self.write = prepare, predict, write
        self.prepared: queue.Queue[Any] = queue.Queue(maxsize=1)
        self.predicted: queue.Queue[Any] = queue.Queue(maxsize=1)
        self.written: queue.Queue[Any] = queue.Queue()
        self.stop = threading.Event()
        self.fatal: list[BaseException] = []

    def _reader(self, jobs: Iterable[Job]) -> None:
        try:
            for job in jobs:
                if self.stop.is_set():
                    break
                _run_stage(self.prepare, job)
                self._put(self.prepared, job)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, raised there
            self.fatal.append(exc)
        finally:
            self._put(self.prepared, _DONE, force=True)

    def _writer(self) -> None:
        try:
            while (job := self.predicted.get()) is not _DONE:
                if not self.stop.is_set():
                    _run_stage(self.write, job)
                self.written.put(job)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, raised there
            self.fatal.append(exc)
            self.stop.set()
            while self.predicted.get() is not _DONE:  # let the predicting thread finish its puts
                pass
        finally:
            self.written.put(_DONE)

    def _put(self, q: queue.Queue[Any], item: Any, *, force: bool = False) -> None:
        """Put, giving up (unless ``force``) when the pipeline is stopping, so no thread blocks forever."""
        while True:
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                if self.stop.is_set() and not force:
                    return

    def run(self, jobs: Iterable[Job]) -> Iterator[Job]:
        reader = threading.Thread(target=self._reader, args=(jobs,), name="medunet-read", daemon=True)
        writer = threading.Thread(target=self._writer, name="medunet-write", daemon=True)
        reader.start()
        writer.start()
        try:
            while (job := self.prepared.get()) is not _DONE:
                if not self.stop.is_set():
                    _run_stage(self.predict, job)
                    job.prepared = None  # the preprocessed volume is not needed any more: free it now
                self.predicted.put(job)
                yield from self._drain(block=False)
        except BaseException as exc:
            self.fatal.append(exc)
            self.stop.set()
            while self.prepared.get() is not _DONE:  # unblock the reader
                pass
        finally:
            self.predicted.put(_DONE)
            if self.fatal:
                self.stop.set()
            reader.join()
            writer.join()
        if self.fatal:
            raise self.fatal[0]
        yield from self._drain(block=True)

    def _drain(self, *, block: bool) -> Iterator[Job]:
        while True:
            try:
                job = self.written.get(block=block)
            except queue.Empty:
                return
            if job is _DONE:
                return
            yield job
