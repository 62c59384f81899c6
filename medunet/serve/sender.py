"""Send results to their destinations: C-STORE to a DICOM AE, a folder, or STOW-RS; one result per file.

    results = send_dicom("PACS", "10.0.0.5", 104, [seg, rtstruct], calling_ae="MEDUNET", timeout=30)
    failed = [r for r in results if not r.ok]

Results are identified by their SOP Instance UID: sending the same file again stores the same
instance again (a PACS keeps one copy, a folder holds one ``<SOP Instance UID>.dcm``), so a resend
after a crash is harmless. What was sent is the caller's (the job store's) to record.

A destination that cannot be reached at all (host down, association refused, no answer in time) is a
:class:`~medunet.errors.SendError` with one line saying which and how to fix it; a file the
destination refuses once connected (a failure status, a SOP class or transfer syntax it does not
accept, no answer to that C-STORE) is a :class:`SendResult` with ``ok`` False and its reason.
Files are sent as they are encoded: no decoding, no change of transfer syntax.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medunet.errors import SendError, parse_error
from medunet.net.dicomweb import DicomWebPacs, PacsConnection

log = logging.getLogger("medunet")

#: C-STORE warning statuses (the instance is stored: coercion of data elements, elements discarded, SOP class mismatch).
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})
#: Most presentation contexts one association may propose.
MAX_CONTEXTS = 128


@dataclass(frozen=True)
class SendResult:
    """What became of one file at one destination.

    Args:
        sop_instance_uid: the instance's SOP Instance UID (what makes a resend idempotent).
        path: the file sent.
        destination: ``AE@host:port``, the folder, or the STOW-RS URL.
        ok: the destination holds the instance.
        status: the C-STORE status (None for a folder, STOW-RS, or no answer).
        message: one line: "stored", the warning, or why not.
    """

    sop_instance_uid: str
    path: Path
    destination: str
    ok: bool
    status: int | None
    message: str


@dataclass(frozen=True)
class _File:
    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_instance_uid: str


def _identify(path: Path) -> _File:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        meta = ds.file_meta
        return _File(Path(path), str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(meta.TransferSyntaxUID),
                     str(ds.get("StudyInstanceUID", "")))
    except Exception as exc:
        raise parse_error("cannot read the DICOM file to send", exc, case=None, path=str(path)) from None


def _unreachable(host: str, port: int, timeout: float) -> str | None:
    """Why a plain TCP connection to the destination fails (refused, timed out, unresolvable), or None if it connects."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer within {timeout:g} s; check the host, the port and any firewall"
    except socket.gaierror:
        return "the host name does not resolve; check the destination's host"
    except OSError as exc:
        return f"{(exc.strerror or type(exc).__name__).lower()}; check that the destination is running and listening on port {port}"


def _association_failure(assoc: Any, destination: str, calling_ae: str, host: str, port: int, timeout: float) -> SendError:
    known = f"check that it knows calling AE title {calling_ae!r} and that {destination.split('@')[0]!r} is its AE title"
    if assoc.is_rejected:
        reply = assoc.acceptor.primitive
        reason = f"{reply.result_str}, {reply.source_str}: {reply.reason_str}" if reply is not None else "rejected"
        return SendError(f"{destination} rejected the association ({reason}); {known}")
    why = _unreachable(host, port, timeout)
    if why is None and assoc.is_aborted:
        return SendError(f"{destination} aborted the association request; {known}")
    why = why or f"it accepts connections but did not answer the association request within {timeout:g} s; check that it is a DICOM node"
    return SendError(f"cannot reach {destination}: {why}")


def _status_result(file: _File, destination: str, status: Any) -> SendResult:
    from pynetdicom.status import code_to_category

    code = status.get("Status") if status is not None else None
    if code is None:
        return SendResult(file.sop_instance_uid, file.path, destination, False, None,
                          f"no answer from {destination} to the C-STORE; the association was aborted or timed out")
    code = int(code)
    comment = str(status.get("ErrorComment", "")).strip()
    detail = f" ({comment})" if comment else ""
    if code == 0x0000:
        return SendResult(file.sop_instance_uid, file.path, destination, True, code, "stored")
    if code in WARNING_STATUSES:
        return SendResult(file.sop_instance_uid, file.path, destination, True, code, f"stored with warning 0x{code:04X}{detail}")
    return SendResult(file.sop_instance_uid, file.path, destination, False, code,
                      f"{destination} refused the instance: {code_to_category(code).lower()} status 0x{code:04X}{detail}")


def send_dicom(
    destination_ae: str, host: str, port: int, files: Sequence[Path], *, calling_ae: str = "MEDUNET", timeout: float = 30.0
) -> list[SendResult]:
    """C-STORE ``files`` to ``destination_ae`` at ``host:port`` over one association; one :class:`SendResult` per file.

    Raises:
        SendError: the destination is down, refuses the association, or does not answer within ``timeout`` seconds.
    """
    from pydicom.uid import UID
    from pynetdicom import AE

    destination = f"{destination_ae}@{host}:{port}"
    identified = [_identify(Path(p)) for p in files]
    if not identified:
        return []
    contexts = sorted({(f.sop_class_uid, f.transfer_syntax) for f in identified})
    if len(contexts) > MAX_CONTEXTS:
        raise SendError(f"{len(contexts)} SOP class / transfer syntax pairs do not fit one association ({MAX_CONTEXTS}); send fewer files at once")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(host, port, ae_title=destination_ae)
    if not assoc.is_established:
        raise _association_failure(assoc, destination, calling_ae, host, port, timeout)
    results: list[SendResult] = []
    try:
        for file in identified:
            if not assoc.is_established:
                results.append(SendResult(file.sop_instance_uid, file.path, destination, False, None,
                                          f"not sent: {destination} ended the association before this file"))
                continue
            try:
                status = assoc.send_c_store(file.path)
            except ValueError:  # no accepted presentation context for this SOP class and transfer syntax
                results.append(SendResult(
                    file.sop_instance_uid, file.path, destination, False, None,
                    f"{destination} does not accept {UID(file.sop_class_uid).name} in {UID(file.transfer_syntax).name}"))
                continue
            results.append(_status_result(file, destination, status))
    finally:
        if assoc.is_established:
            assoc.release()
    stored = sum(r.ok for r in results)
    log.info("sent %d of %d instance(s) to %s", stored, len(results), destination)
    return results


def send_folder(folder: Path, files: Sequence[Path]) -> list[SendResult]:
    """Copy ``files`` into ``folder`` as ``<SOP Instance UID>.dcm``, each atomically (a reader never sees half a file).

    The copy is written as a hidden ``.part`` file, fsynced and renamed, so software watching the
    folder for ``*.dcm`` sees only whole files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for file in (_identify(Path(p)) for p in files):
        copy_atomic(file.path, folder / f"{file.sop_instance_uid}.dcm")
        results.append(SendResult(file.sop_instance_uid, file.path, str(folder), True, None, "stored"))
    log.info("copied %d instance(s) to %s", len(results), folder)
    return results


def copy_atomic(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a hidden, uniquely named ``.part`` file: fsynced, then renamed over it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle, open(source, "rb") as data:
            shutil.copyfileobj(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def send_stowrs(url: str, files: Sequence[Path], *, timeout: float = 30.0, retries: int = 2) -> list[SendResult]:
    """Store ``files`` on a DICOMweb service (STOW-RS, one request per study), with medunet pacs's client and its credentials.

    Raises:
        PacsError: the service is unreachable, refuses the login or refuses an instance.
    """
    pacs = DicomWebPacs(PacsConnection.from_environment(url, timeout=timeout, retries=retries))
    identified = [_identify(Path(p)) for p in files]
    results = []
    for study in sorted({f.study_instance_uid for f in identified}):
        batch = [f for f in identified if f.study_instance_uid == study]
        pacs.store([f.path for f in batch], study_uid=study)
        results += [SendResult(f.sop_instance_uid, f.path, pacs.url, True, None, "stored") for f in batch]
    log.info("stored %d instance(s) on %s", len(results), pacs.url)
    return results
