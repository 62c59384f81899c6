"""`medunet plan`: fingerprint a dataset and write a commented, editable config planned from it."""

from __future__ import annotations

from pathlib import Path

import click

from medunet.cli.app import cli


@cli.command()
@click.argument("datalist", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The plan (YAML config) to write; the fingerprint goes beside it as <name>.fingerprint.json.")
@click.option("--gpu-memory", "gpu_memory", type=float, default=None, metavar="GB",
              help="GPU memory budget for a training step (default: the visible GPU's memory, else 8).")
@click.option("--modality", type=click.Choice(["CT", "MRI"], case_sensitive=False), default=None,
              help="CT or MRI (default: from the datalist's \"modality\").")
@click.option("--workers", type=int, default=2, show_default=True, help="Cases read in parallel.")
@click.option("--overwrite", is_flag=True, help="Replace an existing plan and fingerprint.")
@click.option("--allow-outside-root", is_flag=True, help="Accept datalist paths that are absolute or leave the datalist's folder.")
def plan(datalist: Path, out_path: Path, gpu_memory: float | None, modality: str | None, workers: int, overwrite: bool,
         allow_outside_root: bool) -> None:
    """Plan a training config for DATALIST from its data, like nnU-Net's planner.

    Reads every training case once (spacing, shape, foreground crop, foreground intensities,
    class volumes) and chooses the target spacing, intensity normalisation, patch and batch
    size, DynUNet depth/strides/kernels and features that fit the GPU budget, crop ratios
    for rare classes and augmentation for anisotropic data. Every choice is commented in the
    YAML with the statistic it came from; edit it and train with -c.

    \b
    Examples:
      medunet plan dataset.json -o configs/liver.yaml
      medunet plan dataset.json -o configs/liver.yaml --gpu-memory 11 --overwrite
      medunet plan brain.json -o configs/brain.yaml --modality MRI --workers 8
      medunet train dataset.json -o runs/liver -c configs/liver.yaml
    """
    from medunet.planning.api import plan_datalist, summary

    result = plan_datalist(
        datalist, out_path, gpu_memory_gb=gpu_memory, modality=modality, workers=workers, overwrite=overwrite,
        allow_outside_root=allow_outside_root,
    )
    for line in summary(result):
        click.echo(line)
    click.echo(f"wrote {result.plan_path} and {result.fingerprint_path}")
