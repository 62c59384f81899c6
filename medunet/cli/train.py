"""`medunet train`: build the config (preset, YAML or saved run) and train."""

from __future__ import annotations

from pathlib import Path

import click

from medunet.cli.app import cli, log
from medunet.errors import ConfigError


@cli.command()
@click.argument("datalist", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: checkpoints, config.yaml, metrics.csv, train_curve.png, log.txt.")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="YAML config, e.g. configs/ct.yaml or configs/mri.yaml. Default: the CT preset (MRI preset when the datalist's modality is MR/MRI).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field, e.g. --set train.max_epochs=100 --set augmentation.patch_size=[128,128,64]. Repeatable.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: train.device from the config).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt (its saved config plus any --set).")
@click.option("--allow-outside-root", is_flag=True, help="Accept datalist paths that are absolute or leave the datalist's folder.")
@click.pass_context
def train(ctx: click.Context, datalist: Path, run_dir: Path, config_path: Path | None, overrides: tuple[str, ...],
          device: str | None, resume: bool, allow_outside_root: bool) -> None:
    """Train a segmentation model on DATALIST (MSD/MONAI JSON; paths relative to it).

    \b
    Examples:
      medunet train Task09_Spleen/dataset.json -o runs/spleen -c configs/ct.yaml
      medunet train brain.json -o runs/tumour -c configs/mri.yaml --set train.max_epochs=500
      medunet train dataset.json -o runs/spleen --resume --set train.max_epochs=400

    Without a "validation" list, 20% of "training" is held out (seeded; saved as split.json).
    """
    from medunet.training.trainer import train as run_training

    config = _training_config(datalist, run_dir, config_path, overrides, device, resume, allow_outside_root)
    result = run_training(datalist, run_dir, config, resume=resume, progress=ctx.obj["progress"])
    per_class = ", ".join(f"{k} {v:.3f}" for k, v in result.class_dice.items())
    click.echo(
        f"best validation mean Dice {result.best_dice:.4f} at epoch {result.best_epoch} ({per_class}); "
        f"model in {run_dir / 'best.pt'}"
    )


def _training_config(datalist: Path, run_dir: Path, config_path: Path | None, overrides: tuple[str, ...],
                     device: str | None, resume: bool, allow_outside_root: bool):  # noqa: ANN202
    from medunet.config import apply_overrides, config_from_dict, load_config

    extra = list(overrides)
    if device:
        extra += [f"train.device={device}", f"inference.device={device}"]
    if allow_outside_root:
        extra.append("data.allow_outside_root=true")
    if resume:
        if config_path is not None:
            raise ConfigError("--resume continues with the run's saved config; change it with --set instead of -c")
        from medunet.training.checkpoint import load_checkpoint

        saved = load_checkpoint(run_dir / "last.pt")["config"]
        return config_from_dict(apply_overrides(saved, extra))
    if config_path is None:
        modality = _datalist_modality(datalist)
        log.info("no -c given: using the built-in %s preset", modality)
        return load_config(None, extra, modality=modality)
    return load_config(config_path, extra)


def _datalist_modality(datalist: Path) -> str:
    """ "MRI" when the datalist's "modality" names an MR sequence, else "CT" (the default preset)."""
    import json

    try:
        modality = json.loads(datalist.read_text()).get("modality")
    except (OSError, ValueError, AttributeError):
        return "CT"  # the datalist itself is checked, with a proper error, when training starts
    text = " ".join(map(str, modality.values())) if isinstance(modality, dict) else str(modality or "")
    return "MRI" if any(word in text.upper() for word in ("MR", "T1", "T2", "FLAIR", "ADC", "DWI")) else "CT"
