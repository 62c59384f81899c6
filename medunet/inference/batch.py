"""Segment many inputs into a folder: collect them, name outputs safely, keep going past bad cases."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from medunet import __version__
from medunet.errors import ConfigError, DataError, OutputExistsError
from medunet.inference.pipeline import Job, run_jobs
from medunet.inference.segmenter import CaseResult, Segmenter
from medunet.io.atomic import atomic_write_text
from medunet.io.datalist import NIFTI_SUFFIXES, load_datalist, unique_case_names
from medunet.io.image import DicomSource
from medunet.io.nifti import write_mask

log = logging.getLogger("medunet")

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Process ``index`` of ``count`` (0-based) in a batch split across processes or GPUs.

    Cases are put in a fixed order (sorted by case name) and process K takes those at positions
    i with i % N == K: shares are disjoint, cover every case, and do not depend on the order the
    inputs were listed in. Each shard writes its own report (``inference_report.shard-K-of-N.json``).
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"shard must be K/N with 0 <= K < N, got {self.index}/{self.count}; e.g. --shard 0/2 and --shard 1/2")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"1/4"`` -> Shard(1, 4)."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise ConfigError(f"shard must look like K/N (0-based K, e.g. 0/2), got {text!r}")
        return cls(int(match[1]), int(match[2]))

    @classmethod
    def from_env(cls) -> Shard:
        """The shard of a ``torchrun`` worker (RANK / WORLD_SIZE), or the whole batch outside one."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        return cls(int(os.environ.get("RANK", "0") or 0), world) if world > 1 else cls()

    def select(self, cases: Sequence[tuple[str, T]]) -> list[tuple[str, T]]:
        """This shard's cases, in their given order."""
        if self.count == 1:
            return list(cases)
        order = sorted(range(len(cases)), key=lambda i: cases[i][0])
        mine = {j for position, j in enumerate(order) if position % self.count == self.index}
        return [case for j, case in enumerate(cases) if j in mine]

    def path(self, path: Path) -> Path:
        """``path`` with a ``.shard-K-of-N`` suffix before its extension (unchanged for a single process)."""
        if self.count == 1:
            return path
        return path.with_name(f"{path.stem}.shard-{self.index}-of-{self.count}{path.suffix}")


def collect_inputs(
    source: str | Path, *, allow_outside_root: bool = False, series_uid: str | None = None, allow_resample: bool = False
) -> list[tuple[str, list[Path | DicomSource]]]:
    """(case name, per-channel paths) for a NIfTI file, a folder of them, a DICOM series folder, or a datalist's "test" list.

    A folder holding DICOM files is one case (its series chosen with ``series_uid`` if it holds several);
    a folder of DICOM series folders is one case per subfolder. Names are unique even when files in
    different folders share a name.
    """
    source = Path(source)
    dicom_cases = _dicom_cases(source, series_uid=series_uid, allow_resample=allow_resample)
    if dicom_cases:
        return dicom_cases
    if series_uid is not None:
        raise DataError("--series picks a series in a DICOM folder, but the input is not one (see `medunet dicom ls`)", path=str(source))
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
        if not paths:
            raise DataError("folder holds no .nii or .nii.gz files", path=str(source))
        groups = [[p] for p in paths]
    elif source.suffix == ".json":
        datalist = load_datalist(source, allow_outside_root=allow_outside_root, need_training=False)
        if not datalist.test:
            raise DataError('datalist has no "test" list to segment', path=str(source))
        return [(c.name, list(c.image)) for c in datalist.test]
    elif source.is_file():
        groups = [[source]]
    else:
        raise DataError("input does not exist (give a .nii/.nii.gz file, a folder of them, or a datalist .json)", path=str(source))
    names = unique_case_names([g[0] for g in groups])
    return [(name, [*group]) for name, group in zip(names, groups)]


def _dicom_cases(source: Path, *, series_uid: str | None, allow_resample: bool) -> list[tuple[str, list[Path | DicomSource]]]:
    """Cases for a DICOM series folder (one case) or a folder of them (one per subfolder); [] for anything else."""
    from medunet.io.dicom import is_dicom_folder

    if not source.is_dir() or any(p.is_file() and p.name.endswith(NIFTI_SUFFIXES) for p in source.iterdir()):
        return []
    if is_dicom_folder(source, recursive=False):
        folders = [source]
    else:
        folders = sorted(p for p in source.iterdir() if p.is_dir() and is_dicom_folder(p))
    names = unique_case_names(folders)
    return [(n, [DicomSource(f, series_uid=series_uid, allow_resample=allow_resample)]) for n, f in zip(names, folders)]


def segment_all(
    segmenter: Segmenter,
    cases: Sequence[tuple[str, Sequence[Path | DicomSource]]],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    preview: bool = False,
    progress: bool = True,
    stats_csv: str | Path | None = None,
    output_formats: Sequence[str] = ("nifti",),
    shard: Shard | None = None,
    skip_existing: bool = False,
    overlap_io: bool = True,
) -> list[CaseResult]:
    """Segment every case into ``out_dir/<case>.nii.gz``; a failing case is reported and skipped.

    Writes ``out_dir/inference_report.json`` (versions, model, per-case status and timing) and, with
    ``stats_csv``, volume and intensity per case and class there (:mod:`medunet.inference.statistics`).

    Args:
        shard: segment only this process's share of the cases (see :class:`Shard`); the report (and the
            statistics CSV) then get a ``.shard-K-of-N`` suffix, so parallel processes never write one file.
        skip_existing: resume an interrupted run: cases whose outputs all exist are reported as skipped
            (their statistics are still computed); the leftovers of unfinished cases are replaced.
        overlap_io: read + preprocess the next case and write the previous one in background threads
            while the network runs (:mod:`medunet.inference.pipeline`); False runs the stages in turn.

    Raises:
        OutputExistsError: some outputs exist and neither ``overwrite`` nor ``skip_existing`` is set (checked before any work).
    """
    out_dir = Path(out_dir)
    shard = shard or Shard(0, 1)
    cases = shard.select(cases)
    stats_csv = shard.path(Path(stats_csv)) if stats_csv is not None else None
    targets = {name: out_dir / f"{name}.nii.gz" for name, _ in cases}
    seg_targets = _check_output_formats(output_formats, cases, out_dir, needs_nifti=preview or stats_csv is not None)
    per_case = {name: [*([targets[name]] if "nifti" in output_formats else []), *([seg_targets[name]] if name in seg_targets else []),
                       *([out_dir / f"{name}_preview.png"] if preview else [])] for name, _ in cases}
    finished = {name for name, paths in per_case.items() if skip_existing and all(p.exists() for p in paths)}
    outputs = [p for name, paths in per_case.items() if name not in finished for p in paths if not p.name.endswith(".png")]
    outputs += [Path(stats_csv)] if stats_csv is not None and not skip_existing else []
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not (overwrite or skip_existing):
        raise OutputExistsError(
            f"{len(existing)} output(s) already exist in {out_dir} (e.g. {Path(existing[0]).name}); "
            "pass --overwrite to replace them, or --skip-existing to keep finished cases and do the rest"
        )
    replace = overwrite or skip_existing  # with skip_existing, what exists for an unfinished case is an interrupted run's
    out_dir.mkdir(parents=True, exist_ok=True)
    stats_rows: list[dict[str, Any]] = []

    def prepare(job: Job) -> None:
        if job.name in finished or seg_targets:  # DICOM SEG: read, predict and write together in the predict stage
            return
        job.prepared = segmenter.prepare(job.inputs, case=job.name, timings=job.timings)
        job.reference = job.prepared.reference  # kept for the writer: the pipeline frees `prepared` after the prediction

    def predict(job: Job) -> None:
        if job.name in finished:
            return
        if seg_targets:  # DICOM SEG (and NIfTI) from one prediction
            from medunet.inference.dicom_seg import segment_to_seg

            nifti = targets[job.name] if "nifti" in output_formats else None
            segment_to_seg(segmenter, job.inputs[0], seg_targets[job.name], nifti_output=nifti, overwrite=replace, case=job.name)
        else:
            job.labels = segmenter.labels_for(job.prepared, timings=job.timings)

    def write(job: Job) -> None:
        name, source = job.name, job.inputs[0]
        if job.labels is not None:
            write_mask(job.labels, job.reference, targets[name], num_classes=segmenter.num_classes, overwrite=replace)
            job.labels = job.reference = None  # a DICOM reference holds its voxels: keep memory flat over long batches
        if preview and name not in finished:
            _write_preview(segmenter, name, source, targets[name], out_dir / f"{name}_preview.png")
        if stats_csv is not None:
            from medunet.inference.statistics import case_statistics

            stats_rows.extend(case_statistics(targets[name], source, segmenter.class_names, case=name))
        job.outputs = [str(p) for p in (targets[name] if "nifti" in output_formats else None, seg_targets.get(name)) if p is not None]

    jobs = [Job(name, list(paths)) for name, paths in cases]
    results: list[CaseResult] = []
    timings: dict[str, float] = {}
    status: dict[str, str] = {}
    with tqdm(total=len(jobs), desc="segmenting", unit="case", disable=not progress) as bar:
        for job in run_jobs(jobs, prepare, predict, write, overlap=overlap_io):
            if job.error is not None:
                results.append(CaseResult(job.name, str(job.inputs[0]), None, job.error))
                log.error("error: %s", job.error)
            else:
                results.append(CaseResult(job.name, str(job.inputs[0]), job.outputs[0]))
                log.info("%s -> %s%s", job.name, ", ".join(job.outputs), " (finished before: skipped)" if job.name in finished else "")
            status[job.name] = "failed" if job.error else "skipped" if job.name in finished else "done"
            timings[job.name] = round(job.seconds, 3)
            bar.update()
    report = {
        "medunet_version": __version__,
        "model": segmenter.source,
        "device": str(segmenter.device),
        "classes": segmenter.class_names,
        "shard": {"index": shard.index, "count": shard.count},
        "cases": [{**asdict(r), "status": status[r.case], "seconds": timings[r.case]} for r in results],
    }
    atomic_write_text(shard.path(out_dir / "inference_report.json"), json.dumps(report, indent=2))
    if stats_csv is not None:
        from medunet.inference.statistics import write_statistics_csv

        write_statistics_csv(stats_rows, Path(stats_csv))
    return results


#: Values of ``--output-format`` (comma-separated combinations allowed).
OUTPUT_FORMATS = ("nifti", "dicom-seg")


def _check_output_formats(
    formats: Sequence[str], cases: Sequence[tuple[str, Sequence[Any]]], out_dir: Path, *, needs_nifti: bool
) -> dict[str, Path]:
    """Validate the output formats before any work; the ``<case>.seg.dcm`` targets when DICOM SEG is asked for."""
    from medunet.errors import ConfigError
    from medunet.io.image import DicomSource

    unknown = sorted(set(formats) - set(OUTPUT_FORMATS))
    if unknown or not formats:
        raise ConfigError(f"output format must be one or more of {', '.join(OUTPUT_FORMATS)} (comma-separated), got {list(formats)}")
    if needs_nifti and "nifti" not in formats:
        raise ConfigError("--preview and --stats read the NIfTI mask; use --output-format nifti,dicom-seg")
    if "dicom-seg" not in formats:
        return {}
    from medunet.io.dicom import is_dicom_folder

    for name, paths in cases:
        if not isinstance(paths[0], DicomSource) and not is_dicom_folder(paths[0]):
            raise DataError("a DICOM SEG output needs a DICOM series input (it references the source slices); "
                            "this case is not one: use --output-format nifti", case=name, path=str(paths[0]))
    return {name: out_dir / f"{name}.seg.dcm" for name, _ in cases}


def _write_preview(segmenter: Segmenter, name: str, image_path: Path, mask_path: Path, png: Path) -> None:
    from medunet.visualize import save_overlay_files

    window = segmenter.config.data.window() if segmenter.config.data.normalization == "ct_window" else None
    save_overlay_files(image_path, mask_path, png, title=name, window=window, class_names=segmenter.class_names)
