"""`medunet train`: build the config (preset, YAML or saved run) and train."""

from __future__ import annotations

from pathlib import Path

import click

from medunet.cli.app import cli


@cli.command()
@click.argument("datalist", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: checkpoints, config.yaml, metrics.csv, train_curve.png, log.txt.")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="YAML config, e.g. configs/ct.yaml, configs/mri.yaml or one from `medunet plan`. Default: plan one from the data "
                   "(saved as plan.yaml + fingerprint.json in the run folder).")
@click.option("--gpu-memory", "gpu_memory", type=float, default=None, metavar="GB",
              help="Without -c: the GPU memory the planned patch/network must fit (default: the visible GPU's, else 8).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field, e.g. --set train.max_epochs=100 --set augmentation.patch_size=[128,128,64]. Repeatable.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: train.device from the config).")
@click.option("--time-budget", "time_budget", default=None, metavar="DURATION",
              help="Train for this long, e.g. 90m, 1.5h or 5400s (sets train.max_minutes; train.max_epochs becomes an upper bound). "
                   "The lr schedule is laid over the steps that fit; validation and the last checkpoint are inside the budget.")
@click.option("--track", "trackers", multiple=True, type=click.Choice(["tensorboard", "mlflow"]),
              help="Log to an experiment tracker (sets train.tracking); repeatable. Needs the extra: pip install 'medunet[tensorboard]'.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt (its saved config plus any --set).")
@click.option("--allow-outside-root", is_flag=True, help="Accept datalist paths that are absolute or leave the datalist's folder.")
@click.option("--skip-check", is_flag=True, help="Do not run `medunet check` on the datalist before training (it never runs on --resume).")
@click.option("--fold", type=click.IntRange(min=0), default=None,
              help="Train this cross-validation fold into OUT/fold_<k>/ (splits from OUT/splits.json, made on first use).")
@click.option("--folds", type=click.IntRange(min=2), default=None, help="With --fold: number of folds for new splits (default 5).")
@click.option("--splits", "splits_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help='With --fold: your own splits, a JSON list of {"train": [...], "val": [...]} case names per fold.')
@click.pass_context
def train(ctx: click.Context, datalist: Path, run_dir: Path, config_path: Path | None, overrides: tuple[str, ...],
          device: str | None, resume: bool, allow_outside_root: bool, fold: int | None, folds: int | None,
          splits_file: Path | None, gpu_memory: float | None, skip_check: bool, time_budget: str | None,
          trackers: tuple[str, ...]) -> None:
    """Train a segmentation model on DATALIST (MSD/MONAI JSON; paths relative to it).

    \b
    Examples:
      medunet train Task09_Spleen/dataset.json -o runs/spleen -c configs/ct.yaml
      medunet train brain.json -o runs/tumour -c configs/mri.yaml --set train.max_epochs=500
      medunet train dataset.json -o runs/spleen --resume --set train.max_epochs=400
      medunet train dataset.json -o runs/auto --gpu-memory 11     # no -c: plan from the data first
      medunet train dataset.json -o runs/night -c configs/ct.yaml --time-budget 8h --track tensorboard
      medunet train dataset.json -o runs/spleen_cv --fold 0 --folds 5     # one fold; all: medunet crossval
      torchrun --nproc-per-node 4 -m medunet train dataset.json -o runs/spleen -c configs/ct.yaml   # 4 GPUs

    Without a "validation" list, 20% of "training" is held out (seeded; saved as split.json).
    The datalist is checked first (as `medunet check` does); errors stop before anything is trained.
    Under torchrun (docs/distributed.md) train.batch_size is per process; rank 0 alone checks, plans and writes.
    """
    from medunet.errors import DataError
    from medunet.io.datalist import Datalist, load_datalist
    from medunet.model.layout import BEST_CHECKPOINT, LAST_CHECKPOINT, fold_dir
    from medunet.qc.reference import SharedRows
    from medunet.training import distributed
    from medunet.training.run_config import check_before_training, resolve_training_config
    from medunet.training.splits import fold_for_training
    from medunet.training.trainer import train as run_training

    if fold is None and (folds is not None or splits_file is not None):
        raise click.UsageError("--folds and --splits need --fold K (or use `medunet crossval` to train every fold)")
    overrides = (*overrides, *_budget_and_tracking(time_budget, trackers))
    if trackers:  # a missing tracker package fails before the check, planning or training take time
        from medunet.training.tracking import require_tracking

        require_tracking(None, trackers)
    root, run_dir = run_dir, (fold_dir(run_dir, fold) if fold is not None else run_dir)
    # The datalist is read and decoded once: every step gets this object and checks it under its own options.
    try:
        parsed: Path | Datalist = load_datalist(datalist, allow_outside_root=True, need_training=False, require_files=False)
    except DataError:  # unreadable or malformed: each step reports it where (and as) it would from the file
        parsed = datalist
    qc_rows = SharedRows()  # filled while planning, used by the trainer's QC reference (one read of those cases)
    known_labels = None  # the check's highest value per label file: the classes of a datalist without "labels"
    with distributed.session():  # under torchrun: rank 0 checks, plans and writes splits; the others wait for its result
        if not resume and not skip_check and not (run_dir / LAST_CHECKPOINT).exists():  # (an existing run is refused by the trainer)
            known_labels = distributed.run_on_main(lambda: check_before_training(
                parsed, config_path=config_path, overrides=overrides, allow_outside_root=allow_outside_root,
                progress=ctx.obj["progress"], show=lambda text: click.echo(text, err=True)))
        config = distributed.run_on_main(lambda: resolve_training_config(
            parsed, run_dir, config_path=config_path, overrides=overrides, device=device, resume=resume,
            allow_outside_root=allow_outside_root, gpu_memory=gpu_memory, qc_rows=qc_rows,
            known_labels=known_labels))
        split = None if fold is None else distributed.run_on_main(lambda: fold_for_training(
            parsed, root, fold=fold, folds=folds, seed=config.data.split_seed, splits_file=splits_file,
            allow_outside_root=config.data.allow_outside_root,
        ))
        result = run_training(parsed, run_dir, config, resume=resume, progress=ctx.obj["progress"], fold=split, qc_rows=qc_rows,
                              known_labels=known_labels)
        if not distributed.is_main():
            return
    if result.best_epoch > 0:  # QC fitted to this model on its validation cases (qc.json), as `medunet infer` will apply it
        from medunet.workflows.calibration import calibrate_run

        calibrate_run(parsed, run_dir, device=config.inference.device, progress=ctx.obj["progress"])
    per_class = ", ".join(f"{k} {v:.3f}" for k, v in result.class_dice.items())
    click.echo(
        f"best validation mean Dice {result.best_dice:.4f} (IoU {result.best_iou:.4f}) at epoch {result.best_epoch} ({per_class}); "
        f"{result.epochs_completed} epochs, {result.minutes:.1f} min; model in {run_dir / BEST_CHECKPOINT}"
    )


def _budget_and_tracking(time_budget: str | None, trackers: tuple[str, ...]) -> list[str]:
    """``--set`` overrides for ``--time-budget`` and ``--track``."""
    from medunet.training.budget import parse_duration

    extra = [f"train.max_minutes={parse_duration(time_budget)!r}"] if time_budget else []
    if trackers:
        extra.append(f"train.tracking=[{','.join(dict.fromkeys(trackers))}]")
    return extra
