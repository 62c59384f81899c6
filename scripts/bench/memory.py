"""Host memory of the current process, for the benchmark scripts (each side runs in its own subprocess)."""

from __future__ import annotations

from pathlib import Path


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    """Resident set size now (VmRSS), MiB."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB.

    Not ``ru_maxrss``: Linux keeps it across fork + exec, so a subprocess would report its parent's
    peak whenever that is higher.
    """
    return _status_mib("VmHWM")
