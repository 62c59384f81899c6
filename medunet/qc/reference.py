"""The training reference: what QC compares every prediction with, computed once from the training cases.

It is stored as the checkpoint's ``fingerprint`` (a small JSON-able dict of ranges and medians, no
per-voxel or per-case data, nothing that names a case) by :func:`training_reference`, called when a
training run starts. Each training image and label goes through the very functions inference uses
(:func:`~medunet.qc.signals.input_signals`, :func:`~medunet.qc.signals.mask_signals`), so the two
sides are measured the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from medunet.config import Config
from medunet.io.datalist import Case
from medunet.io.geometry import spacing_of
from medunet.io.image import load_volume
from medunet.qc.signals import input_signals, mask_signals

log = logging.getLogger("medunet")

#: Marks a checkpoint ``fingerprint`` written by this module.
KIND = "medunet-qc-reference"
FORMAT = 1
#: Training cases read for the reference at most (a fixed, evenly spaced subset of larger datasets).
MAX_CASES = 32


def is_ct(config: Config, modality: Any = None) -> bool:
    """True when the model takes CT in Hounsfield units (a CT normalisation, or a CT first channel)."""
    if config.data.normalization in ("ct_window", "ct_clip_zscore"):
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


def training_reference(cases: Sequence[Case], config: Config, class_names: Sequence[str], modality: Any = None) -> dict[str, Any]:
    """The QC reference of a training run (see :func:`summarise`), from at most :data:`MAX_CASES` of its cases."""
    ct = is_ct(config, modality)
    chosen = list(cases)
    if len(chosen) > MAX_CASES:
        chosen = [chosen[i] for i in np.linspace(0, len(chosen) - 1, MAX_CASES).round().astype(int)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        rows = list(pool.map(lambda c: _read_row(c, ct=ct, num_classes=len(class_names)), chosen))
    log.debug("QC reference from %d training cases", len(rows))
    return summarise(rows, class_names=class_names, ct=ct, modality=modality)


def _spread(values: Sequence[Sequence[float]] | Sequence[float]) -> dict[str, Any]:
    """min, median and max over cases (element-wise for lists)."""
    array = np.asarray(values, dtype=float)
    return {
        "min": np.round(array.min(axis=0), 4).tolist(),
        "median": np.round(np.median(array, axis=0), 4).tolist(),
        "max": np.round(array.max(axis=0), 4).tolist(),
    }


def summarise(rows: Sequence[dict[str, Any]], *, class_names: Sequence[str], ct: bool, modality: Any = None) -> dict[str, Any]:
    """Ranges over the training cases of every signal QC compares with (a few hundred numbers in all)."""
    inputs = [r["input"] for r in rows]
    channels = inputs[0]["channels"]
    intensity = []
    for c in range(channels):
        quantiles = [i["intensity"][c]["body_quantiles"] for i in inputs]
        intensity.append({
            "body_quantiles": _spread(quantiles),
            "body_spread": float(np.median([q[-1] - q[0] for q in quantiles])),
            "range": _spread([i["intensity"][c]["range"] for i in inputs]),
            "noise": _spread([i["intensity"][c]["noise"] for i in inputs]),
        })
    classes: dict[str, Any] = {}
    masks = [r["mask"] for r in rows if "mask" in r]
    for c in range(1, len(class_names)):
        own = [m[str(c)] for m in masks]
        present = [m for m in own if m["volume_ml"] > 0]
        classes[str(c)] = {
            "name": class_names[c],
            "present": round(len(present) / max(len(own), 1), 4),
            "volume_ml": _spread([m["volume_ml"] for m in present]) if present else None,
            "components_max": max((m["components"] for m in present), default=0),
            "touches_border": round(sum(m["touches_border"] for m in own) / max(len(own), 1), 4),
        }
    return {
        "kind": KIND,
        "format": FORMAT,
        "num_cases": len(rows),
        "ct": ct,
        "modality": modality,
        "channels": channels,
        "spacing_mm": _spread([i["spacing_mm"] for i in inputs]),
        "extent_mm": _spread([i["extent_mm"] for i in inputs]),
        "body_at_border": _spread([i["body_at_border"] for i in inputs]),
        "intensity": intensity,
        "classes": classes,
    }


def reference_of(fingerprint: dict[str, Any] | None) -> dict[str, Any] | None:
    """The QC reference in a checkpoint's ``fingerprint``, or None (an older checkpoint, or another kind of fingerprint)."""
    if isinstance(fingerprint, dict) and fingerprint.get("kind") == KIND and int(fingerprint.get("format", 0)) <= FORMAT:
        return fingerprint
    return None
