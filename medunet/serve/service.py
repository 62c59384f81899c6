"""``medunet serve``'s process: the DICOM node, the job store, the scheduler, workers, senders and the REST API together.

    service = Service(load_serve_config("serve.yaml"))
    service.run_forever()      # blocks; SIGTERM / SIGINT stop it gracefully

or, in a test, ``service.start()`` ... ``service.stop()``. The threads:

- **node**: the C-STORE SCP; each released association is recorded in the store (and the audit log) before
  the node answers the release, so "released" means "recorded".
- **scheduler** (every 0.5 s): requeues jobs whose worker lost its lease, marks silent series complete, routes
  them (non-image series and series no rule matches are skipped) and queues one job per model.
- **workers** (``workers.jobs_per_model`` per model): claim a job, segment its series (the model stays loaded),
  write the results into ``<storage>/results/<job id>.partial/``, rename it to ``<storage>/results/<job id>/``,
  and hand the deliveries to the store. The SEG's and RTSTRUCT's UIDs derive from (series, model, job id), so a
  job run again after a crash writes the same instances, which a PACS stores once.
- **heartbeat**: renews the lease of every running job.
- **sender**: sends due deliveries by destination kind, retrying with back-off (``retry``), dead-lettering after
  the last attempt.
- **api**: FastAPI on uvicorn (:mod:`medunet.serve.api`).

Which of them a process runs is its ``roles`` (:data:`ROLES`; :data:`MODES` names the sets the CLI offers):
everything by default; ``medunet serve --worker`` only workers, heartbeat and sender (and the API if asked), so
several worker processes on several machines share one PostgreSQL queue and one storage folder;
``--receiver-only`` the node, the scheduler and the API, no model loaded.

Every state change of a job is one log line (job id, model, state; UIDs, never a patient attribute).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medunet.errors import MedunetError, describe_unexpected
from medunet.model.layout import QC_FILE
from medunet.serve.api import ApiServer, ModelInfo, create_app, models_from_config
from medunet.serve.audit import AUDIT_FIELDS, AuditLog
from medunet.serve.config import Destination, ServeConfig
from medunet.serve.receiver import NON_IMAGE_MODALITIES, REJECT_CALLING_AE, DicomNode, discard_unreleased
from medunet.serve.records import Delivery, DeliveryItem, Job, ReceivedInstance
from medunet.serve.routing import route, skip_reason
from medunet.serve.sender import copy_atomic, send_dicom, send_folder, send_stowrs
from medunet.serve.store import JobStore

if TYPE_CHECKING:
    from medunet.inference.segmenter import Segmenter

log = logging.getLogger("medunet")

#: Folders under the storage root: results (one per job) and private inputs of running jobs.
RESULTS, WORK = "results", "work"
#: Suffix of a result folder being written; renamed away once complete.
PARTIAL = ".partial"
#: File names of the results inside a job's folder, per output format.
RESULT_FILES = {"dicom-seg": "result.seg.dcm", "rtstruct": "result.rtstruct.dcm", "nifti": "result.nii.gz", "qc": QC_FILE}
#: Seconds between two scheduler passes, and between two sender passes when nothing was due.
TICK_S = 0.5
#: States after which a job does not change on its own.
FINAL_STATES = ("done", "review", "failed", "superseded")
#: The parts a process may run: the DICOM node, the scheduler, the workers (with their heartbeat), the sender, the API.
ROLES = frozenset({"node", "scheduler", "workers", "sender", "api"})
#: The roles of ``medunet serve`` (all), ``--worker`` and ``--receiver-only``; a worker adds "api" when given ``--api-port``.
MODES = {"all": ROLES, "worker": frozenset({"workers", "sender"}), "receiver": frozenset({"node", "scheduler", "api"})}


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, MedunetError):
        return " ".join(str(exc).split())[:400]
    return describe_unexpected(exc)


class _ConfiguredNode(DicomNode):
    """The DICOM node with the config's allow-list of (AE title, address) pairs checked first."""

    def __init__(self, allows: Callable[[str, str], bool], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._allows = allows

    def _refusal(self, calling: str, called: str, peer_ip: str) -> tuple[tuple[int, int, int], str] | None:
        if not self._allows(calling, peer_ip):
            return REJECT_CALLING_AE, f"calling AE title {calling!r} from {peer_ip} is not in node.allowed_callers"
        return super()._refusal(calling, called, peer_ip)


class _Sink:
    """The node's sink: record the released association in the store."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def on_released(self, association_id: str, calling_ae: str, peer_ip: str, instances: Sequence[ReceivedInstance]) -> None:
        self.store.record_association(association_id, calling_ae, peer_ip, instances)


class Service:
    """Everything ``medunet serve`` runs in one process (see the module docstring).

    Args:
        config: the service's configuration.
        segmenters: already loaded models by name (tests); None loads every configured model once.
        worker_id: names this process's workers in the job store; default ``<host>:<pid>``.
        roles: the parts this process runs (:data:`ROLES`, the default: all); models load only with "workers".
    """

    def __init__(self, config: ServeConfig, *, segmenters: Mapping[str, Segmenter] | None = None, worker_id: str | None = None,
                 roles: Collection[str] = ROLES) -> None:
        unknown = sorted(set(roles) - ROLES)
        if unknown or not roles:
            raise ValueError(f"roles must be a non-empty subset of {sorted(ROLES)}, got {sorted(roles)}")
        self.roles = frozenset(roles)
        self.config = config
        self.storage = config.storage
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.store = JobStore.connect(config.database_url, max_job_attempts=config.workers.max_attempts,
                                      max_delivery_attempts=config.retry.max_attempts)
        self.audit = AuditLog(config.audit_path)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running: dict[int, str] = {}  # job id -> worker holding it in this process
        self._lock = threading.Lock()
        self.segmenters: dict[str, Segmenter] = ({} if "workers" not in self.roles else
                                                 dict(segmenters) if segmenters is not None else self._load_models())
        self.node: DicomNode | None = None
        self.api: ApiServer | None = None

    # ------------------------------------------------------------------------------------------------ set-up

    def _load_models(self) -> dict[str, Segmenter]:
        from medunet.inference.segmenter import Segmenter

        loaded = {}
        for name, model in self.config.models.items():
            started = time.monotonic()
            loaded[name] = Segmenter.from_checkpoint(model.path, device=model.device, folds=model.folds)
            log.info("model %s loaded from %s in %.1f s", name, model.path, time.monotonic() - started)
        return loaded

    def models(self) -> list[ModelInfo]:
        """The configured models as ``GET /models`` shows them."""
        found = []
        for info in models_from_config(self.config):
            segmenter = self.segmenters.get(info.name)
            classes = tuple(segmenter.class_names) if segmenter is not None else ()
            found.append(ModelInfo(info.name, info.path, info.device, info.folds, segmenter is not None, classes))
        return found

    def audit_event(self, event: str, **fields: Any) -> None:
        """Write an audit record; fields outside the audit log's list (the node's reasons, UID lists) go into its detail."""
        kept = {k: v for k, v in fields.items() if k in AUDIT_FIELDS}
        for many, one in (("series_uids", "series_instance_uid"), ("study_uids", "study_instance_uid")):
            if many in fields:
                kept[one] = list(fields[many])
        extra = {k: v for k, v in fields.items() if k not in AUDIT_FIELDS and k not in ("series_uids", "study_uids")}
        if extra:
            kept["detail"] = "; ".join([*([str(kept["detail"])] if "detail" in kept else []), *(f"{k} {v}" for k, v in extra.items())])
        try:
            self.audit.write(event, **kept)
        except OSError:
            log.exception("cannot write the audit log %s", self.audit.path)

    def _clean_storage(self) -> None:
        """After a crash: unreleased incoming folders (the node's), and private inputs and half-written result folders of
        jobs not running (a job running in another process sharing the storage keeps its folders)."""
        if "node" in self.roles:
            discard_unreleased(self.storage, self.store.association_known)
        if "workers" not in self.roles:
            return
        results, work = self.storage / RESULTS, self.storage / WORK
        leftovers = [*(sorted(results.glob(f"*{PARTIAL}")) if results.is_dir() else []), *(sorted(work.iterdir()) if work.is_dir() else [])]
        for folder in leftovers:
            name = folder.name.removesuffix(PARTIAL)
            job = self.store.job(int(name)) if name.isdigit() else None
            if job is None or job.job.state != "running":
                shutil.rmtree(folder, ignore_errors=True)

    def _loops(self) -> list[tuple[str, Callable[[], None]]]:
        """The background threads of this process's roles, by name."""
        loops: list[tuple[str, Callable[[], None]]] = []
        if "scheduler" in self.roles:
            loops.append(("scheduler", self._schedule_loop))
        if "sender" in self.roles:
            loops.append(("sender", self._send_loop))
        if "workers" in self.roles:
            loops.append(("heartbeat", self._heartbeat_loop))
            for model in self.segmenters:
                loops += [(f"worker-{model}-{i}", self._worker_loop(model, f"{self.worker_id}:{model}:{i}"))
                          for i in range(self.config.workers.jobs_per_model)]
        return loops

    def start(self) -> Service:
        """Start the node, the API and the background threads of this process's roles; returns at once."""
        self.storage.mkdir(parents=True, exist_ok=True)
        self._clean_storage()
        node = self.config.node
        if "node" in self.roles:
            self.node = _ConfiguredNode(node.allows, self.storage, _Sink(self.store), ae_title=node.ae_title, host=node.host, port=node.port,
                                        max_associations=node.max_associations, min_free_mb=node.min_free_disk_mb, on_event=self.audit_event)
        for name, target in self._loops():
            thread = threading.Thread(target=target, name=f"medunet-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if "api" in self.roles:
            liveness: dict[str, Callable[[], bool]] = {"node": lambda: self.node is not None} if "node" in self.roles else {}
            app = create_app(self.store, self.models, storage=self.storage, min_free_disk_mb=node.min_free_disk_mb,
                             liveness={**liveness, **{t.name.removeprefix("medunet-"): t.is_alive for t in self._threads}})
            self.api = ApiServer(app, self.config.api.host, self.config.api.port).start()
        if self.node is not None:
            self.node.start()
        parts = [f"DICOM node {node.ae_title} on {node.host}:{self.node.port}" if self.node is not None else "no DICOM node",
                 f"API on http://{self.api.host}:{self.api.port}" if self.api is not None else "no API",
                 *(["scheduler"] if "scheduler" in self.roles else []), *(["sender"] if "sender" in self.roles else []),
                 f"{len(self.segmenters)} model(s)" if "workers" in self.roles else "no workers"]
        log.info("medunet serve running (worker id %s): %s, database %s", self.worker_id, ", ".join(parts), self.store.backend)
        return self

    def stop(self, *, grace_s: float = 30.0) -> None:
        """Stop receiving, let running jobs finish for ``grace_s`` seconds (then hand them back to the queue), close the store."""
        if self.node is not None:
            self.node.stop()
        self._stop.set()
        deadline = time.monotonic() + grace_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            leftover = dict(self._running)
        for job_id, worker in leftover.items():
            if self.store.release(job_id, worker):
                log.info("job %d: requeued (shutting down while it ran)", job_id)
        if self.api is not None:
            self.api.stop()
        if not leftover:
            self.store.close()
        log.info("medunet serve stopped")

    def run_forever(self) -> None:
        """Start, then block until SIGTERM or SIGINT; then stop gracefully."""
        def on_signal(signum: int, _frame: object) -> None:
            log.info("medunet serve: %s received, stopping", signal.Signals(signum).name)
            self._stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        self.start()
        while not self._stop.wait(1.0):
            pass
        self.stop()

    # ------------------------------------------------------------------------------------------------ scheduler

    def _guarded(self, what: str, step: Callable[[], bool]) -> None:
        """Run ``step`` until stopped; it returns whether it did something (else the loop waits a tick)."""
        while not self._stop.is_set():
            try:
                busy = step()
            except Exception:  # noqa: BLE001 - a loop must survive a database hiccup; the traceback is logged once per failure
                log.exception("medunet serve: the %s failed a pass; trying again", what)
                busy = False
            if not busy:
                self._stop.wait(TICK_S)

    def _schedule_loop(self) -> None:
        self._guarded("scheduler", self.schedule_once)

    def schedule_once(self) -> bool:
        """One scheduler pass: requeue lost jobs, complete silent series, route them; False (nothing else to do now)."""
        for job_id in self.store.requeue_expired():
            detail = self.store.job(job_id)
            state = detail.job.state if detail else "queued"
            log.info("job %d: %s (its worker's lease expired)", job_id, "requeued" if state == "queued" else state)
            self.audit_event("job-requeued" if state == "queued" else "job-failed", job_id=job_id, state=state)
        for facts in self.store.complete_series(self.config.node.stable_seconds):
            uid = facts.series_instance_uid
            rule = None if facts.modality.upper() in NON_IMAGE_MODALITIES else route(facts, self.config.routes)
            if rule is None:
                reason = (f"not an image series (modality {facts.modality})" if facts.modality.upper() in NON_IMAGE_MODALITIES
                          else skip_reason(facts))
                if self.store.skip(uid, reason):
                    log.info("series %s skipped: %s", uid, reason)
                    self.audit_event("series-skipped", series_instance_uid=uid, study_instance_uid=facts.study_instance_uid, detail=reason)
                continue
            for job in self.store.enqueue(uid, rule.models, route=rule.name):
                log.info("job %d: queued (series %s, model %s, route %s, %d slices)", job.id, uid, job.model, rule.name, facts.slices)
                self.audit_event("job-queued", job_id=job.id, series_instance_uid=uid, study_instance_uid=facts.study_instance_uid,
                                 model=job.model, route=rule.name, instances=facts.slices)
        return False

    # ------------------------------------------------------------------------------------------------ workers

    def _worker_loop(self, model: str, worker: str) -> Callable[[], None]:
        def step() -> bool:
            job = self.store.claim(worker, [model], self.config.workers.lease_seconds)
            if job is None:
                return False
            with self._lock:
                self._running[job.id] = worker
            try:
                self.run_job(job, worker)
            finally:
                with self._lock:
                    self._running.pop(job.id, None)
            return True

        return lambda: self._guarded(f"worker of {model}", step)

    def _heartbeat_loop(self) -> None:
        interval = max(0.2, self.config.workers.lease_seconds / 4)
        while not self._stop.wait(interval):
            with self._lock:
                running = dict(self._running)
            for job_id, worker in running.items():
                try:
                    if not self.store.heartbeat(job_id, worker, self.config.workers.lease_seconds):
                        log.warning("job %d: taken from worker %s (lease expired or superseded); its result will be discarded", job_id, worker)
                except Exception:  # noqa: BLE001 - the next beat tries again
                    log.exception("heartbeat of job %d failed", job_id)

    def run_job(self, job: Job, worker: str) -> None:
        """Segment a claimed job's series, write its results and hand the deliveries to the store (or record the failure)."""
        log.info("job %d: running (series %s, model %s, attempt %d, worker %s)", job.id, job.series_uid, job.model, job.attempts, worker)
        self.audit_event("job-running", job_id=job.id, series_instance_uid=job.series_uid, model=job.model, attempt=job.attempts)
        try:
            qc_decision, result_dir, items = self._segment(job)
        except Exception as exc:  # noqa: BLE001 - any failure of one job is recorded on it, the worker goes on
            error = _one_line(exc)
            if self.store.fail(job.id, error, worker=worker):
                log.warning("job %d: failed: %s", job.id, error)
                self.audit_event("job-failed", job_id=job.id, series_instance_uid=job.series_uid, model=job.model, detail=error)
            return
        finally:
            shutil.rmtree(self.storage / WORK / str(job.id), ignore_errors=True)
        if not self.store.finish(job.id, qc_decision, result_dir, items, worker=worker):
            log.warning("job %d: result discarded (the job was taken from this worker while it ran)", job.id)
            return
        state = self._state(job.id)
        log.info("job %d: %s (QC %s, %d result(s) to send)", job.id, state, qc_decision or "none", len(items))
        self.audit_event(f"job-{state}", job_id=job.id, series_instance_uid=job.series_uid, model=job.model, state=state,
                         detail=f"QC {qc_decision or 'none'}")

    def _state(self, job_id: int) -> str:
        detail = self.store.job(job_id)
        return detail.job.state if detail else "unknown"

    def _inputs(self, job: Job) -> Path:
        """A private folder of links to (or copies of) the series' stored instances."""
        folder = self.storage / WORK / str(job.id)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for sop_uid, path in self.store.series_instances(job.series_uid):
            target = folder / f"{sop_uid}.dcm"
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
        return folder

    def _segment(self, job: Job) -> tuple[str | None, Path, list[DeliveryItem]]:
        from medunet.inference.outputs import write_outputs
        from medunet.io.dicom_seg import result_uids
        from medunet.io.image import DicomSource

        segmenter = self.segmenters[job.model]
        started = time.monotonic()
        result = segmenter.segment(DicomSource(self._inputs(job), series_uid=job.series_uid), case=f"job-{job.id}")
        qc = result.qc
        decision = qc.flag if qc is not None else None
        names = self.config.delivery.destinations(decision)
        formats = {f for n in names for f in self.config.destinations[n].formats} or {"dicom-seg"}
        results = self.storage / RESULTS
        final, partial = results / str(job.id), results / f"{job.id}{PARTIAL}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        uids = result_uids(f"{job.series_uid}/{job.model}/{job.id}")
        targets: dict[str, Path] = {f: partial / RESULT_FILES[f] for f in ("dicom-seg", "rtstruct", "nifti") if f in formats}
        write_outputs(result, targets, class_names=segmenter.class_names, model_name=segmenter.model_name, uids=uids)
        record = {"job_id": job.id, "series_instance_uid": job.series_uid, "model": job.model, "qc": qc.to_json() if qc else None,
                  "seg_sop_instance_uid": uids.seg.sop_instance_uid, "rtstruct_sop_instance_uid": uids.rtstruct.sop_instance_uid,
                  "seconds": round(time.monotonic() - started, 3)}
        (partial / RESULT_FILES["qc"]).write_text(json.dumps(record, indent=2, default=str) + "\n")
        _fsync_tree(partial)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)
        _fsync_tree(results, files=False)
        item_of = {"dicom-seg": uids.seg.sop_instance_uid, "rtstruct": uids.rtstruct.sop_instance_uid,
                   "nifti": f"{uids.seg.sop_instance_uid}.nii.gz", "qc": f"{uids.seg.sop_instance_uid}.{QC_FILE}"}
        items = [DeliveryItem(name, item_of[f], str(final / RESULT_FILES[f])) for name in names for f in self.config.destinations[name].formats]
        return decision, final, items

    # ------------------------------------------------------------------------------------------------ sender

    def _send_loop(self) -> None:
        self._guarded("sender", self.send_once)

    def send_once(self) -> bool:
        """Send every due delivery, one association (or request) per destination; whether any was due."""
        due = self.store.due_deliveries(worker=self.worker_id, lease_seconds=self.config.workers.lease_seconds)
        by_destination: dict[str, list[Delivery]] = {}
        for delivery in due:
            by_destination.setdefault(delivery.destination, []).append(delivery)
        touched: set[int] = set()
        for name, deliveries in by_destination.items():
            outcomes = self._send(name, deliveries)
            for delivery in deliveries:
                error = outcomes.get(delivery.id)
                touched.add(delivery.job_id)
                if error is None:
                    self.store.delivery_sent(delivery.id)
                    self.audit_event("delivery-sent", delivery_id=delivery.id, job_id=delivery.job_id, destination=name,
                                     sop_instance_uid=delivery.item)
                    continue
                attempt = delivery.attempts + 1
                state = self.store.delivery_failed(delivery.id, error, time.time() + self.config.retry.delay(attempt))
                log.warning("job %d: sending %s to %s failed (attempt %d%s): %s", delivery.job_id, delivery.item, name, attempt,
                            ", dead-lettered" if state == "dead" else ", will retry", error)
                self.audit_event("delivery-dead" if state == "dead" else "delivery-failed", delivery_id=delivery.id, job_id=delivery.job_id,
                                 destination=name, sop_instance_uid=delivery.item, attempt=attempt, detail=error)
        for job_id in sorted(touched):
            now_state = self._state(job_id)
            if now_state in FINAL_STATES:
                log.info("job %d: %s", job_id, now_state)
                self.audit_event(f"job-{now_state}", job_id=job_id, state=now_state)
        return bool(due)

    def _send(self, name: str, deliveries: Sequence[Delivery]) -> dict[int, str | None]:
        """Send to one destination; delivery id -> None (sent) or the one-line reason it was not."""
        destination = self.config.destinations.get(name)
        if destination is None:
            return {d.id: f"destination {name!r} is no longer in the config" for d in deliveries}
        missing = {d.id: f"result file {d.path} is missing" for d in deliveries if not Path(d.path).is_file()}
        present = [d for d in deliveries if d.id not in missing]
        try:
            outcomes = _deliver(destination, present, calling_ae=self.config.node.ae_title) if present else {}
        except Exception as exc:  # noqa: BLE001 - the destination is down or refuses: every file waits for the next attempt
            outcomes = {d.id: _one_line(exc) for d in present}
        return {**missing, **outcomes}


def _deliver(destination: Destination, deliveries: Sequence[Delivery], *, calling_ae: str) -> dict[int, str | None]:
    """Send the files of ``deliveries`` to one destination; raises when it cannot be reached at all."""
    if destination.kind == "folder":
        assert destination.path is not None
        folder = Path(destination.path)
        outcomes: dict[int, str | None] = {}
        dicom = [d for d in deliveries if d.path.endswith(".dcm")]
        for result in send_folder(folder, [Path(d.path) for d in dicom]):
            outcomes.update({d.id: None if result.ok else result.message for d in dicom if Path(d.path) == result.path})
        for delivery in (d for d in deliveries if not d.path.endswith(".dcm")):
            copy_atomic(Path(delivery.path), folder / delivery.item)
            outcomes[delivery.id] = None
        return outcomes
    files = [Path(d.path) for d in deliveries]
    if destination.kind == "stowrs":
        assert destination.url is not None
        results = send_stowrs(destination.url, files)
    else:
        assert destination.ae_title is not None and destination.host is not None and destination.port is not None
        results = send_dicom(destination.ae_title, destination.host, destination.port, files, calling_ae=calling_ae)
    by_path = {r.path: r for r in results}
    return {d.id: (None if by_path[Path(d.path)].ok else by_path[Path(d.path)].message) if Path(d.path) in by_path
            else "no answer for this file" for d in deliveries}


def _fsync_tree(folder: Path, *, files: bool = True) -> None:
    """Flush a folder's files (``files``) and the folder itself to disk, so a rename after it publishes whole files."""
    if files:
        for path in folder.iterdir():
            if path.is_file():
                descriptor = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
