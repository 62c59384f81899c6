"""`medunet infer`: segment files, folders or a datalist's test list with a trained model."""

from __future__ import annotations

from pathlib import Path

import click

from medunet.cli.app import EXIT_ERROR, EXIT_PARTIAL, cli, log


@cli.command()
@click.option("-m", "--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="A run folder (uses best.pt) or a checkpoint file.")
@click.option("-i", "--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="A .nii/.nii.gz file, a folder of them, or a datalist JSON (its \"test\" list).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for <case>.nii.gz masks and inference_report.json.")
@click.option("--overwrite", is_flag=True, help="Replace existing masks in --out.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override inference/post-processing settings, e.g. --set inference.overlap=0.25.")
@click.option("--tta", is_flag=True, help="Average over mirror flips (8x slower, slightly more accurate).")
@click.option("--preview", is_flag=True, help="Also write <case>_preview.png overlays of each mask.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--allow-outside-root", is_flag=True, help="With a datalist input: accept paths outside its folder.")
@click.pass_context
def infer(ctx: click.Context, model_path: Path, input_path: Path, out_dir: Path, overwrite: bool, overrides: tuple[str, ...],
          tta: bool, preview: bool, device: str, allow_outside_root: bool) -> None:
    """Segment volumes with a trained model; masks land exactly on each input's grid.

    \b
    Examples:
      medunet infer -m runs/liver -i ct_001.nii.gz -o preds/
      medunet infer -m runs/liver/best.pt -i scans/ -o preds/ --preview
      medunet infer -m runs/liver -i dataset.json -o preds/ --tta --overwrite

    A case that fails (unreadable file, bad geometry) is reported and the others go on;
    the exit status is then 3. Nothing half-written is ever left at an output path.
    """
    from medunet.inference.batch import collect_inputs, segment_all
    from medunet.inference.segmenter import Segmenter

    cases = collect_inputs(input_path, allow_outside_root=allow_outside_root)
    extra = list(overrides) + (["inference.tta_flips=true"] if tta else [])
    segmenter = Segmenter.from_checkpoint(model_path, device=device, overrides=extra)
    log.info("%r", segmenter)
    results = segment_all(segmenter, cases, out_dir, overwrite=overwrite, preview=preview, progress=ctx.obj["progress"])
    failed = [r for r in results if r.error]
    click.echo(f"{len(results) - len(failed)} of {len(results)} case(s) segmented into {out_dir}")
    if failed:
        click.echo(f"{len(failed)} failed (see {out_dir / 'inference_report.json'})", err=True)
        ctx.exit(EXIT_ERROR if len(failed) == len(results) else EXIT_PARTIAL)
