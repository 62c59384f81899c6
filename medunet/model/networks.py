"""Network registry: a config name -> a MONAI network, wrapped to one output contract.

The default is MONAI's ``DynUNet``: the nnU-Net architecture (instance norm,
LeakyReLU, per-axis kernels and strides, deep supervision), which is what
planning (``medunet plan``) tunes for anisotropic data. ``unet``,
``attention_unet``, ``unet++`` and ``segresnet`` are there for comparison.

Every network is wrapped in :class:`SegmentationNetwork`, so the trainer never
cares which one it has: in training mode it returns a list of full-resolution
logits (main output first, deep-supervision heads after), in eval mode one tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.nets import AttentionUnet, BasicUNetPlusPlus, DynUNet, SegResNet, UNet
from torch import nn

from medunet.config import ModelConfig
from medunet.errors import ConfigError

Builder = Callable[[ModelConfig, int, int], nn.Module]


def _dynunet(cfg: ModelConfig, in_channels: int, out_channels: int) -> nn.Module:
    strides = cfg.level_strides()
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=cfg.level_kernels(),
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(cfg.features),
        dropout=cfg.dropout or None,
        norm_name=(cfg.norm, {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=cfg.deep_supervision,
        deep_supr_num=min(cfg.deep_supervision_heads, len(cfg.features) - 2),
        res_block=cfg.residual,
    )


def _unet(cfg: ModelConfig, in_channels: int, out_channels: int) -> nn.Module:
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=cfg.features,
        strides=[2] * (len(cfg.features) - 1),
        num_res_units=2,
        norm=cfg.norm,
        dropout=cfg.dropout,
    )


def _attention_unet(cfg: ModelConfig, in_channels: int, out_channels: int) -> nn.Module:
    return AttentionUnet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=cfg.features,
        strides=[2] * (len(cfg.features) - 1),
        dropout=cfg.dropout,
    )


def _unetpp(cfg: ModelConfig, in_channels: int, out_channels: int) -> nn.Module:
    if len(cfg.features) != 5:
        raise ConfigError(f"unet++ needs exactly 5 model.features (its five encoder levels), got {list(cfg.features)}")
    return BasicUNetPlusPlus(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        features=(*cfg.features, cfg.features[0]),
        deep_supervision=cfg.deep_supervision,
        norm=(cfg.norm, {"affine": True}),
        dropout=cfg.dropout,
    )


def _segresnet(cfg: ModelConfig, in_channels: int, out_channels: int) -> nn.Module:
    levels = len(cfg.features)
    return SegResNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        init_filters=cfg.features[0],
        blocks_down=tuple([1, 2, 2, 4, 4, 4][:levels]),
        blocks_up=tuple([1] * (levels - 1)),
        norm=(cfg.norm, {"affine": True}),
        dropout_prob=cfg.dropout or None,
    )


NETWORKS: dict[str, Builder] = {
    "dynunet": _dynunet,
    "unet": _unet,
    "attention_unet": _attention_unet,
    "unet++": _unetpp,
    "segresnet": _segresnet,
}


class SegmentationNetwork(nn.Module):
    """Wraps any registered network to one output contract.

    ``forward`` returns, in training mode, a list of logits tensors at full resolution
    (main output first); in eval mode, the main logits tensor alone.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.net(x)
        if isinstance(out, (list, tuple)):  # BasicUNetPlusPlus
            outputs = list(out)
            outputs = [outputs[-1], *outputs[:-1][::-1]] if len(outputs) > 1 else outputs  # deepest head is the final
        elif out.dim() == x.dim() + 1:  # DynUNet deep supervision: (B, heads, C, ...)
            outputs = list(torch.unbind(out, dim=1))
        else:
            outputs = [out]
        return outputs if self.training else outputs[0]


def build_network(cfg: ModelConfig, *, in_channels: int, out_channels: int) -> SegmentationNetwork:
    """Build the network named by ``cfg.name``.

    Raises:
        ConfigError: unknown name (the message lists the valid ones).
    """
    try:
        builder = NETWORKS[cfg.name]
    except KeyError:
        raise ConfigError(f"unknown model.name {cfg.name!r}; valid names: {', '.join(NETWORKS)}") from None
    return SegmentationNetwork(builder(cfg, in_channels, out_channels))
