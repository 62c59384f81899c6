"""Sliding-window prediction: blending, window batching and mirror TTA."""

from __future__ import annotations

import torch
from torch import nn

from medunet.config import load_config
from medunet.model.sliding import ALL_FLIPS, predict_probabilities


class Counting(nn.Module):
    """A random 3x3x3 convolution (not mirror-symmetric, so not flip-equivariant) that counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        nn.init.normal_(self.conv.weight, std=2.0)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x)


def test_flip_tta_averages_the_eight_mirrored_predictions_mapped_back() -> None:
    # one window covers the whole image, so each pass is exactly softmax(model(x)) and TTA can be computed by hand
    image = torch.rand(1, 1, 16, 16, 16) - 0.5
    plain_cfg = load_config(None, ["inference.roi_size=[16,16,16]", "inference.sw_batch_size=1"])
    tta_cfg = load_config(None, ["inference.roi_size=[16,16,16]", "inference.sw_batch_size=1", "inference.tta_flips=true"])
    model = Counting().eval()
    cpu = torch.device("cpu")
    with torch.no_grad():
        plain = predict_probabilities(model, image, plain_cfg, device=cpu)
        calls_plain = model.calls
        tta = predict_probabilities(model, image, tta_cfg, device=cpu)
        calls_tta = model.calls - calls_plain
        by_hand = torch.stack([
            torch.flip(torch.softmax(model(torch.flip(image, dims)), dim=1), dims) if dims else torch.softmax(model(image), dim=1)
            for dims in ALL_FLIPS
        ]).mean(dim=0)
        mirrored = predict_probabilities(model, torch.flip(image, (2, 4)), tta_cfg, device=cpu)
    assert len(ALL_FLIPS) == 8 and len(set(ALL_FLIPS)) == 8 and () in ALL_FLIPS
    assert calls_tta == 8 * calls_plain
    torch.testing.assert_close(plain, torch.softmax(model(image), dim=1).detach(), atol=1e-5, rtol=0)
    assert (tta - plain).abs().max() > 0.05, "the model is not flip-equivariant: TTA must change its output"
    torch.testing.assert_close(tta, by_hand, atol=1e-5, rtol=0)
    # averaging over every mirror makes the prediction flip-equivariant: mirrored input, mirrored output
    torch.testing.assert_close(mirrored, torch.flip(tta, (2, 4)), atol=1e-5, rtol=0)


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
