"""Memory of one DynUNet training step, estimated from the topology (no GPU needed).

The planner asks "does this patch, batch and network fit in N GB?" many times, so the
answer must be cheap. We count what a training step keeps alive at its peak:

* **parameters** (fp32), their **gradients** and the **optimizer state** (AdamW: two
  moments; SGD with momentum: one), exact, from the network built on the ``meta`` device;
* **activations saved for backward**, counted layer by layer from the DynUNet forward pass
  (per resolution level: each conv/norm/LeakyReLU pair keeps its conv output and its
  normalised output; decoder convs also keep the concatenated skip input; the loss keeps
  softmax, log-softmax and one-hot tensors per deep-supervision head);
* a **transient** term for the tensors alive only briefly (gradients of the largest level
  during backward).

``tests/test_planning.py`` checks the activation count against the bytes actually saved by
autograd (``torch.autograd.graph.saved_tensors_hooks``) on CPU, and the total against
``torch.cuda.max_memory_allocated`` when CUDA is available; docs/planning.md gives the
measured ratios.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medunet.config import ModelConfig

GIB = 1024**3
#: Per deep-supervision output: softmax, log-softmax, one-hot target and the stacked logits (elements x classes).
LOSS_TENSORS_PER_HEAD = 4
#: Fraction of the GPU the planner lets a step use; the rest covers the CUDA context, cuDNN workspaces and
#: allocator fragmentation, which the count above does not see.
USABLE_FRACTION = 0.85


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step, by kind."""

    parameters: int
    optimizer: int
    activations: int
    transient: int

    @property
    def total(self) -> int:
        """Everything alive at the step's peak."""
        return self.parameters + self.optimizer + self.activations + self.transient

    def describe(self) -> str:
        """One line for logs and plan comments, in GiB."""
        parts = (self.total, self.parameters, self.optimizer, self.activations, self.transient)
        return "{:.2f} GiB (weights+grads {:.2f}, optimizer {:.2f}, activations {:.2f}, transient {:.2f})".format(
            *(p / GIB for p in parts)
        )


def level_shapes(model: ModelConfig, patch: Sequence[int]) -> list[tuple[int, int, int]]:
    """Spatial size of the feature maps at each resolution level (input level first)."""
    shapes = []
    size = [int(p) for p in patch]
    for stride in model.level_strides():
        size = [math.ceil(s / st) for s, st in zip(size, stride)]
        shapes.append((size[0], size[1], size[2]))
    return shapes


@functools.lru_cache(maxsize=256)  # the planner asks for the same topology many times
def parameter_count(model: ModelConfig, in_channels: int, out_channels: int) -> int:
    """Exact number of trainable parameters (the network is built on the meta device: no memory, little time)."""
    from medunet.model.networks import build_network

    with torch.device("meta"):
        net = build_network(model, in_channels=in_channels, out_channels=out_channels)
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def saved_activation_elements(model: ModelConfig, patch: Sequence[int], in_channels: int, out_channels: int) -> int:
    """Elements autograd keeps for backward in one DynUNet forward + DiceCE loss, per sample.

    Encoder level l (features f, V voxels): conv1 output and norm1 output (LeakyReLU works in
    place on it), conv2 output and norm2 output: 4 f V. Decoder level: the concatenated
    [upsampled, skip] input of its first conv (2 f V) plus the same 4 f V. The network input is
    kept by the first conv. Each output head adds LOSS_TENSORS_PER_HEAD x classes x full-size voxels.
    """
    voxels = [a * b * c for a, b, c in level_shapes(model, patch)]
    features = list(model.features)
    encoder = sum(4 * f * v for f, v in zip(features, voxels))
    decoder = sum(6 * f * v for f, v in zip(features[:-1], voxels[:-1]))
    heads = 1 + (min(model.deep_supervision_heads, len(features) - 2) if model.deep_supervision else 0)
    loss = LOSS_TENSORS_PER_HEAD * out_channels * voxels[0] * heads
    return in_channels * voxels[0] + encoder + decoder + loss


def training_step_memory(
    model: ModelConfig,
    patch: Sequence[int],
    batch: int,
    *,
    in_channels: int,
    out_channels: int,
    activation_bytes: int = 2,
    optimizer: str = "adamw",
) -> MemoryEstimate:
    """Estimate the peak memory of one training step.

    Args:
        model: a dynunet ModelConfig (features, strides, kernel sizes, deep supervision).
        patch: training patch in voxels.
        batch: patches per step.
        activation_bytes: 2 for mixed precision (bf16/fp16 on CUDA, medunet's default there), 4 for fp32.
        optimizer: "adamw" (two fp32 moments per parameter) or "sgd" (one momentum buffer).
    """
    params = parameter_count(model, in_channels, out_channels)
    states = 2 if optimizer == "adamw" else 1
    saved = saved_activation_elements(model, patch, in_channels, out_channels) * batch
    largest = max(f * a * b * c for f, (a, b, c) in zip(model.features, level_shapes(model, patch)))
    return MemoryEstimate(
        parameters=params * 4 * 2,  # fp32 weights and their gradients
        optimizer=params * 4 * states,
        activations=saved * activation_bytes,
        transient=4 * largest * batch * activation_bytes,  # backward: grads of the concatenated input and of the output
    )


def fits(estimate: MemoryEstimate, gpu_memory_gb: float) -> bool:
    """True when the step fits in USABLE_FRACTION of a GPU with ``gpu_memory_gb`` GiB."""
    return estimate.total <= USABLE_FRACTION * gpu_memory_gb * GIB
