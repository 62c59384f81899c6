"""Network engines: what turns a batch of preprocessed windows into logits.

An engine takes a float32 window batch (B, C, X, Y, Z) and returns logits (B, K, X, Y, Z), the
eval-mode contract of :class:`~medunet.model.networks.SegmentationNetwork`. Every engine is an
``nn.Module`` (a thin adapter where the network is not a torch module), so the sliding window
(:func:`medunet.model.sliding.predict_probabilities`) and the Segmenter run any of them unchanged:

* ``torch``: the network itself (a checkpoint's module, or an exported TorchScript ``model.ts``);
* ``onnxruntime``: an exported ``model.onnx`` in an ``onnxruntime.InferenceSession``; torch only
  hands the window over and takes the logits back.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from medunet.errors import MedunetError, PackageError

log = logging.getLogger("medunet")

#: Engine names accepted by ``inference.engine`` (and ``--engine``), besides "auto".
ENGINES = ("torch", "onnxruntime")


def import_onnx_extra(name: str, *, needed_for: str, error: type[MedunetError], alternative: str = "") -> ModuleType:
    """Import ``onnx`` or ``onnxruntime`` (the ``medunet[onnx]`` extra), or raise ``error`` naming the extra in one line.

    The one place that turns a missing ONNX package into advice, for export (ExportError) and for the
    onnxruntime engine (PackageError) alike, instead of a ModuleNotFoundError traceback.
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # kept as the cause: a package that is installed but fails to import shows why under --debug
        hint = f" ({alternative})" if alternative else ""
        raise error(f"{needed_for} needs {name}, which is not installed: pip install 'medunet[onnx]'{hint}") from exc


def onnxruntime_available() -> bool:
    """Whether the onnxruntime engine can run here (``pip install medunet[onnx]``)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def ort_providers(device: torch.device) -> list[str]:
    """onnxruntime execution providers for ``device``: CUDA first on a GPU when installed, always CPU last."""
    import onnxruntime as ort

    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.warning("onnxruntime has no CUDA provider here (install onnxruntime-gpu); the ONNX network runs on the CPU")
    return ["CPUExecutionProvider"]


class OnnxRuntimeEngine(nn.Module):
    """An ONNX network in an onnxruntime session, presented as an eval-mode network (windows -> logits).

    Args:
        path: the ``.onnx`` file (its integrity is checked by the package reader before this).
        device: where the result goes; on CUDA the session uses onnxruntime's CUDA provider when installed.
        out_channels: number of classes (sizes the sliding window's memory estimate).
    """

    def __init__(self, path: str | Path, *, device: torch.device, out_channels: int) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initialisers etc. are not the user's business
        provider_options = [{"device_id": device.index or 0} if p == "CUDAExecutionProvider" else {} for p in ort_providers(device)]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=ort_providers(device),
                                                provider_options=provider_options)
        except Exception as exc:  # onnxruntime raises its own exception types for invalid graphs
            raise PackageError(f"onnxruntime cannot load {path} ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.out_channels = out_channels
        self.path = Path(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        logits = self.session.run(None, {self.input_name: window})[0]
        return torch.from_numpy(logits).to(x.device)


def load_torchscript(path: str | Path, *, device: torch.device) -> nn.Module:
    """An exported TorchScript network (``model.ts``), in eval mode on ``device``.

    Raises:
        PackageError: the file is not a loadable TorchScript archive.
    """
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # torch raises RuntimeError and others for a bad archive
        raise PackageError(f"cannot load TorchScript network {path} ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    return module.eval()
