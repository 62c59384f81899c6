"""`medunet check`: a pre-flight over every case of a datalist, printed as a table and saved as JSON."""

from __future__ import annotations

from pathlib import Path

import click

from medunet.cli.app import EXIT_ERROR, cli


@cli.command()
@click.argument("datalist", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the full report (per-case statistics and every finding) to this JSON file.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Files read in parallel (default: one per CPU core, at most 8).")
@click.option("--allow-outside-root", is_flag=True, help="Accept datalist paths that are absolute or leave the datalist's folder.")
@click.pass_context
def check(ctx: click.Context, datalist: Path, json_path: Path | None, workers: int | None, allow_outside_root: bool) -> None:
    """Check every case of DATALIST before training, and report all problems at once.

    \b
    Examples:
      medunet check Task09_Spleen/dataset.json
      medunet check dataset.json --json check.json --workers 4

    \b
    Per file: exists, readable, not truncated, 3D, spacing plausible, affine not sheared,
    no NaN/Inf voxels, intensities plausible for the modality (CT in HU, MR >= 0).
    Per case: channel count as the datalist's "modality" declares, channels and label on the
    image's grid (shape, spacing, origin, direction), label values within the declared "labels",
    labels not all background. Across cases: identical images, files listed twice.
    Test images get the image checks only.

    Exit status: 0 when there are no errors (warnings are printed), 1 when there are errors or
    the datalist cannot be parsed. `medunet train` runs the same check first (--skip-check skips it).
    See docs/check.md for every check, its threshold and the JSON report's fields.
    """
    from medunet.check import check_datalist

    report = check_datalist(datalist, workers=workers, allow_outside_root=allow_outside_root, progress=ctx.obj["progress"])
    click.echo(report.format_table())
    if json_path is not None:
        report.write_json(json_path)
        click.echo(f"report written to {json_path}")
    if not report.ok:
        ctx.exit(EXIT_ERROR)
