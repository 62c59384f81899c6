"""Write a label mask as a DICOM RT Structure Set (RTSTRUCT) that references its source series.

    series = read_series("scans/ct_series/")
    labels = np.asarray(segmenter.predict(series.image).dataobj)   # on the series' own grid
    write_rtstruct(labels, series, ["background", "parotid_l"], Path("ct.rtstruct.dcm"), model_name="hn-v2")

Radiotherapy planning systems import structure sets, not DICOM SEG. What goes in the file:

- one ROI per foreground class (1..K-1), ROI number = class index, ROI name = class name, generation
  algorithm AUTOMATIC (the model name in ROIGenerationDescription), present in the mask or not;
- per source slice and class, the outlines of the class's pixels as CLOSED_PLANAR contours in
  patient coordinates (LPS, mm), each referencing the source image it lies on (ContourImageSequence);
- the Referenced Frame of Reference Sequence naming the study, the series and every source image
  (RT Referenced Study / Series / Contour Image sequences), which is how planning systems attach
  the structures to the right images;
- the patient and study attributes needed to file it with its patient (name, ID, birth date, sex,
  study UID/date/time/ID, accession number); nothing from the source's equipment, institution,
  operators or physicians (ReferringPhysicianName is present and empty, as type 2 requires).

Contour convention: outlines run along the 0.5 iso-line of the class mask (marching squares,
:func:`skimage.measure.find_contours`), i.e. halfway between a pixel of the class and its
neighbour outside it; collinear points are dropped. Every pixel centre of the class lies inside
its outline and every other pixel centre outside, so rasterising the contours at pixel centres
gives back the mask. Holes are written as further contours nested inside the outer one (and
islands inside holes as contours nested again): a slice's contours of one ROI combine by
exclusive-or (even-odd rule), which is how planning systems read nested CLOSED_PLANAR contours.

Geometry: as for DICOM SEG (:func:`medunet.io.dicom_seg.source_frames`), the labels' grid must be an
exact axis permutation with flips of the source slices; anything else is a GeometryError.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medunet._version import __version__
from medunet.errors import ConfigError, OutputExistsError
from medunet.io.atomic import atomic_path
from medunet.io.dicom_seg import MANUFACTURER, ObjectUids, class_name_map, long_string, source_frames

if TYPE_CHECKING:
    from pydicom import Dataset

    from medunet.io.dicom import DicomSeries

log = logging.getLogger("medunet")

#: RT Structure Set Storage.
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
#: What RT Referenced Study Sequence items conventionally name as the referenced study's SOP class.
STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.2"
#: Patient and study attributes copied from the source so the structure set files with its patient.
PATIENT_STUDY_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
)
#: Type 2 attributes (present, possibly empty) among them.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID", "AccessionNumber")
#: ROI display colours (RGB), cycled by ROI number.
COLORS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
          (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of a 2D boolean mask as (N, 2) arrays of (row, column) pixel coordinates, N >= 3.

    Outer boundaries and hole boundaries alike (see the module docstring for the convention); the
    closing point is not repeated.
    """
    from skimage import measure

    padded = np.pad(np.asarray(mask, dtype=np.uint8), 1)  # outlines touching the border close outside it
    outlines: list[np.ndarray] = []
    for contour in measure.find_contours(padded, 0.5):
        simplified = measure.approximate_polygon(contour, tolerance=1e-6)[:-1] - 1.0  # closed: last point == first
        if len(simplified) >= 3:
            outlines.append(simplified)
    return outlines


def pixel_to_patient(points: np.ndarray, dataset: Dataset) -> np.ndarray:
    """(row, column) pixel coordinates on a source image -> (x, y, z) patient coordinates (LPS, mm)."""
    position = np.asarray([float(v) for v in dataset.ImagePositionPatient], dtype=np.float64)
    orientation = np.asarray([float(v) for v in dataset.ImageOrientationPatient], dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)  # between rows, between columns
    rows, columns = np.asarray(points, dtype=np.float64).T
    return position + np.outer(columns * column_spacing, orientation[:3]) + np.outer(rows * row_spacing, orientation[3:])


def _ds_values(points: np.ndarray) -> list[str]:
    """Coordinates as DS strings (at most 16 characters: 1 µm resolution is plenty for mm)."""
    return [f"{v:.3f}".rstrip("0").rstrip(".") if abs(v) >= 5e-4 else "0" for v in points.ravel()]


def _image_reference(dataset: Dataset) -> Dataset:
    from pydicom import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = dataset.SOPClassUID
    item.ReferencedSOPInstanceUID = dataset.SOPInstanceUID
    return item


def _contour_sequence(frames: np.ndarray, label: int, datasets: Sequence[Dataset]) -> list[Dataset]:
    """The CLOSED_PLANAR contours of class ``label`` on every source slice, numbered from 1."""
    from pydicom import Dataset

    contours: list[Dataset] = []
    for frame, dataset in zip(frames, datasets):
        mask = frame == label
        if not mask.any():
            continue
        for outline in slice_contours(mask):
            item = Dataset()
            item.ContourImageSequence = [_image_reference(dataset)]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(outline)
            item.ContourNumber = len(contours) + 1
            item.ContourData = _ds_values(pixel_to_patient(outline, dataset))
            contours.append(item)
    return contours


def _referenced_frame_of_reference(source: DicomSeries) -> Dataset:
    """Frame of reference -> study -> series -> every source image, as planning systems expect to find them."""
    from pydicom import Dataset

    first = source.datasets[0]
    series = Dataset()
    series.SeriesInstanceUID = source.series_uid
    series.ContourImageSequence = [_image_reference(d) for d in source.datasets]
    study = Dataset()
    study.ReferencedSOPClassUID = STUDY_COMPONENT_MANAGEMENT
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [study]
    return frame


def _header(source: DicomSeries, model_name: str, series_number: int, uids: ObjectUids | None) -> Dataset:
    """File meta, SOP common, patient/study and frame of reference (copied), RT series, equipment, structure set identification."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

    first = source.datasets[0]
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(RT_STRUCTURE_SET_STORAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uids.sop_instance_uid) if uids else generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 192")
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    for keyword in PATIENT_STUDY_ATTRIBUTES:
        if keyword in first:
            setattr(ds, keyword, first[keyword].value)
        elif keyword in _TYPE2:
            setattr(ds, keyword, "")
    ds.ReferringPhysicianName = ""  # type 2: present, empty (who referred is not ours to copy)
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID  # Frame of Reference module: the source's patient coordinates
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = UID(uids.series_instance_uid) if uids else generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = long_string(f"medunet structures ({model_name})")
    ds.OperatorsName = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "medunet"
    ds.SoftwareVersions = __version__
    ds.InstanceNumber = 1
    ds.StructureSetLabel = long_string(model_name)[:16].strip() or "medunet"  # SH: 16 characters
    ds.StructureSetName = long_string(f"medunet {model_name}")
    ds.StructureSetDate, ds.StructureSetTime = date, time
    return ds


def write_rtstruct(
    labels: np.ndarray,
    source: DicomSeries,
    class_names: Mapping[int, str] | Sequence[str],
    output: str | Path,
    *,
    model_name: str,
    overwrite: bool = False,
    series_number: int = 901,
    uids: ObjectUids | None = None,
) -> Path:
    """Write ``labels`` (on ``source.image``'s grid) as an RT Structure Set referencing ``source``, atomically.

    Args:
        labels: integer label array with ``source.image``'s shape; 0 is background.
        source: the series the labels were predicted on (from :func:`medunet.io.dicom.read_series`).
        class_names: names by class index (a list with background first, or a mapping); every
            foreground class becomes one ROI, present in the mask or not.
        output: the ``.dcm`` file to write.
        model_name: recorded in the structure set's label and name and each ROI's generation description.
        overwrite: replace an existing ``output``.
        series_number: SeriesNumber of the new RTSTRUCT series.
        uids: the structure set's Series and SOP Instance UIDs (e.g. from
            :func:`medunet.io.dicom_seg.result_uids`); None draws new random ones.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is False.
        GeometryError: ``labels`` are not on the source series' grid, or hold a value that is not a class.
        ConfigError: ``class_names`` names no foreground class.
    """
    from pydicom import Dataset

    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputExistsError(f"output {output} already exists; pass --overwrite to replace it")
    names = class_name_map(class_names)
    frames = source_frames(labels, source, names, kind="an RT Structure Set")
    foreground = sorted(k for k in names if k != 0)
    if not foreground:
        raise ConfigError(f"no foreground class to write as an ROI (classes {sorted(names)}); class_names must name classes 1..K-1")

    ds = _header(source, model_name, series_number, uids)
    frame_uid = source.datasets[0].FrameOfReferenceUID
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame_of_reference(source)]
    rois, contours, observations = [], [], []
    for number in foreground:
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_uid
        roi.ROIName = long_string(names[number])
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = long_string(f"medunet {model_name} {__version__}")
        rois.append(roi)
        contour = Dataset()
        contour.ROIDisplayColor = list(COLORS[(number - 1) % len(COLORS)])
        sequence = _contour_sequence(frames, number, source.datasets)
        if sequence:  # type 3: an ROI absent from the mask has none
            contour.ContourSequence = sequence
        contour.ReferencedROINumber = number
        contours.append(contour)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = ""  # type 2: a class name does not say ORGAN, PTV, ...
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = rois
    ds.ROIContourSequence = contours
    ds.RTROIObservationsSequence = observations
    with atomic_path(output) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    log.debug("RT Structure Set with %d ROI(s), %d contour(s) -> %s", len(rois),
              sum(len(c.get("ContourSequence", [])) for c in contours), output)
    return output
