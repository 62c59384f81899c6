"""Tests of medunet.model.networks: every registered network honours one output contract."""

from __future__ import annotations

import pytest
import torch

from medunet.config import ModelConfig
from medunet.errors import ConfigError
from medunet.model.networks import NETWORKS, SegmentationNetwork, build_network

TINY = {
    "dynunet": (4, 8, 16, 32),
    "unet": (4, 8, 16, 32),
    "attention_unet": (4, 8, 16, 32),
    "unet++": (4, 4, 8, 8, 16),
    "segresnet": (4, 8, 16, 32),
}
# networks with deep supervision heads: main output + heads
TRAIN_OUTPUTS = {"dynunet": 3, "unet": 1, "attention_unet": 1, "unet++": 4, "segresnet": 1}
IN_CHANNELS, OUT_CHANNELS = 2, 3
# instance norm and no dropout (attention_unet always uses batch norm, whose train and eval outputs differ)
SAME_IN_TRAIN_AND_EVAL = {"dynunet", "unet", "unet++", "segresnet"}


def test_registry_has_documented_names() -> None:
    assert set(NETWORKS) == {"dynunet", "unet", "attention_unet", "unet++", "segresnet"}


@pytest.mark.parametrize("name", sorted(TINY))
def test_train_and_eval_output_contract(name: str) -> None:
    torch.manual_seed(0)
    net = build_network(ModelConfig(name=name, features=TINY[name]), in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS)
    assert isinstance(net, SegmentationNetwork)
    x = torch.randn(2, IN_CHANNELS, 32, 32, 32)

    net.train()
    with torch.no_grad():
        outputs = net(x)
    assert isinstance(outputs, list)
    assert len(outputs) == TRAIN_OUTPUTS[name]
    for out in outputs:
        assert isinstance(out, torch.Tensor)
        assert tuple(out.shape) == (2, OUT_CHANNELS, 32, 32, 32)
        assert torch.isfinite(out).all()

    net.eval()
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor)
    assert tuple(out.shape) == (2, OUT_CHANNELS, 32, 32, 32)
    if name in SAME_IN_TRAIN_AND_EVAL:
        # instance norm, no dropout: train and eval compute the same main logits, so the main output comes first
        torch.testing.assert_close(outputs[0], out, rtol=1e-4, atol=1e-5)


def test_deep_supervision_heads_get_gradients() -> None:
    net = build_network(ModelConfig(features=(4, 8, 16)), in_channels=1, out_channels=2)
    net.train()
    outputs = net(torch.randn(1, 1, 16, 16, 16))
    assert len(outputs) == 2  # 3 levels: main output + 1 head
    outputs[1].mean().backward()  # the auxiliary head alone
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_dynunet_without_deep_supervision_returns_one_output() -> None:
    net = build_network(ModelConfig(features=TINY["dynunet"], deep_supervision=False), in_channels=1, out_channels=2)
    net.train()
    outputs = net(torch.randn(1, 1, 32, 32, 32))
    assert isinstance(outputs, list) and len(outputs) == 1
    assert tuple(outputs[0].shape) == (1, 2, 32, 32, 32)


def test_dynunet_anisotropic_strides() -> None:
    cfg = ModelConfig(
        features=(4, 8, 16, 32),
        strides=((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)),
        kernel_sizes=((3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    )
    assert cfg.total_stride() == (8, 8, 4)
    net = build_network(cfg, in_channels=1, out_channels=2)
    net.train()
    outputs = net(torch.randn(1, 1, 32, 32, 8))
    assert len(outputs) == 3
    assert all(tuple(o.shape) == (1, 2, 32, 32, 8) for o in outputs)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        build_network(ModelConfig(name="vnet", features=(4, 8)), in_channels=1, out_channels=2)
    message = str(info.value)
    assert "'vnet'" in message
    for name in NETWORKS:
        assert name in message


def test_unetpp_needs_five_levels() -> None:
    with pytest.raises(ConfigError, match="5 model.features"):
        build_network(ModelConfig(name="unet++", features=(4, 8, 16, 32)), in_channels=1, out_channels=2)


def test_unetpp_main_output_is_the_full_depth_decoder() -> None:
    """BasicUNetPlusPlus returns [x_0_1, x_0_2, x_0_3, x_0_4]; x_0_4 (the full network) must be the main output."""
    torch.manual_seed(0)
    net = build_network(ModelConfig(name="unet++", features=TINY["unet++"]), in_channels=1, out_channels=2)
    net.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        raw = net.net(x)
        main = net(x)
    assert len(raw) == 4
    torch.testing.assert_close(main, raw[-1])
    assert not torch.allclose(main, raw[0])
