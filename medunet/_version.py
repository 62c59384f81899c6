"""The medunet version: the one place it is written.

A module of its own, importing nothing, so any layer can read it without importing the package's public API
(``medunet/__init__.py`` pulls in the config); ``pyproject.toml`` reads it too (``tool.setuptools.dynamic``).
"""

__version__ = "0.1.0"
