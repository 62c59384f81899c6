"""The ``medunet`` click group, logging set-up and the entry point that maps errors to exit codes.

Errors the library raises on purpose (:class:`MedunetError`) are printed as one
line and exit with status 1 (3 when only some cases of a batch failed); any other
exception is printed as one line too (what failed, its type and message) with
status 1. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import click

from medunet._version import __version__
from medunet.errors import REPORTED_ON_RANK_0, MedunetError, describe_unexpected, unwrap_error

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
    """Entry point: run the CLI, turning any error into a one-line message and exit status 1 (``--debug``: the traceback)."""
    args = argv if argv is not None else sys.argv[1:]
    debug = "--debug" in args
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
    except Exception as exc:  # noqa: BLE001 - a bug or a third-party failure: one line, never a traceback, unless --debug
        if debug:
            raise
        click.echo(f"medunet: error: {_unexpected_error_line(args, exc)}", err=True)
        return EXIT_ERROR
    return status if isinstance(status, int) else 0


def _unexpected_error_line(args: list[str], exc: BaseException) -> str:
    """What failed, the exception's type and message, and the file where known, for an error medunet did not raise on purpose.

    A MedunetError behind a library's wrapper (MONAI's "applying transform") is shown as itself.
    """
    ours = unwrap_error(exc)
    if isinstance(ours, MedunetError):
        return str(ours)
    filename = getattr(exc, "filename", None)
    where = f" (file {filename})" if filename else ""
    return f"{_command_name(args)} failed{where}: {describe_unexpected(exc)} (run with --debug for the traceback)"


def _command_name(args: list[str]) -> str:
    """``infer``, ``dicom ls``: the command in ``args`` (the group's own options are flags only)."""
    words = [a for a in args if not a.startswith("-")]
    return " ".join(words[:2] if words[:1] == ["dicom"] else words[:1]) or "medunet"

