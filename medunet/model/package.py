"""An exported model package: its schema, integrity checks, and the engines that run its networks.

A package is a folder written by ``medunet export`` (see docs/export.md):

    pipeline.json      everything inference needs besides the network (schema below, versioned)
    model.onnx         the network(s): model.onnx / model.ts, or model_fold<k>.onnx ... for a fold ensemble
    model.ts
    qc.json            the QC training reference and calibration (what QC compares each case with, and where it flags)
    model_card.json    training data summary, validation metrics, config, versions, and the sha256 of every
    MODEL_CARD.md      other file: the package's manifest

Reading it (:func:`read_package`) checks, before anything is predicted: both JSON files are there and
parse, the schema version is one this medunet reads, every file the manifest lists exists and has its
checksum, every network ``pipeline.json`` names is in the manifest, and the config sections rebuild a
valid :class:`~medunet.config.Config`; the QC file (``qc.json``, when ``pipeline.json`` names it) is
listed and parses. Any failure is one :class:`PackageError` naming the file.

The config sections are the source of truth: the Segmenter rebuilds the very Config the checkpoint
had and runs the same preprocessing chain, so geometry is that of the checkpoint by construction. The
``steps`` list is the same contract spelled out for readers implementing it without medunet; it is
recomputed from the config on reading and must agree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medunet.config import Config, apply_overrides, config_from_dict
from medunet.errors import ConfigError, PackageError
from medunet.model.engine import OnnxRuntimeEngine, import_onnx_extra, load_torchscript, onnxruntime_available
from medunet.model.layout import CARD_FILE, PIPELINE_FILE
from medunet.transforms import CT_BODY_HU

SCHEMA_VERSION = 1
# The package's file names are in medunet.model.layout; its quality control file (QC_FILE) holds
# ``{"format", "reference": QCReference JSON or null, "thresholds": Thresholds JSON}``.
#: Config sections a package carries (the rest of the training config lives in the model card only).
SECTIONS = ("data", "model", "inference", "postprocessing")
#: Network file format -> the engine that runs it.
FORMAT_ENGINE = {"onnx": "onnxruntime", "torchscript": "torch"}
#: Names of the network's input and output in the ONNX graph.
INPUT_NAME, OUTPUT_NAME = "image", "logits"


@dataclass(frozen=True)
class NetworkFile:
    """One network file of a package."""

    file: str
    format: str
    fold: int | None
    sha256: str


@dataclass(frozen=True)
class Package:
    """A verified package, ready to build engines from."""

    root: Path
    pipeline: dict[str, Any]
    config: Config
    class_names: list[str]
    in_channels: int
    networks: list[NetworkFile]
    qc_reference: dict[str, Any] | None = None
    """The stored QC training reference (:class:`medunet.qc.reference.QCReference` JSON); None when the model has none."""
    qc_thresholds: dict[str, Any] | None = None
    """The QC calibration (:class:`medunet.qc.decide.Thresholds` JSON); None for a package exported without QC."""

    def formats(self) -> list[str]:
        """Network formats present, in a fixed order."""
        return [f for f in FORMAT_ENGINE if any(n.format == f for n in self.networks)]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_steps(config: Config) -> list[dict[str, Any]]:
    """The inference pipeline of ``config`` as an explicit, ordered list of operations (docs/export.md).

    This mirrors :func:`medunet.transforms.preprocessing` and the Segmenter, step by step; a
    reimplementation outside medunet follows it.
    """
    data, inf = config.data, config.inference
    steps: list[dict[str, Any]] = [{"op": "orient", "axcodes": data.orientation.upper()}]
    if data.target_spacing is not None:
        steps.append({"op": "resample", "spacing_mm": list(data.target_spacing), "interpolation": "linear", "dtype": "float32"})
    body_crop = data.crop_foreground and data.normalization == "ct_clip_zscore"
    if body_crop:
        steps.append({"op": "crop_foreground", "where": f"raw value > {CT_BODY_HU:g}"})
    if data.normalization in ("ct_window", "ct_clip_zscore"):
        low, high = data.window()
        mean, std = (data.ct_mean, data.ct_std) if data.normalization == "ct_clip_zscore" else (low, high - low)
        steps.append({"op": "clip_scale", "low": low, "high": high, "out": "(clip(x, low, high) - shift) / scale",
                      "shift": mean, "scale": std})
    elif data.normalization == "zscore":
        steps.append({"op": "zscore", "per_channel": True, "nonzero_only": data.zscore_nonzero})
    if data.crop_foreground and not body_crop:
        steps.append({"op": "crop_foreground", "where": "normalised value != 0"})
    steps += [
        {"op": "sliding_window", "window": list(config.roi_size()), "overlap": inf.overlap, "blend": inf.blend,
         "batch": inf.sw_batch_size, "mirror_tta": inf.tta_flips, "padding": "constant 0 up to the window"},
        {"op": "softmax", "axis": "class"},
        *_crf_step(config),
        {"op": "invert", "what": "probabilities (linear) then argmax" if inf.resample_probabilities else "argmax labels (nearest)",
         "to": "input grid"},
        {"op": "postprocess", "per_class_mm": True},
    ]
    return steps


def _crf_step(config: Config) -> list[dict[str, Any]]:
    """The dense CRF step when ``postprocessing.crf.enabled`` (the Segmenter runs it between softmax and inversion)."""
    crf = config.postprocessing.crf
    if not crf.enabled:
        return []
    return [{"op": "dense_crf", "on": "softmax probabilities and the normalised image, network grid", "iterations": crf.iterations,
             "spatial_sigma_mm": crf.spatial_sigma_mm, "spatial_weight": crf.spatial_weight, "bilateral_sigma_mm": crf.bilateral_sigma_mm,
             "intensity_sigma": crf.intensity_sigma, "bilateral_weight": crf.bilateral_weight,
             "implementation": "mean-field dense CRF, medunet.postprocessing.crf.dense_crf"}]


def _read_qc(root: Path, pipeline: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The QC reference and thresholds of the file ``pipeline.json`` names (both None for a package without one)."""
    name = pipeline.get("qc")
    if name is None:
        return None, None
    qc = _read_json(root, str(name))
    reference, thresholds = qc.get("reference"), qc.get("thresholds")
    if not isinstance(reference, (dict, type(None))) or not isinstance(thresholds, dict):
        raise PackageError(f"package {root}: file {name} lacks its QC reference or thresholds; re-export the model")
    return reference, thresholds


def _read_json(root: Path, name: str) -> dict[str, Any]:
    path = root / name
    if not path.is_file():
        raise PackageError(f"package {root}: file {name} is missing; re-export the model with medunet export")
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PackageError(f"package {root}: file {name} is not valid JSON ({exc}); re-export the model") from exc
    if not isinstance(value, dict):
        raise PackageError(f"package {root}: file {name} does not hold a JSON object; re-export the model")
    return value


def verify_files(root: Path, manifest: Any, required: Sequence[str]) -> None:
    """Every manifest entry exists with its sha256, and every ``required`` file is in the manifest.

    Raises:
        PackageError: naming the first missing, unlisted or changed file.
    """
    if not isinstance(manifest, dict):
        raise PackageError(f"package {root}: file {CARD_FILE} has no file checksums; re-export the model")
    for name in required:
        if name not in manifest:
            raise PackageError(f"package {root}: file {name} is not listed in {CARD_FILE}'s checksums; re-export the model")
    for name, expected in sorted(manifest.items()):
        path = root / name
        if ".." in Path(name).parts or not path.is_file():
            raise PackageError(f"package {root}: file {name} is missing; re-export the model with medunet export")
        if sha256_file(path) != expected:
            raise PackageError(
                f"package {root}: file {name} does not match its checksum in {CARD_FILE} (changed or corrupt); "
                "refusing to use it; re-export the model"
            )


def read_package(path: str | Path, *, overrides: Sequence[str] = (), folds: Sequence[int] | None = None) -> Package:
    """Read and verify an exported package (see the module docstring for what is checked).

    Args:
        path: the package folder.
        overrides: dotted config overrides applied on top of its sections, e.g. ``["inference.overlap=0.5"]``.
        folds: keep only the networks of these folds (default: all).

    Raises:
        PackageError: anything missing, changed or of an unknown schema, naming the file.
    """
    root = Path(path)
    pipeline = _read_json(root, PIPELINE_FILE)
    version = pipeline.get("schema_version")
    if not isinstance(version, int) or version < 1 or version > SCHEMA_VERSION:
        raise PackageError(
            f"package {root}: file {PIPELINE_FILE} has schema_version {version!r}; this medunet reads 1..{SCHEMA_VERSION}; "
            "upgrade medunet or re-export the model with this one"
        )
    card = _read_json(root, CARD_FILE)
    try:
        networks = [NetworkFile(str(n["file"]), str(n["format"]), n.get("fold"), str(n["sha256"])) for n in pipeline["networks"]]
        class_names = [str(c) for c in pipeline["classes"]]
        in_channels = int(pipeline["in_channels"])
        values = {s: pipeline["config"][s] for s in SECTIONS}
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"package {root}: file {PIPELINE_FILE} lacks {exc} or has it malformed; re-export the model") from exc
    unknown = sorted({n.format for n in networks} - set(FORMAT_ENGINE))
    if unknown or not networks:
        raise PackageError(f"package {root}: file {PIPELINE_FILE} lists no networks or unknown formats {unknown}")
    qc_file = [str(pipeline["qc"])] if pipeline.get("qc") is not None else []
    verify_files(root, card.get("files"), [PIPELINE_FILE, *qc_file, *(n.file for n in networks)])
    if any(card["files"][n.file] != n.sha256 for n in networks):
        raise PackageError(f"package {root}: file {PIPELINE_FILE} and {CARD_FILE} disagree on a network's checksum; re-export")
    try:
        exported = config_from_dict(values)
        config = config_from_dict(apply_overrides(values, overrides))
    except ConfigError as exc:
        raise PackageError(f"package {root}: file {PIPELINE_FILE}: {exc}") from exc
    if pipeline.get("steps") != describe_steps(exported):
        raise PackageError(f"package {root}: file {PIPELINE_FILE}: its steps disagree with its config sections; re-export the model")
    if folds is not None:
        present = sorted({n.fold for n in networks if n.fold is not None})
        missing = sorted(set(folds) - set(present))
        if missing:
            raise PackageError(f"package {root} has no network for fold(s) {missing}; it holds folds {present}")
        networks = [n for n in networks if n.fold in set(folds)]
    reference, thresholds = _read_qc(root, pipeline)
    return Package(root, pipeline, config, class_names, in_channels, networks, qc_reference=reference, qc_thresholds=thresholds)


def choose_engine(package: Package, requested: str) -> str:
    """The engine to run ``package`` with: ``requested`` if it can, else a clear error; "auto" prefers onnxruntime.

    Raises:
        PackageError: the package holds no network the engine runs, or onnxruntime is not installed.
    """
    formats = package.formats()
    if requested == "auto":
        requested = "onnxruntime" if "onnx" in formats and (onnxruntime_available() or "torchscript" not in formats) else "torch"
    wanted = next(f for f, e in FORMAT_ENGINE.items() if e == requested)
    if wanted not in formats:
        raise PackageError(
            f"package {package.root} holds {', '.join(formats)} networks only; engine {requested} needs {wanted}: "
            f"re-export with --format {wanted}, or choose --engine {FORMAT_ENGINE[formats[0]]}"
        )
    if requested == "onnxruntime":
        import_onnx_extra("onnxruntime", needed_for="the onnxruntime engine", error=PackageError,
                          alternative="or --engine torch with a TorchScript package")
    return requested


def load_networks(package: Package, engine: str, device: torch.device) -> list[nn.Module]:
    """One engine per fold for ``engine`` ("torch" or "onnxruntime", from :func:`choose_engine`)."""
    wanted = next(f for f, e in FORMAT_ENGINE.items() if e == engine)
    files = [package.root / n.file for n in package.networks if n.format == wanted]
    if engine == "onnxruntime":
        return [OnnxRuntimeEngine(f, device=device, out_channels=len(package.class_names)) for f in files]
    return [load_torchscript(f, device=device) for f in files]
