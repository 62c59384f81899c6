"""Write one network as ONNX or TorchScript, and check the file reproduces the network.

Both exports take the eval-mode forward of :class:`~medunet.model.networks.SegmentationNetwork`:
one logits tensor (B, K, X, Y, Z) for a window batch (B, C, X, Y, Z); DynUNet's deep supervision
heads are off in eval. The ONNX graph has a dynamic batch axis and dynamic spatial axes, so every
window size the sliding window uses works (each spatial size a multiple of the network's total
stride, which ``inference.roi_size`` already is).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medunet.errors import ExportError
from medunet.model.engine import import_onnx_extra
from medunet.model.package import INPUT_NAME, OUTPUT_NAME

log = logging.getLogger("medunet")

#: ONNX opset written. 18 is read by every onnxruntime release since 1.14 (the current one included), by
#: TensorRT 8.6+ and OpenVINO 2023+; the network (Conv, ConvTranspose, InstanceNormalization, LeakyRelu,
#: Concat) needs nothing newer.
ONNX_OPSET = 18

#: Largest |onnxruntime - torch| logit difference accepted at export, relative to the largest |logit| (float32
#: convolution order differs between the two; measured ~1e-6 on the tiny test networks, see docs/export.md).
ONNX_RELATIVE_TOLERANCE = 1e-3


def _window(in_channels: int, window: Sequence[int], seed: int = 0) -> torch.Tensor:
    return torch.randn(1, in_channels, *window, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' deprecation and tracer warnings: they are about torch internals, not the user's model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_onnx(network: nn.Module, path: Path, *, in_channels: int, window: Sequence[int], probe: Sequence[int]) -> float:
    """Write ``network`` (eval mode) as ONNX to ``path``, check it, and compare it with torch on one window.

    Returns:
        The largest absolute logit difference between onnxruntime and torch on a random window of size
        ``probe`` (another size than the traced ``window``: the dynamic axes must work).

    Raises:
        ExportError: onnx or onnxruntime is not installed, the exporter cannot trace the network, the file fails
            ``onnx.checker``, or its logits differ.
    """
    onnx = import_onnx_extra("onnx", needed_for="export --format onnx", error=ExportError)
    import_onnx_extra("onnxruntime", needed_for="export --format onnx (it checks the file with onnxruntime)", error=ExportError)

    network = network.eval().float().cpu()
    x = _window(in_channels, window)
    axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
    buffer = io.BytesIO()
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(network, (x,), buffer,  # type: ignore[arg-type]  # the legacy exporter writes to a file object
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=ONNX_OPSET,
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes}, dynamo=False)
        model = onnx.load_from_string(buffer.getvalue())
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # the exporter raises many types (unsupported operators, tracing failures)
        raise ExportError(f"the network cannot be exported to ONNX ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})") from exc
    path.write_bytes(buffer.getvalue())
    return _compare_onnx(network, path, _window(in_channels, probe, seed=1))


def _compare_onnx(network: nn.Module, path: Path, x: torch.Tensor) -> float:
    ort = import_onnx_extra("onnxruntime", needed_for="export --format onnx", error=ExportError)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = network(x).numpy()
    got = session.run(None, {INPUT_NAME: x.numpy()})[0]
    difference = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if difference > ONNX_RELATIVE_TOLERANCE * max(1.0, float(np.abs(expected).max())):
        raise ExportError(f"the exported ONNX network's logits differ from torch's by {difference:.3g}; not writing the package")
    return difference


def export_torchscript(network: nn.Module, path: Path, *, in_channels: int, window: Sequence[int], probe: Sequence[int]) -> float:
    """Write ``network`` (eval mode) as a traced TorchScript archive to ``path`` and compare it with torch.

    Returns:
        The largest absolute logit difference between the archive and the network on a random window of
        size ``probe`` (another size than the traced ``window``: tracing must not have fixed the shape).

    Raises:
        ExportError: the network cannot be traced or the archive's logits differ.
    """
    network = network.eval().float().cpu()
    try:
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(network, _window(in_channels, window), check_trace=False)
            traced.save(str(path))
            loaded = torch.jit.load(str(path), map_location="cpu")
            x = _window(in_channels, probe, seed=1)
            difference = float((loaded(x) - network(x)).abs().max())
    except Exception as exc:  # tracing raises many types
        raise ExportError(f"the network cannot be exported to TorchScript ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})") from exc
    if difference > 1e-4:
        raise ExportError(f"the traced TorchScript network's logits differ from torch's by {difference:.3g}; not writing the package")
    return difference
