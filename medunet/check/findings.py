"""What a check found: findings, per-file and per-case summaries, the report (table and JSON)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medunet.io.atomic import atomic_write_text
from medunet.io.geometry import spacing_of

Severity = Literal["error", "warning"]

#: Version of the JSON report's layout (bumped when fields change meaning).
REPORT_FORMAT = "medunet-check/1"


@dataclass(frozen=True)
class Finding:
    """One problem: how bad, where (case and file), a short machine code and a one-line message."""

    severity: Severity
    code: str
    message: str
    case: str | None = None
    path: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The finding as it appears in the JSON report."""
        return {"severity": self.severity, "code": self.code, "case": self.case, "path": self.path, "message": self.message}

    def line(self) -> str:
        """One line for the terminal: severity, case, code, message and file."""
        where = f" [{self.path}]" if self.path else ""
        return f"{self.severity.upper():7s} {self.case or '(dataset)'}: {self.code}: {self.message}{where}"


@dataclass
class FileSummary:
    """What one file holds: header facts, voxel statistics and the problems found in it alone."""

    path: str
    role: Literal["image", "label"]
    shape: tuple[int, ...] | None = None
    """Shape as stored in the header (may be 4D; ``shape3d`` is the checked 3D shape)."""
    shape3d: tuple[int, int, int] | None = None
    affine: np.ndarray | None = None
    dtype: str | None = None
    voxels_read: bool = False
    nonfinite: int = 0
    minimum: float | None = None
    maximum: float | None = None
    percentiles: dict[str, float] = field(default_factory=dict)
    digest: str | None = None
    values: dict[str, int] | None = None
    """Label files: voxel count per value (finite values; non-integers as written)."""
    highest: float | None = None
    """Label files: the highest finite value (0 for an empty one), exact where ``values``' keys are rounded."""
    problems: list[Finding] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """Voxel spacing in mm from the affine."""
        if self.affine is None:
            return None
        s = spacing_of(self.affine)
        return float(s[0]), float(s[1]), float(s[2])

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: header facts and voxel statistics (intensities for images, value counts for labels)."""
        out: dict[str, Any] = {"path": self.path, "dtype": self.dtype, "shape": list(self.shape) if self.shape else None}
        if self.role == "image":
            out |= {"min": self.minimum, "max": self.maximum, "percentiles": self.percentiles or None}
            out["nonfinite_voxels"] = self.nonfinite
        else:
            out["values"] = self.values
            out["nonfinite_voxels"] = self.nonfinite
        return out


@dataclass
class CaseSummary:
    """One case of the datalist and everything found in it."""

    name: str
    section: Literal["training", "validation", "test"]
    images: list[FileSummary]
    label: FileSummary | None
    findings: list[Finding] = field(default_factory=list)

    @property
    def status(self) -> Literal["ok", "warning", "error"]:
        """The worst severity among the case's findings ("ok" without any)."""
        severities = {f.severity for f in self.findings}
        return "error" if "error" in severities else "warning" if "warning" in severities else "ok"

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """The first channel's 3D shape."""
        return self.images[0].shape3d if self.images else None

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """The first channel's spacing in mm."""
        return self.images[0].spacing if self.images else None

    def as_dict(self) -> dict[str, Any]:
        """The per-case summary of the JSON report."""
        spacing = self.spacing
        return {
            "case": self.name,
            "list": self.section,
            "status": self.status,
            "shape": list(self.shape) if self.shape else None,
            "spacing_mm": [round(s, 6) if np.isfinite(s) else None for s in spacing] if spacing else None,
            "channels": len(self.images),
            "images": [f.as_dict() for f in self.images],
            "label": self.label.as_dict() if self.label else None,
            "errors": sum(f.severity == "error" for f in self.findings),
            "warnings": sum(f.severity == "warning" for f in self.findings),
        }


@dataclass
class CheckReport:
    """The result of checking a datalist: per-case summaries and every finding, in datalist order."""

    datalist: Path
    cases: list[CaseSummary]
    findings: list[Finding]
    labels: dict[int, str] | None
    channels: list[str] | None
    seconds: float = 0.0

    @property
    def errors(self) -> list[Finding]:
        """Findings that stop training."""
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        """Findings worth a look that do not stop training."""
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there are no errors (warnings allowed)."""
        return not self.errors

    def counts(self) -> dict[str, int]:
        """Cases per list and findings per severity."""
        return {
            "cases": len(self.cases),
            "training": sum(c.section == "training" for c in self.cases),
            "validation": sum(c.section == "validation" for c in self.cases),
            "test": sum(c.section == "test" for c in self.cases),
            "cases_ok": sum(c.status == "ok" for c in self.cases),
            "cases_with_warnings": sum(c.status == "warning" for c in self.cases),
            "cases_with_errors": sum(c.status == "error" for c in self.cases),
            "errors": len(self.errors),
            "warnings": len(self.warnings),
        }

    def to_json(self) -> dict[str, Any]:
        """The JSON report (see docs/check.md for its fields)."""
        from medunet._version import __version__

        return {
            "format": REPORT_FORMAT,
            "medunet_version": __version__,
            "datalist": str(self.datalist),
            "declared": {
                "labels": {str(k): v for k, v in self.labels.items()} if self.labels else None,
                "channels": self.channels,
            },
            "counts": self.counts(),
            "seconds": round(self.seconds, 3),
            "cases": [c.as_dict() for c in self.cases],
            "findings": [f.as_dict() for f in self.findings],
        }

    def write_json(self, path: str | Path) -> Path:
        """Write the JSON report atomically."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")
        return path

    def summary_line(self) -> str:
        """E.g. ``20 cases: 17 ok, 1 with warnings, 2 with errors (3 errors, 1 warning)``."""
        n = self.counts()
        return (
            f"{n['cases']} cases: {n['cases_ok']} ok, {n['cases_with_warnings']} with warnings, "
            f"{n['cases_with_errors']} with errors ({n['errors']} error{'s' * (n['errors'] != 1)}, "
            f"{n['warnings']} warning{'s' * (n['warnings'] != 1)})"
        )

    def format_findings(self, limit: int | None = None) -> str:
        """The findings, one per line (errors first), at most ``limit`` of them."""
        ordered = self.errors + self.warnings
        shown = ordered if limit is None else ordered[:limit]
        lines = [f.line() for f in shown]
        if len(shown) < len(ordered):
            lines.append(f"... and {len(ordered) - len(shown)} more")
        return "\n".join(lines)

    def format_table(self) -> str:
        """One row per case (list, status, shape, spacing, channels, problems), then the findings."""
        header = ("case", "list", "status", "shape", "spacing (mm)", "ch", "problems")
        rows = [header]
        for c in self.cases:
            shape = "x".join(map(str, c.shape)) if c.shape else "-"
            spacing = "x".join(f"{s:.3g}" for s in c.spacing) if c.spacing else "-"
            rows.append((c.name, c.section, c.status, shape, spacing, str(len(c.images)), str(len(c.findings))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.findings:
            lines += ["", "findings:", self.format_findings()]
        lines += ["", self.summary_line()]
        return "\n".join(lines)
