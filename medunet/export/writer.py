"""``medunet export``: a run, checkpoint or crossval folder -> a self-describing package folder.

The package is built in a temporary folder beside ``out`` and renamed into place only when every
file is written and checked, so a failure (no checkpoint, a network the exporter cannot trace, a
setting a bundle cannot express) leaves no partial package.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from medunet._version import __version__
from medunet.config import Config, config_to_dict
from medunet.errors import ExportError, OutputExistsError
from medunet.export import bundle
from medunet.export.card import card_json, card_markdown
from medunet.export.networks import ONNX_OPSET, export_onnx, export_torchscript
from medunet.model.checkpoint import Checkpoint, fold_checkpoints, load_checkpoint, resolve_checkpoint
from medunet.model.layout import CARD_FILE, CARD_MARKDOWN, PIPELINE_FILE, QC_FILE, is_package
from medunet.model.loader import LoadedModel, load_model
from medunet.model.package import INPUT_NAME, OUTPUT_NAME, SCHEMA_VERSION, SECTIONS, describe_steps, sha256_file
from medunet.qc.decide import Thresholds

log = logging.getLogger("medunet")

#: Values of ``--format``.
FORMATS = ("onnx", "torchscript", "bundle")


def _network_name(fmt: str, fold: int | None, formats: Sequence[str]) -> str:
    if fmt == "torchscript" and "bundle" in formats and fold is None:
        return bundle.NETWORK  # one TorchScript file serves the bundle and `medunet infer`
    stem = "model" if fold is None else f"model_fold{fold}"
    return f"{stem}.onnx" if fmt == "onnx" else f"{stem}.ts"


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise OutputExistsError(f"export folder {out} exists and is not empty; pass --overwrite to replace it")
        if not is_package(out):
            raise OutputExistsError(f"{out} is not a medunet package; refusing to replace it, even with --overwrite: choose another -o")


@contextlib.contextmanager
def _staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed onto it on success and removed on any failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists() and any(out.iterdir()) and overwrite:
            old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
            os.replace(out, old)
        elif out.exists():
            out.rmdir()
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pipeline(config: Config, loaded: LoadedModel, modality: Any, networks: list[dict[str, Any]]) -> dict[str, Any]:
    values = config_to_dict(config)
    inference = {**values["inference"], "roi_size": list(config.roi_size()), "device": "auto", "engine": "auto"}
    return {
        "schema_version": SCHEMA_VERSION,
        "medunet_version": __version__,
        "classes": loaded.class_names,
        "in_channels": loaded.in_channels,
        "modality": modality if isinstance(modality, (str, dict)) else config.data.modality,
        "network_io": {"input": {"name": INPUT_NAME, "shape": ["batch", loaded.in_channels, "x", "y", "z"], "dtype": "float32"},
                       "output": {"name": OUTPUT_NAME, "shape": ["batch", loaded.num_classes, "x", "y", "z"], "dtype": "float32",
                                  "meaning": "logits; softmax over the class axis"},
                       "spatial_multiple_of": list(config.model.total_stride()), "onnx_opset": ONNX_OPSET},
        "config": {s: (inference if s == "inference" else values[s]) for s in SECTIONS},
        "steps": describe_steps(replace(config, inference=replace(config.inference, roi_size=config.roi_size()))),
        "networks": networks,
    }


def export_model(source: str | Path, out: str | Path, formats: Sequence[str], *, overwrite: bool = False,
                 overrides: Sequence[str] = (), folds: Sequence[int] | None = None) -> Path:
    """Export a run folder, a checkpoint or a crossval folder (every fold, or ``folds``) as a package in ``out``.

    Args:
        formats: any of "onnx", "torchscript", "bundle".
        overrides: dotted config overrides baked into the package (inference and post-processing settings).

    Raises:
        ExportError: an unknown format, a network that cannot be exported, or settings a bundle cannot express.
        CheckpointError: ``source`` holds no checkpoint.
        OutputExistsError: ``out`` is not empty and ``overwrite`` is not set.
    """
    source, out = Path(source), Path(out)
    formats = list(dict.fromkeys(formats))
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ExportError(f"--format must be one or more of {', '.join(FORMATS)}, got {formats}")
    if is_package(source):
        raise ExportError(f"{source} is already an exported package; export the run or checkpoint it came from")
    _check_target(out, overwrite)
    by_fold: dict[int | None, Path] = {k: v for k, v in fold_checkpoints(source, folds).items()} or {None: resolve_checkpoint(source)}
    checkpoints: dict[int | None, Checkpoint] = {k: load_checkpoint(p) for k, p in by_fold.items()}
    loaded = load_model(source, device="cpu", overrides=[*overrides, "inference.engine=torch"], folds=folds)  # networks, config, QC
    config = replace(loaded.config, inference=replace(loaded.config.inference, engine="auto", device="auto"))
    if "bundle" in formats:
        problems = bundle.bundle_problems(config, folds=len(checkpoints), in_channels=loaded.in_channels)
        if problems:
            raise ExportError(f"--format bundle cannot reproduce this model: {'; '.join(problems)}")
    with _staging(out, overwrite) as tmp:
        networks, checks = _write_networks(tmp, loaded, list(checkpoints), formats, config)
        written = [n["file"] for n in networks]
        modality = next(iter(checkpoints.values())).modality
        written.append(_write_qc(tmp, loaded))
        pipeline = {**_pipeline(config, loaded, modality, networks), "qc": QC_FILE}
        (tmp / PIPELINE_FILE).write_text(json.dumps(pipeline, indent=2) + "\n")
        if "bundle" in formats:
            modality_name = pipeline["modality"] if isinstance(pipeline["modality"], str) else config.data.modality
            written += bundle.write_bundle_configs(tmp, config, loaded.class_names, modality=modality_name, version=__version__,
                                                   qc_file=QC_FILE)
        files = {name: sha256_file(tmp / name) for name in [PIPELINE_FILE, *written]}
        card = card_json(checkpoints, source=source, checkpoint_paths=by_fold, pipeline=pipeline, checks=checks, files=files,
                         qc_reference=loaded.qc_reference, thresholds=loaded.qc_thresholds or Thresholds())
        (tmp / CARD_MARKDOWN).write_text(card_markdown(card))
        card["files"][CARD_MARKDOWN] = sha256_file(tmp / CARD_MARKDOWN)
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    log.debug("exported %s (%s) to %s", source, ", ".join(formats), out)
    return out


def _write_qc(tmp: Path, loaded: LoadedModel) -> str:
    """Write the package's ``qc.json``: the reference and calibration the checkpoint's QC uses, so the package's QC equals it.

    For a run that is its ``qc.json`` (validation cases); for a crossval folder the root's (out-of-fold
    cases); the defaults where there is none. The reference is the (first) checkpoint's, or null.
    """
    reference = loaded.qc_reference.to_json() if loaded.qc_reference is not None else None
    payload = {"format": 1, "reference": reference, "thresholds": (loaded.qc_thresholds or Thresholds()).to_json()}
    (tmp / QC_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    return QC_FILE


def _write_networks(tmp: Path, loaded: LoadedModel, folds: list[int | None], formats: Sequence[str],
                    config: Config) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Write each fold's network in each format; the pipeline.json entries and the measured logit differences."""
    window = list(config.roi_size())
    stride = config.model.total_stride()
    probe = [max(s, w - s) for w, s in zip(window, stride)]  # another valid size than the traced one (and cheaper)
    wanted = [f for f in ("onnx", "torchscript") if f in formats or (f == "torchscript" and "bundle" in formats)]
    networks, checks = [], {}
    for fold, model in zip(folds, loaded.networks):
        for fmt in wanted:
            name = _network_name(fmt, fold, formats)
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            write = export_onnx if fmt == "onnx" else export_torchscript
            checks[name] = write(model, tmp / name, in_channels=loaded.in_channels, window=window, probe=probe)
            networks.append({"file": name, "format": fmt, "fold": fold, "sha256": sha256_file(tmp / name)})
    return networks, checks
