"""The Segmenter: load a trained model once, segment many volumes onto their own grids.

    seg = Segmenter.from_checkpoint("runs/liver")        # a run folder, a .pt file, a crossval folder or a package
    mask = seg.predict("ct.nii.gz")                       # nibabel image, exactly on the input grid
    seg.predict_file("ct.nii.gz", "preds/ct.nii.gz")      # written atomically

A thin façade: :func:`medunet.model.loader.load_model` loads the model, and each call runs the
stages of :mod:`medunet.inference.stages` (read, preprocess, network, CRF, invert, post-process,
QC); the writers of :mod:`medunet.inference.outputs` write any format from the same result.

Geometry: the input is preprocessed with the training chain (orientation, spacing, crop),
predicted with a sliding window, and brought back with MONAI's ``Invertd``. The result is then
checked against the input's shape and affine, and written with the input's own header, so the mask
sits on exactly the input's grid whatever its orientation, obliquity or anisotropy. A mismatch is
an error, never a warning.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import torch

from medunet.config import Config
from medunet.errors import OutputExistsError
from medunet.inference import stages
from medunet.inference.outputs import DICOM_OUTPUT_SUFFIXES, require_source_slices, write_nifti, write_outputs
from medunet.inference.stages import InputImage, NetworkOutput, Prediction, PreparedCase, SegmentedCase
from medunet.io.atomic import atomic_write_text
from medunet.io.dicom import DicomSeries
from medunet.io.image import DicomSource, as_source_list, source_name
from medunet.io.nifti import mask_image
from medunet.model.layout import model_name as name_of_model
from medunet.model.loader import LoadedModel, load_model
from medunet.qc.decide import QCRecord, Thresholds
from medunet.qc.reference import QCReference, is_ct

__all__ = ["InputImage", "PreparedCase", "Prediction", "SegmentedCase", "Segmenter", "predict_dicom_seg", "segment_dicom"]


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
        model_name: str | None = None,
    ) -> None:
        self.models = [m.to(device).eval() for m in ([model] if isinstance(model, torch.nn.Module) else model)]
        self.model = self.models[0]  # the network (the first one of a fold ensemble)
        self.config = config
        self.class_names = list(class_names)
        self.in_channels = in_channels
        self.device = device
        self.source = source
        self.model_name = model_name or (name_of_model(source.split(" (folds")[0]) if source else "medunet")
        """A short model name, recorded in DICOM SEG and RTSTRUCT outputs (the run, folder or package name)."""
        self._preprocessing = stages.Preprocessing(config, num_classes=self.num_classes, in_channels=in_channels)
        self._preprocess = self._preprocessing.chain
        self._network = stages.Network(self.models, config, device=device, num_classes=self.num_classes)
        self._amp = self._network.amp
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
        """A Segmenter for any model source: a run folder, a checkpoint file, a cross-validation folder or a package.

        What loads, how (``fold_<k>/`` ensembles, ``postprocessing.json``, ``overrides``, ``folds``) and
        what it raises are :func:`medunet.model.loader.load_model`'s; ``path`` is its ``source``.
        """
        return cls.from_loaded(load_model(path, device=device, overrides=overrides, folds=folds))

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> Segmenter:
        """A Segmenter on a model :func:`~medunet.model.loader.load_model` loaded."""
        return cls(loaded.networks, loaded.config, class_names=loaded.class_names, in_channels=loaded.in_channels,
                   device=loaded.device, source=loaded.source, qc_reference=loaded.qc_reference,
                   qc_thresholds=loaded.qc_thresholds, model_name=loaded.name)

    # ----------------------------------------------------------------------- whole calls

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
        result = self.segment(image, case=case, qc=False)
        return mask_image(result.labels, result.reference, num_classes=self.num_classes)

    def predict_with_qc(self, image: InputImage | Sequence[InputImage], *, case: str | None = None) -> tuple[nib.Nifti1Image, QCRecord]:
        """:meth:`predict` and the case's QC record (see docs/quality-control.md)."""
        result = self.segment(image, case=case, qc=True)
        assert result.qc is not None
        return mask_image(result.labels, result.reference, num_classes=self.num_classes), result.qc

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
        result = self.segment(image, case=case, timings=timings, qc=report is not None and self.qc_enabled)
        tick = time.perf_counter()
        written = write_nifti(result, output, num_classes=self.num_classes, overwrite=overwrite)
        timings["write"] = time.perf_counter() - tick
        timings["total"] = time.perf_counter() - started
        if report is not None:
            self.write_run_report(report, outputs=[written], timings=timings, inputs=as_source_list(image), qc=result.qc)
        return written

    def segment(
        self, image: InputImage | Sequence[InputImage], *, case: str | None = None, qc: bool | None = None,
        uncertainty_map: bool = False, timings: dict[str, float] | None = None,
    ) -> SegmentedCase:
        """Every stage on one volume: what each output format is written from (:mod:`medunet.inference.outputs`).

        ``qc`` defaults to :attr:`qc_enabled`; ``uncertainty_map`` also inverts the per-voxel entropy. Raises as :meth:`predict`.
        """
        qc = self.qc_enabled if qc is None else qc
        timings = {} if timings is None else timings
        prepared = self._prepare(image, case=case, timings=timings, input_qc=qc)
        return self.segmented(prepared, self.predict_case(prepared, timings=timings, qc=qc, uncertainty_map=uncertainty_map))

    @staticmethod
    def segmented(prepared: PreparedCase, prediction: Prediction) -> SegmentedCase:
        """The hand-off to the writers: a prepared case's prediction with the grid (and DICOM series) it lies on."""
        return SegmentedCase(prepared.case, prediction, prepared.reference, prepared.series)

    # ----------------------------------------------------------------------- the stages

    def prepare(self, image: InputImage | Sequence[InputImage], *, case: str | None = None,
                timings: dict[str, float] | None = None) -> PreparedCase:
        """Read and preprocess one volume, without the network: the part batch mode runs ahead in a background thread.

        Pass the result to :meth:`predict_case`. Raises as :meth:`predict`.
        """
        return self._prepare(image, case=case, timings={} if timings is None else timings, input_qc=self.qc_enabled)

    def _prepare(self, image: InputImage | Sequence[InputImage], *, case: str | None, timings: dict[str, float],
                 input_qc: bool) -> PreparedCase:
        read = stages.read(image, case=case, timings=timings)
        return self._preprocessing(read, input_qc=input_qc, ct=self._ct, timings=timings)

    def probabilities(self, image: torch.Tensor, member_labels: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Softmax probabilities (B, K, X, Y, Z) of a preprocessed batch, averaged over the models of a fold ensemble.

        With ``member_labels`` (and several models), each model's own argmax labels (B, X, Y, Z) are appended to it.
        """
        return self._network.probabilities(image, member_labels)

    def network_output(self, prepared: PreparedCase, *, members: bool = False, timings: dict[str, float] | None = None) -> NetworkOutput:
        """The network stage on a prepared case: probabilities in preprocessed space (``members``: each fold's labels too).

        It runs :meth:`probabilities` of this instance, so a wrapper set on it (to record or alter them) takes effect.
        """
        return self._network(prepared, members=members, timings={} if timings is None else timings, probabilities=self.probabilities)

    def predict_case(
        self, prepared: PreparedCase, *, timings: dict[str, float] | None = None, qc: bool | None = None, uncertainty_map: bool = False,
        calibration: bool = False,
    ) -> Prediction:
        """Labels on the input grid of a volume from :meth:`prepare` and, with ``qc`` (default: :attr:`qc_enabled`), its QC record.

        The network, the dense CRF (``postprocessing.crf.enabled``), then :meth:`finish`. QC reads the probabilities the
        network already computed (no second pass); ``uncertainty_map`` also inverts their per-voxel entropy onto the input
        grid; ``calibration`` adds the expected Dice at every temperature of :data:`~medunet.qc.calibrate.TEMPERATURES` to
        the record (what calibration fits).
        """
        timings = {} if timings is None else timings
        qc = self.qc_enabled if qc is None else qc
        output = self.network_output(prepared, members=qc, timings=timings)
        output = stages.refine(output, prepared, self.config.postprocessing.crf, timings=timings)
        return self.finish(prepared, output, timings=timings, qc=qc, uncertainty_map=uncertainty_map, calibration=calibration)

    def finish(
        self, prepared: PreparedCase, output: NetworkOutput, *, timings: dict[str, float] | None = None, qc: bool | None = None,
        uncertainty_map: bool = False, calibration: bool = False,
    ) -> Prediction:
        """The stages after the network (and CRF): inversion onto the input grid, post-processing and, with ``qc``, QC.

        ``output`` stays valid: one network pass may be finished several ways (e.g. with and without
        :func:`~medunet.inference.stages.refine`), each inverted from the same prepared case.
        """
        timings = {} if timings is None else timings
        qc = self.qc_enabled if qc is None else qc
        inverted = stages.invert(self._preprocessing, output, prepared, resample_probabilities=self.config.inference.resample_probabilities,
                                 num_classes=self.num_classes, uncertainty_map=uncertainty_map, timings=timings)
        prediction = stages.postprocess(inverted, prepared, self.config.postprocessing, self.class_names, timings=timings)
        if not qc:
            timings.pop("qc_uncertainty", None)
            return prediction
        return stages.quality_control(prediction, prepared, output, reference=self.qc_reference, thresholds=self.qc_thresholds,
                                      class_names=self.class_names, calibration=calibration, timings=timings)

    # ----------------------------------------------------------------------- run reports

    def run_report(
        self, *, outputs: Sequence[Path], timings: dict[str, float], inputs: Sequence[object] = (), qc: QCRecord | None = None
    ) -> dict[str, Any]:
        """The JSON-ready run report of one call: versions, device, model, classes, seconds per stage, outputs, QC record."""
        import monai

        from medunet._version import __version__

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


# --------------------------------------------------------------------------- DICOM in, DICOM out


def predict_dicom_seg(
    segmenter: Segmenter,
    series: DicomSeries,
    output: str | Path,
    *,
    model_name: str | None = None,
    overwrite: bool = False,
    case: str | None = None,
) -> nib.Nifti1Image:
    """Segment a DICOM series already read and write its SEG to ``output``; returns the mask on ``series.image``'s grid.

    The returned mask is what a NIfTI output of the same case holds, so callers writing both
    formats predict once.
    """
    output = Path(output)
    if output.exists() and not overwrite:  # before the (slow) prediction
        raise OutputExistsError(f"output {output} already exists; pass --overwrite to replace it")
    require_source_slices(series, ["dicom-seg"], case=case)
    stages_out = segmenter.segment(series.image, case=case, qc=False)
    result = SegmentedCase(case, stages_out.prediction, stages_out.reference, series)
    write_outputs(result, {"dicom-seg": output}, class_names=segmenter.class_names, model_name=model_name or segmenter.model_name,
                  overwrite=overwrite)
    return mask_image(result.labels, result.reference, num_classes=segmenter.num_classes)


def segment_dicom(
    segmenter: Segmenter,
    source: DicomSource | str | Path,
    *,
    seg_output: str | Path | None = None,
    rtstruct_output: str | Path | None = None,
    nifti_output: str | Path | None = None,
    overwrite: bool = False,
    case: str | None = None,
) -> nib.Nifti1Image:
    """Read a DICOM series, segment it once, and write the asked outputs: SEG, RT Structure Set, NIfTI.

    The DICOM objects are written first: if one cannot be (e.g. a resampled series), no NIfTI is left.
    Returns the mask on the series' grid. ``medunet infer --output-format`` runs the same stages and
    writers case by case (:mod:`medunet.inference.batch`), with QC.
    """
    targets = {f: Path(p) for f, p in (("dicom-seg", seg_output), ("rtstruct", rtstruct_output), ("nifti", nifti_output))
               if p is not None}
    for output in targets.values():  # before the (slow) read and prediction
        if output.exists() and not overwrite:
            raise OutputExistsError(f"output {output} already exists; pass --overwrite to replace it")
    source = source if isinstance(source, DicomSource) else DicomSource(Path(source))
    prepared = segmenter._prepare(source, case=case, timings={}, input_qc=False)
    if set(targets) & set(DICOM_OUTPUT_SUFFIXES):  # before the (slow) prediction
        require_source_slices(prepared.series, list(targets), case=case)
    result = segmenter.segmented(prepared, segmenter.predict_case(prepared, qc=False))
    write_outputs(result, targets, class_names=segmenter.class_names, model_name=segmenter.model_name, overwrite=overwrite)
    return mask_image(result.labels, result.reference, num_classes=segmenter.num_classes)
