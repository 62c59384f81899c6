"""The training reference: what QC compares every prediction with, computed once from the training cases.

:func:`training_reference`, called when a training run starts, returns a :class:`QCReference` (ranges
and medians, no per-voxel or per-case data, nothing that names a case), stored in the checkpoint as
``qc_reference``. Each training image and label goes through the very functions inference uses
(:func:`~medunet.qc.signals.input_signals`, :func:`~medunet.qc.signals.mask_signals`), so the two
sides are measured the same way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medunet.config import Config
from medunet.io.datalist import Case
from medunet.io.geometry import spacing_of
from medunet.io.image import load_volume
from medunet.qc.signals import input_signals, mask_signals

log = logging.getLogger("medunet")

#: Marks the stored form of a :class:`QCReference`.
KIND = "medunet-qc-reference"
FORMAT = 1
#: Training cases read for the reference at most (a fixed, evenly spaced subset of larger datasets).
MAX_CASES = 32


def is_ct(config: Config, modality: Any = None) -> bool:
    """True when the model takes CT in Hounsfield units (a CT normalisation, or a CT first channel)."""
    return ct_input(config.data.normalization, modality)


def ct_input(normalization: str, modality: Any = None) -> bool:
    """:func:`is_ct` from the normalisation alone (before the config is complete, e.g. while planning)."""
    if normalization in ("ct_window", "ct_clip_zscore"):
        return True
    first = modality.get("0") if isinstance(modality, dict) else modality
    return isinstance(first, str) and first.upper() == "CT"


def case_row(image: np.ndarray, label: np.ndarray | None, affine: np.ndarray, *, ct: bool, num_classes: int) -> dict[str, Any]:
    """The QC signals of one training case (image channels first, label on the same grid)."""
    row: dict[str, Any] = {"input": input_signals(image, affine, ct=ct)}
    if label is not None:
        row["mask"] = mask_signals(np.rint(label).astype(np.int64), spacing_of(affine), num_classes)
    return row


def _read_row(case: Case, *, ct: bool, num_classes: int) -> dict[str, Any]:
    image, reference = load_volume(list(case.image), case=case.name)
    label = load_volume(case.label, case=case.name)[0].numpy()[0] if case.label is not None else None
    return case_row(image.numpy(), label, np.asarray(reference.affine), ct=ct, num_classes=num_classes)


def reference_cases(cases: Sequence[Case]) -> list[Case]:
    """The training cases the reference is computed from: all, or :data:`MAX_CASES` evenly spaced ones."""
    chosen = list(cases)
    if len(chosen) > MAX_CASES:
        chosen = [chosen[i] for i in np.linspace(0, len(chosen) - 1, MAX_CASES).round().astype(int)]
    return chosen


@dataclass
class SharedRows:
    """QC rows (:func:`case_row`) computed by another pass over the same volumes, so the reference need not read them again.

    ``medunet train`` without ``-c`` plans first: the planning fingerprint reads every training case and,
    for the cases :meth:`expect` names, computes their rows from the very arrays the reference would read
    (:func:`load_volume` of the image channels and the label). A row is used only for the same case
    (name and files), CT flag and class count; any other case is read as before.
    """

    ct: bool = False
    num_classes: int = 0
    wanted: frozenset[Case] = frozenset()
    rows: dict[Case, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def expect(self, cases: Sequence[Case], *, ct: bool, num_classes: int) -> None:
        """Compute rows for ``cases`` (the reference's expected cases) with this CT flag and class count."""
        self.ct, self.num_classes, self.wanted = ct, num_classes, frozenset(cases)

    def wants(self, case: Case) -> bool:
        """Whether the pass reading ``case`` should compute its row."""
        return case in self.wanted

    def add(self, case: Case, image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> None:
        """Compute and keep the row of ``case`` from its image channels, label and the image's affine."""
        row = case_row(image, label, affine, ct=self.ct, num_classes=self.num_classes)
        with self._lock:
            self.rows[case] = row

    def row(self, case: Case, *, ct: bool, num_classes: int) -> dict[str, Any] | None:
        """The kept row of ``case`` when it was computed for this CT flag and class count, else None."""
        if ct != self.ct or num_classes != self.num_classes:
            return None
        return self.rows.get(case)


def training_reference(
    cases: Sequence[Case], config: Config, class_names: Sequence[str], modality: Any = None, *, shared: SharedRows | None = None
) -> QCReference:
    """The QC reference of a training run (see :func:`summarise`), from at most :data:`MAX_CASES` of its cases.

    Rows ``shared`` holds for a chosen case are used instead of reading it again (the same values).
    """
    ct = is_ct(config, modality)
    chosen = reference_cases(cases)
    num_classes = len(class_names)

    def row_of(case: Case) -> dict[str, Any]:
        kept = shared.row(case, ct=ct, num_classes=num_classes) if shared is not None else None
        return kept if kept is not None else _read_row(case, ct=ct, num_classes=num_classes)

    with ThreadPoolExecutor(max_workers=2) as pool:
        rows = list(pool.map(row_of, chosen))
    log.debug("QC reference from %d training cases", len(rows))
    return summarise(rows, class_names=class_names, ct=ct, modality=modality)


@dataclass(frozen=True)
class Spread:
    """Minimum, median and maximum of one statistic over the training cases (lists: element-wise, e.g. per axis)."""

    min: Any
    median: Any
    max: Any

    @classmethod
    def of(cls, values: Sequence[Sequence[float]] | Sequence[float]) -> Spread:
        array = np.asarray(values, dtype=float)
        return cls(*(np.round(f(array, axis=0), 4).tolist() for f in (np.min, np.median, np.max)))

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Spread:
        return cls(raw["min"], raw["median"], raw["max"])


@dataclass(frozen=True)
class ChannelReference:
    """Intensities of one input channel over the training cases."""

    body_quantiles: Spread
    """The :data:`~medunet.qc.signals.BODY_QUANTILES` of the voxels inside the body."""
    body_spread: float
    """Median over cases of (p95 - p5) inside the body: the unit intensity tolerances are measured in."""
    range: Spread
    """The whole volume's 0.5 and 99.5 percentiles."""
    noise: Spread
    """Noise inside the body (:func:`~medunet.qc.signals.noise_sigma`)."""


@dataclass(frozen=True)
class ClassReference:
    """One foreground class over the training labels."""

    name: str
    present: float
    """Share of training cases whose label contains the class (0..1)."""
    volume_ml: Spread | None
    """Volume (mL) over the cases that contain it; None when no case does."""
    components_max: int
    """Most connected components (of at least 0.1 mL) one training label had."""
    touches_border: float
    """Share of training labels where the class touches the volume border."""


@dataclass(frozen=True)
class QCReference:
    """The training reference (ranges over the training cases of every signal QC compares with).

    A few hundred numbers, no per-case data and nothing that names a case. Stored in the checkpoint
    as ``qc_reference`` and, in an exported package, as ``qc.json``'s ``reference``.
    """

    num_cases: int
    ct: bool
    """The model takes CT in Hounsfield units (the CT body threshold applies)."""
    modality: Any
    channels: int
    spacing_mm: Spread
    """Voxel spacing per world axis (R, A, S)."""
    extent_mm: Spread
    """Field of view per world axis (R, A, S)."""
    body_at_border: Spread
    """Per world axis, the larger share of body on the two border faces."""
    intensity: list[ChannelReference]
    classes: dict[str, ClassReference]
    """By label value ("1", "2", ...)."""

    def to_json(self) -> dict[str, Any]:
        """The stored form (plain JSON), marked with :data:`KIND` and :data:`FORMAT`."""
        return {"kind": KIND, "format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> QCReference:
        """Rebuild from :meth:`to_json`'s form.

        Raises:
            KeyError, TypeError, ValueError: not a QC reference (use :func:`reference_of` to test first).
        """
        return cls(
            num_cases=int(raw["num_cases"]), ct=bool(raw["ct"]), modality=raw.get("modality"), channels=int(raw["channels"]),
            spacing_mm=Spread.from_json(raw["spacing_mm"]), extent_mm=Spread.from_json(raw["extent_mm"]),
            body_at_border=Spread.from_json(raw["body_at_border"]),
            intensity=[ChannelReference(Spread.from_json(c["body_quantiles"]), float(c["body_spread"]), Spread.from_json(c["range"]),
                                        Spread.from_json(c["noise"])) for c in raw["intensity"]],
            classes={str(k): ClassReference(str(c["name"]), float(c["present"]),
                                            Spread.from_json(c["volume_ml"]) if c.get("volume_ml") else None,
                                            int(c["components_max"]), float(c["touches_border"])) for k, c in raw["classes"].items()},
        )


def summarise(rows: Sequence[dict[str, Any]], *, class_names: Sequence[str], ct: bool, modality: Any = None) -> QCReference:
    """Ranges over the training cases of every signal QC compares with."""
    inputs = [r["input"] for r in rows]
    channels = inputs[0]["channels"]
    intensity = []
    for c in range(channels):
        quantiles = [i["intensity"][c]["body_quantiles"] for i in inputs]
        intensity.append(ChannelReference(
            body_quantiles=Spread.of(quantiles),
            body_spread=float(np.median([q[-1] - q[0] for q in quantiles])),
            range=Spread.of([i["intensity"][c]["range"] for i in inputs]),
            noise=Spread.of([i["intensity"][c]["noise"] for i in inputs]),
        ))
    classes: dict[str, ClassReference] = {}
    masks = [r["mask"] for r in rows if "mask" in r]
    for c in range(1, len(class_names)):
        own = [m[str(c)] for m in masks]
        present = [m for m in own if m["volume_ml"] > 0]
        classes[str(c)] = ClassReference(
            name=class_names[c],
            present=round(len(present) / max(len(own), 1), 4),
            volume_ml=Spread.of([m["volume_ml"] for m in present]) if present else None,
            components_max=max((m["components"] for m in present), default=0),
            touches_border=round(sum(m["touches_border"] for m in own) / max(len(own), 1), 4),
        )
    return QCReference(
        num_cases=len(rows), ct=ct, modality=modality, channels=channels,
        spacing_mm=Spread.of([i["spacing_mm"] for i in inputs]), extent_mm=Spread.of([i["extent_mm"] for i in inputs]),
        body_at_border=Spread.of([i["body_at_border"] for i in inputs]), intensity=intensity, classes=classes,
    )


def reference_of(stored: dict[str, Any] | None) -> QCReference | None:
    """The QC reference in its stored form, or None (absent, of a newer format, or another kind of summary)."""
    if isinstance(stored, dict) and stored.get("kind") == KIND and int(stored.get("format", 0)) <= FORMAT:
        try:
            return QCReference.from_json(stored)
        except (KeyError, TypeError, ValueError):
            log.warning("the stored QC reference is incomplete; QC uses the model's uncertainty only")
    return None
