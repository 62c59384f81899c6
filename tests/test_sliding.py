"""Sliding-window prediction: blending, window batching and mirror TTA."""

from __future__ import annotations

import torch
from torch import nn

from medunet.config import load_config
from medunet.model.sliding import ALL_FLIPS, predict_probabilities


class Pointwise(nn.Module):
    """A voxel-wise 'network' (logit = +-4x): equivariant to flips, so TTA must not change its output."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.cat([-4.0 * x, 4.0 * x], dim=1)


def test_flip_tta_runs_eight_flips_and_keeps_an_equivariant_prediction() -> None:
    image = torch.rand(1, 1, 20, 18, 12) - 0.5
    plain_cfg = load_config(None, ["inference.roi_size=[16,16,16]", "inference.sw_batch_size=1"])
    tta_cfg = load_config(None, ["inference.roi_size=[16,16,16]", "inference.sw_batch_size=1", "inference.tta_flips=true"])
    model = Pointwise()
    plain = predict_probabilities(model, image, plain_cfg, device=torch.device("cpu"))
    calls_plain = model.calls
    tta = predict_probabilities(model, image, tta_cfg, device=torch.device("cpu"))
    assert len(ALL_FLIPS) == 8 and len(set(ALL_FLIPS)) == 8
    assert model.calls - calls_plain == 8 * calls_plain
    torch.testing.assert_close(tta, plain, atol=1e-5, rtol=0)
    expected = torch.softmax(torch.cat([-4.0 * image, 4.0 * image], dim=1), dim=1)
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=0)


def test_result_does_not_depend_on_window_batch_size() -> None:
    image = torch.rand(1, 1, 40, 36, 24) - 0.5
    conv = nn.Conv3d(1, 2, 3, padding=1)
    torch.manual_seed(0)
    nn.init.normal_(conv.weight)
    results = [
        predict_probabilities(conv, image, load_config(None, ["inference.roi_size=[16,16,16]", f"inference.sw_batch_size={n}"]),
                              device=torch.device("cpu"))
        for n in (1, 3, 8)
    ]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=1e-6, rtol=0)
    assert results[0].shape == (1, 2, 40, 36, 24)
    torch.testing.assert_close(results[0].sum(dim=1), torch.ones(1, 40, 36, 24))
