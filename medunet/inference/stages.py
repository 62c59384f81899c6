"""Inference as stages with typed hand-offs, each a small function or class of this module::

    read(image)                  -> ReadCase       the channels, the input grid and, for a DICOM series, the series
    Preprocessing(read)          -> PreparedCase   the training chain applied, its spatial operations recorded
    Network(prepared)            -> NetworkOutput  softmax probabilities on the network grid (preprocessed space)
    refine(output)               -> NetworkOutput  the dense CRF, still on the network grid (when enabled)
    invert(output)               -> InvertedCase   labels (and the entropy map) back on the input grid, grid-checked
    postprocess(inverted)        -> Prediction     per-class label operations, sizes in mm
    quality_control(prediction)  -> Prediction     with the case's QC record
    SegmentedCase                                  what every output format is written from (medunet.inference.outputs)

:class:`~medunet.inference.segmenter.Segmenter` chains them. The probabilities stay in
preprocessed space until :func:`invert`, so one network pass can be finished in several ways
(cross-validation's plain and CRF candidates). Inversion goes through the very chain that
preprocessed the case: MONAI's inverse checks the identity of the transform that recorded each
operation, so a case prepared by one :class:`Preprocessing` cannot be inverted by another.

Geometry: the inverted labels are checked against the input's shape and affine before anything
else sees them; a mismatch is a :class:`~medunet.errors.GeometryError`, never a warning.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd
from torch import nn

from medunet.config import Config, CrfConfig, PostprocessingConfig
from medunet.errors import DataError, MedunetError, unwrap_error
from medunet.io.dicom import DicomSeries, read_series
from medunet.io.geometry import require_same_grid, spacing_of
from medunet.io.image import ArrayWithAffine, DicomSource, Source, as_source_list, read_image
from medunet.io.nifti import ImageSource, label_dtype
from medunet.model.sliding import inference_dtype, predict_probabilities
from medunet.postprocessing.crf import dense_crf
from medunet.postprocessing.operations import postprocess_labels
from medunet.qc.calibrate import TEMPERATURES
from medunet.qc.decide import QCRecord, Thresholds, decide
from medunet.qc.reference import QCReference
from medunet.qc.signals import entropy_map, expected_dice_curve, input_signals, mask_signals, uncertainty_signals
from medunet.transforms import IMAGE, preprocessing

PRED = "pred"

#: What the read stage accepts as one image (or one channel).
InputImage = Source | ArrayWithAffine


def _add(timings: dict[str, float], stage: str, since: float) -> None:
    """Add the seconds since ``since`` to ``timings[stage]``."""
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - since


# --------------------------------------------------------------------------- read


@dataclass(frozen=True)
class ReadCase:
    """The read stage's output: a case's channels, ready for the preprocessing chain."""

    case: str | None
    channels: list[ImageSource]
    """Per channel, what the chain loads: a NIfTI path stays a path (read lazily, named in errors), anything else is in memory."""
    reference: nib.Nifti1Image
    """The first channel's image: the grid and header of every output."""
    series: DicomSeries | None = None
    """The first channel's DICOM series (its slices' headers), which DICOM SEG and RTSTRUCT outputs reference."""


def _dicom_series(source: object, *, case: str | None) -> DicomSeries | None:
    """The series of a DICOM folder (a path or a :class:`DicomSource`), read as :func:`read_image` would; None for anything else."""
    folder, uid, resample = (source.folder, source.series_uid, source.allow_resample) if isinstance(source, DicomSource) else (
        source, None, False)
    if not isinstance(folder, (str, Path)) or not Path(folder).is_dir():
        return None
    return read_series(Path(folder), series_uid=uid, allow_resample=resample, case=case)


def read(image: InputImage | Sequence[InputImage], *, case: str | None = None, timings: dict[str, float] | None = None) -> ReadCase:
    """Read a case: DICOM series and arrays once, into memory; NIfTI files as lazy images (their voxels are read by the chain).

    Raises:
        DataError: no image, or one that is unreadable, ambiguous or not a valid volume.
    """
    timings = {} if timings is None else timings
    sources = as_source_list(image)
    if not sources:
        raise DataError("no image given", case=case)
    tick = time.perf_counter()
    series = _dicom_series(sources[0], case=case)
    images = [series.image if i == 0 and series is not None else read_image(s, case=case) for i, s in enumerate(sources)]
    channels = [s if isinstance(s, (str, Path)) and not Path(s).is_dir() else img for s, img in zip(sources, images)]
    timings["read"] = time.perf_counter() - tick
    return ReadCase(case, channels, images[0], series)


# --------------------------------------------------------------------------- preprocess (and its inverse)


@dataclass(frozen=True)
class PreparedCase:
    """A volume read and preprocessed, waiting for the network (what :meth:`Segmenter.prepare` returns)."""

    data: dict[str, Any]
    """The preprocessing chain's output (the image, with the operations needed to invert the prediction)."""
    reference: nib.Nifti1Image
    """The input (first channel) image: the grid and header of the mask."""
    case: str | None = None
    input_signals: dict[str, Any] | None = None
    """QC statistics of the raw input (:func:`medunet.qc.signals.input_signals`), when QC is on."""
    series: DicomSeries | None = None
    """The input's DICOM series, when it is one (:attr:`ReadCase.series`)."""


class Preprocessing:
    """The preprocessing stage: the training chain (image only), and its inverse for predictions in network space."""

    def __init__(self, config: Config, *, num_classes: int, in_channels: int) -> None:
        self.chain = preprocessing(config, num_classes=num_classes, in_channels=in_channels, with_label=False)

    def __call__(self, read_case: ReadCase, *, input_qc: bool, ct: bool, timings: dict[str, float]) -> PreparedCase:
        """Apply the chain; with ``input_qc`` also take QC's statistics of the raw intensities (before normalisation)."""
        tick = time.perf_counter()
        signals = None
        try:
            data: dict[str, Any] = self.chain({IMAGE: list(read_case.channels), "case": read_case.case}, end=1)  # loaded, not transformed
            if input_qc:  # the raw intensities: normalisation would hide wrong units or another modality
                qc_tick = time.perf_counter()
                raw = data[IMAGE]
                signals = input_signals(np.asarray(raw.detach().cpu()), np.asarray(raw.affine), ct=ct)
                timings["qc_input"] = time.perf_counter() - qc_tick
            data = self.chain(data, start=1)
        except Exception as exc:  # MONAI wraps transform errors; surface our typed one
            cause = unwrap_error(exc)
            if isinstance(cause, MedunetError):
                raise cause from cause.__cause__  # its own cause kept, MONAI's wrapper dropped
            raise
        timings["preprocess"] = time.perf_counter() - tick - timings.get("qc_input", 0.0)
        return PreparedCase(data=data, reference=read_case.reference, case=read_case.case, input_signals=signals,
                            series=read_case.series)

    def invert(self, values: torch.Tensor, prepared: PreparedCase, *, nearest: bool) -> MetaTensor:
        """Bring a (C, X, Y, Z) prediction in network space back to the input grid with MONAI's ``Invertd``.

        The case's record of operations is copied, not consumed: a case may be inverted any number of times.
        """
        pre_image = prepared.data[IMAGE]
        with_pred: dict[Hashable, Any] = {key: value for key, value in prepared.data.items()}
        with_pred[PRED] = MetaTensor(values, meta=dict(pre_image.meta), applied_operations=list(pre_image.applied_operations))
        return Invertd(keys=PRED, transform=self.chain, orig_keys=IMAGE, nearest_interp=nearest)(with_pred)[PRED]


# --------------------------------------------------------------------------- network and CRF


@dataclass(frozen=True)
class NetworkOutput:
    """The network stage's output: probabilities in preprocessed space, where the CRF and QC's uncertainty read them."""

    probabilities: torch.Tensor
    """Softmax probabilities (K, X, Y, Z) on the network grid, on the network's device (averaged over an ensemble)."""
    member_labels: tuple[torch.Tensor, ...] = ()
    """Each ensemble member's own argmax labels (X, Y, Z), when asked for (QC's member agreement)."""
    refined: bool = False
    """Whether the dense CRF has refined :attr:`probabilities`."""


class Network:
    """The network stage: one network or a fold ensemble, run one call at a time (one pass already fills the device)."""

    def __init__(self, networks: Sequence[nn.Module], config: Config, *, device: torch.device, num_classes: int) -> None:
        self.networks = list(networks)
        self.config, self.device, self.num_classes = config, device, num_classes
        self.amp = inference_dtype(config, device)  # inference.precision
        # Thread-safety model: reading, preprocessing, inversion and post-processing run concurrently; the network
        # runs under this lock, one call at a time (one forward pass already uses every core / the whole GPU).
        self.lock = threading.Lock()

    @torch.inference_mode()
    def probabilities(self, image: torch.Tensor, member_labels: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Softmax probabilities (B, K, X, Y, Z) of a preprocessed batch, averaged over the networks of a fold ensemble.

        All folds share one preprocessing (checked on loading), so averaging in network space is exact.
        With ``member_labels`` (and several networks), each network's own argmax labels (B, X, Y, Z) are appended to it.
        """
        def run(network: nn.Module) -> torch.Tensor:
            probs = predict_probabilities(network, image, self.config, device=self.device, amp=self.amp, num_classes=self.num_classes)
            if member_labels is not None and len(self.networks) > 1:
                member_labels.append(probs.max(dim=1).indices.cpu())
            return probs

        total = run(self.networks[0])
        for network in self.networks[1:]:
            total += run(network)
        return total / len(self.networks) if len(self.networks) > 1 else total

    def __call__(self, prepared: PreparedCase, *, members: bool, timings: dict[str, float],
                 probabilities: Callable[..., torch.Tensor] | None = None) -> NetworkOutput:
        """The probabilities of a prepared case; ``members`` also keeps each ensemble member's labels.

        ``probabilities`` replaces :meth:`probabilities` (same signature), e.g. a caller's wrapper that records them.
        """
        run = self.probabilities if probabilities is None else probabilities
        labels: list[torch.Tensor] = []
        tick = time.perf_counter()
        with self.lock:
            timings["wait_for_model"] = time.perf_counter() - tick
            probs = run(torch.as_tensor(prepared.data[IMAGE])[None], member_labels=labels if members else None)[0]
        timings["network"] = time.perf_counter() - tick - timings["wait_for_model"]
        return NetworkOutput(probs, tuple(m[0] for m in labels))


def refine(output: NetworkOutput, prepared: PreparedCase, config: CrfConfig, *, timings: dict[str, float]) -> NetworkOutput:
    """The CRF stage: the dense CRF on the network grid, before inversion (:mod:`medunet.postprocessing.crf`); a no-op when disabled."""
    if not config.enabled:
        return output
    tick = time.perf_counter()
    pre_image = prepared.data[IMAGE]
    probs = dense_crf(output.probabilities, torch.as_tensor(pre_image), spacing=spacing_of(np.asarray(pre_image.affine)), config=config)
    timings["crf"] = time.perf_counter() - tick
    return replace(output, probabilities=probs, refined=True)


# --------------------------------------------------------------------------- invert


@dataclass(frozen=True)
class InvertedCase:
    """The inversion stage's output: the network's labels on the input grid, before post-processing."""

    labels: np.ndarray
    uncertainty: np.ndarray | None = None
    """Per-voxel normalised entropy (0..1, float32) on the input grid, when asked for."""


#: Bytes of inverted class maps held at once on the input grid: the probabilities are inverted a group of classes at a
#: time, keeping a running argmax, so memory does not grow with the number of classes (one float32 class map of a
#: 512x512x300 CT is 315 MB; groups of 3 classes fit).
INVERT_BUDGET_BYTES = 1 << 30


def classes_per_inversion(num_classes: int, voxels: int, budget: int | None = None) -> int:
    """How many float32 class maps of ``voxels`` voxels to invert at once within ``budget`` bytes (at least 1)."""
    budget = INVERT_BUDGET_BYTES if budget is None else budget
    return max(1, min(num_classes, budget // max(4 * voxels, 1)))


def invert(
    chain: Preprocessing, output: NetworkOutput, prepared: PreparedCase, *, resample_probabilities: bool, num_classes: int,
    uncertainty_map: bool = False, timings: dict[str, float],
) -> InvertedCase:
    """Bring the labels (and, with ``uncertainty_map``, the entropy) onto the input grid and check they lie exactly on it.

    Either the probabilities are inverted (linear; argmax on the input grid) or the hard labels (nearest).
    """
    probs, reference, case = output.probabilities, prepared.reference, prepared.case
    entropy = None
    if uncertainty_map:
        tick = time.perf_counter()
        entropy = _inverted_entropy(chain, probs.cpu(), prepared)
        _add(timings, "qc_uncertainty", tick)
    tick = time.perf_counter()
    if resample_probabilities:
        labels_t, inverted = _invert_probabilities(chain, probs.cpu(), prepared, voxels=int(np.prod(reference.shape[:3])))
    else:  # max().indices: argmax is ~20x slower on CPU
        inverted = chain.invert(probs.max(dim=0, keepdim=True).indices.float().cpu(), prepared, nearest=True)
        labels_t = torch.as_tensor(inverted)[0].round()
    labels = labels_t.numpy().astype(label_dtype(num_classes))
    expected = tuple(int(s) for s in reference.shape[:3])
    require_same_grid(labels.shape, np.asarray(inverted.affine), expected, reference.affine, what="inverted prediction",
                      against="the input's", case=case, fix="refusing to write a mask off the input grid", tolerance=1e-4)
    _add(timings, "invert_postprocess", tick)
    return InvertedCase(labels, entropy)


def _inverted_entropy(chain: Preprocessing, probs: torch.Tensor, prepared: PreparedCase) -> np.ndarray:
    """Per-voxel normalised entropy of ``probs`` brought onto the input grid (linear interpolation), float32."""
    inverted = chain.invert(entropy_map(probs), prepared, nearest=False)
    values = torch.as_tensor(inverted)[0].clamp(0.0, 1.0).numpy().astype(np.float32)
    reference = prepared.reference
    require_same_grid(values.shape, np.asarray(inverted.affine), tuple(int(s) for s in reference.shape[:3]), reference.affine,
                      what="inverted uncertainty map", against="the input's", case=prepared.case,
                      fix="refusing to write it off the input grid", tolerance=1e-4)
    return values


def _invert_probabilities(chain: Preprocessing, probs: torch.Tensor, prepared: PreparedCase, *,
                          voxels: int) -> tuple[torch.Tensor, MetaTensor]:
    """Argmax on the input grid of the linearly inverted probabilities, a group of classes at a time.

    Inversion acts on each class map alone, so a running maximum over groups gives the argmax of the
    whole inversion (ties go to the lower class, as ``max`` does) while holding only one group.
    """
    group = classes_per_inversion(probs.shape[0], voxels)
    best: torch.Tensor | None = None
    labels = torch.zeros(0, dtype=torch.int64)
    for start in range(0, probs.shape[0], group):
        inverted = chain.invert(probs[start:start + group], prepared, nearest=False)
        top, index = torch.as_tensor(inverted).max(dim=0)
        if best is None:
            best, labels = top, index
        else:
            better = top > best
            best = torch.where(better, top, best)
            labels = torch.where(better, index + start, labels)
    return labels, inverted


# --------------------------------------------------------------------------- post-process and QC


@dataclass(frozen=True)
class Prediction:
    """Labels on the input grid and, if asked, QC and uncertainty (what :meth:`Segmenter.predict_case` gives)."""

    labels: np.ndarray
    qc: QCRecord | None = None
    """The QC record (docs/quality-control.md)."""
    uncertainty: np.ndarray | None = None
    """Per-voxel normalised entropy (0..1, float32) on the input grid, when asked for."""


def postprocess(inverted: InvertedCase, prepared: PreparedCase, config: PostprocessingConfig, class_names: Sequence[str], *,
                timings: dict[str, float]) -> Prediction:
    """The post-processing stage: per-class label operations, sizes in mm of the input grid (:mod:`medunet.postprocessing`)."""
    tick = time.perf_counter()
    labels = postprocess_labels(inverted.labels, spacing=spacing_of(prepared.reference.affine), config=config,
                                class_names=dict(enumerate(class_names)))
    _add(timings, "invert_postprocess", tick)
    return Prediction(labels, None, inverted.uncertainty)


def quality_control(
    prediction: Prediction, prepared: PreparedCase, output: NetworkOutput, *, reference: QCReference | None,
    thresholds: Thresholds, class_names: Sequence[str], calibration: bool = False, timings: dict[str, float],
) -> Prediction:
    """The QC stage: the input's statistics, the network's uncertainty (read from the probabilities it already computed, in
    network space) and the final mask's, compared with the training reference (:func:`medunet.qc.decide.decide`).

    ``calibration`` adds the expected Dice at every temperature of :data:`~medunet.qc.calibrate.TEMPERATURES` to the record.
    """
    tick = time.perf_counter()
    uncertainty = uncertainty_signals(output.probabilities, list(output.member_labels), temperature=thresholds.temperature)
    if calibration:
        uncertainty["expected_dice_curve"] = expected_dice_curve(output.probabilities, TEMPERATURES)
    spacing = spacing_of(prepared.reference.affine)
    signals: dict[str, Any] = {"uncertainty": uncertainty, "mask": mask_signals(prediction.labels, spacing, len(class_names))}
    if prepared.input_signals is not None:
        signals = {"input": prepared.input_signals, **signals}
    record = decide(signals, reference, list(class_names), thresholds)
    timings["qc"] = time.perf_counter() - tick + timings.pop("qc_input", 0.0) + timings.pop("qc_uncertainty", 0.0)
    return replace(prediction, qc=record)


# --------------------------------------------------------------------------- the hand-off to the writers


@dataclass(frozen=True)
class SegmentedCase:
    """A case through every stage: what each output format (NIfTI, DICOM SEG, RTSTRUCT, maps, previews, statistics) is written from."""

    case: str | None
    prediction: Prediction
    reference: nib.Nifti1Image
    """The input (first channel) image: the grid and header of every output."""
    series: DicomSeries | None = None
    """The input's DICOM series, which DICOM outputs reference (None for other inputs)."""

    @property
    def labels(self) -> np.ndarray:
        return self.prediction.labels

    @property
    def qc(self) -> QCRecord | None:
        return self.prediction.qc
