"""The ``medunet`` command line: parse, build the config, call the library.

Errors the library raises on purpose (:class:`MedunetError`) are printed as one
line and exit with status 1 (3 when only some cases of a batch failed); ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from medunet import __version__
from medunet.errors import ConfigError, MedunetError

log = logging.getLogger("medunet")

EXIT_ERROR = 1
EXIT_PARTIAL = 3


class _StderrHandler(logging.StreamHandler):
    """Logs to whatever ``sys.stderr`` is now (it may be replaced, e.g. by a test or a notebook)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    log.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.propagate = False
    if not debug:
        import warnings

        warnings.filterwarnings("ignore", module=r"monai\..*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="medunet")
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logging.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """medunet: 3D medical image segmentation (CT and MRI) on MONAI.

    \b
    Try it:            medunet demo
    Train on your data: medunet train dataset.json -o runs/liver -c configs/ct.yaml
    Segment new scans:  medunet infer -m runs/liver -i scans/ -o preds/

    The datalist is the Medical Segmentation Decathlon / MONAI JSON format (see docs/datalist.md).
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj["progress"] = not quiet
    _setup_logging(debug, quiet)


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
    from medunet.demo import run_demo

    result = run_demo(out_dir, epochs=epochs, device=device, overwrite=overwrite, progress=ctx.obj["progress"])
    lines = [
        "",
        f"validation mean Dice (best epoch): {result.val_dice:.3f}",
        "test Dice per class:     " + ", ".join(f"{k} {v:.3f}" for k, v in result.test_dice.items()),
        f"run folder (model, metrics.csv, train_curve.png): {result.run_dir}",
        f"predicted masks:                                  {result.pred_dir}",
        f"image / reference / prediction picture:           {result.preview}",
        f"next: medunet infer -m {result.run_dir} -i {result.out_dir / 'data' / 'imagesTs'} -o {result.out_dir / 'preds2'}",
    ]
    click.echo("\n".join(lines))


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


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning MedunetError into a one-line message and exit status 1."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        status = cli.main(args=argv, prog_name="medunet", standalone_mode=False)
    except MedunetError as exc:
        if debug:
            raise
        click.echo(f"medunet: error: {exc}", err=True)
        return EXIT_ERROR
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted; completed outputs and checkpoints are intact", err=True)
        return 130
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
