"""A DICOMweb client: QIDO-RS search, WADO-RS retrieval and STOW-RS storage against one service.

    pacs = DicomWebPacs(PacsConnection.from_environment("http://pacs:8042/dicom-web", timeout=30))
    pacs.check()                                    # reachable, login accepted
    pacs.find_series("1.2.3")                       # [PacsSeries(...)]

The HTTP side is the ``dicomweb-client`` library (the DICOMweb client of the highdicom authors:
multipart WADO/STOW encoding, QIDO JSON), driven through a ``requests`` session that carries the
credentials, the per-request timeout and no retries of its own: retrying is done here, bounded
(connection failures and 429/502/503/504 only; a timed-out request is not repeated).

Credentials come from ``MEDUNET_DICOMWEB_USER`` / ``MEDUNET_DICOMWEB_PASSWORD`` (HTTP basic auth),
never from the URL or the command line, and are never logged or put in an error message.

Every failure is a :class:`~medunet.errors.PacsError` naming what failed and how to fix it. What to
fetch, segment and send back is :mod:`medunet.workflows.pacs`; this module only talks to the service.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from medunet.errors import PacsError

if TYPE_CHECKING:
    from dicomweb_client import DICOMwebClient

log = logging.getLogger("medunet")

USER_ENV = "MEDUNET_DICOMWEB_USER"
PASSWORD_ENV = "MEDUNET_DICOMWEB_PASSWORD"
#: HTTP statuses worth another try: the server is busy or a gateway failed.
RETRY_STATUSES = frozenset({429, 502, 503, 504})

T = TypeVar("T")


@dataclass(frozen=True)
class PacsConnection:
    """Where the DICOMweb service is and how to talk to it.

    Args:
        url: the DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web`` (Orthanc's plugin).
        username, password: HTTP basic-auth credentials (both or neither); not shown by ``repr``.
        timeout: seconds to wait for a connection and for each answer (per request).
        retries: extra tries after a connection failure or a busy server (0 = try once).
    """

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 30.0
    retries: int = 2

    @classmethod
    def from_environment(
        cls, url: str, *, timeout: float = 30.0, retries: int = 2, environ: Mapping[str, str] | None = None
    ) -> PacsConnection:
        """Credentials from ``MEDUNET_DICOMWEB_USER`` and ``MEDUNET_DICOMWEB_PASSWORD`` (both unset: no auth)."""
        env = os.environ if environ is None else environ
        user, password = env.get(USER_ENV) or None, env.get(PASSWORD_ENV) or None
        if (user is None) != (password is None):
            missing = PASSWORD_ENV if password is None else USER_ENV
            raise PacsError(f"{missing} is not set; set both {USER_ENV} and {PASSWORD_ENV}, or neither for a PACS without login")
        return cls(url=url, username=user, password=password, timeout=timeout, retries=retries)


@dataclass(frozen=True)
class PacsSeries:
    """One series as the PACS lists it (no patient attributes)."""

    series_uid: str
    modality: str
    description: str
    instances: int | None


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PacsError(f"DICOMweb URL must look like http://host:port/dicom-web, got {url!r}")
    if parts.username or parts.password:
        raise PacsError(f"put credentials in {USER_ENV} and {PASSWORD_ENV}, not in the DICOMweb URL")
    return url.rstrip("/")


class DicomWebPacs:
    """QIDO-RS search, WADO-RS retrieval and STOW-RS storage against one DICOMweb service."""

    def __init__(self, connection: PacsConnection) -> None:
        self.url = _check_url(connection.url)
        if connection.timeout <= 0:
            raise PacsError(f"timeout must be positive seconds, got {connection.timeout}")
        self.connection = connection
        self._client = self._make_client()

    def __repr__(self) -> str:
        return f"DicomWebPacs(url={self.url!r}, auth={'yes' if self.connection.username else 'no'}, timeout={self.connection.timeout})"

    def _make_client(self) -> DICOMwebClient:
        import requests
        from dicomweb_client import DICOMwebClient

        session = requests.Session()
        session.trust_env = False  # no proxy or .netrc credentials picked up behind the user's back
        if self.connection.username is not None:
            session.auth = (self.connection.username, self.connection.password or "")
        try:
            client = DICOMwebClient(self.url, session=session, timeout=self.connection.timeout)
        except ValueError as exc:
            raise PacsError(f"DICOMweb URL must look like http://host:port/dicom-web, got {self.url!r}") from exc
        client.set_http_retry_params(retry=False)  # bounded retries are ours (see _request)
        return client

    def _request(self, what: str, call: Callable[[], T]) -> T:
        """Run ``call`` with bounded retries; turn every transport or HTTP failure into a PacsError."""
        import requests

        attempts = self.connection.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return call()
            except requests.Timeout as exc:
                raise PacsError(
                    f"{what}: no answer from {self.url} within {self.connection.timeout:g} s; "
                    "check the server's load or raise --timeout"
                ) from exc
            except requests.ConnectionError as exc:
                if attempt == attempts:
                    raise PacsError(
                        f"{what}: cannot connect to {self.url} ({_reason(exc)}) after {attempts} attempt(s); "
                        "check --url and that the DICOMweb service is running"
                    ) from exc
            except requests.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                if status not in RETRY_STATUSES or attempt == attempts:
                    raise PacsError(f"{what}: {_explain_status(status, self.url)}") from exc
            except requests.RequestException as exc:
                raise PacsError(f"{what}: request to {self.url} failed ({type(exc).__name__})") from exc
            except ValueError as exc:  # an answer that is not DICOMweb (HTML page, broken multipart, bad JSON)
                raise PacsError(
                    f"{what}: {self.url} gave an answer that is not DICOMweb ({type(exc).__name__}); check that the URL is the DICOMweb root"
                ) from exc
            time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
            log.debug("%s: retrying (%d of %d)", what, attempt + 1, attempts)
        raise AssertionError("unreachable")  # pragma: no cover

    def check(self) -> None:
        """Fail fast, before any slow work, if the service is unreachable or refuses the credentials."""
        self._request("connecting to the PACS", lambda: self._client.search_for_studies(limit=1))

    def find_series(self, study_uid: str, series_uid: str | None = None) -> list[PacsSeries]:
        """Series of a study (QIDO-RS), optionally only the one with ``series_uid``."""
        from pydicom import Dataset

        filters = {"SeriesInstanceUID": series_uid} if series_uid else None
        found = self._request(
            f"searching study {study_uid}",
            lambda: self._client.search_for_series(
                study_instance_uid=study_uid,
                search_filters=filters,
                fields=["Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances"],
            ),
        )
        series = []
        for entry in found:
            ds = Dataset.from_json(entry)
            count = ds.get("NumberOfSeriesRelatedInstances")
            series.append(
                PacsSeries(
                    series_uid=str(ds.SeriesInstanceUID),
                    modality=str(ds.get("Modality", "")),
                    description=str(ds.get("SeriesDescription", "")),
                    instances=int(count) if count not in (None, "") else None,
                )
            )
        return series

    def retrieve_series(self, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
        """Fetch every instance of a series (WADO-RS) into ``folder``, one file at a time (bounded memory)."""
        folder.mkdir(parents=True, exist_ok=True)

        def fetch() -> list[Path]:
            paths = []
            for index, dataset in enumerate(self._client.iter_series(study_uid, series_uid)):
                path = folder / f"{index:05d}.dcm"
                dataset.save_as(path, enforce_file_format=True)
                paths.append(path)
            return paths

        paths = self._request(f"retrieving series {series_uid}", fetch)
        if not paths:
            raise PacsError(f"retrieving series {series_uid}: the PACS returned no instances")
        return paths

    def store(self, paths: Sequence[Path], *, study_uid: str) -> list[str]:
        """Store DICOM files (STOW-RS) in ``study_uid``; returns their SOP Instance UIDs as the PACS acknowledged them."""
        import pydicom

        datasets = [pydicom.dcmread(p) for p in paths]
        answer = self._request("storing the segmentation", lambda: self._client.store_instances(datasets, study_instance_uid=study_uid))
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise PacsError(f"storing the segmentation: the PACS refused {len(failed)} instance(s) (failure reason {', '.join(reasons)})")
        stored = [str(item.ReferencedSOPInstanceUID) for item in (answer.get("ReferencedSOPSequence") or [])] if answer else []
        expected = [str(ds.SOPInstanceUID) for ds in datasets]
        if sorted(stored) != sorted(expected):
            raise PacsError(f"storing the segmentation: the PACS acknowledged {len(stored)} of {len(expected)} instance(s)")
        return stored


def _reason(exc: Exception) -> str:
    text = str(exc)
    for reason in ("Connection refused", "Name or service not known", "No route to host", "Network is unreachable"):
        if reason in text:
            return reason.lower()
    return "connection failed"


def _explain_status(status: int, url: str) -> str:
    if status == 401:
        return f"{url} refused the credentials (HTTP 401); set {USER_ENV} and {PASSWORD_ENV} to a valid login"
    if status == 403:
        return f"{url} denied access (HTTP 403); the login lacks permission for this request"
    if status == 404:
        return f"not found on {url} (HTTP 404); check the UID and that the URL is the DICOMweb root"
    return f"{url} answered HTTP {status}"
