"""Which models run on a series: the first routing rule of the config that matches the series' facts.

The facts are technical attributes only (UIDs, Modality, Body Part Examined, Series Description, slice count
and spacing), so routing decisions can be logged and shown without patient data. A series no rule matches
is recorded as skipped by the caller (:meth:`JobStore.skip`).
"""

from __future__ import annotations

import functools
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from medunet.serve.config import Route, RouteMatch


@dataclass(frozen=True)
class SeriesFacts:
    """What routing may look at in a received series (no patient attributes)."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    body_part_examined: str
    series_description: str
    slices: int
    """Instances in the series."""
    spacing_mm: float | None
    """Median distance between neighbouring slice positions; the slice thickness when positions are missing; None if neither is known."""


def slice_spacing(positions: Iterable[float | None], thicknesses: Iterable[float | None] = ()) -> float | None:
    """The median gap between distinct sorted slice positions, else the median slice thickness, else None."""
    known = sorted({round(p, 4) for p in positions if p is not None})
    gaps = [b - a for a, b in zip(known, known[1:])]
    if gaps:
        return float(statistics.median(gaps))
    thick = [t for t in thicknesses if t is not None and t > 0]
    return float(statistics.median(thick)) if thick else None


@functools.lru_cache(maxsize=256)
def _pattern(expression: str) -> re.Pattern[str]:
    return re.compile(expression, re.IGNORECASE)


def _within(value: float | None, low: float | None, high: float | None) -> bool:
    if low is None and high is None:
        return True
    if value is None:
        return False  # a limit is set but the series' value is unknown: do not guess
    return (low is None or value >= low) and (high is None or value <= high)


def matches(facts: SeriesFacts, match: RouteMatch) -> bool:
    """Whether a series satisfies every criterion of ``match`` (empty criteria match anything)."""
    if match.modality and facts.modality.upper() not in {m.upper() for m in match.modality}:
        return False
    if match.body_part and facts.body_part_examined.upper() not in {b.upper() for b in match.body_part}:
        return False
    if match.series_description is not None and not _pattern(match.series_description).search(facts.series_description):
        return False
    return _within(facts.slices, match.min_slices, match.max_slices) and _within(facts.spacing_mm, match.min_spacing_mm, match.max_spacing_mm)


def route(facts: SeriesFacts, routes: Sequence[Route]) -> Route | None:
    """The first rule of ``routes`` that ``facts`` matches, or None (the series is skipped)."""
    for rule in routes:
        if matches(facts, rule.match):
            return rule
    return None


def skip_reason(facts: SeriesFacts) -> str:
    """The one-line reason recorded for a series no rule matched."""
    spacing = "unknown" if facts.spacing_mm is None else f"{facts.spacing_mm:.2f} mm"
    return (f"no route matches modality {facts.modality or '-'}, body part {facts.body_part_examined or '-'}, "
            f"{facts.slices} slices, spacing {spacing}")
