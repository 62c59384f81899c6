"""A PACS round trip over DICOMweb: find a series (QIDO-RS), fetch it (WADO-RS), segment, store a SEG (STOW-RS).

    pacs = DicomWebPacs(PacsConnection.from_environment("http://pacs:8042/dicom-web", timeout=30))
    result = segment_from_pacs(Segmenter.from_checkpoint("runs/liver"), pacs, study_uid="1.2.3")
    result.seg_sop_instance_uid                     # the stored SEG

This module decides what to fetch, segments it and sends the result back; talking to the service
(requests, credentials, retries, error messages) is the client's, :mod:`medunet.net.dicomweb`.

The PACS is only written to at the very end, with a SEG that was completely produced and validated by
its writer: a failure anywhere before leaves the PACS unchanged.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medunet.errors import PacsError
from medunet.net.dicomweb import PASSWORD_ENV, USER_ENV, DicomWebPacs, PacsConnection, PacsSeries

if TYPE_CHECKING:
    from medunet.inference.segmenter import Segmenter

__all__ = [  # the client's names too: `from medunet.workflows.pacs import DicomWebPacs, PacsConnection` keeps working
    "NON_IMAGE_MODALITIES", "PASSWORD_ENV", "USER_ENV", "DicomWebPacs", "PacsConnection", "PacsResult", "PacsSeries",
    "choose_series", "segment_from_pacs",
]

log = logging.getLogger("medunet")

#: Series of these modalities are results, not images to segment; they are never picked automatically.
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "REG", "DOC"})


@dataclass(frozen=True)
class PacsResult:
    """What a round trip did: which series it segmented and the SEG it stored."""

    study_uid: str
    series_uid: str
    seg_series_uid: str
    seg_sop_instance_uid: str
    instances_retrieved: int
    seconds: float


def choose_series(candidates: Iterable[PacsSeries], *, study_uid: str, series_uid: str | None) -> PacsSeries:
    """The one series to segment: the one asked for, or the study's only image series."""
    candidates = list(candidates)
    if series_uid is not None:
        match = [s for s in candidates if s.series_uid == series_uid]
        if not match:
            raise PacsError(f"series {series_uid} is not in study {study_uid} on the PACS; check the UIDs")
        return match[0]
    images = [s for s in candidates if s.modality.upper() not in NON_IMAGE_MODALITIES]
    if not candidates:
        raise PacsError(f"study {study_uid} was not found on the PACS (no series); check the UID")
    if not images:
        raise PacsError(f"study {study_uid} holds no image series to segment (only {sorted({s.modality for s in candidates})})")
    if len(images) > 1:
        listing = "; ".join(f"{s.series_uid} ({s.modality}, {s.instances or '?'} instances, {s.description!r})" for s in images)
        raise PacsError(f"study {study_uid} holds {len(images)} image series; choose one with --series: {listing}")
    return images[0]


def segment_from_pacs(
    segmenter: Segmenter,
    pacs: DicomWebPacs,
    *,
    study_uid: str,
    series_uid: str | None = None,
    model_name: str | None = None,
    keep: Path | None = None,
) -> PacsResult:
    """Find, retrieve and segment a series, then store its DICOM SEG in the same study.

    Args:
        segmenter: the loaded model.
        pacs: the DICOMweb service.
        study_uid: StudyInstanceUID to search.
        series_uid: the series to segment; needed when the study holds several image series.
        model_name: recorded in the SEG (default: :attr:`~medunet.inference.segmenter.Segmenter.model_name`).
        keep: a folder that also receives a copy of the SEG (``<series uid>.seg.dcm``).

    Raises:
        PacsError: the PACS is unreachable, refuses the login, times out, or lacks the study/series.
        MedunetError: the retrieved series cannot be read or segmented (the PACS is left unchanged).
    """
    from medunet.inference.segmenter import predict_dicom_seg
    from medunet.io.dicom import read_series

    started = time.perf_counter()
    pacs.check()
    chosen = choose_series(pacs.find_series(study_uid, series_uid), study_uid=study_uid, series_uid=series_uid)
    log.info("segmenting series %s (%s, %s instances) from %s", chosen.series_uid, chosen.modality, chosen.instances or "?", pacs.url)
    with tempfile.TemporaryDirectory(prefix="medunet-pacs-") as tmp:
        folder = Path(tmp) / "series"
        paths = pacs.retrieve_series(study_uid, chosen.series_uid, folder)
        series = read_series(folder, series_uid=chosen.series_uid, case=chosen.series_uid)
        seg_path = Path(tmp) / "result.seg.dcm"
        predict_dicom_seg(segmenter, series, seg_path, model_name=model_name or segmenter.model_name)
        import pydicom

        seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
        pacs.store([seg_path], study_uid=study_uid)
        if keep is not None:
            from medunet.io.atomic import atomic_write_bytes

            atomic_write_bytes(Path(keep) / f"{chosen.series_uid}.seg.dcm", seg_path.read_bytes())
    result = PacsResult(
        study_uid=study_uid,
        series_uid=chosen.series_uid,
        seg_series_uid=str(seg.SeriesInstanceUID),
        seg_sop_instance_uid=str(seg.SOPInstanceUID),
        instances_retrieved=len(paths),
        seconds=round(time.perf_counter() - started, 3),
    )
    log.info("stored SEG %s (series %s) in study %s", result.seg_sop_instance_uid, result.seg_series_uid, study_uid)
    return result

