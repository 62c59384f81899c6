"""Precision choices: which autocast dtype ``auto`` picks on each kind of device."""

from __future__ import annotations

import pytest
import torch

from medunet import runtime
from medunet.config import load_config
from medunet.model.sliding import inference_dtype

CPU = torch.device("cpu")


@pytest.fixture(params=[True, False], ids=["native-bf16-cpu", "plain-cpu"])
def native(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: request.param)
    return bool(request.param)


def test_auto_uses_bf16_only_on_cpus_that_compute_it_natively(native: bool) -> None:
    assert runtime.amp_dtype("auto", CPU) == (torch.bfloat16 if native else None)


def test_explicit_choices_on_the_cpu(native: bool) -> None:
    assert runtime.amp_dtype("off", CPU) is None
    assert runtime.amp_dtype("bf16", CPU) == torch.bfloat16  # asked for: given even where it is emulated
    assert runtime.amp_dtype("fp16", CPU) is None  # no fp16 autocast on the CPU


def test_inference_precision_follows_training_unless_set(native: bool) -> None:
    assert inference_dtype(load_config(), CPU) == (torch.bfloat16 if native else None)
    assert inference_dtype(load_config(overrides=["train.amp=off"]), CPU) is None
    assert inference_dtype(load_config(overrides=["inference.precision=fp32"]), CPU) is None
    assert inference_dtype(load_config(overrides=["train.amp=off", "inference.precision=bf16"]), CPU) == torch.bfloat16


def test_native_bf16_probe_matches_torch() -> None:
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert runtime.cpu_has_native_bf16() == bool(expected)
