"""`medunet crossval`: train every fold, evaluate out-of-fold predictions, choose post-processing."""

from __future__ import annotations

from pathlib import Path

import click

from medunet.cli.app import cli
from medunet.errors import ConfigError
from medunet.model.layout import POSTPROCESSING_FILE, SPLITS_FILE


@cli.command()
@click.argument("datalist", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "root", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Cross-validation folder: splits.json, fold_<k>/, oof/, oof_eval/, postprocessing.json.")
@click.option("--folds", type=click.IntRange(min=2), default=None, help="Number of folds for new splits (default 5).")
@click.option("--splits", "splits_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help='Your own splits: a JSON list of {"train": [...], "val": [...]} case names per fold.')
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="YAML config for every fold (default: the CT or MRI preset, as for `medunet train`).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field. Repeatable.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: from the config).")
@click.option("--allow-outside-root", is_flag=True, help="Accept datalist paths that are absolute or leave the datalist's folder.")
@click.option("--skip-check", is_flag=True, help="Do not run `medunet check` on the datalist first (it never runs on a restart).")
@click.pass_context
def crossval(ctx: click.Context, datalist: Path, root: Path, folds: int | None, splits_file: Path | None, config_path: Path | None,
             overrides: tuple[str, ...], device: str | None, allow_outside_root: bool, skip_check: bool) -> None:
    """Cross-validate on DATALIST's "training" cases: train k folds, predict each case with the fold
    that held it out, evaluate those predictions and choose post-processing that they prove helps.

    \b
    Examples:
      medunet crossval dataset.json -o runs/liver_cv -c configs/ct.yaml --set train.max_epochs=300
      medunet crossval dataset.json -o runs/liver_cv --folds 3
      medunet crossval dataset.json -o runs/liver_cv --splits my_splits.json   # e.g. one patient per fold
      medunet crossval dataset.json -o runs/liver_cv      # again after an interruption: continues
      medunet infer -m runs/liver_cv -i scans/ -o preds/  # the fold ensemble + chosen post-processing

    \b
    OUT/ then holds splits.json, fold_<k>/ (one run folder per fold), oof/ (out-of-fold masks on
    each case's own grid), oof_eval/ (metrics.csv, summary.json, report.html), postprocessing.json
    and crossval.json. Re-running skips finished folds and resumes an interrupted one (with the
    saved config.yaml plus any --set).
    """
    from medunet.training.distributed import launched
    from medunet.training.run_config import check_before_training, resolve_crossval_config
    from medunet.workflows.crossval import run_crossval

    if launched():  # every process would predict and evaluate too (see docs/distributed.md)
        raise ConfigError("crossval does not run under torchrun; train each fold with "
                          "`torchrun ... -m medunet train DATALIST -o OUT --fold K`, then run `medunet crossval` once without it")
    if not skip_check and not (root / SPLITS_FILE).is_file():  # a new cross-validation: no fold starts on broken data
        check_before_training(datalist, config_path=config_path, overrides=overrides, allow_outside_root=allow_outside_root,
                              progress=ctx.obj["progress"], show=lambda text: click.echo(text, err=True))
    config = resolve_crossval_config(datalist, root, config_path=config_path, overrides=overrides, device=device,
                                     allow_outside_root=allow_outside_root)
    result = run_crossval(datalist, root, config, folds=folds, splits_file=splits_file, device=device or "auto",
                          progress=ctx.obj["progress"])
    summary, choice = result.oof_summary, result.postprocessing
    mean = summary.get("mean_dice")
    lines = [
        "",
        f"cross-validation in {root}: {len(result.fold_dice)} folds, {choice.num_cases} out-of-fold cases",
        "best validation Dice per fold: " + ", ".join(f"fold {k} {v:.3f}" for k, v in result.fold_dice.items()),
        "out-of-fold Dice (original grids): " + ", ".join(f"{n} {summary[n]['dice']['mean']:.3f}" for n in choice.dice_before)
        + (f"; mean {mean:.3f}" if mean is not None else ""),
        f"post-processing chosen (mean Dice {choice.mean_before:.4f} -> {choice.mean_after:.4f}), saved in {root / POSTPROCESSING_FILE}:",
        choice.describe(),
        f"out-of-fold masks: {result.oof_dir}; metrics and report: {result.report or result.eval_dir}",
        f"next: medunet infer -m {root} -i SCANS -o PREDS   (ensemble of all folds, chosen post-processing)",
    ]
    click.echo("\n".join(lines))
