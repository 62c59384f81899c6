"""Pre-flight check of a datalist: every problem of every case, found at once, before training.

``medunet check dataset.json`` and ``medunet train`` (unless ``--skip-check``) run it. Each file is
inspected on its own (header first, then its voxels once), in parallel; then each case's files are
compared (channels and label on the image's grid), then cases with each other (channel counts,
files listed twice, identical images). See docs/check.md for the checks, thresholds and report.

Example:
    >>> report = check_datalist("dataset.json")
    >>> print(report.format_table())
    >>> report.ok, len(report.errors), len(report.warnings)
"""

from medunet.check.findings import CaseSummary, CheckReport, FileSummary, Finding
from medunet.check.run import check_datalist

__all__ = ["CaseSummary", "CheckReport", "FileSummary", "Finding", "check_datalist"]
