"""`medunet export`: write a trained model as a self-describing package (ONNX, TorchScript, MONAI Bundle)."""

from __future__ import annotations

from pathlib import Path

import click

from medunet.cli.app import cli
from medunet.cli.infer import _fold_list


def _formats(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """``--format onnx --format bundle`` or ``--format onnx,bundle`` -> ("onnx", "bundle")."""
    from medunet.export.writer import FORMATS

    parts = tuple(dict.fromkeys(p.strip().lower() for v in values for p in v.split(",") if p.strip()))
    if not parts or set(parts) - set(FORMATS):
        raise click.BadParameter(f"expected one or more of {', '.join(FORMATS)} (repeat the option or separate by commas), got {values}",
                                 param_hint="--format")
    return parts


@cli.command("export")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Package folder to create (must be empty or absent; --overwrite replaces an earlier package).")
@click.option("-f", "--format", "formats", multiple=True, default=("onnx",), show_default=True, callback=_formats,
              help="onnx (model.onnx, runs on onnxruntime), torchscript (model.ts) and/or bundle (a MONAI Bundle: "
                   "configs/ + models/model.ts). Repeat or comma-separate for several.")
@click.option("--overwrite", is_flag=True, help="Replace an existing package in --out.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Bake an inference/post-processing setting into the package, e.g. --set inference.overlap=0.5.")
@click.option("--folds", "folds", default=None, metavar="0,2", help="With a crossval folder: export only these folds (default: all).")
def export(source: Path, out_dir: Path, formats: tuple[str, ...], overwrite: bool, overrides: tuple[str, ...], folds: str | None) -> None:
    """Export a trained model so it runs outside medunet's training process, with the whole pipeline.

    SOURCE is a run folder (its best.pt), a checkpoint file, or a crossval folder (every fold; the
    validated postprocessing.json is baked in). The package holds the network(s), pipeline.json
    (classes, orientation, spacing, normalisation, crop, window, overlap, post-processing: everything
    besides the network), MODEL_CARD.md and model_card.json (training data summary, validation
    scores, config, versions, and the checksum of every file).

    \b
    Examples:
      medunet export runs/liver -o export/liver                            # model.onnx
      medunet export runs/liver -o export/liver -f onnx -f torchscript     # both engines
      medunet export runs/liver -o export/liver-bundle -f bundle           # a MONAI Bundle
      medunet export runs/liver-cv -o export/liver-cv                      # fold ensemble
      medunet infer -m export/liver -i scans/ -o preds/                    # runs on onnxruntime
      medunet infer -m export/liver -i scans/ -o preds/ --engine torch     # needs -f torchscript

    Each network is checked against the checkpoint's before the package appears (ONNX: onnx.checker
    and onnxruntime's logits); nothing is left behind when anything fails. See docs/export.md.
    """
    from medunet.export.writer import export_model

    out = export_model(source, out_dir, formats, overwrite=overwrite, overrides=overrides, folds=_fold_list(folds))
    click.echo(f"exported {source} ({', '.join(formats)}) to {out}")
