"""Synthetic CT/MRI phantoms with known geometry, for the demo, tests and benchmarks.

A phantom is a noisy "body" ellipsoid in air with one or more brighter "organ"
ellipsoids inside; the label marks the organs. Position, size and intensity vary
with the seed, so a network must learn shape and contrast rather than memorise.
The grid (spacing, axis orientation, obliquity, origin) is chosen freely, which is
what the geometry tests need.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

#: Mean intensity of each organ class (HU for CT; arbitrary units for MRI).
CT_ORGAN_HU = (130.0, 210.0, 70.0)
MRI_ORGAN_VALUE = (600.0, 850.0, 450.0)


#: Fake patient identifiers that privacy tests plant in DICOM headers and then search every output for.
CANARY_IDENTIFIERS = {
    "PatientName": "Canary^Zebediah",
    "PatientID": "CANARY-PID-7731",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ACC-CANARY-99",
    "InstitutionName": "Canary General Hospital",
    "ReferringPhysicianName": "Dr^Canaryfield",
}


def grid_affine(
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    axcodes: str = "RAS",
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    oblique_deg: float = 0.0,
) -> np.ndarray:
    """A voxel-to-world (RAS+) affine with the given spacing, axis codes and an optional oblique tilt.

    ``axcodes`` says where each voxel axis points, e.g. "LPS" (DICOM-like) or "PIR" (permuted).
    ``oblique_deg`` rotates the grid about the world's S axis, as an oblique acquisition would.
    """
    ornt = nib.orientations.axcodes2ornt(tuple(axcodes.upper()))
    direction = np.zeros((3, 3))
    for voxel_axis, (world_axis, flip) in enumerate(ornt):
        direction[int(world_axis), voxel_axis] = flip
    angle = np.deg2rad(oblique_deg)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ direction @ np.diag(np.asarray(spacing, dtype=float))
    affine[:3, 3] = origin
    return affine


def _ellipsoid(shape: Sequence[int], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def make_phantom(
    shape: Sequence[int] = (48, 48, 40),
    *,
    seed: int = 0,
    num_classes: int = 2,
    modality: str = "CT",
    noise: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A phantom image (float32) and its label (uint8, values 0..num_classes-1) in voxel space.

    Args:
        shape: volume shape in voxels.
        seed: varies position, size and intensity of body and organs.
        num_classes: classes including background (2 to 4).
        modality: "CT" (HU, air -1000) or "MRI" (positive, background 0, smooth bias field).
        noise: scale of the voxel noise (1.0 is realistic-looking and still easy to learn).
    """
    if not 2 <= num_classes <= 4:
        raise ValueError(f"num_classes must be 2..4, got {num_classes}")
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    size = np.asarray(shape, dtype=float)
    body = _ellipsoid(shape, size / 2 + rng.uniform(-0.03, 0.03, 3) * size, size * rng.uniform(0.40, 0.46, 3))
    label = np.zeros(shape, dtype=np.uint8)
    for k in range(1, num_classes):
        # organs sit in different octants so they rarely overlap
        side = np.array([1 if (k >> b) & 1 else -1 for b in range(3)], dtype=float)
        centre = size / 2 + side * size * rng.uniform(0.08, 0.14, 3)
        radii = size * rng.uniform(0.12, 0.20, 3)
        organ = _ellipsoid(shape, centre, radii) & body & (label == 0)
        label[organ] = k
    if modality.upper() == "CT":
        image = np.full(shape, -1000.0)
        image[body] = rng.uniform(20.0, 50.0)
        for k in range(1, num_classes):
            image[label == k] = CT_ORGAN_HU[k - 1] + rng.uniform(-15.0, 15.0)
        image += ndimage.gaussian_filter(rng.normal(0.0, 25.0 * noise, shape), 0.7)
    else:
        image = np.zeros(shape)
        image[body] = rng.uniform(280.0, 320.0)
        for k in range(1, num_classes):
            image[label == k] = MRI_ORGAN_VALUE[k - 1] * rng.uniform(0.9, 1.1)
        bias = 1.0 + 0.15 * np.sin(np.linspace(0, np.pi, shape[0]))[:, None, None]
        image = image * bias + body * ndimage.gaussian_filter(rng.normal(0.0, 30.0 * noise, shape), 0.7)
        image = np.clip(image, 0.0, None)
    return image.astype(np.float32), label


#: Small-organ task: the small organ is this many HU brighter than the tissue around it, less than the noise.
SMALL_ORGAN_CONTRAST_HU = 20.0
SMALL_ORGAN_NOISE_HU = 30.0


def make_small_organ_phantom(shape: Sequence[int] = (48, 48, 40), *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CT phantom with a large, clear organ (class 1) and a small, low-contrast one (class 2).

    The small organ (radii 6-9 % of the volume, about 0.3 % of its voxels) is only
    :data:`SMALL_ORGAN_CONTRAST_HU` brighter than the tissue around it, while the voxel noise has a
    standard deviation of :data:`SMALL_ORGAN_NOISE_HU`: it cannot be thresholded voxel by voxel, and
    a network finds it late in training, from texture and its place next to the large organ. This is
    the hardest-class case that short time-budgeted runs must still learn (scripts/bench/budget_schedule.py).
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    size = np.asarray(shape, dtype=float)
    body = _ellipsoid(shape, size / 2 + rng.uniform(-0.03, 0.03, 3) * size, size * rng.uniform(0.40, 0.46, 3))
    label = np.zeros(shape, dtype=np.uint8)
    big_centre = size / 2 + np.array([-1.0, -1.0, 0.0]) * size * rng.uniform(0.08, 0.12, 3)
    label[_ellipsoid(shape, big_centre, size * rng.uniform(0.14, 0.20, 3)) & body] = 1
    small_centre = size / 2 + np.array([1.0, 1.0, 0.0]) * size * rng.uniform(0.12, 0.18, 3)
    label[_ellipsoid(shape, small_centre, size * rng.uniform(0.06, 0.09, 3)) & body & (label == 0)] = 2
    tissue = rng.uniform(30.0, 50.0)
    image = np.full(shape, -1000.0)
    image[body] = tissue
    image[label == 1] = CT_ORGAN_HU[0] + rng.uniform(-15.0, 15.0)
    image[label == 2] = tissue + SMALL_ORGAN_CONTRAST_HU
    noise = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), 0.7)
    image += noise * (SMALL_ORGAN_NOISE_HU / noise.std())
    return image.astype(np.float32), label


def as_stored(array: np.ndarray, axcodes: str) -> np.ndarray:
    """A RAS-ordered voxel array as it would lie in a file whose voxel axes point along ``axcodes``."""
    ornt = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(tuple(axcodes.upper()))
    )
    return nib.orientations.apply_orientation(array, ornt)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Save an array with the affine as both qform and sform (as scanners' converters do)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    nib.save(image, str(path))
    return path


def write_dataset(
    out_dir: str | Path,
    *,
    num_train: int = 8,
    num_test: int = 2,
    shape: Sequence[int] = (48, 48, 40),
    spacing: Sequence[float] = (1.5, 1.5, 2.5),
    num_classes: int = 2,
    modality: str = "CT",
    seed: int = 0,
    axcodes: Sequence[str] = ("RAS", "LPS"),
    small_organ: bool = False,
) -> Path:
    """Write a small MSD-style dataset (imagesTr/, labelsTr/, imagesTs/, dataset.json).

    Cases alternate between the orientations in ``axcodes`` so every pipeline run also
    exercises reorientation. With ``small_organ`` the cases are :func:`make_small_organ_phantom`
    (CT, three classes; ``num_classes`` and ``modality`` are ignored). Returns the datalist path.
    """
    out = Path(out_dir)
    if small_organ:
        num_classes, modality = 3, "CT"
    names = ["background", "organ", "small_organ" if small_organ else "vessel", "lesion"][:num_classes]
    datalist: dict[str, Any] = {
        "name": "medunet synthetic phantoms",
        "modality": {"0": modality.upper()},
        "labels": {str(i): n for i, n in enumerate(names)},
        "training": [],
        "test": [],
    }
    for i in range(num_train + num_test):
        if small_organ:
            image, label = make_small_organ_phantom(shape, seed=seed * 1000 + i)
        else:
            image, label = make_phantom(shape, seed=seed * 1000 + i, num_classes=num_classes, modality=modality)
        codes = axcodes[i % len(axcodes)]
        affine = grid_affine(spacing, axcodes=codes, origin=(-30.0 + i, 20.0, -15.0 - 2 * i))
        image, label = as_stored(image, codes), as_stored(label, codes)
        name = f"phantom_{i:03d}.nii.gz"
        if i < num_train:
            save_nifti(image, affine, out / "imagesTr" / name)
            save_nifti(label.astype(np.uint8), affine, out / "labelsTr" / name)
            datalist["training"].append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
        else:
            save_nifti(image, affine, out / "imagesTs" / name)
            save_nifti(label.astype(np.uint8), affine, out / "labelsTs" / name)
            datalist["test"].append({"image": f"imagesTs/{name}", "label": f"labelsTs/{name}"})
    path = out / "dataset.json"
    path.write_text(json.dumps(datalist, indent=2))
    return path


def add_second_sequence(datalist_path: str | Path, *, seed: int = 0) -> Path:
    """Give every training case of an MRI dataset from :func:`write_dataset` a second, T2-like channel.

    The organ (class 1) is darker than the body in it (the first channel has it brighter), with its own
    noise; the datalist's "image" entries become [t1, t2] and its modality T1/T2. Returns the datalist path.
    """
    path = Path(datalist_path)
    spec = json.loads(path.read_text())
    rng = np.random.default_rng(seed)
    for entry in spec["training"]:
        first = path.parent / entry["image"]
        image = nib.nifti1.load(first)
        body = np.asarray(image.dataobj) > 0
        organ = np.asarray(nib.nifti1.load(path.parent / entry["label"]).dataobj) == 1
        t2 = np.clip(body * (250.0 + rng.normal(0.0, 20.0, body.shape)) - organ * 150.0, 0.0, None).astype(np.float32)
        second = first.with_name(first.name.replace(".nii.gz", "_t2.nii.gz"))
        save_nifti(t2, image.affine, second)
        entry["image"] = [entry["image"], second.relative_to(path.parent).as_posix()]
    spec["modality"] = {"0": "T1", "1": "T2"}
    path.write_text(json.dumps(spec, indent=2))
    return path


#: Diagonal that flips between NIfTI's RAS+ world and DICOM's LPS+ patient coordinates (its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) for ``value``."""
    from pydicom.valuerep import format_number_as_ds

    text = format_number_as_ds(float(value))
    return "0" if text in ("-0", "-0.0") else text


def _slice_rescale(values: np.ndarray, rng: np.random.Generator, per_slice: bool) -> tuple[float, float]:
    """(slope, intercept) for one slice: powers of two and integers, so stored * slope + intercept is exact in float."""
    if not per_slice:
        return 1.0, 0.0
    low, high = float(values.min()), float(values.max())
    slope = float(rng.choice([1 / 32, 1 / 16, 1 / 8]))  # fine slopes push stored values past 32767 (uint16 overflow bait)
    while (high - low) / slope > 60000:
        slope *= 2
    intercept = float(np.floor(low)) - float(rng.integers(0, 64))
    return slope, intercept


def _stored_slices(volume: np.ndarray, rng: np.random.Generator, per_slice: bool) -> tuple[list[np.ndarray], list[tuple[float, float]], np.dtype, int]:
    """Each slice as stored (rows, columns), its (slope, intercept), the stored dtype and PixelRepresentation."""
    rescales = [_slice_rescale(volume[:, :, k], rng, per_slice) for k in range(volume.shape[2])]
    stored = [np.rint((volume[:, :, k].T - b) / s) for k, (s, b) in enumerate(rescales)]
    low, high = min(float(a.min()) for a in stored), max(float(a.max()) for a in stored)
    if low >= 0 and high <= 65535:
        return stored, rescales, np.dtype("<u2"), 0
    if low >= -32768 and high <= 32767:
        return stored, rescales, np.dtype("<i2"), 1
    raise ValueError(f"values {low}..{high} do not fit 16 bits; use rescale_per_slice=True")


def _study_tags(ds: Any, *, modality: str, series_description: str, patient_name: str, patient_id: str) -> None:
    """Patient, study and series attributes shared by every slice (dates fixed; patient values as given)."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate, ds.StudyTime = "20240101", "120000"
    ds.SeriesDate, ds.SeriesTime = "20240101", "120500"
    ds.ContentDate, ds.ContentTime = "20240101", "120500"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "medunet synthetic"
    ds.InstitutionName = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "synthetic phantom"
    ds.SeriesDescription = series_description
    ds.Laterality = ""  # type 2C; empty: a phantom has no paired body part
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.PositionReferenceIndicator = ""


def _geometry_tags(ds: Any, lps: np.ndarray, k: int, shape: tuple[int, int]) -> None:
    """Where slice ``k`` of the LPS+ grid ``lps`` lies: position, orientation, spacing, size."""
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    position = lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + lps[:3, 3]
    ds.SliceThickness = _ds(spacing[2])
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
    ds.SliceLocation = _ds(float(np.dot(position, np.cross(row_dir, col_dir))))
    ds.Rows, ds.Columns = shape
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing (between rows), column spacing


def _pixel_tags(ds: Any, stored: np.ndarray, rescale: tuple[float, float], dtype: np.dtype, representation: int, modality: str) -> None:
    """Pixel module and rescale of one slice."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = representation
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    slope, intercept = rescale
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleSlope = _ds(slope)
    ds.RescaleType = "HU" if modality == "CT" else "US"
    ds.PixelData = stored.astype(dtype).tobytes()


def write_dicom_series(
    volume: np.ndarray,
    affine: np.ndarray,
    folder: str | Path,
    *,
    modality: str = "CT",
    series_description: str = "synthetic",
    patient_name: str = "Phantom^Test",
    patient_id: str = "PHANTOM01",
    shuffle_names: bool = True,
    rescale_per_slice: bool = True,
    seed: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> list[Path]:
    """Write a volume as a DICOM series, one CT Image Storage file per slice (explicit VR little endian).

    The geometry is the NIfTI affine converted from RAS+ to DICOM's LPS+: voxel axis 0 runs along
    the columns of each slice (ImageOrientationPatient's row direction), axis 1 along the rows, and
    slice ``k`` sits at ``affine @ (0, 0, k)``. ``volume`` holds real-world values (HU for CT).

    With ``rescale_per_slice`` every slice gets its own RescaleSlope (1/32 .. 1/8, so stored values
    exceed 32767) and RescaleIntercept, stored as uint16 when every value fits, else int16; without it
    slope 1 / intercept 0 and int16. Stored values are rounded, so values read back differ from
    ``volume`` by at most half a slope. ``shuffle_names`` gives random, extension-less file names, so
    nothing may rely on names for slice order. Patient values are parameters so tests can plant canaries.

    Returns:
        The written files, in slice order (index ``k`` holds slice ``k``).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

    volume = np.asarray(volume, dtype=np.float64)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D (X, Y, Z), got shape {volume.shape}")
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    nx, ny, nz = volume.shape
    stored, rescales, dtype, representation = _stored_slices(volume, rng, rescale_per_slice)
    names = [f"{rng.integers(0, 2**48):012x}" for _ in range(nz)] if shuffle_names else [f"slice_{k:04d}.dcm" for k in range(nz)]
    paths = []
    for k in range(nz):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        _study_tags(ds, modality=modality, series_description=series_description, patient_name=patient_name, patient_id=patient_id)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.InstanceNumber = k + 1
        _geometry_tags(ds, lps, k, (ny, nx))
        _pixel_tags(ds, stored[k], rescales[k], dtype, representation, modality)
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


#: Ways :func:`corrupt_phantom` spoils a clean CT phantom, each one a reason a mask should not be trusted.
CORRUPTIONS = ("mri_contrast", "heavy_noise", "half_cut", "hu_offset", "unit_scaled", "constant", "head", "thick_slices")


def make_head_phantom(shape: Sequence[int] = (48, 48, 40), *, seed: int = 0) -> np.ndarray:
    """A head-like CT volume (HU): a bone-dense spherical shell around brain-like tissue, in air, no organs."""
    rng = np.random.default_rng(seed)
    size = np.asarray(shape, dtype=float)
    outer = _ellipsoid(shape, size / 2, size * 0.42)
    inner = _ellipsoid(shape, size / 2, size * 0.42 - 3.0)
    image = np.full(shape, -1000.0)
    image[outer] = 900.0 + rng.uniform(-50.0, 50.0)
    image[inner] = 35.0 + rng.uniform(-5.0, 5.0)
    image += ndimage.gaussian_filter(rng.normal(0.0, 25.0, shape), 0.7)
    return image.astype(np.float32)


def corrupt_phantom(
    kind: str, shape: Sequence[int], spacing: Sequence[float], *, seed: int = 0, num_classes: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """A CT phantom (RAS voxel order) spoilt in one of the :data:`CORRUPTIONS` ways, and the spacing it should be saved with.

    mri_contrast: the same anatomy with MRI-like intensities; heavy_noise: 10x the noise; half_cut: the
    anterior half outside the field of view; hu_offset: HU + 1024 (unsigned storage, no rescale);
    unit_scaled: intensities scaled to [0, 1]; constant: one value everywhere; head: a head-like volume;
    thick_slices: the same voxels declared with 4x thicker slices.
    """
    spacing_mm = np.asarray(spacing, dtype=float)
    if kind == "mri_contrast":
        return make_phantom(shape, seed=seed, num_classes=num_classes, modality="MRI")[0], spacing_mm
    image = make_phantom(shape, seed=seed, num_classes=num_classes)[0]
    if kind == "heavy_noise":
        noise = np.random.default_rng(seed + 1).normal(0.0, 250.0, image.shape)
        return (image + noise).astype(np.float32), spacing_mm
    if kind == "half_cut":
        return np.ascontiguousarray(image[:, image.shape[1] // 2:, :]), spacing_mm
    if kind == "hu_offset":
        return image + 1024.0, spacing_mm
    if kind == "unit_scaled":
        return ((image - image.min()) / (image.max() - image.min())).astype(np.float32), spacing_mm
    if kind == "constant":
        return np.zeros_like(image), spacing_mm
    if kind == "head":
        return make_head_phantom(shape, seed=seed), spacing_mm
    if kind == "thick_slices":
        return image, spacing_mm * np.array([1.0, 1.0, 4.0])
    raise ValueError(f"unknown corruption {kind!r}; one of {', '.join(CORRUPTIONS)}")
