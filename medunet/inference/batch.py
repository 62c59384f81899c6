"""Segment many inputs into a folder: collect them, name outputs safely, keep going past bad cases."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from medunet import __version__
from medunet.errors import DataError, MedunetError, OutputExistsError
from medunet.inference.segmenter import CaseResult, Segmenter
from medunet.io.atomic import atomic_write_text
from medunet.io.datalist import NIFTI_SUFFIXES, load_datalist, unique_case_names
from medunet.io.image import DicomSource

log = logging.getLogger("medunet")


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
    return list(zip(names, groups))


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
    cases: Sequence[tuple[str, list[Path]]],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    preview: bool = False,
    progress: bool = True,
    stats_csv: str | Path | None = None,
    output_formats: Sequence[str] = ("nifti",),
) -> list[CaseResult]:
    """Segment every case into ``out_dir/<case>.nii.gz``; a failing case is reported and skipped.

    Writes ``out_dir/inference_report.json`` (versions, model, per-case status and timing) and, with
    ``stats_csv``, volume and intensity per case and class there (:mod:`medunet.evaluation.statistics`).

    Raises:
        OutputExistsError: some outputs exist and ``overwrite`` is False (checked before any work).
    """
    out_dir = Path(out_dir)
    targets = {name: out_dir / f"{name}.nii.gz" for name, _ in cases}
    seg_targets = _check_output_formats(output_formats, cases, out_dir, needs_nifti=preview or stats_csv is not None)
    outputs = [*(targets.values() if "nifti" in output_formats else []), *seg_targets.values(),
               *([Path(stats_csv)] if stats_csv is not None else [])]
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"{len(existing)} output(s) already exist in {out_dir} (e.g. {Path(existing[0]).name}); pass --overwrite to replace them"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[CaseResult] = []
    timings: dict[str, float] = {}
    stats_rows: list[dict] = []
    for name, paths in tqdm(cases, desc="segmenting", unit="case", disable=not progress):
        started = time.perf_counter()
        try:
            if seg_targets:  # DICOM SEG (and NIfTI) from one prediction
                from medunet.io.dicom_seg import segment_to_seg

                nifti = targets[name] if "nifti" in output_formats else None
                segment_to_seg(segmenter, paths[0], seg_targets[name], nifti_output=nifti, overwrite=overwrite, case=name)
            else:
                segmenter.predict_file(paths, targets[name], overwrite=overwrite, case=name)
            if preview:
                _write_preview(segmenter, name, paths[0], targets[name], out_dir / f"{name}_preview.png")
            if stats_csv is not None:
                from medunet.evaluation.statistics import case_statistics

                stats_rows.extend(case_statistics(targets[name], paths[0], segmenter.class_names, case=name))
            written = [p for p in (targets[name] if "nifti" in output_formats else None, seg_targets.get(name)) if p is not None]
            results.append(CaseResult(name, str(paths[0]), str(written[0])))
            log.info("%s -> %s", name, ", ".join(map(str, written)))
        except MedunetError as exc:
            results.append(CaseResult(name, str(paths[0]), None, str(exc)))
            log.error("error: %s", exc)
        timings[name] = round(time.perf_counter() - started, 3)
    report = {
        "medunet_version": __version__,
        "model": segmenter.source,
        "device": str(segmenter.device),
        "classes": segmenter.class_names,
        "cases": [{**asdict(r), "seconds": timings[r.case]} for r in results],
    }
    atomic_write_text(out_dir / "inference_report.json", json.dumps(report, indent=2))
    if stats_csv is not None:
        from medunet.evaluation.statistics import write_statistics_csv

        write_statistics_csv(stats_rows, Path(stats_csv))
    return results


#: Values of ``--output-format`` (comma-separated combinations allowed).
OUTPUT_FORMATS = ("nifti", "dicom-seg")


def _check_output_formats(
    formats: Sequence[str], cases: Sequence[tuple[str, list]], out_dir: Path, *, needs_nifti: bool
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
