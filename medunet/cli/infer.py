"""`medunet infer`: segment files, folders or a datalist's test list with a trained model."""

from __future__ import annotations

from pathlib import Path

import click

from medunet.cli.app import EXIT_ERROR, EXIT_PARTIAL, EXIT_QC_REVIEW, cli, log


@cli.command()
@click.option("-m", "--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="A run folder (uses best.pt), a checkpoint file, a crossval folder (ensemble of its folds), "
                   "or a package folder from `medunet export`.")
@click.option("-i", "--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="A .nii/.nii.gz file, a folder of them, a DICOM series folder (or a folder of such folders), "
                   "or a datalist JSON (its \"test\" list).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for <case>.nii.gz masks and inference_report.json.")
@click.option("--overwrite", is_flag=True, help="Replace existing masks in --out.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override inference/post-processing settings, e.g. --set inference.overlap=0.25.")
@click.option("--folds", "folds", default=None, metavar="0,2",
              help="With a crossval folder: ensemble only these folds (default: all).")
@click.option("--tta", is_flag=True, help="Average over mirror flips (8x slower, slightly more accurate).")
@click.option("--preview", is_flag=True, help="Also write <case>_preview.png overlays of each mask.")
@click.option("--stats", "stats_csv", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a CSV of volume (mL) and mean/std intensity (HU for CT) per case and class.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--engine", type=click.Choice(["auto", "torch", "onnxruntime"]), default=None,
              help="What runs the network (inference.engine): torch, or onnxruntime for a package from `medunet export -f onnx`; "
                   "default auto: onnxruntime for an ONNX package, torch otherwise.")
@click.option("--allow-outside-root", is_flag=True, help="With a datalist input: accept paths outside its folder.")
@click.option("--series", "series_uid", default=None, metavar="UID",
              help="DICOM input: the SeriesInstanceUID to segment when a folder holds several (see `medunet dicom ls`).")
@click.option("--allow-resample", is_flag=True,
              help="DICOM input: interpolate missing/uneven slices and gantry tilt onto a regular grid instead of refusing.")
@click.option("--output-format", "output_formats", default="nifti", show_default=True, callback=lambda _c, _p, v: _formats(v),
              help="nifti (<case>.nii.gz), dicom-seg (<case>.seg.dcm) and/or rtstruct (<case>.rtstruct.dcm, an RT Structure "
                   "Set for radiotherapy planning); the DICOM formats need DICOM input. Combine with commas: nifti,dicom-seg,rtstruct.")
@click.option("--shard", "shard_text", default=None, metavar="K/N",
              help="Segment only share K of N (0-based; cases sorted by name, every N-th from K), for N processes or GPUs "
                   "on one batch. Under torchrun, RANK/WORLD_SIZE choose it. Each share writes inference_report.shard-K-of-N.json (and its own --stats CSV).")
@click.option("--skip-existing", is_flag=True,
              help="Resume: keep cases whose outputs all exist (reported as skipped), do the rest.")
@click.option("--qc-fail", is_flag=True,
              help="Exit with status 4 when quality control flags a case for review (its mask is still written).")
@click.option("--no-qc", is_flag=True, help="Skip per-case quality control (no \"qc\" records, no QC summary).")
@click.option("--uncertainty-map", is_flag=True,
              help="Also write <case>_uncertainty.nii.gz: per-voxel normalised entropy (0 sure .. 1 unsure) on the input grid.")
@click.pass_context
def infer(ctx: click.Context, model_path: Path, input_path: Path, out_dir: Path, overwrite: bool, overrides: tuple[str, ...],
          folds: str | None, tta: bool, preview: bool, stats_csv: Path | None, device: str, engine: str | None, allow_outside_root: bool,
          series_uid: str | None, allow_resample: bool, output_formats: tuple[str, ...], shard_text: str | None,
          skip_existing: bool, qc_fail: bool, no_qc: bool, uncertainty_map: bool) -> None:
    """Segment volumes with a trained model; masks land exactly on each input's grid.

    \b
    Examples:
      medunet infer -m runs/liver -i ct_001.nii.gz -o preds/
      medunet infer -m runs/liver/best.pt -i scans/ -o preds/ --preview
      medunet infer -m runs/liver -i scans/ -o preds/ --stats preds/stats.csv   # volumes and HU per class
      medunet infer -m runs/liver -i dataset.json -o preds/ --tta --overwrite
      medunet infer -m runs/liver -i dicom/ct_series/ -o preds/ --series 1.2.840.99.1   # a DICOM series
      medunet infer -m runs/liver -i dicom/ct_series/ -o preds/ --output-format nifti,dicom-seg   # + DICOM SEG
      medunet infer -m runs/liver -i dicom/ct_series/ -o preds/ --output-format rtstruct   # RT Structure Set
      medunet infer -m runs/liver_cv -i scans/ -o preds/ --folds 0,2   # crossval folder: fold ensemble
      medunet infer -m runs/liver -i scans/ -o preds/ --shard 0/2 --device cuda:0 &   # two GPUs,
      medunet infer -m runs/liver -i scans/ -o preds/ --shard 1/2 --device cuda:1     # half the cases each
      torchrun --nproc-per-node 4 -m medunet infer -m runs/liver -i scans/ -o preds/   # one share per GPU
      medunet infer -m runs/liver -i scans/ -o preds/ --skip-existing   # after an interruption: do the rest
      medunet infer -m export/liver -i scans/ -o preds/   # a package from `medunet export` (ONNX: onnxruntime)

    A case that fails (unreadable file, bad geometry) is reported and the others go on.
    Nothing half-written is ever left at an output path.

    Quality control gives each case a "qc" record in inference_report.json: flag ok or review,
    a score (0..1, higher is more trustworthy) and the reasons (see docs/quality-control.md).

    \b
    Exit status:
      0  every case segmented (and, with --qc-fail, none flagged for review)
      1  every case failed, or the command itself failed (bad model, options or input)
      3  some cases failed, the others were segmented
      4  with --qc-fail: every case segmented, some flagged for review (masks written)
    """
    from medunet.inference.batch import Shard, collect_inputs, qc_summary, qc_summary_line, segment_all
    from medunet.inference.segmenter import Segmenter

    _check_qc_options(qc_fail=qc_fail, no_qc=no_qc, uncertainty_map=uncertainty_map)
    shard = Shard.parse(shard_text) if shard_text is not None else Shard.from_env()
    cases = collect_inputs(input_path, allow_outside_root=allow_outside_root, series_uid=series_uid, allow_resample=allow_resample)
    extra = list(overrides) + (["inference.tta_flips=true"] if tta else []) + ([f"inference.engine={engine}"] if engine else [])
    segmenter = Segmenter.from_checkpoint(model_path, device=_rank_device(device), overrides=extra, folds=_fold_list(folds))
    segmenter.qc_enabled = not no_qc
    log.info("%r%s", segmenter, f", shard {shard.index}/{shard.count}" if shard.count > 1 else "")
    results = segment_all(segmenter, cases, out_dir, overwrite=overwrite, preview=preview, progress=ctx.obj["progress"],
                          stats_csv=stats_csv, output_formats=output_formats, shard=shard, skip_existing=skip_existing,
                          uncertainty_map=uncertainty_map)
    failed = [r for r in results if r.error]
    report = shard.path(out_dir / "inference_report.json")
    click.echo(f"{len(results) - len(failed)} of {len(results)} case(s) segmented into {out_dir}")
    summary = qc_summary(results)
    if not no_qc:
        click.echo(qc_summary_line(summary))
    if failed:
        click.echo(f"{len(failed)} failed (see {report})", err=True)
        ctx.exit(EXIT_ERROR if len(failed) == len(results) else EXIT_PARTIAL)
    if qc_fail and summary["review"]:
        click.echo(f"{summary['review']} case(s) flagged for review by QC (see \"qc\" in {report})", err=True)
        ctx.exit(EXIT_QC_REVIEW)


def _check_qc_options(*, qc_fail: bool, no_qc: bool, uncertainty_map: bool) -> None:
    """Refuse, before any work, QC flags that could not do what they promise (usage errors, exit status 2)."""
    if no_qc and (qc_fail or uncertainty_map):
        raise click.UsageError("--no-qc switches quality control off; it cannot be combined with --qc-fail or --uncertainty-map")


def _rank_device(device: str) -> str:
    """Under torchrun on a GPU machine, ``auto`` means this worker's own GPU (LOCAL_RANK), not every worker on cuda:0."""
    import os

    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    if device != "auto" or local_rank is None or not torch.cuda.is_available():
        return device
    return f"cuda:{int(local_rank) % torch.cuda.device_count()}"


def _fold_list(text: str | None) -> list[int] | None:
    """``"0,2"`` -> [0, 2]."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected fold numbers like 0,2, got {text!r}", param_hint="--folds") from None


def _formats(text: str) -> tuple[str, ...]:
    """``"nifti,rtstruct"`` -> ("nifti", "rtstruct"), checked against the known formats."""
    from medunet.inference.outputs import OUTPUT_FORMATS

    formats = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    if not formats or set(formats) - set(OUTPUT_FORMATS):
        raise click.BadParameter(f"expected one or more of {', '.join(OUTPUT_FORMATS)}, comma-separated, got {text!r}",
                                 param_hint="--output-format")
    return formats
