"""Segment a DICOM series straight to DICOM outputs: a SEG, an RT Structure Set (and, if asked, the same mask as NIfTI).

The writers themselves (:func:`medunet.io.dicom_seg.write_dicom_seg`,
:func:`medunet.io.rtstruct.write_rtstruct`) know nothing of models; this module runs a
:class:`~medunet.inference.segmenter.Segmenter` on the series' own grid and hands the mask to
them, so one prediction serves every output format.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medunet.errors import GeometryError, OutputExistsError
from medunet.inference.segmenter import Segmenter
from medunet.io.dicom import DicomSeries, read_series
from medunet.io.dicom_seg import write_dicom_seg
from medunet.io.image import DicomSource
from medunet.io.nifti import write_mask
from medunet.io.rtstruct import write_rtstruct


def model_name_of(segmenter: Segmenter) -> str:
    """A short model name for the SEG: the run folder's name for ``<run>/best.pt``, else the checkpoint's stem."""
    source = Path(str(segmenter.source).split(" (folds")[0]) if segmenter.source else Path("medunet")
    if source.suffix == ".pt":
        return source.parent.name if source.stem in ("best", "last") and source.parent.name else source.stem
    return source.name or "medunet"


def predict_dicom_seg(
    segmenter: Segmenter,
    series: DicomSeries,
    output: str | Path,
    *,
    model_name: str | None = None,
    overwrite: bool = False,
    case: str | None = None,
) -> nib.Nifti1Image:
    """Segment a DICOM series and write its SEG to ``output``; returns the mask on ``series.image``'s grid.

    The returned mask is what a NIfTI output of the same case holds, so callers writing both
    formats predict once.
    """
    output = Path(output)
    if output.exists() and not overwrite:  # before the (slow) prediction
        raise OutputExistsError(f"output {output} already exists; pass --overwrite to replace it")
    if series.resampled:
        raise GeometryError(
            f"case {case!r}: the series was resampled onto a regular grid, so its voxels no longer match the source slices; "
            "a DICOM SEG needs the original slices (write NIfTI only, or fix the series)"
        )
    mask = segmenter.predict(series.image, case=case)
    write_dicom_seg(
        np.asarray(mask.dataobj),
        series,
        segmenter.class_names,
        output,
        model_name=model_name or model_name_of(segmenter),
        overwrite=overwrite,
    )
    return mask


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

    Used by ``medunet infer --output-format`` with ``dicom-seg`` and/or ``rtstruct`` (and ``nifti``).
    The DICOM objects are written first: if one cannot be (e.g. a resampled series), no NIfTI is left.
    Returns the mask on the series' grid.
    """
    outputs = [Path(p) for p in (seg_output, rtstruct_output, nifti_output) if p is not None]
    for output in outputs:  # before the (slow) read and prediction
        if output.exists() and not overwrite:
            raise OutputExistsError(f"output {output} already exists; pass --overwrite to replace it")
    if not isinstance(source, DicomSource):
        source = DicomSource(Path(source))
    series = read_series(source.folder, series_uid=source.series_uid, allow_resample=source.allow_resample, case=case)
    if series.resampled and (seg_output is not None or rtstruct_output is not None):
        raise GeometryError(
            f"case {case!r}: the series was resampled onto a regular grid, so its voxels no longer match the source slices; "
            "DICOM SEG and RTSTRUCT outputs need the original slices (write NIfTI only, or fix the series)"
        )
    mask = segmenter.predict(series.image, case=case)
    labels = np.asarray(mask.dataobj)
    model_name = model_name_of(segmenter)
    if seg_output is not None:
        write_dicom_seg(labels, series, segmenter.class_names, seg_output, model_name=model_name, overwrite=overwrite)
    if rtstruct_output is not None:
        write_rtstruct(labels, series, segmenter.class_names, rtstruct_output, model_name=model_name, overwrite=overwrite)
    if nifti_output is not None:
        write_mask(labels, series.image, Path(nifti_output), num_classes=segmenter.num_classes, overwrite=overwrite)
    return mask

