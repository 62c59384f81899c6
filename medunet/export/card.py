"""The model card of an exported package: ``model_card.json`` (machine-readable) and ``MODEL_CARD.md``.

It says what the model was trained on, from wherever the run has it: the planning fingerprint
(``fingerprint.json`` of a planned run, or of a crossval root or fold), the QC reference in the
checkpoint (cases, spacing and field-of-view ranges, intensity ranges, class presence and volumes),
and explicitly what is unknown (never per-case records); the package's QC calibration; how well it validated (per class, per fold; the cross-validation's out-of-fold scores when
the export came from a crossval folder), the full training config, the software versions, intended
use and limits, and the sha256 of every other file of the package, which makes ``model_card.json``
the package's manifest (checked by :func:`medunet.model.package.read_package`).
"""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medunet._version import __version__
from medunet.errors import DataError
from medunet.model.checkpoint import Checkpoint
from medunet.model.layout import CARD_FILE, CARD_MARKDOWN, OOF_EVAL_DIR, POSTPROCESSING_FILE, QC_FILE, SPLIT_FILE, fold_name
from medunet.model.package import SCHEMA_VERSION
from medunet.planning.fingerprint import load_fingerprint
from medunet.qc.decide import Thresholds
from medunet.qc.reference import MAX_CASES, QCReference
from medunet.qc.signals import BODY_QUANTILES
from medunet.training.run_config import FINGERPRINT_FILE

#: Fingerprint keys copied into the card (the per-case records are left out: they name cases).
FINGERPRINT_KEYS = ("num_cases", "modality", "orientation", "channels", "spacing", "shape", "intensity", "classes", "zero_background")
#: Why a fact is missing, in the card's words.
NO_FINGERPRINT = ("the run was trained with a config, not planned (medunet plan writes <plan>.fingerprint.json, which "
                  "medunet train -c <plan> keeps as fingerprint.json)")
NO_REFERENCE = "the checkpoint holds none (the model was trained before QC existed)"
NO_DATALIST = f"the run does not record where its datalist is ({SPLIT_FILE} names cases only)"


def software_versions() -> dict[str, str]:
    """Versions of Python and of the packages that produced (and run) the package."""
    import monai
    import numpy
    import torch

    versions = {"python": platform.python_version(), "medunet": __version__, "torch": torch.__version__, "monai": monai.__version__,
                "numpy": numpy.__version__}
    for name in ("onnx", "onnxruntime"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def _validation(folds: dict[int | None, Checkpoint], source: Path) -> dict[str, Any]:
    per_network = {}
    for fold, checkpoint in folds.items():
        state = checkpoint.train_state
        key = "model" if fold is None else fold_name(fold)
        per_network[key] = {"epochs": checkpoint.epoch} | ({
            "best_epoch": state.best_epoch, "mean_dice": round(state.best_mean_dice(), 4),
            "selection_metric": state.best_metric,
            "class_dice": {k: round(v, 4) for k, v in state.best_class_dice.items()},
        } if state is not None and state.best_epoch > 0 else {"note": "no validation recorded in the checkpoint"})
    result: dict[str, Any] = {"held_out_validation": per_network,
                              "how": "mean Dice per class on the run's validation cases (sliding window, network space), best epoch"}
    summary = source / OOF_EVAL_DIR / "summary.json"
    if summary.is_file():
        scores = json.loads(summary.read_text())
        result["cross_validation_out_of_fold"] = {
            name: {m: scores[name][m]["mean"] for m in ("dice", "hd95", "nsd") if isinstance(scores[name].get(m), dict)}
            for name in scores if isinstance(scores[name], dict)
        } | {"mean_dice": scores.get("mean_dice"), "cases": scores.get("n_cases")}
    chosen = source / POSTPROCESSING_FILE
    if chosen.is_file():
        payload = json.loads(chosen.read_text())
        result["postprocessing_validation"] = {k: payload.get(k) for k in ("rule", "cases", "dice_before", "dice_after")}
    return result


def _planning_fingerprint(folders: Sequence[Path], root: Path) -> tuple[dict[str, Any] | None, str]:
    """The first readable planning fingerprint in ``folders`` (its summary keys only) and where it was, or None and why not."""
    for folder in folders:
        path = folder / FINGERPRINT_FILE
        if path.is_file():
            try:
                fingerprint = load_fingerprint(path)
            except DataError as exc:
                return None, f"{_relative(path, root)} is unreadable ({exc})"
            return {k: fingerprint[k] for k in FINGERPRINT_KEYS if k in fingerprint}, _relative(path, root)
    return None, NO_FINGERPRINT


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the exported folder (the card names no absolute paths of the exporting machine)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def _reference_summary(reference: QCReference) -> dict[str, Any]:
    """The QC reference's ranges for people: cases, spacing, field of view, intensities, class presence and volumes."""
    return {
        "num_cases": reference.num_cases,
        "what": f"training cases of the run read for QC (its training split; at most {MAX_CASES} are read)",
        "modality": reference.modality,
        "spacing_mm": asdict(reference.spacing_mm),
        "field_of_view_mm": asdict(reference.extent_mm),
        "axes": "world R, A, S",
        "intensity": [{"range_p0_5_p99_5": asdict(c.range), "body_quantiles": asdict(c.body_quantiles),
                       "quantiles": list(BODY_QUANTILES)} for c in reference.intensity],
        "classes": {k: {"name": c.name, "present_in_cases": c.present, "volume_ml": asdict(c.volume_ml) if c.volume_ml else None}
                    for k, c in reference.classes.items()},
    }


def training_data(reference: QCReference | None, *, source: Path, checkpoint_paths: dict[int | None, Path]) -> dict[str, Any]:
    """What the card says about the training data: the planning fingerprint, the QC reference, and what is unknown.

    The planning fingerprint is looked for in the exported folder, then in each checkpoint's run folder
    (a crossval fold's); the reference is the one QC uses (the first network's). Anything absent goes
    into ``unknown`` with the reason, so the card never guesses and never fails for lack of it.
    """
    folders = list(dict.fromkeys([*([source] if source.is_dir() else []), *(p.parent for p in checkpoint_paths.values())]))
    root = source if source.is_dir() else source.parent
    fingerprint, where = _planning_fingerprint(folders, root)
    first, path = next(iter(checkpoint_paths.items()))
    checkpoint = f"checkpoint of fold {first} ({_relative(path, root)})" if first is not None else f"checkpoint {_relative(path, root)}"
    data: dict[str, Any] = {"sources": {"planning_fingerprint": where if fingerprint else None,
                                        "qc_reference": checkpoint if reference else None, "datalist": None}}
    unknown = {}
    if fingerprint is not None:
        data["planning_fingerprint"] = fingerprint
    else:
        unknown["planning_fingerprint"] = where
    if reference is not None:
        data["qc_reference"] = _reference_summary(reference)
    else:
        unknown["qc_reference"] = NO_REFERENCE
    unknown["datalist"] = NO_DATALIST
    return {**data, "unknown": unknown}


def quality_control(reference: QCReference | None, thresholds: Thresholds) -> dict[str, Any]:
    """The package's QC (qc.json) in the card: whether there is a reference, and the calibration with what it achieved."""
    return {
        "file": QC_FILE,
        "reference": (f"the training reference of {reference.num_cases} cases: inputs and masks are checked against it"
                      if reference else f"none: {NO_REFERENCE}; QC uses the model's uncertainty only"),
        "calibration": {"source": thresholds.source, "describe": thresholds.describe(), "temperature": thresholds.temperature,
                        "score_review": thresholds.score_review, "achieved": thresholds.achieved},
    }


def card_json(folds: dict[int | None, Checkpoint], *, source: Path, checkpoint_paths: dict[int | None, Path], pipeline: dict[str, Any],
              checks: dict[str, float], files: dict[str, str], qc_reference: QCReference | None, thresholds: Thresholds) -> dict[str, Any]:
    """The card's content (``files``: sha256 by relative path of every other file of the package)."""
    first = next(iter(folds.values()))
    modality = pipeline["modality"]
    modality = modality if isinstance(modality, str) else "/".join(str(v) for v in dict(modality).values())  # MSD: {"0": "CT"}
    classes = pipeline["classes"]
    spacing = pipeline["config"]["data"]["target_spacing"]
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.date.today().isoformat(),
        "model": {"network": first.config.get("model", {}).get("name"), "classes": classes, "modality": modality,
                  "in_channels": pipeline["in_channels"], "folds": [f for f in folds if f is not None] or None,
                  "trained_with_medunet": first.medunet_version},
        "intended_use": (
            f"Research and evaluation: automatic {modality} segmentation of {', '.join(classes[1:])} on 3D volumes like "
            "the training data summarised here. Every mask needs review by a qualified reader before any clinical use."
        ),
        "limitations": [
            "Validated only on the data and metrics below; other scanners, protocols, contrast phases, fields of view and "
            "pathologies may lower accuracy without warning.",
            f"Volumes are resampled to {spacing} mm; images far coarser than the training spacings lose detail.",
            "Exported networks compute in float32 (onnxruntime and TorchScript); see docs/export.md for fp32 vs bf16.",
        ],
        "training_data": training_data(qc_reference, source=source, checkpoint_paths=checkpoint_paths),
        "quality_control": quality_control(qc_reference, thresholds),
        "validation": _validation(folds, source),
        "export_checks": {"max_abs_logit_difference_vs_torch": checks},
        "config": first.config,
        "software": software_versions(),
        "files": files,
    }


def _number(value: Any) -> str:
    """A number or a list of numbers, compactly (``1.5, 1.5, 2.5``)."""
    if isinstance(value, list):
        return ", ".join(_number(v) for v in value)
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _spread(spread: dict[str, Any]) -> str:
    """``min / median / max``, lists in brackets (one value per axis)."""
    return " / ".join(f"[{_number(v)}]" if isinstance(v, list) else _number(v) for v in (spread[k] for k in ("min", "median", "max")))


def _table(rows: dict[str, Any]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |" for k, v in rows.items()]
    return lines


def _fingerprint_lines(data: dict[str, Any], where: str) -> list[str]:
    """The planning fingerprint as a table (spacing and shape in the network's axis order)."""
    lines = [f"From the planning fingerprint (`{where}`), over the datalist's training cases:", ""]
    lines += _table({"cases": data["num_cases"], "spacing (median, mm)": data["spacing"]["median"],
                     "spacing (min, mm)": data["spacing"]["min"], "spacing (max, mm)": data["spacing"]["max"],
                     "shape (median)": data["shape"]["median"]})
    for c, stats in enumerate(data.get("intensity", [])):
        lines.append(f"| foreground intensity, channel {c} (mean / std / p0.5 / p99.5) | {stats.get('mean', 0):.1f} / "
                     f"{stats.get('std', 0):.1f} / {stats.get('percentile_00_5', 0):.1f} / {stats.get('percentile_99_5', 0):.1f} |")
    for info in data.get("classes", {}).values():
        lines.append(f"| {info['name']}: median volume (mL), present in cases | {info['volume_ml_median']:.2f}, "
                     f"{100 * info['present_in_cases']:.0f}% |")
    return lines


def _reference_lines(ref: dict[str, Any], where: str) -> list[str]:
    """The QC reference as a table (min / median / max over its cases, world axes R, A, S)."""
    lines = [f"From the QC reference in the {where}: {ref['num_cases']} {ref['what']}; min / median / max:", ""]
    lines += _table({"cases": ref["num_cases"], "spacing (mm, R A S)": _spread(ref["spacing_mm"]),
                     "field of view (mm, R A S)": _spread(ref["field_of_view_mm"])})
    for c, stats in enumerate(ref["intensity"]):
        lines.append(f"| intensity range p0.5, p99.5, channel {c} | {_spread(stats['range_p0_5_p99_5'])} |")
    for info in ref["classes"].values():
        volume = _spread(info["volume_ml"]) if info["volume_ml"] else "never present"
        lines.append(f"| {info['name']}: present in cases, volume (mL) | {100 * info['present_in_cases']:.0f}%, {volume} |")
    return lines


def _training_data_lines(data: dict[str, Any]) -> list[str]:
    """What is known about the training data, source by source, then what is not."""
    lines: list[str] = []
    if "planning_fingerprint" in data:
        lines += _fingerprint_lines(data["planning_fingerprint"], data["sources"]["planning_fingerprint"]) + [""]
    if "qc_reference" in data:
        lines += _reference_lines(data["qc_reference"], data["sources"]["qc_reference"]) + [""]
    names = {"planning_fingerprint": "planning fingerprint", "qc_reference": "QC reference", "datalist": "datalist"}
    lines += ["Unknown:", ""] + [f"- {names.get(k, k)}: {why}" for k, why in data["unknown"].items()]
    return lines


def _qc_lines(qc: dict[str, Any]) -> list[str]:
    """The package's QC: its reference and its calibration (temperature, review threshold, what it achieved)."""
    calibration = qc["calibration"]
    lines = [f"`{qc['file']}` ships the QC `medunet infer -m` applies to every case (docs/quality-control.md).", "",
             f"- reference: {qc['reference']}", f"- calibration: {calibration['describe']}"]
    if calibration["achieved"]:
        lines.append(f"- achieved on the calibration cases: {json.dumps(calibration['achieved'])}")
    return lines


def card_markdown(card: dict[str, Any]) -> str:
    """``MODEL_CARD.md``: the card for people (the JSON holds the same facts in full)."""
    model = card["model"]
    lines = [f"# Model card: {model['modality']} segmentation of {', '.join(model['classes'][1:])}", "",
             f"Exported {card['created']} by medunet {card['software']['medunet']}; network `{model['network']}`, "
             f"{model['in_channels']} input channel(s), classes {model['classes']}"
             + (f", ensemble of folds {model['folds']}" if model["folds"] else "") + ".", "",
             "## Intended use", "", card["intended_use"], "", "## Limits", ""]
    lines += [f"- {item}" for item in card["limitations"]]
    lines += ["", "## Training data", ""] + _training_data_lines(card["training_data"])
    lines += ["", "## Quality control", ""] + _qc_lines(card["quality_control"])
    lines += ["", "## Validation", "", card["validation"]["how"], ""]
    for key, scores in card["validation"]["held_out_validation"].items():
        lines.append(f"- {key}: " + (", ".join(f"{n} {d:.4f}" for n, d in scores["class_dice"].items()) + f" (best epoch {scores['best_epoch']})"
                                     if "class_dice" in scores else scores["note"]))
    if "cross_validation_out_of_fold" in card["validation"]:
        lines += ["", "Cross-validation, out-of-fold (input grids):", ""] + _table(card["validation"]["cross_validation_out_of_fold"])
    lines += ["", "## Software", ""] + _table(card["software"])
    lines += ["", "## Files (sha256)", "", f"`{CARD_FILE}` lists these; `medunet infer -m` refuses a package where one differs.", ""]
    lines += [f"- `{name}`: `{digest}`" for name, digest in card["files"].items() if name != CARD_MARKDOWN]
    lines += ["", f"The run's full config is in `{CARD_FILE}` (`config`).", ""]
    return "\n".join(lines)
