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

import nibabel as nib
import numpy as np
from scipy import ndimage

#: Mean intensity of each organ class (HU for CT; arbitrary units for MRI).
CT_ORGAN_HU = (130.0, 210.0, 70.0)
MRI_ORGAN_VALUE = (600.0, 850.0, 450.0)


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
) -> Path:
    """Write a small MSD-style dataset (imagesTr/, labelsTr/, imagesTs/, dataset.json).

    Cases alternate between the orientations in ``axcodes`` so every pipeline run also
    exercises reorientation. Returns the datalist path.
    """
    out = Path(out_dir)
    names = ["background", "organ", "vessel", "lesion"][:num_classes]
    datalist: dict = {
        "name": "medunet synthetic phantoms",
        "modality": {"0": modality.upper()},
        "labels": {str(i): n for i, n in enumerate(names)},
        "training": [],
        "test": [],
    }
    for i in range(num_train + num_test):
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
