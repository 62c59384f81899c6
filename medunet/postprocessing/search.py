"""Choose post-processing per class from out-of-fold predictions, keeping only what validation proves.

First, when out-of-fold predictions refined by the dense CRF (:mod:`medunet.postprocessing.crf`)
are given, the CRF is tried for all classes at once: it acts on the probabilities before they
are inverted to the input grid, so it cannot be replayed on saved label maps; instead the
cross-validation predicts every out-of-fold case twice (``oof/`` without, ``oof_crf/`` with the
CRF, same network), and the search compares the two label maps. If the CRF is kept, the per-class
search below runs on the CRF-refined predictions.

Then, for each foreground class, three operations of :mod:`medunet.postprocessing` are tried on
the out-of-fold predictions of a cross-validation, one at a time on top of what that class
already kept:

1. keep the largest connected component;
2. (if 1 was not kept) remove components smaller than a threshold in mm³, candidates being
   fractions of the smallest component found in the reference labels of that class;
3. fill enclosed holes.

An operation is kept when it raises the mean foreground Dice over all cases and lowers no
class's mean Dice (nnU-Net's rule, applied per operation). The decision is saved as plain
JSON (``postprocessing.json``) in the cross-validation folder; ``Segmenter.from_checkpoint``
on that folder applies it, unless ``--set postprocessing.*`` is given explicitly.

The candidates run through :func:`medunet.postprocessing.postprocess_labels`, the very code
inference uses, so what was validated is what is applied.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cc3d
import numpy as np

from medunet._version import __version__
from medunet.config import ClassPostprocessing, CrfConfig, PostprocessingConfig, config_from_dict, config_to_dict
from medunet.errors import CheckpointError, ConfigError, DataError
from medunet.io.atomic import atomic_write_text
from medunet.io.datalist import Case
from medunet.io.geometry import require_same_grid, spacing_of
from medunet.io.nifti import read_nifti, read_voxels
from medunet.postprocessing.operations import DEFAULT_CONNECTIVITY, postprocess_labels

log = logging.getLogger("medunet")

FORMAT_VERSION = 1

#: Small-component thresholds tried, as fractions of the smallest reference component of the class.
THRESHOLD_FRACTIONS = (0.1, 0.25, 0.5)

#: A change smaller than this is float noise, not an improvement (or a loss).
TOLERANCE = 1e-6

RULE = (
    "the dense CRF (all classes), then per class and operation (keep largest component, remove small components, fill holes): "
    "kept when it raises the mean foreground Dice of the out-of-fold predictions and lowers no class's mean Dice"
)


@dataclass(frozen=True)
class SearchCase:
    """One out-of-fold case: predicted and reference labels on the same grid, and that grid's spacing (mm)."""

    name: str
    prediction: np.ndarray
    reference: np.ndarray
    spacing: tuple[float, float, float]


@dataclass
class PostprocessingChoice:
    """What the search chose, with the evidence."""

    settings: dict[str, ClassPostprocessing]
    dice_before: dict[str, float]
    dice_after: dict[str, float]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    num_cases: int = 0
    crf: CrfConfig | None = None
    """The dense CRF settings tried (``enabled`` true when kept); None when it was not a candidate."""

    @property
    def mean_before(self) -> float:
        """Mean foreground Dice of the raw predictions."""
        return float(np.mean(list(self.dice_before.values())))

    @property
    def mean_after(self) -> float:
        """Mean foreground Dice with the chosen post-processing."""
        return float(np.mean(list(self.dice_after.values())))

    def describe(self) -> str:
        """One line per class: what was chosen and its Dice before -> after (and whether the dense CRF was kept)."""
        lines = [] if self.crf is None else [f"  dense CRF (all classes): {'kept' if self.crf.enabled else 'not kept'}"]
        return "\n".join(lines + [
            f"  {name}: {describe_settings(s)} (Dice {self.dice_before[name]:.4f} -> {self.dice_after[name]:.4f})"
            for name, s in self.settings.items()
        ])

    def to_json(self) -> dict[str, Any]:
        """The plain-JSON form saved as ``postprocessing.json``."""
        return {
            "format": FORMAT_VERSION,
            "medunet_version": __version__,
            "rule": RULE,
            "cases": self.num_cases,
            "postprocessing": {
                "classes": {n: _searched_fields(s) for n, s in self.settings.items()},
                **({"crf": asdict(self.crf)} if self.crf is not None else {}),
            },
            "dice_before": self.dice_before,
            "dice_after": self.dice_after,
            "mean_dice_before": self.mean_before,
            "mean_dice_after": self.mean_after,
            "candidates": self.candidates,
        }


def _searched_fields(settings: ClassPostprocessing) -> dict[str, Any]:
    return {"keep_largest": settings.keep_largest, "fill_holes": settings.fill_holes, "min_size_mm3": settings.min_size_mm3}


def describe_settings(settings: ClassPostprocessing) -> str:
    """``"keep largest, fill holes"``, ``"remove < 12 mm³"`` or ``"none"``."""
    steps = []
    if settings.keep_largest:
        steps.append("keep largest component")
    if settings.min_size_mm3 > 0:
        steps.append(f"remove components < {settings.min_size_mm3:g} mm³")
    if settings.fill_holes:
        steps.append("fill holes")
    if settings.opening_mm > 0:
        steps.append(f"opening {settings.opening_mm:g} mm")
    if settings.closing_mm > 0:
        steps.append(f"closing {settings.closing_mm:g} mm")
    return ", ".join(steps) or "none"


def confusion_dice(prediction: np.ndarray, reference: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of classes 1..K-1 from one confusion-matrix pass (both empty: 1.0, as :mod:`medunet.evaluation`).

    One ``bincount`` instead of one-hot tensors: the search scores every candidate on every
    case, and this stays fast and small on full-size CT.
    """
    counts = np.bincount(
        prediction.astype(np.int64, copy=False).ravel() * num_classes + reference.astype(np.int64, copy=False).ravel(),
        minlength=num_classes * num_classes,
    )[: num_classes * num_classes].reshape(num_classes, num_classes)
    overlap = np.diag(counts)[1:].astype(np.float64)
    total = counts.sum(axis=1)[1:] + counts.sum(axis=0)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(total > 0, 2.0 * overlap / np.maximum(total, 1), 1.0)
    return dice


def crop_to_foreground(prediction: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays cut to the box around either's foreground plus one voxel of background.

    Keeping-largest, small-component removal and hole filling give the same result on the
    crop (the margin is background connected to the outside, as in the full volume) and
    Dice only counts foreground, so the search can hold many cases in memory.
    """
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} differ in shape")
    where = np.nonzero((prediction > 0) | (reference > 0))
    if not where[0].size:
        return prediction[:1, :1, :1].copy(), reference[:1, :1, :1].copy()
    box = tuple(slice(max(int(w.min()) - 1, 0), int(w.max()) + 2) for w in where)
    return prediction[box].copy(), reference[box].copy()


def load_search_cases(pred_dir: Path, cases: Sequence[Case]) -> list[SearchCase]:
    """Read each case's prediction (``pred_dir/<case>.nii.gz``) and reference label, checking they share a grid.

    Raises:
        DataError: a prediction is missing or unreadable.
        GeometryError: a prediction does not lie on its reference's grid.
    """
    result = []
    for case in cases:
        if case.label is None:
            continue
        pred_path = Path(pred_dir) / f"{case.name}.nii.gz"
        if not pred_path.is_file():
            raise DataError("no out-of-fold prediction for this case; re-run the cross-validation", case=case.name, path=str(pred_path))
        pred_img, ref_img = read_nifti(pred_path, case=case.name), read_nifti(case.label, case=case.name)
        require_same_grid(pred_img.shape, pred_img.affine, ref_img.shape, ref_img.affine, what="out-of-fold prediction",
                          against=f"its reference label's ({case.label})", case=case.name, path=str(pred_path),
                          fix="re-run the cross-validation to predict it again")
        pred = read_voxels(pred_img, case=case.name, path=str(pred_path), dtype=np.int64)
        ref = read_voxels(ref_img, case=case.name, path=str(case.label), dtype=np.int64)
        pred, ref = crop_to_foreground(pred.astype(np.uint16), ref.astype(np.uint16))
        spacing = tuple(float(s) for s in spacing_of(ref_img.affine))
        result.append(SearchCase(case.name, pred, ref, spacing))  # type: ignore[arg-type]  # spacing_of gives 3 values
    return result


def threshold_candidates(cases: Sequence[SearchCase], label: int) -> list[float]:
    """Small-component thresholds (mm³) for one class: fractions of its smallest reference component."""
    smallest = math.inf
    for case in cases:
        mask = case.reference == label
        if not mask.any():
            continue
        voxel_mm3 = math.prod(case.spacing)
        counts = np.bincount(cc3d.connected_components(mask.astype(np.uint8), connectivity=DEFAULT_CONNECTIVITY).ravel())[1:]
        smallest = min(smallest, float(counts.min()) * voxel_mm3)
    if not math.isfinite(smallest):
        return []
    return sorted({float(f"{f * smallest:.2g}") for f in THRESHOLD_FRACTIONS if f * smallest > 0})


def _score(
    cases: Sequence[SearchCase], settings: Mapping[int, ClassPostprocessing], class_names: Mapping[int, str]
) -> np.ndarray:
    """Mean Dice per foreground class over the cases, after post-processing with ``settings``."""
    config = PostprocessingConfig(classes={class_names[k]: s for k, s in settings.items()})
    num_classes = max(class_names) + 1
    per_case = [
        confusion_dice(postprocess_labels(c.prediction, spacing=c.spacing, config=config, class_names=class_names), c.reference, num_classes)
        for c in cases
    ]
    return np.mean(per_case, axis=0)


def _try_crf(
    cases: Sequence[SearchCase], crf_cases: Sequence[SearchCase], crf: CrfConfig, names: Mapping[int, str], current: np.ndarray
) -> tuple[CrfConfig, np.ndarray, dict[str, Any]]:
    """The dense CRF as a candidate: (its settings, enabled when kept; its class Dice; the candidate's record)."""
    if [c.name for c in crf_cases] != [c.name for c in cases]:
        raise DataError("the CRF-refined out-of-fold predictions are not the same cases as the plain ones; re-run the cross-validation")
    foreground = [k for k in names if k > 0]
    dice = _score(crf_cases, {k: ClassPostprocessing() for k in foreground}, names)
    keep = bool(dice.mean() > current.mean() + TOLERANCE and np.all(dice >= current - TOLERANCE))
    record = {"class": "*", "operation": "dense_crf", "settings": asdict(replace(crf, enabled=True)), "mean_dice": float(dice.mean()),
              "class_dice": {names[j]: float(d) for j, d in zip(foreground, dice)}, "chosen": keep}
    return replace(crf, enabled=keep), dice, record


def search_postprocessing(
    cases: Sequence[SearchCase],
    class_names: Mapping[int, str],
    *,
    crf_cases: Sequence[SearchCase] | None = None,
    crf: CrfConfig | None = None,
) -> PostprocessingChoice:
    """Decide whether the dense CRF and which per-class clean-up operations the out-of-fold predictions support.

    Args:
        cases: predictions and references (e.g. from :func:`load_search_cases`).
        class_names: index -> name, background (0) included.
        crf_cases: the same cases predicted with the dense CRF ``crf`` (same names and references);
            None: the CRF is not a candidate.
        crf: the CRF settings that produced ``crf_cases``.

    Raises:
        DataError: no cases, or ``crf_cases`` that are not the same cases.
    """
    if not cases:
        raise DataError("post-processing search needs at least one case with a prediction and a reference")
    names = dict(sorted(class_names.items()))
    foreground = [k for k in names if k > 0]
    settings = {k: ClassPostprocessing() for k in foreground}
    before = _score(cases, settings, names)
    current = before
    candidates: list[dict[str, Any]] = []
    tried_crf: CrfConfig | None = None
    if crf_cases is not None:
        tried_crf, crf_dice, candidate = _try_crf(cases, crf_cases, crf or CrfConfig(), names, current)
        candidates.append(candidate)
        if tried_crf.enabled:
            cases, current = crf_cases, crf_dice

    def record(k: int, operation: str, trial: ClassPostprocessing, dice: np.ndarray, chosen: bool) -> None:
        candidates.append({
            "class": names[k],
            "operation": operation,
            "settings": _searched_fields(trial),
            "mean_dice": float(dice.mean()),
            "class_dice": {names[j]: float(d) for j, d in zip(foreground, dice)},
            "chosen": chosen,
        })

    def acceptable(dice: np.ndarray) -> bool:
        return bool(dice.mean() > current.mean() + TOLERANCE and np.all(dice >= current - TOLERANCE))

    for k in foreground:
        steps: list[tuple[str, list[ClassPostprocessing]]] = [
            ("keep_largest", [replace(settings[k], keep_largest=True)]),
            ("remove_small_components", [replace(settings[k], min_size_mm3=t) for t in threshold_candidates(cases, k)]),
            ("fill_holes", [replace(settings[k], fill_holes=True)]),
        ]
        for operation, trials in steps:
            if operation == "remove_small_components" and settings[k].keep_largest:
                continue  # keeping only the largest component already removes every smaller one
            scored = [(trial, _score(cases, {**settings, k: trial}, names)) for trial in trials]
            best = max(scored, key=lambda item: item[1].mean(), default=None)
            chosen = best is not None and acceptable(best[1])
            for trial, dice in scored:
                record(k, operation, trial, dice, chosen and trial is best[0])  # type: ignore[index]  # best is not None when chosen
            if chosen:
                settings[k], current = best[0], best[1]  # type: ignore[index]  # best is not None when chosen
    return PostprocessingChoice(
        settings={names[k]: settings[k] for k in foreground},
        dice_before={names[k]: float(d) for k, d in zip(foreground, before)},
        dice_after={names[k]: float(d) for k, d in zip(foreground, current)},
        candidates=candidates,
        num_cases=len(cases),
        crf=tried_crf,
    )


def save_choice(choice: PostprocessingChoice, path: Path) -> Path:
    """Write the decision as ``postprocessing.json`` (atomically)."""
    atomic_write_text(Path(path), json.dumps(choice.to_json(), indent=2) + "\n")
    return Path(path)


def load_choice(path: Path, class_names: Sequence[str]) -> dict[str, Any]:
    """The ``postprocessing`` config section saved in a ``postprocessing.json``, checked against the model's classes.

    Raises:
        ConfigError: the file is not valid JSON or its settings are not valid post-processing settings.
        CheckpointError: it names classes the model does not have.
    """
    try:
        payload = json.loads(Path(path).read_text())
        section = payload["postprocessing"]
        config_from_dict({"postprocessing": section})  # strict check of every field
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a valid post-processing decision ({type(exc).__name__}: {exc}); delete it or re-run crossval") from exc
    unknown = sorted(set(section.get("classes", {})) - set(class_names))
    if unknown:
        raise CheckpointError(f"{path} names classes {unknown} that the model does not have ({class_names}); delete it or re-run crossval")
    return dict(section)


def validated_postprocessing(path: Path, class_names: Sequence[str], overrides: Sequence[str]) -> dict[str, Any] | None:
    """The post-processing section a saved decision (a ``postprocessing.json`` file) sets, or None to keep the checkpoint's own.

    None too when ``path`` does not exist. The decision is applied unless an override sets
    ``postprocessing.*`` (explicit settings win). What happens is logged.
    """
    path = Path(path)
    if not path.is_file():
        return None
    if any(o.strip().startswith("postprocessing") for o in overrides):
        log.info("explicit --set postprocessing.* given: not applying the validated %s", path)
        return None
    section = load_choice(path, class_names)
    config = config_from_dict({"postprocessing": section}).postprocessing
    applied = "; ".join([*(["dense CRF"] if config.crf.enabled else []),
                         *(f"{n}: {describe_settings(s)}" for n, s in config.classes.items())]) or "none"
    log.info("post-processing chosen by cross-validation (%s): %s", path, applied)
    return config_to_dict(config)
