"""The model card of an exported package: ``model_card.json`` (machine-readable) and ``MODEL_CARD.md``.

It says what the model was trained on (a summary of the training data fingerprint, never per-case
records), how well it validated (per class, per fold; the cross-validation's out-of-fold scores when
the export came from a crossval folder), the full training config, the software versions, intended
use and limits, and the sha256 of every other file of the package, which makes ``model_card.json``
the package's manifest (checked by :func:`medunet.model.package.read_package`).
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import Any

from medunet import __version__
from medunet.model.checkpoint import Checkpoint
from medunet.model.package import SCHEMA_VERSION
from medunet.postprocessing.search import POSTPROCESSING_FILE

#: Fingerprint keys copied into the card (the per-case records are left out: they name cases).
FINGERPRINT_KEYS = ("num_cases", "modality", "orientation", "channels", "spacing", "shape", "intensity", "classes", "zero_background")


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
        key = "model" if fold is None else f"fold_{fold}"
        per_network[key] = {"epochs": checkpoint.epoch} | ({
            "best_epoch": state.best_epoch, "mean_dice": round(state.best_dice, 4),
            "class_dice": {k: round(v, 4) for k, v in state.best_class_dice.items()},
        } if state is not None and state.best_epoch > 0 else {"note": "no validation recorded in the checkpoint"})
    result: dict[str, Any] = {"held_out_validation": per_network,
                              "how": "mean Dice per class on the run's validation cases (sliding window, network space), best epoch"}
    summary = source / "oof_eval" / "summary.json"
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


def card_json(folds: dict[int | None, Checkpoint], *, source: Path, pipeline: dict[str, Any], checks: dict[str, float],
              files: dict[str, str]) -> dict[str, Any]:
    """The card's content (``files``: sha256 by relative path of every other file of the package)."""
    first = next(iter(folds.values()))
    modality = pipeline["modality"]
    modality = modality if isinstance(modality, str) else "/".join(str(v) for v in dict(modality).values())  # MSD: {"0": "CT"}
    fingerprint = None  # the checkpoint holds a QC reference, not the planning fingerprint the card reads (being fixed)
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
        "training_data": fingerprint or {"note": "the checkpoint carries no data fingerprint (trained with a config, not planned)"},
        "validation": _validation(folds, source),
        "export_checks": {"max_abs_logit_difference_vs_torch": checks},
        "config": first.config,
        "software": software_versions(),
        "files": files,
    }


def _table(rows: dict[str, Any]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |" for k, v in rows.items()]
    return lines


def card_markdown(card: dict[str, Any]) -> str:
    """``MODEL_CARD.md``: the card for people (the JSON holds the same facts in full)."""
    model, data = card["model"], card["training_data"]
    lines = [f"# Model card: {model['modality']} segmentation of {', '.join(model['classes'][1:])}", "",
             f"Exported {card['created']} by medunet {card['software']['medunet']}; network `{model['network']}`, "
             f"{model['in_channels']} input channel(s), classes {model['classes']}"
             + (f", ensemble of folds {model['folds']}" if model["folds"] else "") + ".", "",
             "## Intended use", "", card["intended_use"], "", "## Limits", ""]
    lines += [f"- {item}" for item in card["limitations"]]
    lines += ["", "## Training data", ""]
    if "num_cases" in data:
        lines += _table({"cases": data["num_cases"], "spacing (median, mm)": data["spacing"]["median"],
                         "spacing (min, mm)": data["spacing"]["min"], "spacing (max, mm)": data["spacing"]["max"],
                         "shape (median)": data["shape"]["median"]})
        for c, stats in enumerate(data.get("intensity", [])):
            lines.append(f"| intensity, channel {c} (mean / std / p0.5 / p99.5) | {stats.get('mean', 0):.1f} / {stats.get('std', 0):.1f} / "
                         f"{stats.get('percentile_00_5', 0):.1f} / {stats.get('percentile_99_5', 0):.1f} |")
        for info in data.get("classes", {}).values():
            lines.append(f"| {info['name']}: median volume (mL), present in cases | {info['volume_ml_median']:.2f}, "
                         f"{100 * info['present_in_cases']:.0f}% |")
    else:
        lines.append(data["note"])
    lines += ["", "## Validation", "", card["validation"]["how"], ""]
    for key, scores in card["validation"]["held_out_validation"].items():
        lines.append(f"- {key}: " + (", ".join(f"{n} {d:.4f}" for n, d in scores["class_dice"].items()) + f" (best epoch {scores['best_epoch']})"
                                     if "class_dice" in scores else scores["note"]))
    if "cross_validation_out_of_fold" in card["validation"]:
        lines += ["", "Cross-validation, out-of-fold (input grids):", ""] + _table(card["validation"]["cross_validation_out_of_fold"])
    lines += ["", "## Software", ""] + _table(card["software"])
    lines += ["", "## Files (sha256)", "", "`model_card.json` lists these; `medunet infer -m` refuses a package where one differs.", ""]
    lines += [f"- `{name}`: `{digest}`" for name, digest in card["files"].items() if name != "MODEL_CARD.md"]
    lines += ["", "The run's full config is in `model_card.json` (`config`).", ""]
    return "\n".join(lines)
