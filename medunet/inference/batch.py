"""Segment many inputs into a folder: collect them, name outputs safely, keep going past bad cases."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from medunet._version import __version__
from medunet.errors import CaseError, ConfigError, DataError, MedunetError, OutputExistsError, describe_unexpected, unwrap_error
from medunet.inference.outputs import (
    DICOM_OUTPUT_SUFFIXES,
    OUTPUT_FORMATS,
    require_source_slices,
    statistics_rows,
    write_outputs,
    write_preview,
    write_uncertainty,
)
from medunet.inference.pipeline import Job, Stage, run_jobs
from medunet.inference.segmenter import Segmenter
from medunet.inference.stages import SegmentedCase
from medunet.io.atomic import atomic_write_text
from medunet.io.datalist import NIFTI_SUFFIXES, load_datalist, unique_case_names
from medunet.io.image import DicomSource, source_name
from medunet.qc.decide import QCRecord

log = logging.getLogger("medunet")

T = TypeVar("T")

__all__ = ["DICOM_OUTPUT_SUFFIXES", "OUTPUT_FORMATS", "BatchOptions", "BatchStages", "CaseResult", "Shard", "collect_inputs",
           "qc_summary", "qc_summary_line", "segment_all"]


@dataclass(frozen=True)
class CaseResult:
    """Outcome of one case in a batch run."""

    case: str
    input: str
    output: str | None
    error: str | None = None
    qc: QCRecord | None = None
    """The case's quality-control record (:func:`medunet.qc.decide.decide`), when QC ran."""


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


@dataclass(frozen=True)
class BatchOptions:
    """How :func:`segment_all` writes a batch (the ``medunet infer`` flags)."""

    overwrite: bool = False
    """Replace existing outputs."""
    preview: bool = False
    """Also write ``<case>_preview.png`` overlays."""
    progress: bool = True
    """Show a progress bar."""
    stats_csv: Path | None = None
    """Also write volume and intensity per case and class to this CSV (:mod:`medunet.inference.statistics`)."""
    output_formats: tuple[str, ...] = ("nifti",)
    """Values of :data:`OUTPUT_FORMATS`."""
    shard: Shard = Shard(0, 1)
    """This process's share of the cases (see :class:`Shard`)."""
    skip_existing: bool = False
    """Resume an interrupted run: cases whose outputs all exist are reported as skipped."""
    overlap_io: bool = True
    """Read ahead and write behind the network in background threads (:mod:`medunet.inference.pipeline`)."""
    uncertainty_map: bool = False
    """Also write ``<case>_uncertainty.nii.gz``: per-voxel normalised entropy (0..1) on the input grid."""

    @property
    def replace(self) -> bool:
        """Whether existing files may be replaced (with skip_existing, what exists for an unfinished case is an interrupted run's)."""
        return self.overwrite or self.skip_existing


@dataclass(frozen=True)
class BatchPlan:
    """Where every case of this process's share goes, decided (and checked) before any work."""

    out_dir: Path
    cases: list[tuple[str, Sequence[Path | DicomSource]]]
    targets: dict[str, Path]
    """NIfTI mask per case."""
    dicom_targets: dict[str, dict[str, Path]]
    """Per case, the DICOM outputs asked for (SEG, RTSTRUCT) by format."""
    uncertainty_targets: dict[str, Path]
    """Uncertainty map per case, when asked for."""
    finished: set[str]
    """Cases whose outputs all exist (skipped with ``skip_existing``)."""
    stats_csv: Path | None
    report: Path


def plan_batch(cases: Sequence[tuple[str, Sequence[Path | DicomSource]]], out_dir: str | Path, options: BatchOptions) -> BatchPlan:
    """This shard's cases and their outputs; refuses existing outputs unless told to replace or skip them.

    Raises:
        OutputExistsError: some outputs exist and neither ``overwrite`` nor ``skip_existing`` is set.
        ConfigError, DataError: unknown output formats, or DICOM SEG asked for a non-DICOM input.
    """
    out_dir, shard = Path(out_dir), options.shard
    mine = shard.select(cases)
    stats_csv = shard.path(Path(options.stats_csv)) if options.stats_csv is not None else None
    formats = options.output_formats
    targets = {name: out_dir / f"{name}.nii.gz" for name, _ in mine}
    dicom_targets = _check_output_formats(formats, mine, out_dir, needs_nifti=stats_csv is not None and options.skip_existing)
    maps = {name: out_dir / f"{name}_uncertainty.nii.gz" for name, _ in mine} if options.uncertainty_map else {}
    per_case = {name: [*([targets[name]] if "nifti" in formats else []), *dicom_targets.get(name, {}).values(),
                       *([maps[name]] if name in maps else []),
                       *([out_dir / f"{name}_preview.png"] if options.preview else [])] for name, _ in mine}
    finished = {name for name, paths in per_case.items() if options.skip_existing and all(p.exists() for p in paths)}
    outputs = [p for name, paths in per_case.items() if name not in finished for p in paths if not p.name.endswith(".png")]
    outputs += [stats_csv] if stats_csv is not None and not options.skip_existing else []
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not options.replace:
        raise OutputExistsError(
            f"{len(existing)} output(s) already exist in {out_dir} (e.g. {Path(existing[0]).name}); "
            "pass --overwrite to replace them, or --skip-existing to keep finished cases and do the rest"
        )
    return BatchPlan(out_dir, mine, targets, dicom_targets, maps, finished, stats_csv, shard.path(out_dir / "inference_report.json"))


class BatchStages:
    """The three pipeline stages of one batch (:func:`medunet.inference.pipeline.run_jobs`), sharing its plan.

    ``prepare`` reads and preprocesses a case (:mod:`medunet.inference.stages`), ``predict`` runs the network and every
    stage after it (CRF, inversion, post-processing, QC), and ``write`` writes every output asked for (NIfTI, DICOM SEG,
    RTSTRUCT, uncertainty map, preview, statistics) from that one result (:mod:`medunet.inference.outputs`): each
    case gets its QC record whatever the formats, and nothing written is read back.

    Called bare, a stage raises whatever went wrong (the fuzz run drives them so); :func:`run_batch` guards each
    so that an unforeseen exception fails its case only.
    """

    def __init__(self, segmenter: Segmenter, plan: BatchPlan, options: BatchOptions) -> None:
        self.segmenter, self.plan, self.options = segmenter, plan, options
        self.stats_rows: list[dict[str, Any]] = []

    def prepare(self, job: Job) -> None:
        if job.name in self.plan.finished:
            return
        prepared = self.segmenter.prepare(job.inputs, case=job.name, timings=job.timings)
        dicom = self.plan.dicom_targets.get(job.name)
        if dicom:  # a resampled series cannot be referenced: refuse it before the network runs
            require_source_slices(prepared.series, list(dicom), case=job.name)
        elif prepared.series is not None:  # the slices' headers are only needed to reference them
            prepared = dataclasses.replace(prepared, series=None)
        job.prepared = prepared

    def predict(self, job: Job) -> None:
        if job.name in self.plan.finished:
            return
        prediction = self.segmenter.predict_case(job.prepared, timings=job.timings, uncertainty_map=self.options.uncertainty_map)
        job.result, job.qc = self.segmenter.segmented(job.prepared, prediction), prediction.qc

    def write(self, job: Job) -> None:
        plan, options, segmenter = self.plan, self.options, self.segmenter
        name, source = job.name, job.inputs[0]
        targets = self.targets(name)
        result: SegmentedCase | None = job.result
        job.result = None  # a DICOM reference holds its voxels: keep memory flat
        if result is not None:
            write_outputs(result, targets, class_names=segmenter.class_names, model_name=segmenter.model_name, overwrite=options.replace)
            if result.prediction.uncertainty is not None:
                write_uncertainty(result, plan.uncertainty_targets[name], overwrite=options.replace)
            if options.preview:
                window = segmenter.config.data.window() if segmenter.config.data.normalization == "ct_window" else None
                write_preview(result, plan.out_dir / f"{name}_preview.png", title=name, window=window,
                              class_names=segmenter.class_names, image_name=source_name(source))
        if plan.stats_csv is not None:
            if result is not None:
                self.stats_rows.extend(statistics_rows(result, segmenter.class_names, case=name, image_name=source_name(source)))
            else:  # finished in an earlier run: its mask is on disk
                from medunet.inference.statistics import case_statistics

                self.stats_rows.extend(case_statistics(plan.targets[name], source, segmenter.class_names, case=name))
        uncertainty = [plan.uncertainty_targets[name]] if name in plan.uncertainty_targets else []
        job.outputs = [str(p) for p in (*targets.values(), *uncertainty)]

    def targets(self, name: str) -> dict[str, Path]:
        """The mask files of case ``name`` by output format, in the order they are reported (NIfTI first)."""
        nifti = {"nifti": self.plan.targets[name]} if "nifti" in self.options.output_formats else {}
        return {**nifti, **self.plan.dicom_targets.get(name, {})}


def _one_case(stage: Stage, doing: str) -> Stage:
    """``stage``, with any exception that is not a MedunetError turned into that case's :class:`CaseError`.

    A bug or a driver error while one case is read, predicted or written must not stop the others:
    the case is reported failed in one line (case, file, error type and message) and the batch goes on.
    """

    def run(job: Job) -> None:
        try:
            stage(job)
        except MedunetError:
            raise
        except Exception as exc:  # noqa: BLE001 - anything unforeseen fails this case only; KeyboardInterrupt still stops
            ours = unwrap_error(exc)
            if isinstance(ours, MedunetError):
                raise ours from exc
            log.debug("case %s failed while %s", job.name, doing, exc_info=True)  # the traceback, with --debug
            raise CaseError(f"case {job.name!r}, file {job.inputs[0]}: unexpected error while {doing}: {describe_unexpected(exc)}") from exc

    return run


@dataclass
class BatchOutcome:
    """What running a plan gave: one result per case, with its status and seconds."""

    results: list[CaseResult]
    status: dict[str, str]
    seconds: dict[str, float]
    stats_rows: list[dict[str, Any]]


def run_batch(segmenter: Segmenter, plan: BatchPlan, options: BatchOptions) -> BatchOutcome:
    """Segment the plan's cases through the overlapped pipeline; a failing case (any exception) is logged and the others go on."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    stages = BatchStages(segmenter, plan, options)
    jobs = [Job(name, list(paths)) for name, paths in plan.cases]
    outcome = BatchOutcome([], {}, {}, stages.stats_rows)
    with tqdm(total=len(jobs), desc="segmenting", unit="case", disable=not options.progress) as bar:
        guarded: list[Stage] = [_one_case(stages.prepare, "reading it"), _one_case(stages.predict, "predicting it"),
                                               _one_case(stages.write, "writing its outputs")]
        for job in run_jobs(jobs, *guarded, overlap=options.overlap_io):
            skipped = job.name in plan.finished
            if job.error is not None:
                outcome.results.append(CaseResult(job.name, str(job.inputs[0]), None, job.error))
                log.error("error: %s", job.error)
            else:
                outcome.results.append(CaseResult(job.name, str(job.inputs[0]), job.outputs[0], qc=job.qc))
                log.info("%s -> %s%s", job.name, ", ".join(job.outputs), " (finished before: skipped)" if skipped else "")
            outcome.status[job.name] = "failed" if job.error else "skipped" if skipped else "done"
            outcome.seconds[job.name] = round(job.seconds, 3)
            bar.update()
    return outcome


def write_batch_report(segmenter: Segmenter, plan: BatchPlan, options: BatchOptions, outcome: BatchOutcome) -> None:
    """``inference_report.json`` (versions, model, per-case status and timing) and, if asked, the statistics CSV."""
    shard = options.shard
    report = {
        "medunet_version": __version__,
        "model": segmenter.source,
        "device": str(segmenter.device),
        "classes": segmenter.class_names,
        "shard": {"index": shard.index, "count": shard.count},
        "cases": [{**asdict(r), "status": outcome.status[r.case], "seconds": outcome.seconds[r.case]} for r in outcome.results],
        "qc": qc_summary(outcome.results),
        "qc_calibration": segmenter.qc_thresholds.describe() if segmenter.qc_enabled else None,
    }
    atomic_write_text(plan.report, json.dumps(report, indent=2))
    if plan.stats_csv is not None:
        from medunet.inference.statistics import write_statistics_csv

        write_statistics_csv(outcome.stats_rows, plan.stats_csv)


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
    uncertainty_map: bool = False,
) -> list[CaseResult]:
    """Segment every case into ``out_dir/<case>.nii.gz``; a failing case is reported and skipped.

    Plan (outputs chosen and checked before any work), run, report: see :func:`plan_batch`,
    :func:`run_batch`, :func:`write_batch_report`, and :class:`BatchOptions` for the options.
    Writes ``out_dir/inference_report.json`` (versions, model, per-case status, timing and QC record,
    and a QC summary; see docs/quality-control.md) and, with
    ``stats_csv``, volume and intensity per case and class there. With a ``shard`` the report (and the
    statistics CSV) get a ``.shard-K-of-N`` suffix, so parallel processes never write one file.

    Raises:
        OutputExistsError: some outputs exist and neither ``overwrite`` nor ``skip_existing`` is set (checked before any work).
    """
    options = BatchOptions(
        overwrite=overwrite, preview=preview, progress=progress, stats_csv=Path(stats_csv) if stats_csv is not None else None,
        output_formats=tuple(output_formats), shard=shard or Shard(0, 1), skip_existing=skip_existing, overlap_io=overlap_io,
        uncertainty_map=uncertainty_map,
    )
    plan = plan_batch(cases, out_dir, options)
    outcome = run_batch(segmenter, plan, options)
    write_batch_report(segmenter, plan, options, outcome)
    return outcome.results


def qc_summary(results: Sequence[CaseResult]) -> dict[str, Any]:
    """How many cases QC passed and flagged, and the checks that flagged them (counts per check)."""
    records = [r.qc for r in results if r.qc is not None]
    review = [q for q in records if q.review]
    why: dict[str, int] = {}
    for record in review:
        for check in record.fired or ["low_confidence"]:
            why[check] = why.get(check, 0) + 1
    return {"ok": len(records) - len(review), "review": len(review), "without_qc": len(results) - len(records),
            "review_reasons": dict(sorted(why.items(), key=lambda kv: (-kv[1], kv[0])))}


def qc_summary_line(summary: dict[str, Any]) -> str:
    """One line for the end of a batch, e.g. ``QC: 18 ok, 2 to review (noise 1, field_of_view 1)``."""
    why = ", ".join(f"{check} {count}" for check, count in summary["review_reasons"].items())
    skipped = f", {summary['without_qc']} without QC" if summary["without_qc"] else ""
    return f"QC: {summary['ok']} ok, {summary['review']} to review{f' ({why})' if why else ''}{skipped}"


def _check_output_formats(
    formats: Sequence[str], cases: Sequence[tuple[str, Sequence[Any]]], out_dir: Path, *, needs_nifti: bool
) -> dict[str, dict[str, Path]]:
    """Validate the output formats before any work; per case, the DICOM targets by format (``<case>.seg.dcm``, ``<case>.rtstruct.dcm``)."""
    from medunet.errors import ConfigError
    from medunet.io.image import DicomSource

    unknown = sorted(set(formats) - set(OUTPUT_FORMATS))
    if unknown or not formats:
        raise ConfigError(f"output format must be one or more of {', '.join(OUTPUT_FORMATS)} (comma-separated), got {list(formats)}")
    if needs_nifti and "nifti" not in formats:  # previews and statistics of new cases come from memory, whatever the formats
        raise ConfigError("--stats with --skip-existing reads the NIfTI masks of the finished cases; "
                          "add nifti to --output-format (e.g. nifti,dicom-seg)")
    dicom_formats = [f for f in formats if f in DICOM_OUTPUT_SUFFIXES]
    if not dicom_formats:
        return {}
    from medunet.io.dicom import is_dicom_folder

    for name, paths in cases:
        if not isinstance(paths[0], DicomSource) and not is_dicom_folder(paths[0]):
            raise DataError(f"a {' / '.join(dicom_formats)} output needs a DICOM series input (it references the source slices); "
                            "this case is not one: use --output-format nifti", case=name, path=str(paths[0]))
    return {name: {f: out_dir / f"{name}{DICOM_OUTPUT_SUFFIXES[f]}" for f in dicom_formats} for name, _ in cases}
