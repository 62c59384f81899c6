"""Records the DICOM node hands to the job store: what was received, without patient attributes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ReceivedInstance:
    """One stored DICOM instance of a released association: where it lies and the non-patient facts routing needs."""
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: Path
    modality: str
    body_part_examined: str
    series_description: str
    slice_position: float | None
    slice_thickness: float | None
