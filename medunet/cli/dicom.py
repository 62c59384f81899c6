"""`medunet dicom`: look at DICOM folders before segmenting them (`medunet dicom ls`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from medunet.cli.app import cli


@cli.group()
def dicom() -> None:
    """Inspect DICOM folders (which series they hold, their geometry).

    \b
    Examples:
      medunet dicom ls export/            # one line per series
      medunet dicom ls export/ --json     # the same as JSON, for scripts

    Patient identifiers are never shown: only series UIDs, modality, description and geometry.
    """


@dicom.command("ls")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def ls(folder: Path, as_json: bool) -> None:
    """List the image series in FOLDER (searched recursively), largest first.

    \b
    Columns: SeriesInstanceUID, modality, slice count, size (columns x rows x slices),
    spacing in mm (column, row, slice gap), description. Pick one for segmentation with
      medunet infer -m runs/liver -i FOLDER -o preds/ --series UID
    """
    from medunet.io.dicom import list_series, series_summary

    infos = list_series(folder)
    if as_json:
        click.echo(json.dumps(series_summary(infos), indent=2))
        return
    width = max(len(i.series_uid) for i in infos)
    click.echo(f"{'SeriesInstanceUID':<{width}}  modality  slices  size           spacing (mm)          description")
    for info in infos:
        size = "x".join(str(s) for s in info.size)
        spacing = "x".join(f"{s:.4g}" for s in info.spacing) if info.spacing else "?"
        frames = " (multi-frame: not supported)" if info.multi_frame else ""
        click.echo(
            f"{info.series_uid:<{width}}  {info.modality:<8}  {info.num_slices:>6}  {size:<13}  {spacing:<20}  {info.description}{frames}"
        )
    click.echo(f"{len(infos)} series in {folder}")
