"""Write a label mask as a DICOM Segmentation (SEG) object that references its source series.

    series = read_series("scans/ct_series/")
    labels = np.asarray(segmenter.predict(series.image).dataobj)   # on the series' own grid
    write_dicom_seg(labels, series, ["background", "liver"], Path("ct.seg.dcm"), model_name="liver-v3")

What goes in the file (built by highdicom's ``Segmentation``):

- one BINARY segment per foreground class (1..K-1, background is not a segment), numbered as the
  class and labelled with its name; category and type are the generic SNOMED CT code "Tissue"
  (85756007) unless ``property_codes`` says better for a class;
- algorithm identification: name = the model name, version = the medunet version, family
  "Artificial Intelligence"; manufacturer "medunet", software version the medunet version;
- one frame per (slice, segment) pair that has foreground (``omit_empty_frames``), each frame
  referencing the source instance it was derived from (same position, same pixel grid);
- the patient, study and frame-of-reference attributes highdicom copies from the source; nothing
  else from the source headers: the institution, station, operator and device serial number that
  highdicom would copy into the Contributing Equipment Sequence are removed, and
  ReferringPhysicianName (type 2, General Study) is left empty.

Geometry: the labels arrive on the grid of ``source.image`` (RAS world, any voxel order, e.g.
RAS-canonical). Each frame of a SEG is a source slice in DICOM's own order (rows, columns). The
index mapping between the two grids is derived from the affines and must be an exact axis
permutation with flips; anything else (a resampled series, a foreign grid) is a GeometryError,
never a silently misplaced mask.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medunet._version import __version__
from medunet.errors import ConfigError, GeometryError, OutputExistsError
from medunet.io.atomic import atomic_path

if TYPE_CHECKING:
    from pydicom import Dataset
    from pydicom.sr.coding import Code

    from medunet.io.dicom import DicomSeries

log = logging.getLogger("medunet")

#: Manufacturer and model name written into every SEG (General Equipment / Enhanced General Equipment).
MANUFACTURER = "medunet"
#: Largest distance (in voxels) between a source slice and the grid position it should occupy.
POSITION_TOLERANCE = 1e-2
#: Attributes highdicom copies from the source's acquisition equipment that name a site, a person or a device.
_EQUIPMENT_IDENTIFYING = (
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber",
    "OperatorsName", "OperatorIdentificationSequence",
)
#: LPS (DICOM patient coordinates) <-> RAS (NIfTI world): negate x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class ObjectUids:
    """The Series and SOP Instance UIDs of one written DICOM object (SEG or RTSTRUCT)."""

    series_instance_uid: str
    sop_instance_uid: str

    def __post_init__(self) -> None:
        from pydicom.uid import UID

        for name, value in (("series_instance_uid", self.series_instance_uid), ("sop_instance_uid", self.sop_instance_uid)):
            if not UID(value).is_valid:
                raise ConfigError(f"{name} {value!r} is not a valid DICOM UID; derive UIDs with medunet.io.dicom_seg.result_uids")


@dataclass(frozen=True)
class ResultUids:
    """The UIDs of a case's DICOM results, one pair per format: the same UIDs re-create the same objects for a PACS."""

    seg: ObjectUids
    rtstruct: ObjectUids


def result_uids(seed: str) -> ResultUids:
    """Valid UIDs derived from ``seed`` alone (e.g. a job id and model name): the same seed always gives the same UIDs.

    A service that re-creates a result after a crash writes it with the UIDs it wrote the first time,
    so sending it again replaces (or is ignored as) the same instance instead of adding a duplicate.
    """
    from pydicom.uid import generate_uid

    if not seed:
        raise ValueError("result_uids needs a non-empty seed (e.g. the job id)")

    def pair(kind: str) -> ObjectUids:
        return ObjectUids(series_instance_uid=str(generate_uid(entropy_srcs=["medunet", seed, kind, "series"])),
                          sop_instance_uid=str(generate_uid(entropy_srcs=["medunet", seed, kind, "instance"])))

    return ResultUids(seg=pair("seg"), rtstruct=pair("rtstruct"))


def generic_property_codes() -> tuple[Code, Code]:
    """(category, type) used for every segment without a specific code: SNOMED CT 85756007 "Tissue" for both.

    "Tissue" belongs to both context groups a SEG draws from (CID 7150 categories, CID 7151 types)
    and is true of any region a CT/MRI model segments (organ, vessel or lesion); the segment's label
    carries the class name.
    """
    from pydicom.sr.codedict import codes

    return codes.SCT.Tissue, codes.SCT.Tissue


def native_affine(datasets: Sequence[Dataset]) -> np.ndarray:
    """Voxel (column, row, slice index) -> RAS world affine of single-frame slices sorted along their normal.

    Uses the first slice's ImageOrientationPatient/PixelSpacing and the first-to-last
    ImagePositionPatient step; :func:`voxels_to_frames` checks every slice lies where this puts it.
    """
    first = datasets[0]
    orientation = np.asarray([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)  # between rows, between columns
    origin = np.asarray([float(v) for v in first.ImagePositionPatient], dtype=np.float64)
    if len(datasets) > 1:
        last = np.asarray([float(v) for v in datasets[-1].ImagePositionPatient], dtype=np.float64)
        step = (last - origin) / (len(datasets) - 1)
    else:
        normal = np.cross(orientation[:3], orientation[3:])
        step = normal * float(getattr(first, "SliceThickness", None) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * column_spacing  # along a row: increasing column index
    lps[:3, 1] = orientation[3:] * row_spacing  # down a column: increasing row index
    lps[:3, 2] = step
    lps[:3, 3] = origin
    return _LPS_TO_RAS @ lps


def voxels_to_frames(labels: np.ndarray, affine: np.ndarray, datasets: Sequence[Dataset]) -> np.ndarray:
    """Rearrange ``labels`` (on the grid ``affine``) into source-frame order: (slice, row, column).

    Frame ``i`` of the result lies exactly on ``datasets[i]``.

    Raises:
        GeometryError: the two grids are not the same voxels in a different axis order, or a slice
            is not where the series' regular spacing puts it (e.g. the volume was resampled).
    """
    native = native_affine(datasets)
    rows, columns = int(datasets[0].Rows), int(datasets[0].Columns)
    native_shape = (columns, rows, len(datasets))
    for index, dataset in enumerate(datasets):  # every slice where the regular grid puts it
        position = _LPS_TO_RAS[:3, :3] @ np.asarray([float(v) for v in dataset.ImagePositionPatient])
        expected = native[:3, :3] @ np.array([0.0, 0.0, index]) + native[:3, 3]
        if np.linalg.norm(position - expected) > POSITION_TOLERANCE * float(np.linalg.norm(native[:3, 2])):
            raise GeometryError(
                f"source slice {index} is {np.linalg.norm(position - expected):.3f} mm off the series' regular grid; "
                "a DICOM SEG can only be written for labels on the series' own, evenly spaced slices (not a resampled volume)"
            )
    # voxel index on the labels' grid -> voxel index on the native grid; must be a signed permutation
    transform = np.linalg.inv(native) @ np.asarray(affine, dtype=np.float64)
    permutation = np.round(transform[:3, :3])
    offset = np.round(transform[:3, 3])
    if (
        labels.ndim != 3
        or not np.allclose(transform[:3, :3], permutation, atol=POSITION_TOLERANCE)
        or not np.allclose(transform[:3, 3], offset, atol=POSITION_TOLERANCE)
        or sorted(np.abs(permutation).sum(axis=0)) != [1, 1, 1]
        or sorted(np.abs(permutation).sum(axis=1)) != [1, 1, 1]
    ):
        raise GeometryError(
            "labels are not on the source series' voxel grid (their affine is not an axis permutation of the slices'); "
            "give the labels exactly as predicted on the series read by medunet.io.dicom.read_series"
        )
    order = [int(np.flatnonzero(permutation[axis])[0]) for axis in range(3)]  # native axis <- labels axis
    arranged = np.transpose(labels, order)
    for axis in range(3):
        if permutation[axis, order[axis]] < 0:
            arranged = np.flip(arranged, axis=axis)
    expected_offset = [native_shape[a] - 1 if permutation[a, order[a]] < 0 else 0 for a in range(3)]
    if arranged.shape != native_shape or [int(v) for v in offset] != expected_offset:
        raise GeometryError(
            f"labels of shape {labels.shape} do not cover the source series ({len(datasets)} slices of {rows}x{columns}); "
            "give the labels exactly as predicted on the series read by medunet.io.dicom.read_series"
        )
    return np.ascontiguousarray(np.transpose(arranged, (2, 1, 0)))  # (column, row, slice) -> (slice, row, column)


def class_name_map(class_names: Mapping[int, str] | Sequence[str]) -> dict[int, str]:
    """Class names by index, from a list with background first or a mapping."""
    names = dict(class_names) if isinstance(class_names, Mapping) else dict(enumerate(class_names))
    return {int(k): str(v) for k, v in names.items()}


def source_frames(labels: np.ndarray, source: DicomSeries, names: Mapping[int, str], *, kind: str = "a DICOM SEG") -> np.ndarray:
    """``labels`` (on ``source.image``'s grid) checked and rearranged as (slice, row, column) frames of ``source.datasets``.

    Shared by the SEG and RTSTRUCT writers: both describe the mask slice by slice on the source's own images.

    Raises:
        GeometryError: a resampled series, labels of another shape or grid, or a value that is not a class.
    """
    if getattr(source, "resampled", False):
        raise GeometryError(f"the series was resampled onto a regular grid; {kind} needs labels on its original slices")
    labels = np.asarray(labels)
    if labels.shape != tuple(source.image.shape[:3]):
        raise GeometryError(f"labels have shape {labels.shape} but the source series {tuple(source.image.shape[:3])}")
    present = set(np.unique(labels).tolist())
    unknown = sorted(v for v in present if v != 0 and v not in names)
    if unknown or min(present) < 0:
        raise GeometryError(f"labels hold values {unknown or sorted(present)[:1]} that are not classes {sorted(names)}")
    max_class = max((k for k in names if k != 0), default=0)
    return voxels_to_frames(labels.astype(np.uint16 if max_class > 255 else np.uint8), source.image.affine, source.datasets)


def _segment_descriptions(
    names: Mapping[int, str], max_class: int, *, model_name: str, property_codes: Mapping[int, tuple[Code, Code]] | None
) -> list[Any]:
    """One highdicom SegmentDescription per class 1..max_class (a label map needs every number up to its maximum)."""
    import highdicom as hd

    algorithm = _algorithm(model_name)
    generic = generic_property_codes()
    descriptions = []
    for number in range(1, max_class + 1):
        category, kind = (property_codes or {}).get(number, generic)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=long_string(names.get(number, f"class {number}")),
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    if not descriptions:
        raise ConfigError(f"no foreground class to write as a segment (classes {sorted(names)}); class_names must name classes 1..K-1")
    return descriptions


def write_dicom_seg(
    labels: np.ndarray,
    source: DicomSeries,
    class_names: Mapping[int, str] | Sequence[str],
    output: str | Path,
    *,
    model_name: str,
    overwrite: bool = False,
    omit_empty_frames: bool = True,
    property_codes: Mapping[int, tuple[Code, Code]] | None = None,
    series_number: int = 900,
    uids: ObjectUids | None = None,
) -> Path:
    """Write ``labels`` (on ``source.image``'s grid) as a BINARY DICOM SEG referencing ``source``, atomically.

    Args:
        labels: integer label array with ``source.image``'s shape; 0 is background.
        source: the series the labels were predicted on (from :func:`medunet.io.dicom.read_series`).
        class_names: names by class index (a list with background first, or a mapping); every
            foreground class becomes one segment, present in the mask or not.
        output: the ``.dcm`` file to write.
        model_name: recorded as the segments' AlgorithmName (e.g. the run folder's name).
        overwrite: replace an existing ``output``.
        omit_empty_frames: leave out frames with no foreground (smaller files; readers treat
            missing frames as empty). False writes every slice for every segment.
        property_codes: per class, a (category, type) pair of codes replacing the generic
            "Tissue" (see :func:`generic_property_codes`).
        series_number: SeriesNumber of the new SEG series.
        uids: the SEG's Series and SOP Instance UIDs (e.g. from :func:`result_uids`, so a re-created
            result is the same instance); None draws new random ones.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is False.
        GeometryError: ``labels`` are not on the source series' grid, or hold a value that is not a class.
    """
    import highdicom as hd

    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputExistsError(f"output {output} already exists; pass --overwrite to replace it")
    names = class_name_map(class_names)
    frames = source_frames(labels, source, names)
    max_class = max((k for k in names if k != 0), default=0)
    descriptions = _segment_descriptions(names, max_class, model_name=model_name, property_codes=property_codes)
    seg = hd.seg.Segmentation(
        source_images=list(source.datasets),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(uids.series_instance_uid) if uids else hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(uids.sop_instance_uid) if uids else hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="medunet",
        software_versions=__version__,
        device_serial_number="0",
        content_label="SEGMENTATION",
        content_description=long_string(f"medunet {model_name}"),
        series_description=long_string(f"medunet segmentation ({model_name})"),
        omit_empty_frames=omit_empty_frames,
    )
    _drop_identifying(seg)
    with atomic_path(output) as tmp:
        seg.save_as(tmp)
    log.debug("DICOM SEG with %d segment(s), %d frame(s) -> %s", len(descriptions), int(seg.NumberOfFrames), output)
    return output


def long_string(text: str) -> str:
    """``text`` as a valid DICOM LO value: at most 64 characters, no backslash (the value separator) or control characters."""
    cleaned = "".join(" " if ch == "\\" or not ch.isprintable() else ch for ch in str(text))
    return cleaned.strip()[:64]


def _drop_identifying(seg: Dataset) -> None:
    """Remove what highdicom copies beyond the patient/study match: who referred, where and on what it was acquired."""
    seg.ReferringPhysicianName = ""  # type 2 in the General Study module: present, empty
    for item in getattr(seg, "ContributingEquipmentSequence", []):
        for keyword in _EQUIPMENT_IDENTIFYING:
            if keyword in item:
                delattr(item, keyword)


def _algorithm(model_name: str) -> Any:  # a highdicom AlgorithmIdentificationSequence (imported lazily)
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(
        name=long_string(model_name) or "medunet", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
