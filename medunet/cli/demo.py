"""`medunet demo`: the whole pipeline on synthetic phantoms."""

from __future__ import annotations

from pathlib import Path

import click

from medunet.cli.app import cli


@cli.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("medunet-demo"), show_default=True,
              help="Folder for the synthetic data, run folder, predictions and preview picture.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Train for this many epochs instead of the demo's 40.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier demo in the same folder.")
@click.pass_context
def demo(ctx: click.Context, out_dir: Path, epochs: int | None, device: str, overwrite: bool) -> None:
    """Run the whole pipeline on synthetic CT phantoms: data, training, inference, scores, picture.

    Takes a few minutes on a laptop CPU (seconds on a GPU). The run folder it leaves is a real
    model: `medunet infer -m OUT/run -i ...` accepts it.
    """
    from medunet.workflows.demo import run_demo

    result = run_demo(out_dir, epochs=epochs, device=device, overwrite=overwrite, progress=ctx.obj["progress"])
    lines = [
        "",
        f"validation mean Dice (best epoch): {result.val_dice:.3f}",
        "test Dice per class:     " + ", ".join(f"{k} {v:.3f}" for k, v in result.test_dice.items()),
        f"run folder (model, metrics.csv, train_curve.png): {result.run_dir}",
        f"predicted masks:                                  {result.pred_dir}",
        f"image / reference / prediction picture:           {result.preview}",
        *(f"watch it learn:                                   {path}" for path in result.learning),
        f"next: medunet infer -m {result.run_dir} -i {result.out_dir / 'data' / 'imagesTs'} -o {result.out_dir / 'preds2'}",
    ]
    click.echo("\n".join(lines))
