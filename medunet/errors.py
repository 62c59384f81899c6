"""Typed errors that a pipeline can catch and route (e.g. to manual review).

Every error medunet raises on purpose is a :class:`MedunetError`; the CLI prints
its message on one line and exits non-zero. Messages name the case and the file
(never patient identifiers) and say how to fix the problem where we know how.
"""

from __future__ import annotations

#: Attribute set on the copy of rank 0's error that the other torchrun ranks raise, so the CLI prints it once.
REPORTED_ON_RANK_0 = "medunet_reported_on_rank_0"


class MedunetError(Exception):
    """Base class of all errors raised by medunet on purpose."""


class ConfigError(MedunetError):
    """A configuration file or override is invalid."""


class DataError(MedunetError):
    """An input file or datalist entry is missing, unreadable or inconsistent.

    Args:
        message: what is wrong.
        case: the case name, when the problem belongs to one case.
        path: the offending file, when there is one.
    """

    def __init__(self, message: str, *, case: str | None = None, path: str | None = None) -> None:
        self.case = case
        self.path = path
        self.problem = message
        parts = []
        if case is not None:
            parts.append(f"case {case!r}")
        if path is not None:
            parts.append(f"file {path}")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


def parse_error(what: str, exc: BaseException, *, case: str | None, path: str | None) -> DataError:
    """The one conversion of a third-party parsing error (nibabel, pydicom, numpy) into a one-line DataError."""
    detail = " ".join(str(exc).split())[:160]
    return DataError(f"{what} ({type(exc).__name__}{': ' + detail if detail else ''}); the file is corrupt", case=case, path=path)


class GeometryError(MedunetError):
    """A result would not lie exactly on its input's grid."""


class CheckpointError(MedunetError):
    """A checkpoint is missing, corrupt, unsafe or incompatible."""


class PackageError(CheckpointError):
    """An exported model package is incomplete, tampered with, or of a schema this medunet does not read."""


class ExportError(MedunetError):
    """A model cannot be exported (no checkpoint, a network the exporter cannot trace, an unsupported setting)."""


class OutputExistsError(MedunetError):
    """An output file exists and overwriting was not allowed."""


class TrainingError(MedunetError):
    """Training cannot continue (e.g. a non-finite loss)."""


class PacsError(MedunetError):
    """A PACS (DICOMweb) request failed: unreachable, refused credentials, timed out, or not found."""


class ServeError(MedunetError):
    """The ``medunet serve`` service cannot do what was asked: its database is unreachable, a job is unknown, an extra is missing."""


class SendError(MedunetError):
    """Results could not be sent to a DICOM destination: the host is down, refused the association, or did not answer in time."""


class CaseError(MedunetError):
    """One case of a batch failed for a reason medunet did not foresee (a bug, a driver error); the other cases go on."""


def describe_unexpected(exc: BaseException) -> str:
    """``ExceptionType: message`` on one line, for reporting an error medunet did not raise on purpose."""
    detail = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}{': ' + detail if detail else ''}"


def unwrap_error(exc: BaseException) -> BaseException:
    """The MedunetError behind MONAI's "applying transform" wrappers, or ``exc`` itself."""
    seen = exc
    while seen is not None:
        if isinstance(seen, MedunetError):
            return seen
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]  # __cause__/__context__ are BaseException; the loop only returns MedunetError
    return exc
