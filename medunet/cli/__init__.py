"""The ``medunet`` command line: parse, build the config, call the library.

One module per command; each registers itself on the click group in :mod:`medunet.cli.app`.
Errors the library raises on purpose (:class:`~medunet.errors.MedunetError`) are printed as
one line and exit with status 1 (3 when only some cases of a batch failed); so does any other
exception (what failed, its type and message); ``--debug`` shows the traceback instead.
"""

from medunet.cli import check, crossval, demo, dicom, evaluate, export, infer, pacs, plan, serve, train  # noqa: F401  (registers the commands)
from medunet.cli.app import EXIT_ERROR, EXIT_PARTIAL, EXIT_QC_REVIEW, cli, main

__all__ = ["EXIT_ERROR", "EXIT_PARTIAL", "EXIT_QC_REVIEW", "cli", "main"]
