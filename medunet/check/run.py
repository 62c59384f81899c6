"""Check a whole datalist: every file in parallel, then each case's files against each other, then across cases."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from medunet.check.findings import CaseSummary, CheckReport, FileSummary, Finding
from medunet.check.inspect import FileTask, inspect_file, modality_kind
from medunet.io.datalist import Case, Datalist, DatalistSource, datalist_file, load_datalist
from medunet.io.geometry import AFFINE_TOLERANCE, describe_affine, same_grid, spacing_of

Section = Literal["training", "validation", "test"]

#: Threads by default: gzip inflation, hashing and NumPy reductions release the GIL, and threads avoid
#: starting processes in a parent that has torch loaded (measured in docs/check.md).
DEFAULT_EXECUTOR: Literal["thread", "process"] = "thread"


def default_workers() -> int:
    """One worker per CPU core, at most 8 (reading is I/O- and zlib-bound beyond that)."""
    return max(1, min(8, os.cpu_count() or 1))


def check_datalist(
    path: DatalistSource,
    *,
    workers: int | None = None,
    allow_outside_root: bool = False,
    labels: Mapping[int, str] | None = None,
    progress: bool = False,
    executor: Literal["thread", "process"] = DEFAULT_EXECUTOR,
) -> CheckReport:
    """Check every case of a datalist and report all problems at once.

    Args:
        path: the datalist JSON (MSD/MONAI format), or a :class:`Datalist` already read from it.
        workers: files inspected in parallel (default: one per CPU core, at most 8).
        allow_outside_root: accept absolute paths and paths leaving the datalist's folder.
        labels: class names to check label values against when the datalist has no "labels"
            (e.g. a config's ``data.labels``).
        progress: show a progress bar.
        executor: "thread" or "process" pool.

    Returns:
        The report; ``report.ok`` is False when any finding is an error.

    Raises:
        DataError: the datalist itself cannot be parsed (not JSON, malformed entries, paths outside its folder).
    """
    start = time.perf_counter()
    datalist = load_datalist(path, allow_outside_root=allow_outside_root, need_training=False, require_files=False)
    path = datalist_file(path)
    class_names = dict(datalist.labels or labels or {}) or None
    num_classes = len(class_names) if class_names else None
    channels = _declared_channels(datalist.raw)
    root = datalist.root

    plan = _plan(datalist, channels, num_classes)
    tasks = list(dict.fromkeys(t for _, _, images, label in plan for t in [*images, label] if t is not None))
    summaries = _inspect_all(tasks, workers=workers or default_workers(), executor=executor, progress=progress)

    cases_out: list[CaseSummary] = []
    for section, case, images, label in plan:
        summary = CaseSummary(
            name=case.name,
            section=section,
            images=[summaries[t] for t in images],
            label=summaries[label] if label is not None else None,
        )
        files = [*summary.images, *([summary.label] if summary.label else [])]
        summary.findings = [replace(f, case=case.name) for file in files for f in file.problems]
        summary.findings += _case_findings(summary, channels)
        cases_out.append(summary)

    _cross_case_findings(cases_out, plan, channels, root)
    dataset_findings: list[Finding] = []
    if num_classes is None and any(c.label is not None for c in cases_out):
        dataset_findings.append(Finding(
            "warning", "no_labels_declared",
            'the datalist has no "labels": label values are only checked to be non-negative integers; '
            'add "labels": {"0": "background", "1": ...}',
            path=str(path),
        ))
    if not datalist.training:
        dataset_findings.append(Finding(
            "warning", "no_training_cases", 'the "training" list is empty: fine for inference, not for training',
            path=str(path),
        ))
    findings = [f for c in cases_out for f in c.findings] + dataset_findings
    return CheckReport(
        datalist=path, cases=cases_out, findings=findings, labels=class_names, channels=channels,
        seconds=time.perf_counter() - start,
    )


PlannedCase = tuple[Section, Case, list[FileTask], FileTask | None]


def _plan(datalist: Datalist, channels: list[str] | None, num_classes: int | None) -> list[PlannedCase]:
    """Each case with the files to inspect: image channels (with their modality) and, outside "test", the label."""
    root = datalist.root
    plan: list[PlannedCase] = []
    sections: list[tuple[Section, list[Case]]] = [
        ("training", datalist.training), ("validation", datalist.validation), ("test", datalist.test)
    ]
    for section, cases in sections:
        for case in cases:
            images = [
                FileTask(p, _shown(p, root), "image", modality_kind(_channel_name(channels, i, len(case.image))))
                for i, p in enumerate(case.image)
            ]
            label = None
            if section != "test" and case.label is not None:  # test labels are optional and not checked
                label = FileTask(case.label, _shown(case.label, root), "label", num_classes=num_classes)
            plan.append((section, case, images, label))
    return plan


def _declared_channels(decoded: dict[str, Any]) -> list[str] | None:
    """The datalist's "modality" as one name per channel ({"0": "T1", "1": "FLAIR"} -> ["T1", "FLAIR"])."""
    raw = decoded.get("modality")  # the JSON load_datalist has decoded
    if isinstance(raw, dict) and raw:
        keys = sorted(raw, key=lambda k: (0, int(k)) if str(k).isdigit() else (1, str(k)))
        return [str(raw[k]) for k in keys]
    if isinstance(raw, str) and raw:
        return [raw]
    return None


def _channel_name(channels: list[str] | None, index: int, count: int) -> str | None:
    if channels is None:
        return None
    if index < len(channels):
        return channels[index]
    return channels[0] if len(channels) == 1 and count == 1 else None


def _shown(path: Path, root: Path) -> str:
    """The path as the datalist gives it (relative to its folder) where possible."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _inspect_all(
    tasks: Sequence[FileTask], *, workers: int, executor: Literal["thread", "process"], progress: bool
) -> dict[FileTask, FileSummary]:
    bar = tqdm(total=len(tasks), desc="checking", unit="file", disable=not progress)
    results: dict[FileTask, FileSummary] = {}
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                results[task] = inspect_file(task)
                bar.update()
            return results
        pool: Executor = (ThreadPoolExecutor if executor == "thread" else ProcessPoolExecutor)(max_workers=workers)
        with pool:
            futures = {pool.submit(inspect_file, task): task for task in tasks}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    finally:
        bar.close()
    return results


def _case_findings(case: CaseSummary, channels: list[str] | None) -> list[Finding]:
    """Within one case: channel count, channels on one grid, label on the image's grid."""
    found: list[Finding] = []
    first = case.images[0]
    if channels is not None and len(case.images) != len(channels):
        found.append(Finding(
            "error", "channel_count",
            f"has {len(case.images)} image channel(s), the datalist's \"modality\" declares {len(channels)} "
            f"({', '.join(channels)}); list one file per channel in \"image\", or fix \"modality\"",
            case=case.name, path=first.path,
        ))
    for i, channel in enumerate(case.images[1:], start=1):
        found += _grid_findings(channel, first, what=f"channel {i}", code="channel", case=case.name)
    if case.label is not None:
        found += _grid_findings(case.label, first, what="label", code="label", case=case.name)
    return found


def _grid_findings(other: FileSummary, image: FileSummary, *, what: str, code: str, case: str) -> list[Finding]:
    """Errors naming both values for each part of the grid (shape, spacing, origin, direction) that differs."""
    if other.shape3d is None or image.shape3d is None or other.affine is None or image.affine is None:
        return []  # a header problem was reported already
    if not all(np.isfinite(x).all() and (spacing_of(x) > 0).all() for x in (other.affine, image.affine)):
        return []  # a broken affine (invalid_spacing) was reported already; comparing it says nothing more
    fix = (
        f"resample the {what} onto the image's grid, or, if only its header is wrong, copy the image's affine into it "
        "(after checking the overlay)"
    )
    found: list[Finding] = []

    def add(part: str, message: str) -> None:
        found.append(Finding("error", f"{code}_{part}_mismatch", f"{message}; {fix}", case=case, path=other.path))

    if other.shape3d != image.shape3d:
        add("shape", f"{what} grid differs from the image's: shape {other.shape3d} vs {image.shape3d}")
    a, b = other.affine, image.affine
    if same_grid(a, b):
        return found
    shape_findings = len(found)
    tol = AFFINE_TOLERANCE * max(float(np.nanmax(spacing_of(b))), 1e-6)
    sa, sb = spacing_of(a), spacing_of(b)
    if not np.allclose(sa, sb, rtol=0.0, atol=tol):
        add("spacing", f"{what} grid differs from the image's: spacing {_vec(sa)} vs {_vec(sb)} mm")
    oa, ob = a[:3, 3], b[:3, 3]
    if not np.allclose(oa, ob, rtol=0.0, atol=tol):
        add("origin", f"{what} grid differs from the image's: origin {_vec(oa)} vs {_vec(ob)} mm "
                      f"({float(np.linalg.norm(oa - ob)):.4g} mm apart)")
    da, db = a[:3, :3] / np.maximum(sa, 1e-12), b[:3, :3] / np.maximum(sb, 1e-12)
    if not np.allclose(da, db, rtol=0.0, atol=AFFINE_TOLERANCE):
        add("direction", f"{what} grid differs from the image's: axes {_directions(da)} vs {_directions(db)}")
    if len(found) == shape_findings:  # the affines differ, but no single part beyond the tolerance shows how
        add("grid", f"{what} grid differs from the image's: {describe_affine(a)} vs {describe_affine(b)}")
    return found


def _vec(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _directions(direction: np.ndarray) -> str:
    """Axis codes (e.g. RAS) and, for oblique grids, the direction cosines."""
    import nibabel as nib

    affine = np.eye(4)
    affine[:3, :3] = direction
    codes = "".join(c or "?" for c in nib.aff2axcodes(affine)) if np.isfinite(direction).all() else "???"
    if np.allclose(np.abs(direction), np.round(np.abs(direction)), atol=AFFINE_TOLERANCE):
        return codes
    return f"{codes} {np.array2string(direction, precision=3, separator=',').replace(chr(10), '')}"


def _cross_case_findings(
    cases: list[CaseSummary], plan: Sequence[PlannedCase], channels: list[str] | None, root: Path
) -> None:
    """Across cases: channel counts agree, no file listed twice, no two cases with the same image voxels.

    Each finding is added to the later case involved (naming the earlier one), so its status shows it.
    """
    if channels is None:
        counts = [len(c.images) for c in cases]
        usual = max(set(counts), key=counts.count) if counts else 0
        for case in cases:
            if len(case.images) != usual:
                case.findings.append(Finding(
                    "error", "channel_count",
                    f"has {len(case.images)} image channel(s), most cases have {usual}; every case needs the same "
                    "channels in the same order (declare them in the datalist's \"modality\")",
                    case=case.name, path=case.images[0].path,
                ))
    seen_files: dict[Path, tuple[str, str]] = {}
    same_file_pairs: set[tuple[str, str]] = set()
    for case, (section, entry, _, _) in zip(cases, plan):
        files = [*entry.image, *([entry.label] if entry.label is not None and section != "test" else [])]
        for file in dict.fromkeys(p.resolve() for p in files):
            if file in seen_files:
                first, first_section = seen_files[file]
                same_file_pairs.add((first, case.name))
                case.findings.append(Finding(
                    "warning", "file_listed_twice",
                    f"this file is also listed for case {first!r} ({first_section}); each case should have its own "
                    "files (a training file that is also validated or tested on inflates the scores)",
                    case=case.name, path=_shown(file, root.resolve()),
                ))
            else:
                seen_files[file] = (case.name, section)
    seen_images: dict[tuple[str, ...], CaseSummary] = {}
    for case in cases:
        digests = tuple(f.digest for f in case.images)
        if not digests or any(d is None for d in digests):
            continue
        key = tuple(d for d in digests if d is not None)
        original = seen_images.setdefault(key, case)
        if original is not case and (original.name, case.name) not in same_file_pairs:
            case.findings.append(Finding(
                "warning", "duplicate_image",
                f"image voxels are identical to case {original.name!r} ({original.images[0].path}); remove the copy, "
                "or keep both in one list so validation never scores a training image",
                case=case.name, path=case.images[0].path,
            ))
