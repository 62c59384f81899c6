"""Deprecated name, kept so that existing imports keep working: use :mod:`medunet.inference.segmenter`
(:func:`~medunet.inference.segmenter.segment_dicom`, :func:`~medunet.inference.segmenter.predict_dicom_seg`) and
:mod:`medunet.inference.outputs` (the writers of every output format).

This module once held both the DICOM outputs of a prediction and their writers' glue, and shared its name
with :mod:`medunet.io.dicom_seg` (the DICOM SEG writer). It will be removed once nothing imports it.
"""

from __future__ import annotations

from medunet.inference.segmenter import Segmenter, predict_dicom_seg, segment_dicom


def model_name_of(segmenter: Segmenter) -> str:
    """A short model name for the SEG (:attr:`Segmenter.model_name`): the run folder's name for ``<run>/best.pt``, else the checkpoint's stem."""
    return segmenter.model_name


__all__ = ["model_name_of", "predict_dicom_seg", "segment_dicom"]
