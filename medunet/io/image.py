"""One entry point for "an image": a NIfTI file, a DICOM series folder, or an image already in memory.

Everything that reads a case (training's ``LoadCased``, ``load_volume``, the ``Segmenter``)
goes through :func:`read_image`, so a DICOM folder works wherever a NIfTI path does.
The result is always a ``nibabel.Nifti1Image`` with a RAS+ affine: for DICOM it is the
series' own grid (see :mod:`medunet.io.dicom`), so a mask written on it lies on the DICOM grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import MetaTensor

from medunet.errors import DataError
from medunet.io.dicom import is_dicom_file
from medunet.io.geometry import require_same_grid
from medunet.io.nifti import ImageSource, read_nifti, read_voxels, spatial_shape_3d, to_meta_tensor


@dataclass(frozen=True)
class DicomSource:
    """A DICOM folder with reading options: which series, and whether irregular geometry may be resampled."""

    folder: Path
    series_uid: str | None = None
    allow_resample: bool = False

    def __str__(self) -> str:
        return str(self.folder)


ArrayWithAffine = tuple[np.ndarray, np.ndarray]
Source = str | Path | DicomSource | nib.Nifti1Image


def from_array(array: np.ndarray, affine: np.ndarray, *, case: str | None = None) -> nib.Nifti1Image:
    """An in-memory image from an (X, Y, Z) array and its 4x4 RAS+ affine (qform and sform code 1)."""
    data = np.asarray(array)
    matrix = np.asarray(affine, dtype=np.float64)
    if data.ndim != 3:
        raise DataError(f"expected an (X, Y, Z) array, got shape {data.shape}", case=case, path="<array>")
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise DataError(f"expected a finite, invertible 4x4 affine, got shape {matrix.shape}", case=case, path="<array>")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise DataError(f"unsupported array type {data.dtype}", case=case, path="<array>")
    image = nib.Nifti1Image(data.astype(np.float32, copy=False), matrix)
    image.header.set_qform(matrix, code=1)
    image.header.set_sform(matrix, code=1)
    return image


def read_image(
    source: Source | ArrayWithAffine,
    *,
    case: str | None = None,
    series_uid: str | None = None,
    allow_resample: bool = False,
) -> nib.Nifti1Image:
    """Open an image from a NIfTI path, a DICOM folder, a :class:`DicomSource`, a Nifti1Image or (array, affine).

    NIfTI files are opened lazily (header only); DICOM series are read whole.
    ``series_uid`` and ``allow_resample`` apply to DICOM folders given as plain paths.

    Raises:
        DataError: the source is missing, unreadable, ambiguous (several series) or has unsupported geometry.
    """
    if isinstance(source, nib.Nifti1Image):
        return source
    if isinstance(source, tuple):
        if len(source) != 2:
            raise DataError(f"expected an (array, affine) pair, got a tuple of {len(source)}", case=case, path="<array>")
        return from_array(source[0], source[1], case=case)
    if isinstance(source, DicomSource):
        series_uid, allow_resample, source = source.series_uid, source.allow_resample, source.folder
    if not isinstance(source, (str, Path)):
        raise DataError(
            f"cannot read an image from a {type(source).__name__}; give a path, a DICOM folder, a nibabel image "
            "or an (array, affine) pair",
            case=case,
        )
    path = Path(source)
    if path.is_dir():
        from medunet.io.dicom import read_series

        return read_series(path, series_uid=series_uid, allow_resample=allow_resample, case=case).image
    if path.is_file() and not path.name.endswith((".nii", ".nii.gz")) and is_dicom_file(path):
        raise DataError("is a single DICOM file; give the folder holding the whole series instead", case=case, path=str(path))
    return read_nifti(path, case=case)


def source_name(source: object) -> str:
    """How a source is named in messages and reports (a path, or a placeholder for in-memory data)."""
    if isinstance(source, nib.Nifti1Image):
        return "<in-memory image>"
    if isinstance(source, tuple):
        return "<array>"
    return str(source)


def as_source_list(sources: object) -> list[Any]:
    """One source or a sequence of per-channel sources -> a list (an (array, affine) pair is one source)."""
    if isinstance(sources, tuple) and len(sources) == 2 and isinstance(sources[0], np.ndarray):
        return [sources]
    if isinstance(sources, (list, tuple)):
        return list(sources)
    return [sources]


def load_volume(
    sources: ImageSource | Sequence[ImageSource], *, case: str | None = None, dtype: type = np.float32
) -> tuple[MetaTensor, nib.Nifti1Image]:
    """Read one or more channels of a case into a channel-first MetaTensor.

    Returns:
        The tensor (C, X, Y, Z) and the first channel's NIfTI image, the reference grid for outputs.

    Raises:
        DataError: missing/unreadable/truncated file, not 3D, NaN/Inf voxels, or channels on different grids.
    """
    sources = as_source_list(sources)
    if not sources:
        raise DataError("no image file given", case=case)
    images = [read_image(s, case=case) for s in sources]
    names = [source_name(s) for s in sources]
    reference = images[0]
    ref_shape = spatial_shape_3d(reference.shape, case=case, path=names[0])
    channels = []
    for image, name in zip(images, names):
        shape = spatial_shape_3d(image.shape, case=case, path=name)
        require_same_grid(shape, image.affine, ref_shape, reference.affine,
                          what="channel", against="the first channel's", case=case, path=name, error=DataError)
        channels.append(read_voxels(image, case=case, path=name, dtype=dtype))
    return to_meta_tensor(channels, reference.affine, source=names[0]), reference
