"""`medunet evaluate`: score predicted masks against a datalist's reference labels."""

from __future__ import annotations

from pathlib import Path

import click

from medunet.cli.app import cli


@cli.command()
@click.option("--pred", "pred_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder of predicted masks named <case>.nii.gz (as medunet infer writes them).")
@click.option("--datalist", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help='Datalist JSON whose cases carry a "label" (the reference) and whose "labels" name the classes.')
@click.option("--split", type=click.Choice(["test", "validation", "training"]), default="test", show_default=True,
              help='Which list of the datalist to score. "test" entries need {"image": ..., "label": ...}.')
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for metrics.csv, summary.json, the report and figures/ (earlier results there are replaced).")
@click.option("--tolerance-mm", type=click.FloatRange(min=0.0), default=2.0, show_default=True,
              help="Tolerance of the normalised surface Dice (NSD), in mm (crossval uses the config's evaluation.nsd_tolerance_mm).")
@click.option("--report", "report_format", type=click.Choice(["html", "md", "none"]), default="html", show_default=True,
              help="report.html (self-contained), report.md (pictures in figures/) or no report.")
@click.option("--worst", "worst_cases", type=click.IntRange(min=0), default=3, show_default=True,
              help="How many of the lowest-Dice cases the report draws as contour pictures.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Cases scored in parallel (threads).")
@click.option("--allow-outside-root", is_flag=True, help="Accept datalist paths that are absolute or leave the datalist's folder.")
@click.pass_context
def evaluate(ctx: click.Context, pred_dir: Path, datalist: Path, split: str, out_dir: Path, tolerance_mm: float,
             report_format: str, worst_cases: int, workers: int, allow_outside_root: bool) -> None:
    """Score predicted masks: Dice, IoU, HD95, ASD, NSD, volumes, sensitivity, precision per case and class.

    \b
    Examples:
      medunet infer -m runs/liver -i dataset.json -o preds/
      medunet evaluate --pred preds/ --datalist dataset.json -o eval/
      medunet evaluate --pred preds/ --datalist dataset.json --split validation -o eval/ --tolerance-mm 1 --report md

    Every prediction must lie on its reference's grid (shape and affine); distances are in mm.
    Empty masks: Dice = IoU = NSD = 1 when prediction and reference are both empty, 0 when only one
    is; HD95/ASD are then n/a and counted, not averaged (see docs/evaluation.md).
    """
    from medunet.errors import DataError
    from medunet.evaluation.evaluate import evaluate as run_evaluation
    from medunet.evaluation.report import format_table
    from medunet.io.datalist import load_datalist

    parsed = load_datalist(datalist, allow_outside_root=allow_outside_root, need_training=False)
    cases = {"test": parsed.test, "validation": parsed.validation, "training": parsed.training}[split]
    if not cases:
        raise DataError(f'the datalist has no "{split}" cases to evaluate; choose another --split', path=str(datalist))
    if not parsed.labels:
        raise DataError('the datalist has no "labels"; add them, e.g. {"0": "background", "1": "liver"}', path=str(datalist))
    result = run_evaluation(pred_dir, cases, parsed.labels, out_dir, nsd_tolerance_mm=tolerance_mm, report=report_format,
                            worst_cases=worst_cases, workers=workers, progress=ctx.obj["progress"])
    names = [parsed.labels[k] for k in sorted(parsed.labels) if k != 0]
    click.echo(format_table(result.summary, names))
    written = ", ".join(p.name for p in (result.metrics_csv, result.summary_json, result.report) if p is not None)
    click.echo(f"{len(cases)} case(s) evaluated (NSD tolerance {tolerance_mm:g} mm); wrote {written} in {out_dir}")
