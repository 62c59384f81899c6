"""The run folder's human-readable records: metrics.csv, train_curve.png, split.json."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medunet.io.atomic import atomic_write_text
from medunet.model.layout import SPLIT_FILE
from medunet.visualize import plot_training_curve


def dice_column(name: str) -> str:
    """CSV column of one class's validation Dice."""
    return f"val_dice_{name}"


def iou_column(name: str) -> str:
    """CSV column of one class's validation IoU (Jaccard)."""
    return f"val_iou_{name}"


class MetricsLog:
    """Per-epoch metrics, rewritten atomically as ``metrics.csv`` and drawn as ``train_curve.png``.

    With ``write=False`` (ranks other than 0 under torchrun) the rows are kept but no file is written.
    """

    def __init__(
        self, run_dir: Path, class_names: Sequence[str], rows: list[dict[str, Any]] | None = None, *, write: bool = True
    ) -> None:
        self.run_dir = run_dir
        self.write = write
        self.class_names = list(class_names)
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.columns = [
            "epoch", "train_loss", "lr", "val_dice_mean", *map(dice_column, self.class_names),
            "val_iou_mean", *map(iou_column, self.class_names), "step_seconds", "epoch_seconds",
        ]

    def add(self, row: dict[str, Any], *, draw: bool) -> None:
        """Record one epoch; write the CSV, and redraw the curve when ``draw`` (after a validation)."""
        self.rows.append(row)
        self.write_csv()
        if draw and self.write:
            plot_training_curve(self.rows, self.run_dir / "train_curve.png", class_names=self.class_names)

    def write_csv(self) -> None:
        """Rewrite metrics.csv from the rows (small; atomic so readers never see half a file)."""
        if not self.write:
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _fmt(row.get(k)) for k in self.columns})
        atomic_write_text(self.run_dir / "metrics.csv", buffer.getvalue())


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_split(run_dir: Path, training: Sequence[str], validation: Sequence[str], *, seed: int, source: str) -> None:
    """Save the train/validation case names so the split can be audited and reused."""
    payload = {"source": source, "seed": seed, "training": list(training), "validation": list(validation)}
    atomic_write_text(run_dir / SPLIT_FILE, json.dumps(payload, indent=2))
