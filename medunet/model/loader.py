"""One loader for every kind of trained model: a run folder, a checkpoint file, a cross-validation folder, an exported package.

    model = load_model("runs/liver")              # best.pt of a run (or a .pt file, a crossval folder, a package)
    model.networks, model.config, model.class_names, model.qc_reference, model.qc_thresholds

Whatever the source, the result is one :class:`LoadedModel`: the networks in eval mode on their
device (one per fold of an ensemble; for a package, the engines that run its exported files),
the config inference applies (the checkpoint's, with a folder's validated ``postprocessing.json``
and the caller's overrides on top), the class names, the QC reference and calibration, and a
description of where it came from. The folder layout it reads is :mod:`medunet.model.layout`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medunet.config import Config, DataConfig, apply_overrides, config_from_dict, non_preprocessing_fields
from medunet.errors import CheckpointError
from medunet.model.checkpoint import Checkpoint, fold_checkpoints, load_checkpoint, resolve_checkpoint
from medunet.model.layout import POSTPROCESSING_FILE, QC_FILE, is_package, model_name
from medunet.model.networks import build_network
from medunet.model.package import Package, choose_engine, load_networks, read_package
from medunet.postprocessing.search import validated_postprocessing
from medunet.qc.decide import Thresholds, load_thresholds
from medunet.qc.reference import QCReference, reference_of
from medunet.runtime import select_device

log = logging.getLogger("medunet")


@dataclass(frozen=True)
class LoadedModel:
    """A trained model ready to run: what :func:`load_model` returns for any kind of source."""

    networks: list[nn.Module]
    """The networks (engines) in eval mode on :attr:`device`: one, or one per fold of an ensemble (probabilities averaged)."""
    config: Config
    """The config inference applies: the model's, with a folder's validated post-processing and the overrides on top."""
    class_names: list[str]
    """Class names by label value (index 0 is background)."""
    in_channels: int
    device: torch.device
    kind: str
    """``"checkpoint"`` (a run folder or a .pt file), ``"crossval"`` (a fold ensemble) or ``"package"`` (``medunet export``)."""
    source: str
    """Where the model came from, in words (logs and run reports)."""
    name: str
    """A short model name (the run, folder or package name), recorded in DICOM SEG and RTSTRUCT outputs."""
    qc_reference: QCReference | None = None
    """The training reference QC compares inputs and masks with (None: a model older than QC)."""
    qc_thresholds: Thresholds | None = None
    """The QC calibration shipped with the model (its ``qc.json``); None for QC's defaults."""
    postprocessing: dict[str, Any] | None = None
    """The post-processing section taken from the folder's ``postprocessing.json`` (None: the checkpoint's own applies)."""
    checkpoints: dict[int | None, Path] = field(default_factory=dict)
    """The checkpoint files by fold (key None for a single checkpoint); empty for a package."""
    modality: Any = None
    """The training data's modality, as the (first) checkpoint or the package records it."""

    @property
    def num_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.class_names)


def load_model(
    source: str | Path, *, device: str = "auto", overrides: Sequence[str] = (), folds: Sequence[int] | None = None
) -> LoadedModel:
    """Load a checkpoint, a run folder's best.pt, a cross-validation folder's fold ensemble or an exported package, safely.

    A folder holding ``fold_<k>/`` runs loads every fold (or those in ``folds``) and averages their
    probabilities. A ``postprocessing.json`` in the folder (chosen by ``medunet crossval``) replaces
    the checkpoint's post-processing unless ``overrides`` set ``postprocessing.*`` themselves. A
    package's networks run on ``inference.engine``.

    Args:
        source: a run folder, a cross-validation folder, a checkpoint file or a package folder.
        device: auto, cpu, cuda or cuda:N.
        overrides: dotted config overrides, e.g. ``["inference.overlap=0.25"]``.
        folds: fold indices to ensemble (default: all folds found).

    Raises:
        CheckpointError: unreadable checkpoint, missing fold, or folds that disagree on classes, channels or preprocessing.
        PackageError: a package that is incomplete, changed since export, or of an unknown schema.
    """
    if is_package(source):
        return _load_package(Path(source), device=device, overrides=overrides, folds=folds)
    return _load_checkpoints(Path(source), device=device, overrides=overrides, folds=folds)


def _load_checkpoints(path: Path, *, device: str, overrides: Sequence[str], folds: Sequence[int] | None) -> LoadedModel:
    """A run folder, a checkpoint file or a cross-validation folder: networks rebuilt from the checkpoints' weights."""
    by_fold = fold_checkpoints(path, folds)
    files: dict[int | None, Path] = dict(by_fold.items()) or {None: resolve_checkpoint(path)}
    loaded = [load_checkpoint(c) for c in files.values()]
    check_ensemble(loaded, [str(c) for c in files.values()])
    class_names = loaded[0].class_names
    values = loaded[0].config
    chosen = validated_postprocessing(path / POSTPROCESSING_FILE, class_names, overrides) if path.is_dir() else None
    if chosen is not None:
        values = {**values, "postprocessing": chosen}
    config = config_from_dict(apply_overrides(values, overrides))
    if config.inference.engine == "onnxruntime":
        raise CheckpointError(f"the onnxruntime engine runs an exported package; export first: medunet export {path} -o OUT --format onnx")
    torch_device = select_device(device if device != "auto" else config.inference.device)
    networks: list[nn.Module] = []
    for checkpoint, saved in zip(files.values(), loaded):
        network = build_network(config.model, in_channels=saved.in_channels, out_channels=len(class_names))
        network.load_state_dict(saved.model)
        networks.append(network.to(torch_device).eval())
        log.debug("loaded %s (epoch %s)", checkpoint, saved.epoch)
    first = next(iter(files.values()))
    source = f"{path} (folds {', '.join(map(str, by_fold))})" if by_fold else str(first)
    if len(networks) > 1:
        log.info("ensemble of %d folds (%s), averaging probabilities", len(networks), ", ".join(map(str, by_fold)))
    reference = _reference(loaded[0].qc_reference, source)
    return LoadedModel(networks, config, class_names, loaded[0].in_channels, torch_device, "crossval" if by_fold else "checkpoint",
                       source, model_name(path if by_fold else first), reference, _qc_thresholds(path if by_fold else first.parent),
                       chosen, files, loaded[0].modality)


def _load_package(path: Path, *, device: str, overrides: Sequence[str], folds: Sequence[int] | None) -> LoadedModel:
    """A verified exported package: the same config, preprocessing and inversion as its checkpoint, another engine."""
    package = read_package(path, overrides=overrides, folds=folds)
    engine = choose_engine(package, package.config.inference.engine)
    config = package.config
    if engine == "onnxruntime":  # the ONNX graph computes in float32 whatever inference.precision says
        config = replace(config, inference=replace(config.inference, precision="fp32"))
    torch_device = select_device(device if device != "auto" else config.inference.device)
    networks = [n.to(torch_device).eval() for n in load_networks(package, engine, torch_device)]
    source = f"{path} (exported package, {engine}, {len(networks)} network(s))"
    reference = _reference(package.qc_reference, source)
    return LoadedModel(networks, config, package.class_names, package.in_channels, torch_device, "package", source, model_name(path),
                       reference, _package_thresholds(package), modality=package.pipeline.get("modality"))


def _reference(stored: dict[str, Any] | None, source: str) -> QCReference | None:
    reference = reference_of(stored)
    if reference is None:
        log.info("%s has no training reference (trained before QC existed): QC uses the model's uncertainty only", source)
    return reference


def _package_thresholds(package: Package) -> Thresholds | None:
    """The QC calibration a package shipped (its ``qc.json``): QC then flags as the checkpoint's did."""
    if package.qc_thresholds is None:
        return None
    thresholds = Thresholds.from_json(package.qc_thresholds, source=str(package.root / str(package.pipeline.get("qc"))))
    log.info("QC thresholds from %s (%s)", package.root, thresholds.source)
    return thresholds


def _qc_thresholds(path: Path) -> Thresholds | None:
    """The QC calibration of a run or cross-validation folder (``<folder>/qc.json``), or None for the defaults."""
    file = path / QC_FILE
    if not path.is_dir() or not file.is_file():
        return None
    thresholds = load_thresholds(file)
    log.info("QC thresholds from %s (%s)", file, thresholds.source)
    return thresholds


#: Config sections that must agree between the folds of an ensemble: they fix the preprocessing and the network.
_ENSEMBLE_SECTIONS = ("data", "model")
_ENSEMBLE_IGNORED = non_preprocessing_fields(DataConfig)  # caching, split and path settings may differ between folds


def check_ensemble(checkpoints: Sequence[Checkpoint], sources: Sequence[str]) -> None:
    """Refuse to average models that disagree on classes, input channels, preprocessing or architecture.

    Raises:
        CheckpointError: naming the two checkpoints and what differs.
    """
    first = checkpoints[0]
    for other, source in zip(checkpoints[1:], sources[1:]):
        differences = []
        if other.class_names != first.class_names:
            differences.append(f"classes {other.class_names} vs {first.class_names}")
        if other.in_channels != first.in_channels:
            differences.append(f"input channels {other.in_channels} vs {first.in_channels}")
        for section in _ENSEMBLE_SECTIONS:
            a, b = other.config.get(section, {}), first.config.get(section, {})
            differences += [f"{section}.{k} {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b))
                            if k not in _ENSEMBLE_IGNORED and a.get(k) != b.get(k)]
        if differences:
            raise CheckpointError(
                f"cannot ensemble {source} with {sources[0]}: they differ in {'; '.join(differences[:3])}; "
                "choose matching folds with --folds"
            )
