"""Seeded mutators of valid NIfTI files and DICOM series, and a runner that reads each through medunet.

Used by ``tests/test_fuzz_readers.py`` (a few hundred cases) and ``scripts/fuzz.py`` (the long run).
A case is fully determined by its kind and seed: :func:`make_case` writes a small valid synthetic
image, applies the mutations drawn from ``numpy.random.default_rng(seed)`` and returns the path with
a one-line recipe of what was done, so a failure found by the long run is replayed by its seed.

:func:`run_case` reads the case through medunet's own entry points (``read_image`` + ``read_voxels``,
``check_datalist``, and optionally every per-case output of ``medunet infer`` with a ``Segmenter``) and returns the failures: any exception that is not a
:class:`MedunetError`, a ``MedunetError`` whose message is not one line naming the file, a case over the
time limit, or one that needs more memory than :data:`MEMORY_LIMIT` (a header claiming a huge size).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import resource
import shutil
import signal
import struct
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medunet.check import check_datalist
from medunet.errors import MedunetError
from medunet.io.image import read_image
from medunet.io.nifti import read_voxels
from medunet.synthetic import grid_affine, write_dicom_series

#: Extra heap a single case may allocate (bytes) before it counts as a memory blow-up.
MEMORY_LIMIT = 1536 * 2**20

# ---------------------------------------------------------------- NIfTI -----

#: NIfTI-1 header fields the mutator rewrites: name -> (byte offset, struct format, count).
NIFTI_FIELDS: dict[str, tuple[int, str, int]] = {
    "sizeof_hdr": (0, "i", 1),
    "dim": (40, "h", 8),
    "datatype": (70, "h", 1),
    "bitpix": (72, "h", 1),
    "pixdim": (76, "f", 8),
    "vox_offset": (108, "f", 1),
    "scl_slope": (112, "f", 1),
    "scl_inter": (116, "f", 1),
    "qform_code": (252, "h", 1),
    "sform_code": (254, "h", 1),
    "quatern": (256, "f", 3),
    "qoffset": (268, "f", 3),
    "srow_x": (280, "f", 4),
    "srow_y": (296, "f", 4),
    "srow_z": (312, "f", 4),
    "magic": (344, "4s", 1),
}
INT_VALUES = (0, 1, -1, 2, 3, 4, 5, 7, 8, 16, 255, 256, 1000, 32767, -32768)
FLOAT_VALUES = (0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e-30, 1e30, 3.4e38, -3.4e38, 0.5, 352.0)
DATATYPES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 3)


def _nifti_value(rng: np.random.Generator, field: str, fmt: str) -> Any:
    if field == "magic":
        return bytes(rng.choice([b"n+1\0", b"ni1\0", b"n+2\0", b"xxxx", b"\0\0\0\0"]))
    if field == "datatype":
        return int(rng.choice(DATATYPES))
    if fmt in ("h", "i"):
        return int(rng.choice(INT_VALUES)) if rng.random() < 0.8 else int(rng.integers(-32768, 32768))
    return float(rng.choice(FLOAT_VALUES)) if rng.random() < 0.7 else float(rng.normal(0.0, 50.0))


def _set_field(data: bytearray, rng: np.random.Generator) -> str:
    name = str(rng.choice(list(NIFTI_FIELDS)))
    offset, fmt, count = NIFTI_FIELDS[name]
    index = int(rng.integers(count))
    value = _nifti_value(rng, name, fmt)
    size = struct.calcsize("<" + fmt)
    struct.pack_into("<" + fmt, data, offset + index * size, value)
    return f"{name}[{index}]={value!r}"


def _base_nifti(rng: np.random.Generator) -> tuple[bytes, str]:
    shape = tuple(int(s) for s in rng.integers(3, 10, 3))
    if rng.random() < 0.15:
        shape = (*shape, 1)
    dtype = np.dtype(str(rng.choice(["uint8", "int16", "int32", "float32", "float64", "uint16"])))
    values = rng.normal(100.0, 40.0, shape)
    array = np.clip(values, 0, 250).astype(dtype) if dtype.kind in "ui" else values.astype(dtype)
    axcodes = str(rng.choice(["RAS", "LPS", "LAS", "PIR"]))
    affine = grid_affine(tuple(rng.uniform(0.5, 3.0, 3)), axcodes=axcodes, oblique_deg=float(rng.choice([0.0, 0.0, 20.0])))
    image = nib.Nifti1Image(array, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=int(rng.choice([0, 1, 2])))
    if rng.random() < 0.3:
        image.header.set_slope_inter(float(rng.choice([0.5, 2.0])), float(rng.choice([0.0, -10.0])))
    return image.to_bytes(), f"{shape} {dtype} {axcodes}"


def make_nifti(seed: int, folder: Path) -> tuple[Path, str]:
    """A mutated NIfTI file in ``folder`` and the recipe of what was done to it."""
    rng = np.random.default_rng([1, seed])
    raw, base = _base_nifti(rng)
    data = bytearray(raw)
    steps = [f"nifti seed {seed}: {base}"]
    for _ in range(int(rng.integers(0, 4))):
        steps.append(_set_field(data, rng))
    if rng.random() < 0.25:
        flips = int(rng.integers(1, 8))
        limit = 348 if rng.random() < 0.6 else len(data)
        for _ in range(flips):
            data[int(rng.integers(limit))] ^= 1 << int(rng.integers(8))
        steps.append(f"flip {flips} bit(s) in the first {limit} bytes")
    if rng.random() < 0.2:
        cut = int(rng.integers(0, len(data)))
        data = data[:cut]
        steps.append(f"truncate to {cut} bytes")
    if rng.random() < 0.1:
        extra = int(rng.integers(1, 2000))
        data += rng.bytes(extra)
        steps.append(f"append {extra} garbage bytes")
    compressed = rng.random() < 0.4
    if compressed:
        packed = gzip.compress(bytes(data), mtime=0)
        if rng.random() < 0.15:
            cut = int(rng.integers(0, len(packed)))
            packed = packed[:cut]
            steps.append(f"truncate gzip to {cut} bytes")
        path = folder / "image.nii.gz"
        path.write_bytes(packed)
    else:
        path = folder / "image.nii"
        path.write_bytes(bytes(data))
    return path, "; ".join(steps)


# ---------------------------------------------------------------- DICOM -----

#: Tags the mutator removes or rewrites: keyword -> (tag, VR).
DICOM_TAGS: dict[str, tuple[int, str]] = {
    "ImagePositionPatient": (0x00200032, "DS"),
    "ImageOrientationPatient": (0x00200037, "DS"),
    "PixelSpacing": (0x00280030, "DS"),
    "SliceThickness": (0x00180050, "DS"),
    "SpacingBetweenSlices": (0x00180088, "DS"),
    "Rows": (0x00280010, "US"),
    "Columns": (0x00280011, "US"),
    "BitsAllocated": (0x00280100, "US"),
    "BitsStored": (0x00280101, "US"),
    "HighBit": (0x00280102, "US"),
    "PixelRepresentation": (0x00280103, "US"),
    "SamplesPerPixel": (0x00280002, "US"),
    "PhotometricInterpretation": (0x00280004, "CS"),
    "RescaleSlope": (0x00281053, "DS"),
    "RescaleIntercept": (0x00281052, "DS"),
    "NumberOfFrames": (0x00280008, "IS"),
    "SeriesInstanceUID": (0x0020000E, "UI"),
    "SOPInstanceUID": (0x00080018, "UI"),
    "Modality": (0x00080060, "CS"),
    "PixelData": (0x7FE00010, "OW"),
}
DS_VALUES = (
    b"abc", b"", b"NaN", b"nan\\0\\0", b"inf\\1\\1", b"1e999", b"-1e999", b"0", b"-1", b"0\\0", b"1\\2", b"1\\0\\0\\0\\1",
    b"1\\0\\0\\0\\0\\0", b"1\\1\\0\\0\\1\\0", b"1.5.2", b"12,5", b"0\\0\\0\\0\\0\\0", b"1e30\\1e30\\1e30", b"-0.5\\-0.5",
    b"1\\0\\0\\0\\1\\0\\0", b"\xff\xfe", b"  ", b"1\\x\\3",
)
IS_VALUES = (b"abc", b"", b"0", b"-1", b"2", b"100000", b"99999999999999999999", b"1.5", b"NaN")
US_VALUES = (0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 32, 64, 255, 4096, 65535)
TEXT_VALUES = (b"", b"SEG", b"RTSTRUCT", b"MR", b"1.2.3", b"\xff\xfe\x00", b"RGB", b"PALETTE COLOR", b"YBR_FULL", b"MONOCHROME1")


def _dicom_value(rng: np.random.Generator, vr: str) -> bytes:
    if vr == "DS":
        value = bytes(rng.choice(DS_VALUES)) if rng.random() < 0.85 else f"{rng.normal(0, 1e3):.6g}".encode()
    elif vr == "IS":
        value = bytes(rng.choice(IS_VALUES))
    elif vr == "US":
        choice = rng.random()
        if choice < 0.8:
            return struct.pack("<H", int(rng.choice(US_VALUES)))
        return b"\x01" if choice < 0.9 else struct.pack("<HH", 1, 2)
    elif vr == "OW":
        return rng.bytes(int(rng.choice([0, 2, 10, 100, 1000])))
    else:
        value = bytes(rng.choice(TEXT_VALUES))
    return value + b" " if len(value) % 2 else value


def _rewrite_tag(paths: list[Path], rng: np.random.Generator) -> str:
    """Remove or rewrite one tag in one slice or in every slice (raw bytes, so any malformed value gets written)."""
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    name = str(rng.choice(list(DICOM_TAGS)))
    tag, vr = DICOM_TAGS[name]
    remove = rng.random() < 0.3
    value = b"" if remove else _dicom_value(rng, vr)
    targets = paths if rng.random() < 0.5 else [paths[int(rng.integers(len(paths)))]]
    for path in targets:
        try:
            ds = pydicom.dcmread(path, force=True)
            if remove:
                if Tag(tag) in ds:
                    del ds[Tag(tag)]
            else:
                ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
            ds.save_as(path)
        except Exception:  # noqa: BLE001 - an earlier step damaged this file beyond rewriting: leave it so
            continue
    where = "every slice" if len(targets) > 1 else "one slice"
    return f"{name} {'removed' if remove else '= ' + repr(value[:24])} in {where}"


def _file_damage(paths: list[Path], folder: Path, rng: np.random.Generator) -> str:
    """Byte flips, truncation, junk files, duplicated or removed slices."""
    kind = str(rng.choice(["flip", "truncate", "junk", "duplicate", "remove", "empty"]))
    target = paths[int(rng.integers(len(paths)))]
    if kind == "flip":
        data = bytearray(target.read_bytes())
        flips = int(rng.integers(1, 16))
        start = 128 if rng.random() < 0.7 else 0
        end = min(len(data), 1200) if rng.random() < 0.7 else len(data)
        start = start if end > start else 0  # an earlier step truncated this slice
        for _ in range(flips if end > start else 0):
            data[int(rng.integers(start, end))] ^= 1 << int(rng.integers(8))
        target.write_bytes(bytes(data))
        return f"flip {flips} bit(s) in bytes {start}..{end} of a slice"
    if kind == "truncate":
        size = target.stat().st_size
        cut = int(rng.integers(0, size))
        target.write_bytes(target.read_bytes()[:cut])
        return f"truncate a slice to {cut} of {size} bytes"
    if kind == "junk":
        junk = str(rng.choice(["random", "preamble", "text", "dicomdir"]))
        payload = {
            "random": rng.bytes(int(rng.integers(1, 3000))),
            "preamble": bytes(128) + b"DICM" + rng.bytes(int(rng.integers(0, 500))),
            "text": b"exported by a workstation\n",
            "dicomdir": bytes(128) + b"DICM" + rng.bytes(64),
        }[junk]
        (folder / ("DICOMDIR" if junk == "dicomdir" else f"junk_{junk}")).write_bytes(payload)
        return f"junk file ({junk})"
    if kind == "duplicate":
        shutil.copy(target, folder / "copy_of_slice")
        return "a slice duplicated under another name"
    if kind == "remove" and len(paths) > 1:
        target.unlink()
        paths.remove(target)
        return "a slice removed"
    target.write_bytes(b"")
    return "a slice emptied (0 bytes)"


def make_dicom(seed: int, folder: Path) -> tuple[Path, str]:
    """A mutated DICOM series in ``folder`` (a new sub-folder) and the recipe of what was done to it."""
    rng = np.random.default_rng([2, seed])
    shape = tuple(int(s) for s in (rng.integers(4, 9), rng.integers(4, 9), rng.integers(2, 6)))
    axcodes = str(rng.choice(["LPS", "RAS", "LIP"]))
    affine = grid_affine(tuple(rng.uniform(0.5, 3.0, 3)), axcodes=axcodes, oblique_deg=float(rng.choice([0.0, 0.0, 15.0])))
    volume = rng.normal(0.0, 300.0, shape)
    series = folder / "series"
    paths = write_dicom_series(
        volume, affine, series, seed=seed, rescale_per_slice=bool(rng.random() < 0.5), shuffle_names=True
    )
    steps = [f"dicom seed {seed}: {shape} {axcodes}"]
    for _ in range(int(rng.integers(1, 3))):
        if rng.random() < 0.65:
            steps.append(_rewrite_tag(paths, rng))
        else:
            steps.append(_file_damage(paths, series, rng))
    return series, "; ".join(steps)


MAKERS: dict[str, Callable[[int, Path], tuple[Path, str]]] = {"nifti": make_nifti, "dicom": make_dicom}


# ---------------------------------------------------------------- runner ----


@dataclass(frozen=True)
class Failure:
    """One entry point that ended neither in success nor in a well-formed MedunetError."""

    kind: str
    seed: int
    entry: str
    recipe: str
    error: str
    trace: str

    def line(self) -> str:
        """One line for test output and the long run's log."""
        return f"{self.kind} seed {self.seed} [{self.entry}] {self.error} <- {self.recipe}"


class CaseTimeout(Exception):
    """A case ran past its time limit (raised from SIGALRM)."""


@contextlib.contextmanager
def limits(seconds: float, memory: int = MEMORY_LIMIT) -> Iterator[None]:
    """Raise CaseTimeout after ``seconds`` and MemoryError past ``memory`` more bytes of heap (restored after)."""

    def expire(signum: int, frame: object) -> None:
        raise CaseTimeout(f"ran longer than {seconds:g} s")

    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    used = _data_size()
    cap = used + memory if hard == resource.RLIM_INFINITY else min(hard, used + memory)
    previous = signal.signal(signal.SIGALRM, expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)  # an enclosing alarm (e.g. pytest-timeout) is re-armed after
    start = time.monotonic()
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
        if outer > 0:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


def _data_size() -> int:
    """Bytes of this process's data segment (what RLIMIT_DATA limits), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    return 0


def _problem(exc: BaseException, path: Path) -> str | None:
    """Why an exception is a failure, or None when it is a well-formed MedunetError naming ``path``."""
    if isinstance(exc, CaseTimeout):
        return f"hang: {exc}"
    if isinstance(exc, MemoryError):
        return "memory blow-up (MemoryError)"
    if not isinstance(exc, MedunetError):
        return f"untyped {type(exc).__name__}: {str(exc)[:200]}"
    message = str(exc)
    if "\n" in message or not message.strip():
        return f"{type(exc).__name__} message is not one line: {message[:200]!r}"
    if str(path) not in message:
        return f"{type(exc).__name__} message does not name the file: {message[:200]}"
    return None


def _read(path: Path) -> None:
    image = read_image(path)
    read_voxels(image, case=None, path=str(path))


def _check(path: Path) -> None:
    datalist = path.parent / "fuzz_datalist.json"
    datalist.write_text(json.dumps({"training": [], "test": [{"image": path.name}]}))
    report = check_datalist(datalist, workers=1)
    report.format_table()


def run_case(
    kind: str, seed: int, workdir: Path, *, segmenter: Any = None, seconds: float = 10.0
) -> tuple[list[Failure], str]:
    """Make the case ``(kind, seed)`` in an empty ``workdir`` and read it every way; returns (failures, recipe)."""
    path, recipe = MAKERS[kind](seed, workdir)
    entries: dict[str, Callable[[Path], None]] = {"read_image": _read, "check": _check}
    if segmenter is not None:
        entries["segmenter"] = lambda image: segment_every_output(segmenter, image)
    failures = []
    for entry, call in entries.items():
        start = time.perf_counter()
        problem = None
        try:
            with limits(seconds), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                call(path)
            leaked = [w for w in caught if issubclass(w.category, RuntimeWarning)]
            if leaked:
                problem, trace = f"RuntimeWarning leaked: {leaked[0].message}", f"{leaked[0].filename}:{leaked[0].lineno}"
        except BaseException as exc:  # noqa: BLE001 - classifying every exception is the point
            if isinstance(exc, KeyboardInterrupt):
                raise
            problem = _problem(exc, path)
            trace = traceback.format_exc(limit=-6)
        if problem is None and time.perf_counter() - start > seconds:
            problem, trace = f"hang: took {time.perf_counter() - start:.1f} s", ""
        if problem is not None:
            failures.append(Failure(kind, seed, entry, recipe, problem, trace))
    return failures, recipe


def segment_every_output(segmenter: Any, path: Path) -> None:
    """What ``medunet infer --uncertainty-map --stats --preview`` does for one input, through the batch's own stages.

    The stages are called bare (not through :func:`medunet.inference.batch.run_batch`, which turns any exception
    into a case failure), so an untyped error in reading, predicting or writing the mask, the uncertainty map, the
    statistics row or the preview reaches the harness.
    """
    from medunet.inference.batch import BatchOptions, BatchStages, collect_inputs, plan_batch
    from medunet.inference.pipeline import Job
    from medunet.inference.statistics import write_statistics_csv

    out = path.parent / "fuzz_outputs"
    options = BatchOptions(overwrite=True, preview=True, progress=False, stats_csv=out / "stats.csv", overlap_io=False,
                           uncertainty_map=True)
    plan = plan_batch(collect_inputs(path), out, options)
    out.mkdir(exist_ok=True)
    stages = BatchStages(segmenter, plan, options)
    for name, inputs in plan.cases:
        job = Job(name, list(inputs))
        for stage in (stages.prepare, stages.predict, stages.write):
            stage(job)
    assert plan.stats_csv is not None
    write_statistics_csv(stages.stats_rows, plan.stats_csv)


def tiny_segmenter() -> Any:
    """An untrained 1-channel, 2-class network with a tiny patch, for the Segmenter entry point."""
    import torch

    from medunet.config import load_config
    from medunet.inference.segmenter import Segmenter
    from medunet.model.networks import build_network

    config = load_config(
        None,
        overrides=[
            "inference.roi_size=[16,16,16]",
            "inference.sw_batch_size=1",
            "data.target_spacing=[1.5,1.5,1.5]",
            "model.features=[4,8,8]",
            "model.deep_supervision=false",
        ],
    )
    torch.manual_seed(0)
    network = build_network(config.model, in_channels=1, out_channels=2)
    return Segmenter(network, config, class_names=["background", "organ"], in_channels=1, device=torch.device("cpu"))

