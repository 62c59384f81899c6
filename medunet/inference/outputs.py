"""The write stage: every output of a case, from one :class:`~medunet.inference.stages.SegmentedCase`.

NIfTI masks, DICOM SEG, RT Structure Sets, uncertainty maps, preview PNGs and statistics rows are
all written from the same stage result, so one prediction (and one QC record) serves every format.
The DICOM writers (:func:`medunet.io.dicom_seg.write_dicom_seg`, :func:`medunet.io.rtstruct.write_rtstruct`)
know nothing of models; this module hands them the mask on the series' own grid. Every file is
written atomically (a temporary name, then a rename).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medunet.errors import DataError, GeometryError
from medunet.inference.stages import SegmentedCase
from medunet.io.dicom import DicomSeries
from medunet.io.dicom_seg import ResultUids, write_dicom_seg
from medunet.io.nifti import label_dtype, write_float_map, write_mask
from medunet.io.rtstruct import write_rtstruct

#: Values of ``--output-format`` (comma-separated combinations allowed).
OUTPUT_FORMATS = ("nifti", "dicom-seg", "rtstruct")
#: File name suffix of each DICOM output format (``<case><suffix>``).
DICOM_OUTPUT_SUFFIXES = {"dicom-seg": ".seg.dcm", "rtstruct": ".rtstruct.dcm"}


def source_series(result: SegmentedCase, formats: Sequence[str]) -> DicomSeries:
    """The DICOM series the asked DICOM ``formats`` reference, checked to hold the original slices.

    Raises:
        DataError: the input was not a DICOM series.
        GeometryError: the series was resampled onto a regular grid, so its voxels no longer match the source slices.
    """
    return require_source_slices(result.series, formats, case=result.case)


def require_source_slices(series: DicomSeries | None, formats: Sequence[str], *, case: str | None) -> DicomSeries:
    """:func:`source_series` for a series before it is predicted (a batch checks before running the network)."""
    asked = " / ".join(f for f in formats if f in DICOM_OUTPUT_SUFFIXES) or "DICOM"
    if series is None:
        raise DataError(f"a {asked} output needs a DICOM series input (it references the source slices); "
                        "this case is not one: use --output-format nifti", case=case)
    if series.resampled:
        raise GeometryError(
            f"case {case!r}: the series was resampled onto a regular grid, so its voxels no longer match the source slices; "
            "DICOM SEG and RTSTRUCT outputs need the original slices (write NIfTI only, or fix the series)"
        )
    return series


def write_nifti(result: SegmentedCase, path: str | Path, *, num_classes: int, overwrite: bool = False) -> Path:
    """The mask as NIfTI with the input's header (shape, affine, qform/sform), atomically."""
    return write_mask(result.labels, result.reference, Path(path), num_classes=num_classes, overwrite=overwrite)


def write_uncertainty(result: SegmentedCase, path: str | Path, *, overwrite: bool = False) -> Path:
    """The per-voxel uncertainty map (normalised entropy, float32) with the input's header, atomically."""
    if result.prediction.uncertainty is None:
        raise ValueError("the case was segmented without its uncertainty map (uncertainty_map=False)")
    return write_float_map(result.prediction.uncertainty, result.reference, Path(path), overwrite=overwrite,
                           description="medunet uncertainty (normalised entropy)")


def write_outputs(
    result: SegmentedCase, targets: Mapping[str, Path], *, class_names: Sequence[str], model_name: str, overwrite: bool = False,
    uids: ResultUids | None = None,
) -> list[Path]:
    """Write the mask in every asked format (``targets``: format of :data:`OUTPUT_FORMATS` -> file) from one result.

    The DICOM objects are written first: if one cannot be (e.g. a resampled series), no NIfTI is left.
    ``model_name`` is recorded in the DICOM objects (e.g. the run folder's name). ``uids`` (from
    :func:`medunet.io.dicom_seg.result_uids`) fixes the SEG's and RTSTRUCT's UIDs, so a result written
    again is the same instance; None draws random ones. Returns the files, in that order.
    """
    unknown = sorted(set(targets) - set(OUTPUT_FORMATS))
    if unknown:
        raise ValueError(f"unknown output format(s) {unknown}; known: {OUTPUT_FORMATS}")
    written = []
    labels = np.asarray(result.labels).astype(label_dtype(len(class_names)), copy=False)
    if "dicom-seg" in targets or "rtstruct" in targets:
        series = source_series(result, list(targets))
        if "dicom-seg" in targets:
            written.append(write_dicom_seg(labels, series, class_names, targets["dicom-seg"], model_name=model_name, overwrite=overwrite,
                                           uids=uids.seg if uids else None))
        if "rtstruct" in targets:
            written.append(write_rtstruct(labels, series, class_names, targets["rtstruct"], model_name=model_name, overwrite=overwrite,
                                          uids=uids.rtstruct if uids else None))
    if "nifti" in targets:
        written.append(write_nifti(result, targets["nifti"], num_classes=len(class_names), overwrite=overwrite))
    return written


def write_preview(result: SegmentedCase, png: Path, *, title: str, window: tuple[float, float] | None,
                  class_names: Sequence[str], image_name: str = "<image>") -> Path:
    """An overlay PNG of the mask on its input (first channel), from memory: the written files are not read back."""
    from medunet.visualize import save_mask_overlay

    save_mask_overlay(result.reference, result.labels, png, name=image_name, title=title, window=window, class_names=class_names)
    return png


def statistics_rows(result: SegmentedCase, class_names: Sequence[str], *, case: str, image_name: str) -> list[dict[str, Any]]:
    """Volume and intensity per class (``--stats``) of the mask in memory and its input (first channel)."""
    from medunet.inference.statistics import prediction_statistics

    return prediction_statistics(result.labels, result.reference, class_names, case=case, name=image_name)
