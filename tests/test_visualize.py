"""Tests for medunet.visualize: PNGs are valid, sized as documented, coloured where labels are."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from medunet.visualize import plot_training_curve, save_overlay

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHAPE = (20, 24, 16)
LEGEND_TOP = 850  # overlay rows below this hold the class legend, centred across columns


def read_png(path: Path) -> np.ndarray:
    """Check the PNG signature and return the decoded RGB(A) pixels as floats in 0..1."""
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return imread(path)


def assert_no_temp_files(folder: Path, expected: set[str]) -> None:
    """The folder holds exactly the expected PNGs: no leftover atomic-write temporaries."""
    assert {p.name for p in folder.iterdir()} == expected


def colourful(pixels: np.ndarray) -> int:
    """Number of clearly non-grey pixels (max-min of RGB channels above 0.2)."""
    rgb = pixels[..., :3]
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2).sum())


@pytest.fixture
def volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A grey gradient image, a two-class prediction cube and a slightly shifted reference."""
    image = np.linspace(-100.0, 300.0, math.prod(SHAPE)).reshape(SHAPE)
    prediction = np.zeros(SHAPE, dtype=np.uint8)
    prediction[6:14, 8:16, 5:11] = 1
    prediction[8:12, 10:14, 6:10] = 2
    reference = np.roll(prediction, 1, axis=0)
    return image, prediction, reference


def test_overlay_with_reference(tmp_path: Path, volume: tuple[np.ndarray, ...]) -> None:
    image, prediction, reference = volume
    out = tmp_path / "overlay.png"
    save_overlay(image, prediction, out, reference=reference, spacing=(0.8, 0.8, 2.5), title="case_001")
    pixels = read_png(out)
    assert pixels.shape[:2] == (900, 900)  # 3 views x 3 columns, 3 in each at 100 dpi
    panels = pixels[:LEGEND_TOP]
    plain, ref_col, pred_col = panels[:, :300], panels[:, 300:600], panels[:, 600:]
    assert colourful(plain) == 0
    assert colourful(ref_col) > 500
    assert colourful(pred_col) > 500
    assert not np.allclose(pred_col[..., :3].mean(axis=(0, 1)), plain[..., :3].mean(axis=(0, 1)))
    assert_no_temp_files(tmp_path, {"overlay.png"})


def test_overlay_without_reference(tmp_path: Path, volume: tuple[np.ndarray, ...]) -> None:
    image, prediction, _ = volume
    out = tmp_path / "sub" / "overlay.png"
    save_overlay(image, prediction, out, window=(-50.0, 250.0))
    pixels = read_png(out)
    assert pixels.shape[:2] == (900, 600)  # 3 views x 2 columns
    assert colourful(pixels[:LEGEND_TOP, :300]) == 0
    assert colourful(pixels[:LEGEND_TOP, 300:]) > 500
    assert_no_temp_files(out.parent, {"overlay.png"})


def test_overlay_empty_labels_uses_centre(tmp_path: Path, volume: tuple[np.ndarray, ...]) -> None:
    image, prediction, _ = volume
    out = tmp_path / "empty.png"
    save_overlay(image, np.zeros_like(prediction), out, reference=np.zeros_like(prediction))
    assert colourful(read_png(out)) == 0


def test_overlay_overwrites_existing_file(tmp_path: Path, volume: tuple[np.ndarray, ...]) -> None:
    image, prediction, _ = volume
    out = tmp_path / "overlay.png"
    out.write_bytes(b"old")
    save_overlay(image, prediction, out)
    read_png(out)
    assert_no_temp_files(tmp_path, {"overlay.png"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prediction": np.zeros((20, 24, 15))}, "prediction must have the image's shape"),
        ({"reference": np.zeros((20, 24))}, "reference must be a 3D array"),
        ({"image": np.zeros((20, 24))}, "image must be a 3D array"),
        ({"spacing": (1.0, 1.0)}, "spacing must be 3 positive numbers"),
    ],
)
def test_overlay_rejects_bad_input(
    tmp_path: Path, volume: tuple[np.ndarray, ...], kwargs: dict[str, object], message: str
) -> None:
    image, prediction, _ = volume
    args: dict[str, object] = {"image": image, "prediction": prediction, **kwargs}
    with pytest.raises(ValueError, match=message):
        save_overlay(out_png=tmp_path / "bad.png", **args)  # type: ignore[arg-type]
    assert_no_temp_files(tmp_path, set())


def curve_rows(n: int, validate_every: int) -> list[dict[str, float | int | str | None]]:
    """Epoch rows as the trainer logs them; epochs without validation have empty Dice cells."""
    rows: list[dict[str, float | int | str | None]] = []
    for epoch in range(1, n + 1):
        validated = epoch % validate_every == 0
        dice = 0.9 * (1 - math.exp(-epoch / 5))
        rows.append({
            "epoch": epoch,
            "train_loss": 1.0 / epoch,
            "lr": 1e-3,
            "val_dice_mean": dice if validated else None,
            "val_dice_liver": dice + 0.05 if validated else "",
            "val_dice_tumour": dice - 0.1 if validated else math.nan,
        })
    return rows


@pytest.mark.parametrize(
    "rows",
    [curve_rows(20, 2), curve_rows(3, 10), curve_rows(1, 1), curve_rows(1, 5)],
    ids=["with-validation", "no-validation", "single-validated-row", "single-row"],
)
def test_training_curve(tmp_path: Path, rows: list[dict[str, float | int | str | None]]) -> None:
    out = tmp_path / "curve.png"
    plot_training_curve(rows, out, class_names=["liver", "tumour"])
    assert read_png(out).shape[:2] == (400, 1000)  # 10 x 4 in at 100 dpi
    assert_no_temp_files(tmp_path, {"curve.png"})


def test_training_curve_accepts_csv_strings_and_non_positive_loss(tmp_path: Path) -> None:
    rows = [{"epoch": "1", "train_loss": "-0.2", "lr": "0.001", "val_dice_mean": "0.5", "val_dice_a": "0.5"},
            {"epoch": "2", "train_loss": "-0.4", "lr": "0.001", "val_dice_mean": "", "val_dice_a": ""}]
    out = tmp_path / "curve.png"
    plot_training_curve(rows, out, class_names=["a"])
    read_png(out)


def test_training_curve_rejects_empty_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rows must be"):
        plot_training_curve([], tmp_path / "curve.png", class_names=[])
    assert_no_temp_files(tmp_path, set())
