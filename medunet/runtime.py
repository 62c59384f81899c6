"""Device, precision and seeding choices shared by training and inference."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

from medunet.errors import ConfigError


def select_device(name: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA GPU when there is one, else the CPU; otherwise the named device.

    Raises:
        ConfigError: CUDA was asked for and is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX tiles).

    There bf16 autocast roughly halves a 3D U-Net step (docs/benchmarks.md); on other CPUs
    torch emulates bf16 and it is slower than fp32, so ``auto`` keeps full precision.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device``; None means full precision.

    ``auto`` picks bf16 where the hardware has it natively (CUDA GPUs that support it, CPUs with
    AVX512-BF16/AMX), fp16 on older GPUs and fp32 on other CPUs. fp16 is never used on the CPU.
    """
    if mode == "off":
        return None
    if device.type == "cuda":
        if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return torch.float16
    if device.type == "cpu" and (mode == "bf16" or (mode == "auto" and cpu_has_native_bf16())):
        return torch.bfloat16
    return None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed precision when ``dtype`` is set, otherwise nothing."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(seed: int, epoch: int, *, rank: int = 0) -> int:
    """A seed for one epoch that depends only on the run's seed, the epoch number and the process rank.

    Reseeding every epoch from this makes a resumed run draw exactly the random numbers an
    uninterrupted run would have drawn, whatever happened before. Under torchrun each rank gets
    its own stream (rank 0's is the single-process one).
    """
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729 + 12_345) % 2**31
