"""The ``medunet serve`` configuration: one YAML file, frozen dataclasses, strictly checked.

Loading uses the same strict rules as the training config (:mod:`medunet.config`): an unknown key is an error
with a "did you mean" hint, every value is checked against its field's type, and the message names the field.
Cross references are checked too: a route names known models, the delivery names known destinations, and
each destination has the settings its kind needs.

Example::

    node: {ae_title: MEDUNET, port: 11112, storage: /var/lib/medunet}
    models: {liver: {path: /models/liver}}
    routes:
      - {name: abdomen-ct, match: {modality: [CT], body_part: [ABDOMEN]}, models: [liver]}
    destinations:
      pacs: {kind: dicom, ae_title: PACS, host: pacs.local, port: 104, formats: [dicom-seg, rtstruct]}
    delivery: {send_to: [pacs]}

Relative paths (storage, model paths, folder destinations, the audit log, a SQLite URL) are taken from the
folder the service is started in.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from medunet.config import _suggest, read_yaml, section_from_dict
from medunet.errors import ConfigError

OutputFormat = Literal["dicom-seg", "rtstruct", "nifti", "qc"]


@dataclass(frozen=True)
class AllowedCaller:
    """One calling application the node accepts associations from."""

    ae_title: str = ""
    """Calling AE title, compared exactly (trailing spaces ignored)."""
    ip: str | None = None
    """Peer address or network in CIDR notation (e.g. 10.1.2.0/24); null: any address."""

    def __post_init__(self) -> None:
        if not self.ae_title.strip() or len(self.ae_title.strip()) > 16:
            raise ConfigError(f"node.allowed_callers: ae_title must be 1 to 16 characters, got {self.ae_title!r}")
        if self.ip is not None:
            try:
                ipaddress.ip_network(self.ip, strict=False)
            except ValueError:
                raise ConfigError(f"node.allowed_callers: ip of {self.ae_title!r} must be an address or a CIDR network, got {self.ip!r}") from None

    def allows(self, ae_title: str, peer_ip: str) -> bool:
        """Whether a caller with this AE title from this address matches the entry."""
        if ae_title.strip() != self.ae_title.strip():
            return False
        if self.ip is None:
            return True
        try:
            return ipaddress.ip_address(peer_ip) in ipaddress.ip_network(self.ip, strict=False)
        except ValueError:
            return False


@dataclass(frozen=True)
class NodeConfig:
    """The DICOM node that receives series (C-STORE SCP)."""

    ae_title: str = "MEDUNET"
    """The node's own AE title (what senders call)."""
    host: str = "0.0.0.0"
    """Address the node listens on."""
    port: int = 11112
    """TCP port the node listens on."""
    allowed_callers: tuple[AllowedCaller, ...] = ()
    """Callers accepted, each {ae_title, ip (optional, CIDR ok)}; empty: accept any caller."""
    stable_seconds: float = 10.0
    """A series is complete after this many seconds without a new instance (like Orthanc's StableAge)."""
    max_associations: int = 10
    """Associations served at once; more are refused until one ends."""
    min_free_disk_mb: int = 2048
    """New associations are refused while the storage folder's disk has less free space than this (MiB)."""
    storage: str = "medunet-serve"
    """Folder of the received instances, the results and (by default) the job database and the audit log."""

    def __post_init__(self) -> None:
        if not self.ae_title.strip() or len(self.ae_title) > 16:
            raise ConfigError(f"node.ae_title must be 1 to 16 characters, got {self.ae_title!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"node.port must be between 1 and 65535, got {self.port}")
        if self.stable_seconds <= 0:
            raise ConfigError(f"node.stable_seconds must be positive, got {self.stable_seconds}")
        if self.max_associations < 1:
            raise ConfigError(f"node.max_associations must be >= 1, got {self.max_associations}")
        if self.min_free_disk_mb < 0:
            raise ConfigError(f"node.min_free_disk_mb must be >= 0, got {self.min_free_disk_mb}")

    def allows(self, ae_title: str, peer_ip: str) -> bool:
        """Whether the allow-list accepts this caller (an empty list accepts any)."""
        return not self.allowed_callers or any(c.allows(ae_title, peer_ip) for c in self.allowed_callers)


@dataclass(frozen=True)
class DatabaseConfig:
    """Where the job queue lives."""

    url: str | None = None
    """sqlite:///path/jobs.sqlite (sqlite:////abs/path) or postgresql://user@host/db; null: sqlite in <node.storage>/jobs.sqlite."""

    def __post_init__(self) -> None:
        if self.url is not None and not self.url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ConfigError(f"database.url must start with sqlite:/// or postgresql://, got {self.url.split('://')[0]!r}")


@dataclass(frozen=True)
class ServeModel:
    """A model the service keeps loaded."""

    path: str = ""
    """Run folder, checkpoint, cross-validation folder or exported package (what medunet infer takes)."""
    device: str = "auto"
    """Device it runs on: auto, cpu, cuda or cuda:<index>."""
    folds: tuple[int, ...] | None = None
    """Cross-validation folds to ensemble; null: all of them."""


@dataclass(frozen=True)
class RouteMatch:
    """What a series must have for a route to apply; an empty or null criterion matches anything."""

    modality: tuple[str, ...] = ()
    """Modalities (0008,0060) accepted, e.g. [CT]; compared case-insensitively."""
    body_part: tuple[str, ...] = ()
    """Body Part Examined (0018,0015) values accepted, e.g. [ABDOMEN, CHEST]; case-insensitive."""
    series_description: str | None = None
    """Regular expression searched in the Series Description (case-insensitive)."""
    min_slices: int | None = None
    """Fewest slices accepted."""
    max_slices: int | None = None
    """Most slices accepted."""
    min_spacing_mm: float | None = None
    """Smallest slice spacing accepted, in mm."""
    max_spacing_mm: float | None = None
    """Largest slice spacing accepted, in mm."""

    def __post_init__(self) -> None:
        if self.series_description is not None:
            try:
                re.compile(self.series_description)
            except re.error as exc:
                raise ConfigError(f"routes.match.series_description {self.series_description!r} is not a valid regular expression: {exc}") from None
        for low, high, what in ((self.min_slices, self.max_slices, "slices"), (self.min_spacing_mm, self.max_spacing_mm, "spacing_mm")):
            if low is not None and high is not None and low > high:
                raise ConfigError(f"routes.match: min_{what} ({low}) is above max_{what} ({high})")


@dataclass(frozen=True)
class Route:
    """One routing rule: a series that matches runs the rule's models."""

    name: str = ""
    """Name of the rule, shown in the job list and the audit log."""
    match: RouteMatch = field(default_factory=RouteMatch)
    """What the series must have."""
    models: tuple[str, ...] = ()
    """Models (names from models) run on a matching series, one job each."""


@dataclass(frozen=True)
class Destination:
    """Where results are sent."""

    kind: Literal["dicom", "stowrs", "folder"] = "dicom"
    """dicom: C-STORE to an AE; stowrs: DICOMweb STOW-RS; folder: copied into a folder."""
    ae_title: str | None = None
    """dicom only: the destination's AE title."""
    host: str | None = None
    """dicom only: its host name or address."""
    port: int | None = None
    """dicom only: its port."""
    url: str | None = None
    """stowrs only: the DICOMweb base URL."""
    path: str | None = None
    """folder only: the folder."""
    formats: tuple[OutputFormat, ...] = ("dicom-seg",)
    """Results sent there: any of dicom-seg, rtstruct, nifti, qc (nifti and qc only to folders)."""


@dataclass(frozen=True)
class DeliveryConfig:
    """Which destinations get a job's results, by its QC decision."""

    send_to: tuple[str, ...] = ()
    """Destinations of every result that QC accepts."""
    review_to: tuple[str, ...] = ()
    """Destinations of the results that QC flags for review."""
    hold_review: bool = True
    """true: a flagged result goes to review_to only (none: held in the review state); false: to send_to as well."""

    def destinations(self, qc_decision: str | None) -> tuple[str, ...]:
        """The destinations of a result with this QC decision ("review" or anything else)."""
        if qc_decision != "review":
            return self.send_to
        if self.hold_review:
            return self.review_to
        return tuple(dict.fromkeys(self.send_to + self.review_to))


@dataclass(frozen=True)
class RetryConfig:
    """Retries of a failed send, with exponential back-off."""

    max_attempts: int = 5
    """Attempts per result and destination before it is dead-lettered."""
    first_delay_s: float = 10.0
    """Wait before the second attempt, in seconds; each further wait doubles."""
    max_delay_s: float = 600.0
    """Longest wait between attempts, in seconds."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"retry.max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 <= self.first_delay_s <= self.max_delay_s:
            raise ConfigError(f"retry needs 0 <= first_delay_s <= max_delay_s, got {self.first_delay_s} and {self.max_delay_s}")

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after the ``failed_attempts``-th failure (1, 2, ...) before trying again."""
        return float(min(self.max_delay_s, self.first_delay_s * 2.0 ** max(0, failed_attempts - 1)))


@dataclass(frozen=True)
class ApiConfig:
    """The REST API (health, jobs, models, metrics)."""

    host: str = "127.0.0.1"
    """Address the API listens on (loopback by default: put a proxy with authentication in front to open it)."""
    port: int = 8080
    """TCP port of the API."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"api.port must be between 1 and 65535, got {self.port}")


@dataclass(frozen=True)
class WorkersConfig:
    """How jobs are run."""

    jobs_per_model: int = 1
    """Jobs of one model run at once in one process (one per GPU is usual)."""
    lease_seconds: float = 300.0
    """A running job's lease, renewed by its worker's heartbeat; a job whose lease runs out is requeued."""
    max_attempts: int = 3
    """Times a job is started (a lost worker counts) before it is failed."""

    def __post_init__(self) -> None:
        if self.jobs_per_model < 1:
            raise ConfigError(f"workers.jobs_per_model must be >= 1, got {self.jobs_per_model}")
        if self.lease_seconds <= 0:
            raise ConfigError(f"workers.lease_seconds must be positive, got {self.lease_seconds}")
        if self.max_attempts < 1:
            raise ConfigError(f"workers.max_attempts must be >= 1, got {self.max_attempts}")


@dataclass(frozen=True)
class ServeConfig:
    """The whole ``medunet serve`` configuration, one field per YAML section."""

    node: NodeConfig = field(default_factory=NodeConfig)
    """The DICOM node."""
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    """The job database."""
    models: dict[str, ServeModel] = field(default_factory=dict)
    """Model name -> {path, device, folds}."""
    routes: tuple[Route, ...] = ()
    """Routing rules in order: the first that matches a series wins; a series no rule matches is recorded as skipped."""
    destinations: dict[str, Destination] = field(default_factory=dict)
    """Destination name -> {kind, ae_title/host/port, url or path, formats}."""
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    """Which destinations get which results."""
    retry: RetryConfig = field(default_factory=RetryConfig)
    """Retries of failed sends."""
    api: ApiConfig = field(default_factory=ApiConfig)
    """The REST API."""
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    """How jobs are run."""
    audit_log: str | None = None
    """JSON-lines audit log; null: <node.storage>/audit.jsonl."""

    def __post_init__(self) -> None:
        for name, model in self.models.items():
            if not model.path:
                raise ConfigError(f"models.{name}.path must be set (a run folder, checkpoint or package)")
        seen: set[str] = set()
        for index, rule in enumerate(self.routes):
            where = f"routes[{index}]"
            if not rule.name or rule.name in seen:
                raise ConfigError(f"{where}.name must be set and unique, got {rule.name!r}")
            seen.add(rule.name)
            if not rule.models:
                raise ConfigError(f"{where}.models must name at least one model")
            _check_known(rule.models, self.models, f"{where}.models", "models")
        for name, destination in self.destinations.items():
            _check_destination(name, destination)
        _check_known(self.delivery.send_to, self.destinations, "delivery.send_to", "destinations")
        _check_known(self.delivery.review_to, self.destinations, "delivery.review_to", "destinations")

    @property
    def storage(self) -> Path:
        """The storage folder."""
        return Path(self.node.storage)

    @property
    def database_url(self) -> str:
        """The database URL, defaulting to SQLite in the storage folder."""
        return self.database.url or f"sqlite:///{self.storage / 'jobs.sqlite'}"

    @property
    def audit_path(self) -> Path:
        """The audit log's file."""
        return Path(self.audit_log) if self.audit_log else self.storage / "audit.jsonl"


def _check_known(names: tuple[str, ...], known: Mapping[str, object], where: str, section: str) -> None:
    for name in names:
        if name not in known:
            raise ConfigError(f"{where} names {name!r}, which is not in {section} ({', '.join(sorted(known)) or 'none defined'})" + _suggest(name, known))


def _check_destination(name: str, destination: Destination) -> None:
    where = f"destinations.{name}"
    if destination.kind == "dicom":
        missing = [f for f in ("ae_title", "host", "port") if getattr(destination, f) is None]
        if missing:
            raise ConfigError(f"{where}: kind dicom needs {', '.join(missing)}")
    elif destination.kind == "stowrs" and not destination.url:
        raise ConfigError(f"{where}: kind stowrs needs url")
    elif destination.kind == "folder" and not destination.path:
        raise ConfigError(f"{where}: kind folder needs path")
    if not destination.formats:
        raise ConfigError(f"{where}.formats must name at least one of dicom-seg, rtstruct, nifti, qc")
    files_only = sorted({"nifti", "qc"} & set(destination.formats))
    if destination.kind != "folder" and files_only:
        raise ConfigError(f"{where}.formats: {', '.join(files_only)} can only go to a folder destination (kind {destination.kind} takes dicom-seg, rtstruct)")


def serve_config_from_dict(values: dict[str, object]) -> ServeConfig:
    """Build a :class:`ServeConfig` from plain nested dicts, strictly checked."""
    config: ServeConfig = section_from_dict(ServeConfig, values, "")
    return config


def load_serve_config(path: str | Path) -> ServeConfig:
    """Read the service's YAML file; a bad value is a :class:`ConfigError` naming the field and the file."""
    values = read_yaml(path)
    try:
        return serve_config_from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{exc} in {path}") from None
