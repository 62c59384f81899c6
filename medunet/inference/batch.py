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

log = logging.getLogger("medunet")


def collect_inputs(source: str | Path, *, allow_outside_root: bool = False) -> list[tuple[str, list[Path]]]:
    """(case name, per-channel paths) for a NIfTI file, a folder of them, or a datalist's "test" list.

    Names are unique even when files in different folders share a name.
    """
    source = Path(source)
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


def segment_all(
    segmenter: Segmenter,
    cases: Sequence[tuple[str, list[Path]]],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    preview: bool = False,
    progress: bool = True,
) -> list[CaseResult]:
    """Segment every case into ``out_dir/<case>.nii.gz``; a failing case is reported and skipped.

    Writes ``out_dir/inference_report.json`` (versions, model, per-case status and timing).

    Raises:
        OutputExistsError: some outputs exist and ``overwrite`` is False (checked before any work).
    """
    out_dir = Path(out_dir)
    targets = {name: out_dir / f"{name}.nii.gz" for name, _ in cases}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"{len(existing)} output(s) already exist in {out_dir} (e.g. {Path(existing[0]).name}); pass --overwrite to replace them"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[CaseResult] = []
    timings: dict[str, float] = {}
    for name, paths in tqdm(cases, desc="segmenting", unit="case", disable=not progress):
        started = time.perf_counter()
        try:
            segmenter.predict_file(paths, targets[name], overwrite=overwrite, case=name)
            if preview:
                _write_preview(segmenter, name, paths[0], targets[name], out_dir / f"{name}_preview.png")
            results.append(CaseResult(name, str(paths[0]), str(targets[name])))
            log.info("%s -> %s", name, targets[name])
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
    return results


def _write_preview(segmenter: Segmenter, name: str, image_path: Path, mask_path: Path, png: Path) -> None:
    from medunet.visualize import save_overlay_files

    window = segmenter.config.data.window() if segmenter.config.data.normalization == "ct_window" else None
    save_overlay_files(image_path, mask_path, png, title=name, window=window, class_names=segmenter.class_names)
