"""NIfTI reading and writing: owns the array + affine contract.

Reading returns a channel-first ``MetaTensor`` whose affine is the file's full
world (RAS+) affine, exactly as MONAI's ``NibabelReader`` would build it, after
checks that turn bad files into one-line :class:`DataError` messages.

Writing puts a label array on the grid of a reference image: same shape, same
affine, same qform/sform codes, integer dtype, written to a temporary name and
renamed so a crash never leaves a valid-looking half file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import SpaceKeys

from medunet.errors import DataError, GeometryError, OutputExistsError, parse_error
from medunet.io.atomic import atomic_path
from medunet.io.geometry import MAX_VOXELS, SHEAR_TOLERANCE, implausible_grid, shear_of

ImageSource = str | Path | nib.Nifti1Image


#: Deflate never expands data more than about 1032:1, so a .nii.gz declaring more voxel bytes than this times
#: its own size is truncated or lying (and must not make nibabel allocate what the header claims).
MAX_GZIP_RATIO = 1100


def _degenerate(matrix: np.ndarray) -> bool:
    """True when a 4x4 affine is not finite or its 3x3 part is (nearly) singular."""
    with np.errstate(all="ignore"):
        return not np.isfinite(matrix).all() or not abs(np.linalg.det(matrix[:3, :3])) > 1e-12


def _open_nifti(path: Path, *, case: str | None, check_grid: bool) -> nib.Nifti1Image:
    """``nib.load`` plus every header value medunet uses later (shape, dtype, affine, qform, sform, data offset).

    Parsing them all here, inside one handler, is what turns any corrupt header into a DataError naming the file.
    With ``check_grid`` a coded qform or sform must also be usable (finite, non-degenerate): masks copy both.
    """
    try:
        with np.errstate(all="ignore"):
            image = nib.load(str(path))
            if not isinstance(image, nib.Nifti1Image):  # Nifti2Image subclasses Nifti1Image
                raise DataError(f"unsupported image type {type(image).__name__}", case=case, path=str(path))
            header = image.header
            image.shape, image.get_data_dtype(), image.affine  # noqa: B018 - parsed for their errors
            transforms = {"qform": header.get_qform(coded=True), "sform": header.get_sform(coded=True)}
            offset = float(getattr(image.dataobj, "offset", 0))
    except DataError:
        raise
    except Exception as exc:  # nibabel raises many types for corrupt headers; all mean "unreadable"
        raise parse_error("cannot read NIfTI header", exc, case=case, path=str(path)) from exc
    for name, (matrix, code) in transforms.items():
        if check_grid and code and matrix is not None and _degenerate(matrix):
            raise DataError(
                f"header {name} (code {int(code)}) is degenerate (non-finite or zero-size voxel axis); "
                "fix pixdim/quatern/srow in the header or re-convert the image",
                case=case,
                path=str(path),
            )
    if not 0 <= offset < 2**62:
        raise DataError(f"header vox_offset {offset:g} is not a valid byte offset; the file is corrupt", case=case, path=str(path))
    return image


def read_nifti(source: ImageSource, *, case: str | None = None, check_grid: bool = True) -> nib.Nifti1Image:
    """Open a NIfTI file (header only; voxels are read later), with clear errors.

    ``check_grid=False`` lets a degenerate or sheared affine through (``medunet check`` reports it as a finding).
    """
    if isinstance(source, nib.Nifti1Image):
        return source
    path = Path(source)
    if not path.is_file():
        raise DataError("file does not exist", case=case, path=str(path))
    if not path.name.endswith((".nii", ".nii.gz")):
        raise DataError("not a NIfTI file (expected .nii or .nii.gz)", case=case, path=str(path))
    if path.stat().st_size == 0:
        raise DataError("file is empty (0 bytes)", case=case, path=str(path))
    image = _open_nifti(path, case=case, check_grid=check_grid)
    if check_grid and _degenerate(image.affine):
        raise DataError(
            "header affine is degenerate (non-finite or zero-size voxel axis); fix pixdim/qform/sform or re-convert the image",
            case=case,
            path=str(path),
        )
    problem = implausible_grid(image.affine) if check_grid else None
    if problem:
        raise DataError(f"{problem}; fix pixdim/qform/sform or re-convert the image", case=case, path=str(path))
    if check_grid and shear_of(image.affine) > SHEAR_TOLERANCE:
        raise DataError(
            f"has a sheared affine (gantry tilt, skew {shear_of(image.affine):.3g}); medunet only writes masks on "
            "orthogonal grids. Resample the image to an orthogonal grid first",
            case=case,
            path=str(path),
        )
    declared = int(np.prod(image.shape, dtype=np.int64))
    if declared > MAX_VOXELS:
        raise DataError(f"declares {image.shape} voxels, more than medunet accepts", case=case, path=str(path))
    needed = int(getattr(image.dataobj, "offset", 0)) + declared * image.get_data_dtype().itemsize
    size = path.stat().st_size
    if not path.name.endswith(".gz") and size < needed:  # uncompressed: a short file is truncated, known before reading it
        raise DataError(f"file is truncated: {size} bytes, the header declares {needed}", case=case, path=str(path))
    if path.name.endswith(".gz") and needed > MAX_GZIP_RATIO * size:
        raise DataError(
            f"header declares {needed} bytes of voxels, more than a {size}-byte compressed file can hold: "
            "the file is truncated or its header corrupt",
            case=case,
            path=str(path),
        )
    return image


def spatial_shape_3d(shape: Sequence[int], *, case: str | None, path: str | None) -> tuple[int, int, int]:
    """The 3D shape of an image; trailing singleton dimensions are dropped, anything else is refused."""
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 3:
        kind = "2D" if len(dims) < 3 else f"{len(dims)}D"
        raise DataError(
            f"expected a 3D volume, got a {kind} image of shape {tuple(shape)}; "
            "give each channel as its own file in the datalist's image list",
            case=case,
            path=path,
        )
    if min(dims) < 1:
        raise DataError(f"has an empty dimension, shape {tuple(shape)}", case=case, path=path)
    return dims[0], dims[1], dims[2]


def voxel_array(image: nib.Nifti1Image, *, scaled: bool = True, case: str | None, path: str | None) -> np.ndarray:
    """An image's voxels as numpy reads them (scaled by scl_slope/inter unless ``scaled`` is False).

    The one place voxel bytes are parsed: a truncated, corrupt or mistyped data block becomes a DataError.
    """
    try:
        with np.errstate(all="ignore"):
            proxy = image.dataobj
            if not scaled and hasattr(proxy, "get_unscaled"):
                return np.asanyarray(proxy.get_unscaled())
            return np.asarray(proxy, dtype=None)
    except MemoryError:
        raise
    except Exception as exc:  # nibabel/numpy/zlib raise many types for damaged data; all mean "unreadable"
        raise parse_error("cannot read voxel data: the data block is truncated or corrupt", exc, case=case, path=path) from exc


def _check_fits(data: np.ndarray, dtype: np.dtype, *, case: str | None, path: str | None) -> None:
    """Refuse values that ``dtype`` cannot hold (a corrupt scl_slope/scl_inter), instead of a cast to Inf or garbage."""
    if data.size == 0 or not np.issubdtype(data.dtype, np.floating) or np.can_cast(data.dtype, dtype, "safe"):
        return
    limits = np.finfo(dtype) if np.issubdtype(dtype, np.floating) else np.iinfo(dtype)
    low, high = float(data.min()), float(data.max())
    if low < float(limits.min) or high > float(limits.max):
        raise DataError(
            f"voxel values {low:.3g}..{high:.3g} (after scl_slope/scl_inter) do not fit {np.dtype(dtype).name}; "
            "the header's scaling is corrupt",
            case=case,
            path=path,
        )


def read_voxels(image: nib.Nifti1Image, *, case: str | None, path: str | None, dtype: type = np.float32) -> np.ndarray:
    """Read an image's voxels as a 3D array (scaling applied), refusing truncated files, NaN/Inf and overflow."""
    shape = spatial_shape_3d(image.shape, case=case, path=path)
    data = voxel_array(image, case=case, path=path)
    if data.size != int(np.prod(shape)):
        raise DataError(f"holds {data.size} voxels, the header declares shape {shape}", case=case, path=path)
    data = data.reshape(shape)
    if np.issubdtype(data.dtype, np.complexfloating) or data.dtype.fields is not None:
        raise DataError(f"unsupported voxel type {data.dtype} (RGB or complex)", case=case, path=path)
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise DataError(f"contains {bad} NaN/Inf voxels", case=case, path=path)
    _check_fits(data, np.dtype(dtype), case=case, path=path)
    return data.astype(dtype, copy=False)


def to_meta_tensor(channels: Sequence[np.ndarray], affine: np.ndarray, *, source: str) -> MetaTensor:
    """Stack per-channel 3D arrays into a channel-first MetaTensor carrying the world affine."""
    affine_t = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    shape = channels[0].shape
    meta = {
        "original_affine": affine_t.clone(),
        "spatial_shape": np.asarray(shape),
        "space": SpaceKeys.RAS,
        "original_channel_dim": 0 if len(channels) > 1 else float("nan"),
        "filename_or_obj": source,
    }
    array = np.stack([np.ascontiguousarray(c) for c in channels], axis=0)
    return MetaTensor(torch.from_numpy(array), affine=affine_t, meta=meta)


def label_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned dtype holding labels 0..num_classes-1 (uint8 up to 256 classes)."""
    if num_classes <= 256:
        return np.dtype(np.uint8)
    if num_classes <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def output_image(values: np.ndarray, reference: nib.Nifti1Image, *, dtype: np.dtype, what: str) -> nib.Nifti1Image:
    """``values`` on ``reference``'s grid with a copy of its header: the one header rule of every NIfTI medunet writes.

    Same shape, affine, qform/sform and codes as the reference, scaling reset. Masks and float maps both come
    from here, so they cannot drift apart in how they handle geometry.

    Raises:
        GeometryError: ``values`` does not have the reference's 3D shape.
    """
    shape = tuple(int(s) for s in reference.shape[:3])
    if tuple(values.shape) != shape:
        raise GeometryError(f"{what} shape {tuple(values.shape)} differs from the input's {shape}; refusing to write it")
    header = reference.header.copy()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    image = nib.Nifti1Image(values.astype(dtype, copy=False), reference.affine, header)
    # nibabel may rewrite the codes when given an affine: restore the reference's qform/sform exactly. An uncoded
    # transform is not computed (code 0 only): its fields may hold garbage a reader ignores, e.g. an invalid quaternion.
    qform, qform_code = reference.header.get_qform(coded=True)
    sform, sform_code = reference.header.get_sform(coded=True)
    image.set_qform(qform, code=int(qform_code))
    image.set_sform(sform, code=int(sform_code))
    if not np.allclose(image.affine, reference.affine, atol=1e-6):
        raise GeometryError(f"{what} affine would differ from the input's; refusing to write it")  # pragma: no cover
    return image


def mask_image(labels: np.ndarray, reference: nib.Nifti1Image, *, num_classes: int) -> nib.Nifti1Image:
    """A label image on ``reference``'s grid (:func:`output_image`): smallest unsigned dtype, intent "label".

    Raises:
        GeometryError: ``labels`` does not have the reference's 3D shape.
    """
    image = output_image(labels, reference, dtype=label_dtype(num_classes), what="mask")
    image.header["cal_min"] = 0
    image.header["cal_max"] = max(num_classes - 1, 0)
    image.header["descrip"] = b"medunet segmentation"
    image.header.set_intent("label")
    return image


def float_map_image(values: np.ndarray, reference: nib.Nifti1Image, *, description: str) -> nib.Nifti1Image:
    """A float32 map (e.g. per-voxel uncertainty) on ``reference``'s grid (:func:`output_image`).

    Raises:
        GeometryError: ``values`` does not have the reference's 3D shape.
    """
    image = output_image(values, reference, dtype=np.dtype(np.float32), what="map")
    image.header["descrip"] = description.encode()[:79]
    image.header.set_intent("none")
    return image


def write_mask(
    labels: np.ndarray, reference: nib.Nifti1Image, path: str | Path, *, num_classes: int, overwrite: bool = False
) -> Path:
    """Write ``labels`` on ``reference``'s grid to ``path`` atomically.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
        GeometryError: the labels do not fit the reference grid.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {path} already exists; pass --overwrite to replace it")
    image = mask_image(labels, reference, num_classes=num_classes)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path


def write_float_map(
    values: np.ndarray, reference: nib.Nifti1Image, path: str | Path, *, description: str, overwrite: bool = False
) -> Path:
    """Write a float32 map (e.g. per-voxel uncertainty) on ``reference``'s grid to ``path`` atomically.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
        GeometryError: ``values`` does not have the reference's 3D shape.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {path} already exists; pass --overwrite to replace it")
    image = float_map_image(values, reference, description=description)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path
