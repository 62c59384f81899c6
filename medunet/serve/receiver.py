"""The DICOM node: a C-STORE / C-ECHO SCP (pynetdicom) that stores what a PACS or scanner sends, as received.

    node = DicomNode(Path("/srv/medunet"), store, ae_title="MEDUNET", port=11112, allowed_calling_aes=["PACS"])
    node.start()          # returns at once; associations are served on pynetdicom's threads
    ...
    node.stop()

Each instance is written atomically (temporary name, fsync, rename) into
``<storage>/incoming/<association id>/<SOP Instance UID>.dcm``, byte for byte as the peer encoded it
(the transfer syntax it negotiated, under a file meta header naming it): nothing is decoded or
re-encoded. Only a *released* association counts: when the peer asks to release it, the node fsyncs
the folder and calls the sink's ``on_released`` before it answers, so a sink that records durably
makes "released" mean "recorded". If the sink raises, the node drops the connection instead of
answering (the peer sees a failed association and sends again) and deletes the folder. An aborted
association, or a dropped connection, leaves nothing: its folder is deleted and the sink is not
called. After a crash, :func:`discard_unreleased` deletes the folders the store never recorded.

Refusals, each with one log line and a DICOM reason the peer's log shows:

- a calling AE title not on the allow-list: rejected permanent, "calling AE title not recognised";
- a peer address not on the allow-list: rejected permanent, "no reason given" (DICOM has no code for it);
- more than ``max_associations`` at once: rejected transient, "local limit exceeded";
- free disk below ``min_free_mb``: new associations rejected transient, "temporary congestion"; a
  C-STORE arriving when the disk has crossed it is answered 0xA700 (out of resources).

Non-image objects (SR, PR, SEG, RTSTRUCT, ...) are stored like images; their Modality says what they
are and :func:`is_image` lets routing skip them. The ``on_event`` hook receives an audit record of
every association (accepted, rejected, released, aborted) with AE titles, addresses and UIDs, never
a patient attribute.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from medunet.errors import ConfigError
from medunet.serve.records import ReceivedInstance

if TYPE_CHECKING:
    from pydicom import Dataset
    from pynetdicom.association import Association
    from pynetdicom.events import Event
    from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger("medunet")

#: The folder under the storage root that holds one folder per open (or released, not yet processed) association.
INCOMING = "incoming"
#: Modalities of objects that are not images to segment (structured reports, presentation states, results...).
NON_IMAGE_MODALITIES = frozenset({"SR", "PR", "KO", "DOC", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "REG",
                                  "FID", "PLAN", "AU", "ECG", "HD", "OT_SR"})
#: C-STORE statuses: success, out of resources, cannot understand.
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
#: A-ASSOCIATE-RJ (result, source, diagnostic) and what each means, as peers' logs print them.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_PEER = (0x01, 0x01, 0x01)
REJECT_BUSY = (0x02, 0x03, 0x02)
REJECT_DISK = (0x02, 0x03, 0x01)
_REASONS = {REJECT_CALLING_AE: "calling AE title not recognised", REJECT_CALLED_AE: "called AE title not recognised",
            REJECT_PEER: "no reason given", REJECT_BUSY: "local limit exceeded", REJECT_DISK: "temporary congestion"}
#: Uncompressed transfer syntaxes in order of preference: explicit VR little endian, deflated, implicit, big endian.
_NATIVE_PREFERENCE = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: Header attributes read from each instance (no patient attributes).
_FACTS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "BodyPartExamined",
          "SeriesDescription", "ImagePositionPatient", "ImageOrientationPatient", "SliceThickness")


class InstanceSink(Protocol):
    """Who takes the instances of a released association (the job store): it should record them durably before returning."""

    def on_released(self, association_id: str, calling_ae: str, peer_ip: str, instances: Sequence[ReceivedInstance]) -> None:
        """Called once per released association that stored instances, before the node answers the release; raising makes the peer send again."""


class AuditHook(Protocol):
    """The audit log: ``event`` is ``association-accepted`` / ``-rejected`` / ``-released`` / ``-aborted``; no patient attributes."""

    def __call__(self, event: str, **fields: Any) -> None: ...


def is_image(instance: ReceivedInstance) -> bool:
    """Whether ``instance`` is an image to segment (not a report, presentation state, SEG, structure set...)."""
    return instance.modality.upper() not in NON_IMAGE_MODALITIES


def decodable_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes whose pixel data this installation decodes (pydicom's native ones and its installed plugins).

    Compressed ones first: pynetdicom accepts, of the syntaxes a peer proposes for a context, the first
    of this list, and a peer holding compressed data proposes its own syntax beside the uncompressed
    ones; preferring it keeps the instance as the peer holds it (no conversion on the sender's side).
    """
    from pydicom.pixels.decoders.base import _PIXEL_DATA_DECODERS, get_decoder
    from pydicom.uid import UID

    found = []
    for uid in _PIXEL_DATA_DECODERS:
        with contextlib.suppress(NotImplementedError, ValueError):
            if get_decoder(uid).is_available:
                found.append(UID(uid))
    compressed = [str(u) for u in found if u.is_compressed]
    native = [str(u) for u in found if not u.is_compressed]
    return compressed + sorted(native, key=lambda u: _NATIVE_PREFERENCE.index(u) if u in _NATIVE_PREFERENCE else len(native))


def discard_unreleased(storage: Path, known: Callable[[str], bool]) -> list[str]:
    """Delete the incoming folders of associations the store never recorded (left by a crash); returns their ids.

    Call it before the node starts: a live association's folder is not known to the store yet.
    """
    incoming = Path(storage) / INCOMING
    removed = []
    for folder in sorted(incoming.iterdir()) if incoming.is_dir() else []:
        if folder.is_dir() and not known(folder.name):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    if removed:
        log.warning("discarded %d incoming association folder(s) never released to the store: %s", len(removed), ", ".join(removed))
    return removed


@dataclass
class _Session:
    """One association as the node tracks it."""

    association_id: str
    calling_ae: str
    called_ae: str
    peer_ip: str
    peer_port: int
    folder: Path
    instances: dict[str, ReceivedInstance] = field(default_factory=dict)
    state: str = "open"  # open -> released | aborted | failed (the sink raised)
    refused: int = 0


def _allowed_networks(peers: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    try:
        return [ipaddress.ip_network(p, strict=False) for p in peers]
    except ValueError as exc:
        raise ConfigError(f"allowed peer {exc}; give IP addresses or networks such as 10.0.0.0/8") from None


class DicomNode:
    """A C-STORE / C-ECHO SCP that stores instances as received and hands released associations to a sink.

    Args:
        storage: root folder; instances go to ``<storage>/incoming/<association id>/``.
        sink: receives each released association's instances (:class:`InstanceSink`).
        ae_title: the node's AE title (at most 16 characters).
        host, port: where to listen; port 0 picks a free port (see :attr:`port` after :meth:`start`).
        allowed_calling_aes: calling AE titles accepted; empty accepts any.
        allowed_peers: peer IP addresses or networks (``10.1.0.0/16``) accepted; empty accepts any.
        check_called_ae: reject associations that call another AE title than ``ae_title``.
        max_associations: associations served at once; more are rejected (transient).
        min_free_mb: free space the storage disk must keep; below it the node refuses (transient).
        timeout: seconds of silence after which an association is aborted (network, ACSE and DIMSE timeouts).
        on_event: audit hook (:class:`AuditHook`).
    """

    def __init__(
        self, storage: Path, sink: InstanceSink, *, ae_title: str = "MEDUNET", host: str = "127.0.0.1", port: int = 11112,
        allowed_calling_aes: Sequence[str] = (), allowed_peers: Sequence[str] = (), check_called_ae: bool = False,
        max_associations: int = 8, min_free_mb: float = 1024.0, timeout: float = 60.0, on_event: AuditHook | None = None,
    ) -> None:
        if not ae_title.strip() or len(ae_title) > 16:
            raise ConfigError(f"AE title {ae_title!r} must be 1 to 16 characters")
        if max_associations < 1 or timeout <= 0 or min_free_mb < 0:
            raise ConfigError("max_associations must be >= 1, timeout > 0 s and min_free_mb >= 0")
        self.storage = Path(storage)
        self.sink = sink
        self.ae_title = ae_title.strip()
        self.host, self._port = host, port
        self.allowed_calling_aes = frozenset(a.strip() for a in allowed_calling_aes)
        self.allowed_peers = _allowed_networks(allowed_peers)
        self.check_called_ae = check_called_ae
        self.max_associations = max_associations
        self.min_free_mb = min_free_mb
        self.timeout = timeout
        self.on_event = on_event
        self._sessions: dict[int, _Session] = {}  # id(Association) -> session
        self._lock = threading.RLock()
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        """The port the node listens on (the one picked when started with port 0)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._port

    @property
    def active_associations(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _application_entity(self) -> Any:
        from pynetdicom import AE, AllStoragePresentationContexts, VerificationPresentationContexts

        ae = AE(ae_title=self.ae_title)
        syntaxes = decodable_transfer_syntaxes()
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), syntaxes)
        for context in VerificationPresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax))
        ae.maximum_associations = self.max_associations + 16  # the node's own check (with its log line) comes first
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = self.timeout
        ae.maximum_pdu_size = 0  # no limit on what the peer sends in one PDU
        return ae

    def start(self) -> None:
        """Listen on ``host:port``; returns at once (associations run on pynetdicom's threads)."""
        from pynetdicom import evt

        with self._lock:
            if self._server is not None:
                raise RuntimeError("the DICOM node is already running")
            (self.storage / INCOMING).mkdir(parents=True, exist_ok=True)
            handlers = [(evt.EVT_REQUESTED, self._requested), (evt.EVT_ACCEPTED, self._accepted),
                        (evt.EVT_C_STORE, self._store), (evt.EVT_PDU_RECV, self._pdu_received),
                        (evt.EVT_ABORTED, self._aborted), (evt.EVT_CONN_CLOSE, self._closed)]
            try:
                self._server = self._application_entity().start_server((self.host, self._port), block=False, evt_handlers=handlers)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {self.host}:{self._port} ({exc.strerror}); choose a free port") from None
        log.info("DICOM node %s listening on %s:%d", self.ae_title, self.host, self.port)

    def stop(self, *, wait: float = 10.0) -> None:
        """Stop listening and abort the associations still open (their instances are deleted, as for any abort)."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        active = list(server.active_associations)
        server.shutdown()
        for assoc in active:
            assoc.abort()
        deadline = time.monotonic() + wait
        while self.active_associations and time.monotonic() < deadline:
            time.sleep(0.02)
        log.info("DICOM node %s stopped", self.ae_title)

    def __enter__(self) -> DicomNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------- association life cycle

    def _audit(self, event: str, **fields: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event, **fields)
            except Exception:  # an audit failure must not take the node down
                log.exception("audit hook failed on %s", event)

    def _refusal(self, calling: str, called: str, peer_ip: str) -> tuple[tuple[int, int, int], str] | None:
        """Why a new association must be rejected (the A-ASSOCIATE-RJ reason and a log explanation), or None."""
        if self.allowed_calling_aes and calling not in self.allowed_calling_aes:
            return REJECT_CALLING_AE, f"calling AE title {calling!r} is not in the allow-list"
        if self.check_called_ae and called != self.ae_title:
            return REJECT_CALLED_AE, f"called AE title {called!r} is not this node's ({self.ae_title!r})"
        if self.allowed_peers and not any(ipaddress.ip_address(peer_ip) in net for net in self.allowed_peers):
            return REJECT_PEER, f"peer address {peer_ip} is not in the allow-list"
        if len(self._sessions) >= self.max_associations:
            return REJECT_BUSY, f"{len(self._sessions)} association(s) already open (max_associations {self.max_associations})"
        free = self.free_mb()
        if free < self.min_free_mb:
            return REJECT_DISK, f"{free:.0f} MB free on the storage disk, below min_free_mb {self.min_free_mb:g}"
        return None

    def free_mb(self) -> float:
        """Free space on the storage disk, in MB."""
        return shutil.disk_usage(self.storage).free / 2**20

    def _requested(self, event: Event) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling = str(getattr(request, "calling_ae_title", "")).strip()
        called = str(getattr(request, "called_ae_title", "")).strip()
        peer_ip, peer_port = str(assoc.requestor.address), int(assoc.requestor.port)
        with self._lock:
            refusal = self._refusal(calling, called, peer_ip)
            if refusal is None:
                association_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
                self._sessions[id(assoc)] = _Session(association_id, calling, called, peer_ip, peer_port,
                                                     self.storage / INCOMING / association_id)
                return
        reason, why = refusal
        log.warning("DICOM node rejected the association from %s (%s:%d): %s; answered A-ASSOCIATE-RJ %s (%s)",
                    calling, peer_ip, peer_port, why, "permanent" if reason[0] == 1 else "transient", _REASONS[reason])
        self._audit("association-rejected", calling_ae=calling, called_ae=called, peer_ip=peer_ip, reason=why,
                    dicom_reason=_REASONS[reason])
        assoc.acse.send_reject(*reason)
        assoc.kill()

    def _session(self, assoc: Association) -> _Session | None:
        with self._lock:
            return self._sessions.get(id(assoc))

    def _accepted(self, event: Event) -> None:
        session = self._session(event.assoc)
        if session is not None:
            log.info("DICOM node accepted association %s from %s (%s)", session.association_id, session.calling_ae, session.peer_ip)
            self._audit("association-accepted", association_id=session.association_id, calling_ae=session.calling_ae,
                        called_ae=session.called_ae, peer_ip=session.peer_ip)

    def _pdu_received(self, event: Event) -> None:
        """On the peer's A-RELEASE-RQ, before the node answers it: hand the instances to the sink."""
        from pynetdicom.pdu import A_RELEASE_RQ

        if isinstance(event.pdu, A_RELEASE_RQ):
            session = self._session(event.assoc)
            if session is not None and session.state == "open":
                self._release(session, event.assoc)

    def _release(self, session: _Session, assoc: Association) -> None:
        with self._lock:
            session.state = "released"
            instances = list(session.instances.values())
        try:
            if instances:  # an association that only echoed has nothing for the store
                _fsync_folder(session.folder)
                self.sink.on_released(session.association_id, session.calling_ae, session.peer_ip, instances)
        except Exception as exc:
            with self._lock:
                session.state = "failed"
            _drop_connection(assoc)
            shutil.rmtree(session.folder, ignore_errors=True)
            log.error("DICOM node: the store did not take association %s (%s); dropped the connection so %s sends again, "
                      "deleted its %d instance(s)", session.association_id, type(exc).__name__, session.calling_ae, len(instances),
                      exc_info=True)
            self._audit("association-aborted", association_id=session.association_id, calling_ae=session.calling_ae,
                        called_ae=session.called_ae, peer_ip=session.peer_ip, instances=len(instances), reason="store failed")
            return
        series = sorted({i.series_instance_uid for i in instances})
        log.info("DICOM node: association %s from %s released with %d instance(s) of %d series",
                 session.association_id, session.calling_ae, len(instances), len(series))
        self._audit("association-released", association_id=session.association_id, calling_ae=session.calling_ae,
                    called_ae=session.called_ae, peer_ip=session.peer_ip, instances=len(instances), series_uids=series,
                    study_uids=sorted({i.study_instance_uid for i in instances}), refused=session.refused)

    def _aborted(self, event: Event) -> None:
        session = self._session(event.assoc)
        if session is not None:
            with self._lock:
                if session.state == "open":
                    session.state = "aborted"

    def _closed(self, event: Event) -> None:
        """The connection closed: forget the association; unless it was released, delete what it stored."""
        with self._lock:
            session = self._sessions.pop(id(event.assoc), None)
            if session is None:
                return
            if session.state in ("released", "failed"):  # handed to the store, or already deleted by _release
                return
            session.state = "aborted"
        shutil.rmtree(session.folder, ignore_errors=True)
        log.warning("DICOM node: association %s from %s (%s) ended without a release; deleted its %d instance(s)",
                    session.association_id, session.calling_ae, session.peer_ip, len(session.instances))
        self._audit("association-aborted", association_id=session.association_id, calling_ae=session.calling_ae,
                    called_ae=session.called_ae, peer_ip=session.peer_ip, instances=len(session.instances))

    # ----------------------------------------------------------------------------------------------- C-STORE

    def _store(self, event: Event) -> int:
        session = self._session(event.assoc)
        if session is None:
            return OUT_OF_RESOURCES
        request: Any = event.request  # a C-STORE request
        uid = str(request.AffectedSOPInstanceUID)
        if not _UID.match(uid) or len(uid) > 64:
            log.warning("DICOM node: association %s sent SOP Instance UID %r, not a valid UID; refused it (0xC000)",
                        session.association_id, uid[:80])
            return CANNOT_UNDERSTAND
        if self.free_mb() < self.min_free_mb:
            with self._lock:
                session.refused += 1
                first = session.refused == 1
            if first:
                log.warning("DICOM node: storage disk below min_free_mb %g; answering association %s's C-STOREs 0xA700 "
                            "(out of resources)", self.min_free_mb, session.association_id)
            return OUT_OF_RESOURCES
        raw = event.encoded_dataset(include_meta=True)
        try:
            header = _read_header(raw)
        except Exception as exc:
            log.warning("DICOM node: association %s sent instance %s that cannot be parsed (%s); refused it (0xC000)",
                        session.association_id, uid, type(exc).__name__)
            return CANNOT_UNDERSTAND
        final = session.folder / f"{uid}.dcm"
        try:
            stored = self._write(session, final, raw)
        except OSError as exc:
            log.warning("DICOM node: cannot write instance of association %s (%s); answered 0xA700 (out of resources)",
                        session.association_id, exc.strerror or type(exc).__name__)
            return OUT_OF_RESOURCES
        if stored:
            with self._lock:
                session.instances[uid] = _instance(header, uid, str(request.AffectedSOPClassUID), final)
        return SUCCESS if stored else OUT_OF_RESOURCES

    def _write(self, session: _Session, final: Path, data: bytes) -> bool:
        """Temporary name, fsync, rename, unless the association ended meanwhile (then nothing is left)."""
        session.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=session.folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            with self._lock:
                if session.state == "open":
                    os.replace(tmp, final)
                    return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        shutil.rmtree(session.folder, ignore_errors=True)  # the association was aborted while this instance was written
        return False


def _read_header(raw: bytes) -> Dataset:
    """The non-patient facts of an encoded instance (its file meta says the transfer syntax), pixel data not read."""
    import pydicom

    return pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True, specific_tags=list(_FACTS))


def _number(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]  # DS / IS / str; anything else is None below
    except (TypeError, ValueError):
        return None


def _slice_position(header: Dataset) -> float | None:
    """Position of the slice along its normal (mm), from ImagePositionPatient and ImageOrientationPatient."""
    try:
        position = [float(v) for v in header.ImagePositionPatient]
        row, column = [float(v) for v in header.ImageOrientationPatient[:3]], [float(v) for v in header.ImageOrientationPatient[3:]]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(position) != 3 or len(row) != 3 or len(column) != 3:
        return None
    normal = (row[1] * column[2] - row[2] * column[1], row[2] * column[0] - row[0] * column[2], row[0] * column[1] - row[1] * column[0])
    return sum(p * n for p, n in zip(position, normal))


def _instance(header: Dataset, uid: str, sop_class: str, path: Path) -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=uid,
        sop_class_uid=str(header.get("SOPClassUID", sop_class)),
        study_instance_uid=str(header.get("StudyInstanceUID", "")),
        series_instance_uid=str(header.get("SeriesInstanceUID", "")),
        path=path,
        modality=str(header.get("Modality", "")),
        body_part_examined=str(header.get("BodyPartExamined", "")),
        series_description=str(header.get("SeriesDescription", "")),
        slice_position=_slice_position(header),
        slice_thickness=_number(header.get("SliceThickness")),
    )


def _fsync_folder(folder: Path) -> None:
    """Make the renames into ``folder`` durable (a rename is only on disk once its directory is)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_connection(assoc: Association) -> None:
    """Shut the association's socket so the peer sees a failed association instead of a release."""
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
