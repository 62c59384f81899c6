"""Training on several processes (GPUs, nodes) under ``torchrun``: the process group, sharding, reductions.

``torchrun --nproc-per-node N -m medunet train ...`` starts N copies of medunet and gives each
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and a rendezvous address in its environment. Inside
:func:`session` every copy joins one process group (NCCL for CUDA tensors, Gloo for CPU tensors
and Python objects) and then:

- trains on its own shard of the training cases (:func:`shard`), so each rank caches only its share;
- averages gradients through :class:`~torch.nn.parallel.DistributedDataParallel` (:func:`wrap`);
- validates its shard of the validation cases and adds the Dice sums and counts of all ranks;
- leaves every file to rank 0 (:func:`is_main`) and logs only warnings on the others.

Outside torchrun (``WORLD_SIZE`` unset or 1) nothing here starts a process group and every helper
answers for a single process (rank 0 of 1, identity reductions), so the one-process path runs
exactly the code it always ran.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from medunet.errors import REPORTED_ON_RANK_0, ConfigError, MedunetError, TrainingError
from medunet.runtime import select_device

log = logging.getLogger("medunet")

T = TypeVar("T")

TIMEOUT = datetime.timedelta(hours=2)
"""How long a rank waits at a collective: rank 0 alone checks and plans the data while the others wait."""

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True when this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise ConfigError(f"WORLD_SIZE must be an integer (torchrun sets it), got {os.environ['WORLD_SIZE']!r}") from None


def is_distributed() -> bool:
    """True inside a :func:`session` with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 outside torchrun)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of training processes (1 outside torchrun)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its node: the index of its GPU (0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """True on rank 0, the only process that writes files (and the only one outside torchrun)."""
    return rank() == 0


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Join torchrun's process group for the duration of the block; outside torchrun, do nothing.

    Sessions nest (the CLI opens one around planning and training, the trainer another): only the
    one that created the group destroys it, also when the block raises. Ranks other than 0 log
    warnings and errors only.

    Raises:
        ConfigError: ``WORLD_SIZE`` is set but torchrun's other variables are not, or torch lacks ``torch.distributed``.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    level = log.level
    if int(os.environ.get("RANK", "0")) != 0:
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    _init_process_group()
    try:
        yield
    finally:
        log.setLevel(level)
        dist.destroy_process_group()


def _init_process_group() -> None:
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start multi-process training with "
            "torchrun (e.g. torchrun --nproc-per-node 4 -m medunet train ...), or unset WORLD_SIZE"
        )
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; train with one process (plain `medunet train`)")
    cuda = torch.cuda.is_available()
    local = int(os.environ["LOCAL_RANK"])
    if cuda and local < torch.cuda.device_count():
        torch.cuda.set_device(local)  # NCCL works on the current device
    # CUDA tensors (gradients) go through NCCL; CPU tensors, barriers and objects through Gloo.
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    log.info("torchrun: %d processes, this is rank %d (local rank %d), backend %s", world_size(), rank(), local, backend)


def device_for(name: str) -> torch.device:
    """The training device of this process: ``train.device`` alone, or ``cuda:LOCAL_RANK`` under torchrun.

    Raises:
        ConfigError: a named GPU (``cuda:N``) under torchrun, or more processes on a node than it has GPUs.
    """
    device = select_device(name)
    if not is_distributed() or device.type != "cuda":
        return device
    if name not in ("auto", "cuda"):
        raise ConfigError(
            f"under torchrun each process trains on GPU LOCAL_RANK; train.device must be auto, cuda or cpu, got {name!r} "
            "(choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if local_rank() >= torch.cuda.device_count():
        raise ConfigError(
            f"local rank {local_rank()} has no GPU: this node has {torch.cuda.device_count()}; "
            "pass --nproc-per-node at most that many"
        )
    return torch.device("cuda", local_rank())


def split_among(items: Sequence[T], ranks: int, *, even: bool) -> list[list[T]]:
    """``items`` dealt to ``ranks`` shards like cards: shard r holds items r, r + ranks, r + 2 * ranks, ...

    Without ``even`` (validation) the shards are disjoint and together hold each item exactly once.
    With ``even`` (training) they are made equally long by dealing the first items again (at most
    ``ranks`` - 1 extra), so every rank runs the same number of steps per epoch, as DDP needs.
    MONAI's ``partition_dataset`` deals the same way but refuses fewer items than ranks (e.g. 2
    validation cases on 4 GPUs, where some ranks must simply get none).
    """
    dealt = list(items)
    if even and dealt:
        total = math.ceil(len(dealt) / ranks) * ranks
        dealt = (dealt * math.ceil(total / len(dealt)))[:total]
    return [dealt[r::ranks] for r in range(ranks)]


def shard(items: Sequence[T], *, even: bool) -> list[T]:
    """This rank's share of ``items`` (see :func:`split_among`); all of them for one process."""
    if even and 0 < len(items) < world_size():
        log.warning("%d training cases for %d processes: some ranks repeat cases", len(items), world_size())
    return split_among(items, world_size(), even=even)[rank()]


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel under torchrun, else ``model`` itself.

    Parameters stay shared with ``model`` (build the optimizer on either; save ``model.state_dict()``,
    which has no ``module.`` prefix). ``static_graph`` lets DDP skip parameters a network computes
    but the loss never uses (e.g. unet++ heads without deep supervision) without searching the graph
    every step. Batch norm becomes SyncBatchNorm on GPUs, so its statistics cover the global batch.
    """
    if not is_distributed():
        return model
    if device.type == "cuda" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        static_graph=True,
        gradient_as_bucket_view=True,
    )


def barrier() -> None:
    """Wait until every rank got here."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Element-wise sum of ``values`` over all ranks (float64, through Gloo on the CPU)."""
    if not is_distributed():
        return values
    tensor = torch.as_tensor(np.asarray(values, dtype=np.float64))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.numpy()


def all_reduce_mean(value: float) -> float:
    """Mean of ``value`` over all ranks (``value`` itself for one process)."""
    if not is_distributed():
        return value
    return float(all_reduce_sum(np.array([value]))[0] / world_size())


def all_true(flag: bool) -> bool:
    """True only if ``flag`` is true on every rank (so all ranks take the same branch)."""
    if not is_distributed():
        return flag
    return bool(all_reduce_sum(np.array([0.0 if flag else 1.0]))[0] == 0)


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (any picklable value)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]  # rank 0's T after the broadcast, never None


def run_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 alone (it may write files); every rank gets its result, or its error.

    The other ranks wait meanwhile. A :class:`MedunetError` on rank 0 is raised on every rank,
    so all stop with the same one-line reason.
    """
    if not is_distributed():
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            outcome = ("ok", fn())
        except MedunetError as exc:
            broadcast(("error", exc))
            raise
        except BaseException as exc:
            broadcast(("crash", f"{type(exc).__name__}: {exc}"))
            raise
    kind, value = broadcast(outcome)
    if kind == "error":
        setattr(value, REPORTED_ON_RANK_0, True)  # the CLI prints it once, from rank 0
        raise value
    if kind == "crash":
        raise TrainingError(f"rank 0 failed ({value}); see its output above")
    return value
