"""medunet: 3D medical image segmentation on MONAI.

Public API::

    from medunet import Segmenter, load_config
    seg = Segmenter.from_checkpoint("runs/liver")
    mask = seg.predict("ct.nii.gz")          # a nibabel image on the input's grid
"""

from __future__ import annotations

from typing import Any

from medunet._version import __version__
from medunet.config import Config, load_config
from medunet.errors import MedunetError


def __getattr__(name: str) -> Any:  # lazy: importing medunet stays light until inference is needed
    if name == "Segmenter":
        from medunet.inference.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'medunet' has no attribute {name!r}")


__all__ = ["Config", "MedunetError", "Segmenter", "__version__", "load_config"]
