"""The ``medunet`` click group, logging set-up and the entry point that maps errors to exit codes.

Errors the library raises on purpose (:class:`MedunetError`) are printed as one
line and exit with status 1 (3 when only some cases of a batch failed); ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import click

from medunet import __version__
from medunet.errors import REPORTED_ON_RANK_0, MedunetError

log = logging.getLogger("medunet")

EXIT_ERROR = 1
EXIT_PARTIAL = 3
EXIT_QC_REVIEW = 4


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]  # StreamHandler[TextIO] fails at runtime on 3.10
    """Logs to whatever ``sys.stderr`` is now (it may be replaced, e.g. by a test or a notebook)."""

    @property  # a read-only view of sys.stderr replaces the attribute
    def stream(self) -> TextIO:
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
    Try it:               medunet demo
    Check your data:      medunet check dataset.json
    Plan a config:        medunet plan dataset.json -o configs/liver.yaml
    Train:                medunet train dataset.json -o runs/liver -c configs/liver.yaml
    Cross-validate:       medunet crossval dataset.json -o runs/liver-cv --folds 5
    Segment new scans:    medunet infer -m runs/liver -i scans/ -o preds/
    Score predictions:    medunet evaluate --pred preds/ --datalist dataset.json -o eval/
    DICOM and PACS:       medunet dicom ls study/ ; medunet pacs --url http://pacs/dicom-web -m runs/liver --study UID

    The datalist is the Medical Segmentation Decathlon / MONAI JSON format (see docs/datalist.md).
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj["progress"] = not quiet
    _setup_logging(debug, quiet)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning MedunetError into a one-line message and exit status 1."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        status = cli.main(args=argv, prog_name="medunet", standalone_mode=False)
    except MedunetError as exc:
        if debug:
            raise
        if not getattr(exc, REPORTED_ON_RANK_0, False):  # under torchrun, rank 0 already printed it
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

