"""The Segmenter: load a trained model once, segment many volumes onto their own grids.

    seg = Segmenter.from_checkpoint("runs/liver")        # a run folder or a .pt file
    mask = seg.predict("ct.nii.gz")                       # nibabel image, exactly on the input grid
    seg.predict_file("ct.nii.gz", "preds/ct.nii.gz")      # written atomically

Geometry: the input is preprocessed with the training chain (orientation, spacing,
crop), predicted with a sliding window, and brought back with MONAI's ``Invertd``.
The result is then checked against the input's shape and affine, and written with
the input's own header, so the mask sits on exactly the input's grid whatever its
orientation, obliquity or anisotropy. A mismatch is an error, never a warning.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from medunet.config import Config
from medunet.errors import DataError, MedunetError, OutputExistsError, unwrap_error
from medunet.io.atomic import atomic_write_text
from medunet.io.geometry import require_same_grid, spacing_of
from medunet.io.image import ArrayWithAffine, DicomSource, Source, as_source_list, read_image, source_name
from medunet.io.nifti import ImageSource, label_dtype, mask_image, write_mask
from medunet.model.loader import LoadedModel, load_model
from medunet.model.sliding import inference_dtype, predict_probabilities
from medunet.postprocessing.crf import dense_crf
from medunet.postprocessing.operations import postprocess_labels
from medunet.qc.calibrate import TEMPERATURES
from medunet.qc.decide import QCRecord, Thresholds, decide
from medunet.qc.reference import QCReference, is_ct
from medunet.qc.signals import entropy_map, expected_dice_curve, input_signals, mask_signals, uncertainty_signals
from medunet.transforms import IMAGE, preprocessing

log = logging.getLogger("medunet")

PRED = "pred"

#: What :meth:`Segmenter.predict` accepts as one image (or one channel).
InputImage = Source | ArrayWithAffine


@dataclass(frozen=True)
class CaseResult:
    """Outcome of one case in a batch run."""

    case: str
    input: str
    output: str | None
    error: str | None = None
    qc: QCRecord | None = None
    """The case's quality-control record (:func:`medunet.qc.decide.decide`), when QC ran."""


@dataclass(frozen=True)
class PreparedCase:
    """A volume read and preprocessed by :meth:`Segmenter.prepare`, waiting for the network."""

    data: dict[str, Any]
    """The preprocessing chain's output (the image, with the operations needed to invert the prediction)."""
    reference: nib.Nifti1Image
    """The input (first channel) image: the grid and header of the mask."""
    case: str | None = None
    input_signals: dict[str, Any] | None = None
    """QC statistics of the raw input (:func:`medunet.qc.signals.input_signals`), when QC is on."""


@dataclass(frozen=True)
class Prediction:
    """What :meth:`Segmenter.predict_case` gives: labels on the input grid and, if asked, QC and uncertainty."""

    labels: np.ndarray
    qc: QCRecord | None = None
    """The QC record (docs/quality-control.md)."""
    uncertainty: np.ndarray | None = None
    """Per-voxel normalised entropy (0..1, float32) on the input grid, when asked for."""


class Segmenter:
    """A trained model ready to segment volumes. Build it with :meth:`from_checkpoint`.

    One instance serves many calls and may be shared by threads: everything but the network runs
    concurrently, the network under one lock (see docs/hospital-pipelines.md). Calls keep no state.
    """

    def __init__(
        self,
        model: torch.nn.Module | Sequence[torch.nn.Module],
        config: Config,
        *,
        class_names: Sequence[str],
        in_channels: int,
        device: torch.device,
        source: str = "",
        qc_reference: QCReference | None = None,
        qc_thresholds: Thresholds | None = None,
    ) -> None:
        self.models = [m.to(device).eval() for m in ([model] if isinstance(model, torch.nn.Module) else model)]
        self.model = self.models[0]  # the network (the first one of a fold ensemble)
        self.config = config
        self.class_names = list(class_names)
        self.in_channels = in_channels
        self.device = device
        self.source = source
        self._amp = inference_dtype(config, device)  # inference.precision
        self._preprocess = preprocessing(config, num_classes=self.num_classes, in_channels=in_channels, with_label=False)
        # Thread-safety model: reading, preprocessing, inversion and post-processing run concurrently; the network
        # runs under this lock, one call at a time (one forward pass already uses every core / the whole GPU).
        self._model_lock = threading.Lock()
        self.qc_reference = qc_reference
        """The training reference QC compares inputs and masks with (None: only the uncertainty checks run)."""
        self.qc_thresholds = qc_thresholds or Thresholds()
        self.qc_enabled = True
        """Compute a QC record per case (``medunet infer --no-qc`` turns it off)."""
        self._ct = qc_reference.ct if qc_reference else is_ct(config)

    @property
    def num_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.class_names)

    def __repr__(self) -> str:
        return (
            f"Segmenter(model={self.config.model.name!r}, classes={self.class_names}, in_channels={self.in_channels}, "
            f"spacing={self.config.data.target_spacing}, device={self.device})"
        )

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, device: str = "auto", overrides: Sequence[str] = (), folds: Sequence[int] | None = None
    ) -> Segmenter:
        """Load a checkpoint, a run folder's best.pt, a cross-validation folder's fold ensemble or an exported package, safely.

        A folder holding ``fold_<k>/`` runs loads every fold (or those in ``folds``) and averages their
        probabilities. A ``postprocessing.json`` in the folder (chosen by ``medunet crossval``) replaces
        the checkpoint's post-processing unless ``overrides`` set ``postprocessing.*`` themselves.
        An exported package (``medunet export``) loads too: its networks run on ``inference.engine``.
        See :func:`medunet.model.loader.load_model`.

        Args:
            path: a run folder, a cross-validation folder, a checkpoint file or a package folder.
            device: auto, cpu, cuda or cuda:N.
            overrides: dotted config overrides, e.g. ``["inference.overlap=0.25"]``.
            folds: fold indices to ensemble (default: all folds found).

        Raises:
            CheckpointError: unreadable checkpoint, missing fold, or folds that disagree on classes, channels or preprocessing.
            PackageError: a package that is incomplete, changed since export, or of an unknown schema.
        """
        return cls.from_loaded(load_model(path, device=device, overrides=overrides, folds=folds))

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> Segmenter:
        """A Segmenter on a model :func:`~medunet.model.loader.load_model` loaded."""
        return cls(loaded.networks, loaded.config, class_names=loaded.class_names, in_channels=loaded.in_channels,
                   device=loaded.device, source=loaded.source, qc_reference=loaded.qc_reference,
                   qc_thresholds=loaded.qc_thresholds)

    def predict(self, image: InputImage | Sequence[InputImage], *, case: str | None = None) -> nib.Nifti1Image:
        """Segment one volume.

        Args:
            image: a NIfTI path, a DICOM series folder (or a :class:`~medunet.io.image.DicomSource` choosing the
                series), a ``nibabel.Nifti1Image``, an ``(array, affine)`` pair (X, Y, Z array, 4x4 RAS+ affine),
                or a list of these, one per channel.
            case: a name for error messages.

        Returns:
            A label image (uint8 up to 256 classes) with the input's shape, affine and header geometry
            (for DICOM input: the series' grid, slices ordered along the normal).

        Raises:
            DataError: the input is unreadable, ambiguous or not a valid volume.
            GeometryError: the result would not lie exactly on the input grid.
        """
        prediction, reference = self._segment(image, case=case, timings={}, qc=False)
        return mask_image(prediction.labels, reference, num_classes=self.num_classes)

    def predict_with_qc(self, image: InputImage | Sequence[InputImage], *, case: str | None = None) -> tuple[nib.Nifti1Image, QCRecord]:
        """:meth:`predict` and the case's QC record (see docs/quality-control.md)."""
        prediction, reference = self._segment(image, case=case, timings={}, qc=True)
        assert prediction.qc is not None
        return mask_image(prediction.labels, reference, num_classes=self.num_classes), prediction.qc

    def predict_file(
        self,
        image: InputImage | Sequence[InputImage],
        output: str | Path,
        report: str | Path | None = None,
        *,
        overwrite: bool = False,
        case: str | None = None,
    ) -> Path:
        """Segment ``image`` and write the mask to ``output`` (.nii.gz) atomically.

        Args:
            image: as for :meth:`predict`.
            output: the mask file to write.
            report: if given, also write a JSON run report there (versions, device, model, checkpoint,
                classes, seconds per stage, output paths, the QC record when QC is on; nothing about the patient).
            overwrite: replace existing ``output`` (and ``report``).
            case: a name for error messages.
        """
        output = Path(output)
        for target in (output, Path(report) if report is not None else None):
            if target is not None and target.exists() and not overwrite:  # before the (slow) prediction, not only at writing
                raise OutputExistsError(f"output {target} already exists; pass --overwrite to replace it")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        prediction, reference = self._segment(image, case=case, timings=timings, qc=report is not None and self.qc_enabled)
        tick = time.perf_counter()
        written = write_mask(prediction.labels, reference, output, num_classes=self.num_classes, overwrite=overwrite)
        timings["write"] = time.perf_counter() - tick
        timings["total"] = time.perf_counter() - started
        if report is not None:
            self.write_run_report(report, outputs=[written], timings=timings, inputs=as_source_list(image), qc=prediction.qc)
        return written

    def run_report(
        self, *, outputs: Sequence[Path], timings: dict[str, float], inputs: Sequence[object] = (), qc: QCRecord | None = None
    ) -> dict[str, Any]:
        """The JSON-ready run report of one call: versions, device, model, classes, seconds per stage, outputs, QC record."""
        import monai

        from medunet import __version__

        kinds = ["dicom" if isinstance(s, DicomSource) or (isinstance(s, (str, Path)) and Path(s).is_dir()) else
                 "nifti" if isinstance(s, (str, Path)) else "in-memory" for s in inputs]
        return {
            "medunet_version": __version__,
            "torch_version": torch.__version__,
            "monai_version": monai.__version__,
            "device": str(self.device),
            "precision": str(self._amp).removeprefix("torch.") if self._amp else "float32",
            "model": self.config.model.name,
            "checkpoint": self.source,
            "classes": self.class_names,
            "inputs": [{"source": source_name(s), "kind": k} for s, k in zip(inputs, kinds)],
            "seconds": {stage: round(value, 4) for stage, value in timings.items()},
            "outputs": [str(p) for p in outputs],
            **({"qc": qc.to_json()} if qc is not None else {}),
        }

    def write_run_report(
        self, path: str | Path, *, outputs: Sequence[Path], timings: dict[str, float], inputs: Sequence[object] = (),
        qc: QCRecord | None = None,
    ) -> Path:
        """Write :meth:`run_report` to ``path`` atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.run_report(outputs=outputs, timings=timings, inputs=inputs, qc=qc), indent=2))
        return path

    def _segment(
        self, image: InputImage | Sequence[InputImage], *, case: str | None, timings: dict[str, float], qc: bool
    ) -> tuple[Prediction, nib.Nifti1Image]:
        """The prediction on the input grid, and the input (first channel) image whose header it takes."""
        prepared = self.prepare(image, case=case, timings=timings)
        return self.predict_case(prepared, timings=timings, qc=qc), prepared.reference

    def prepare(self, image: InputImage | Sequence[InputImage], *, case: str | None = None,
                timings: dict[str, float] | None = None) -> PreparedCase:
        """Read and preprocess one volume, without the network: the part batch mode runs ahead in a background thread.

        Pass the result to :meth:`labels_for`. Raises as :meth:`predict`.
        """
        timings = {} if timings is None else timings
        sources = as_source_list(image)
        if not sources:
            raise DataError("no image given", case=case)
        tick = time.perf_counter()
        # DICOM series and arrays are read once here and handed on in memory; NIfTI paths stay paths (read lazily, named in errors).
        images = [read_image(s, case=case) for s in sources]
        inputs = [s if isinstance(s, (str, Path)) and not Path(s).is_dir() else img for s, img in zip(sources, images)]
        timings["read"] = time.perf_counter() - tick
        return self._preprocessed(inputs, reference=images[0], case=case, timings=timings)

    @torch.inference_mode()
    def probabilities(self, image: torch.Tensor, member_labels: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Softmax probabilities (B, K, X, Y, Z) of a preprocessed batch, averaged over the models of a fold ensemble.

        All folds share one preprocessing (checked on loading), so averaging in network space is exact.
        With ``member_labels`` (and several models), each model's own argmax labels (B, X, Y, Z) are appended to it.
        """
        def run(model: torch.nn.Module) -> torch.Tensor:
            probs = predict_probabilities(model, image, self.config, device=self.device, amp=self._amp, num_classes=self.num_classes)
            if member_labels is not None and len(self.models) > 1:
                member_labels.append(probs.max(dim=1).indices.cpu())
            return probs

        total = run(self.models[0])
        for model in self.models[1:]:
            total += run(model)
        return total / len(self.models) if len(self.models) > 1 else total

    def predict_labels(
        self,
        sources: Sequence[ImageSource],
        *,
        reference: nib.Nifti1Image,
        case: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> np.ndarray:
        """Label array on ``reference``'s grid (after inversion and post-processing); seconds per stage go to ``timings``."""
        timings = {} if timings is None else timings
        return self.labels_for(self._preprocessed(sources, reference=reference, case=case, timings=timings), timings=timings)

    def _preprocessed(
        self, sources: Sequence[ImageSource], *, reference: nib.Nifti1Image, case: str | None, timings: dict[str, float]
    ) -> PreparedCase:
        tick = time.perf_counter()
        signals = None
        try:
            data: dict[str, Any] = self._preprocess({IMAGE: list(sources), "case": case}, end=1)  # loaded, not yet transformed
            if self.qc_enabled:  # the raw intensities: normalisation would hide wrong units or another modality
                qc_tick = time.perf_counter()
                raw = data[IMAGE]
                signals = input_signals(np.asarray(raw.detach().cpu()), np.asarray(raw.affine), ct=self._ct)
                timings["qc_input"] = time.perf_counter() - qc_tick
            data = self._preprocess(data, start=1)
        except Exception as exc:  # MONAI wraps transform errors; surface our typed one
            cause = unwrap_error(exc)
            if isinstance(cause, MedunetError):
                raise cause from None
            raise
        timings["preprocess"] = time.perf_counter() - tick - timings.get("qc_input", 0.0)
        return PreparedCase(data=data, reference=reference, case=case, input_signals=signals)

    def labels_for(self, prepared: PreparedCase, *, timings: dict[str, float] | None = None) -> np.ndarray:
        """Network, inversion and post-processing of a volume from :meth:`prepare`: labels on its input grid."""
        return self.predict_case(prepared, timings=timings, qc=False).labels

    def predict_case(
        self, prepared: PreparedCase, *, timings: dict[str, float] | None = None, qc: bool | None = None, uncertainty_map: bool = False,
        calibration: bool = False,
    ) -> Prediction:
        """Labels on the input grid of a volume from :meth:`prepare` and, with ``qc`` (default: :attr:`qc_enabled`), its QC record.

        QC reads the probabilities the network already computed (no second pass); ``uncertainty_map``
        also inverts their per-voxel entropy onto the input grid; ``calibration`` adds the expected Dice at
        every temperature of :data:`~medunet.qc.calibrate.TEMPERATURES` to the record (what calibration fits).
        """
        timings = {} if timings is None else timings
        qc = self.qc_enabled if qc is None else qc
        data, reference, case = dict(prepared.data), prepared.reference, prepared.case
        pre_image = data[IMAGE]
        members: list[torch.Tensor] = []
        tick = time.perf_counter()
        with self._model_lock:
            timings["wait_for_model"] = time.perf_counter() - tick
            probs = self.probabilities(torch.as_tensor(pre_image)[None], member_labels=members if qc else None)[0]
        timings["network"] = time.perf_counter() - tick - timings["wait_for_model"]
        if self.config.postprocessing.crf.enabled:  # on the network's grid, before inversion (medunet.postprocessing.crf)
            tick = time.perf_counter()
            probs = dense_crf(probs, torch.as_tensor(pre_image), spacing=spacing_of(np.asarray(pre_image.affine)),
                              config=self.config.postprocessing.crf)
            timings["crf"] = time.perf_counter() - tick
        tick = time.perf_counter()
        uncertainty = (uncertainty_signals(probs, [m[0] for m in members], temperature=self.qc_thresholds.temperature)
                       if qc else None)  # on the network's device
        if uncertainty is not None and calibration:
            uncertainty["expected_dice_curve"] = expected_dice_curve(probs, TEMPERATURES)
        entropy = self._inverted_entropy(probs.cpu(), data, reference, case) if uncertainty_map else None
        timings["qc_uncertainty"] = time.perf_counter() - tick
        tick = time.perf_counter()
        # Invert either the probabilities (linear; argmax on the input grid) or the hard labels (nearest).
        if self.config.inference.resample_probabilities:
            labels_t, inverted = self._invert_probabilities(probs.cpu(), data, voxels=int(np.prod(reference.shape[:3])))
        else:
            inverted = self._invert(probs.max(dim=0, keepdim=True).indices.float().cpu(), data, nearest=True)  # max().indices: argmax is ~20x slower on CPU
            labels_t = torch.as_tensor(inverted)[0].round()
        labels = labels_t.numpy().astype(label_dtype(self.num_classes))
        expected = tuple(int(s) for s in reference.shape[:3])
        require_same_grid(labels.shape, np.asarray(inverted.affine), expected, reference.affine, what="inverted prediction",
                          against="the input's", case=case, fix="refusing to write a mask off the input grid", tolerance=1e-4)
        labels = postprocess_labels(
            labels,
            spacing=spacing_of(reference.affine),
            config=self.config.postprocessing,
            class_names=dict(enumerate(self.class_names)),
        )
        timings["invert_postprocess"] = time.perf_counter() - tick
        record = None
        if uncertainty is not None:
            tick = time.perf_counter()
            signals: dict[str, Any] = {"uncertainty": uncertainty, "mask": mask_signals(labels, spacing_of(reference.affine), self.num_classes)}
            if prepared.input_signals is not None:
                signals = {"input": prepared.input_signals, **signals}
            record = decide(signals, self.qc_reference, self.class_names, self.qc_thresholds)
            timings["qc"] = time.perf_counter() - tick + timings.pop("qc_input", 0.0) + timings.pop("qc_uncertainty", 0.0)
        else:
            timings.pop("qc_uncertainty", None)
        return Prediction(labels, record, entropy)

    def _inverted_entropy(self, probs: torch.Tensor, data: dict[str, Any], reference: nib.Nifti1Image, case: str | None) -> np.ndarray:
        """Per-voxel normalised entropy of ``probs`` brought onto the input grid (linear interpolation), float32."""
        inverted = self._invert(entropy_map(probs), data, nearest=False)
        values = torch.as_tensor(inverted)[0].clamp(0.0, 1.0).numpy().astype(np.float32)
        expected = tuple(int(s) for s in reference.shape[:3])
        require_same_grid(values.shape, np.asarray(inverted.affine), expected, reference.affine, what="inverted uncertainty map",
                          against="the input's", case=case, fix="refusing to write it off the input grid", tolerance=1e-4)
        return values

    def _invert(self, values: torch.Tensor, data: dict[str, Any], *, nearest: bool) -> MetaTensor:
        """Bring a (C, X, Y, Z) prediction in network space back to the input grid with MONAI's ``Invertd``."""
        pre_image = data[IMAGE]
        with_pred: dict[Hashable, Any] = {key: value for key, value in data.items()}
        with_pred[PRED] = MetaTensor(values, meta=dict(pre_image.meta), applied_operations=list(pre_image.applied_operations))
        return Invertd(keys=PRED, transform=self._preprocess, orig_keys=IMAGE, nearest_interp=nearest)(with_pred)[PRED]

    def _invert_probabilities(self, probs: torch.Tensor, data: dict[str, Any], *, voxels: int) -> tuple[torch.Tensor, MetaTensor]:
        """Argmax on the input grid of the linearly inverted probabilities, a group of classes at a time.

        Inversion acts on each class map alone, so a running maximum over groups gives the argmax of the
        whole inversion (ties go to the lower class, as ``max`` does) while holding only one group.
        """
        group = classes_per_inversion(probs.shape[0], voxels)
        best: torch.Tensor | None = None
        labels = torch.zeros(0, dtype=torch.int64)
        for start in range(0, probs.shape[0], group):
            inverted = self._invert(probs[start:start + group], data, nearest=False)
            top, index = torch.as_tensor(inverted).max(dim=0)
            if best is None:
                best, labels = top, index
            else:
                better = top > best
                best = torch.where(better, top, best)
                labels = torch.where(better, index + start, labels)
        return labels, inverted


#: Bytes of inverted class maps held at once on the input grid: the probabilities are inverted a group of classes at a
#: time, keeping a running argmax, so memory does not grow with the number of classes (one float32 class map of a
#: 512x512x300 CT is 315 MB; groups of 3 classes fit).
INVERT_BUDGET_BYTES = 1 << 30


def classes_per_inversion(num_classes: int, voxels: int, budget: int | None = None) -> int:
    """How many float32 class maps of ``voxels`` voxels to invert at once within ``budget`` bytes (at least 1)."""
    budget = INVERT_BUDGET_BYTES if budget is None else budget
    return max(1, min(num_classes, budget // max(4 * voxels, 1)))
