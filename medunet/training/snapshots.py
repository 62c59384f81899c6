"""Watch a run learn: the prediction on fixed slices of one validation case at every validation.

At each validation the trainer hands over its prediction for the first validation volume; three
orthogonal slices through the reference's centre are kept in ``<run>/learning/epoch_NNNN.npz`` (small,
so a resumed run keeps its earlier frames). At the end of training they become ``learning.png`` (a
grid over epochs above the training curve) and ``learning.gif`` (the mask forming, frame by frame),
with the reference contour drawn in yellow on every view.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medunet.io.atomic import atomic_path
from medunet.visualize import learning_frame, learning_view, save_learning_pictures

log = logging.getLogger("medunet")

#: Slice axes of the three views (axial, coronal, sagittal in the RAS-oriented network grid).
_AXES = (2, 1, 0)


def _display(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The slice at ``index`` along ``axis``, turned so the first remaining axis runs across and the second up."""
    return np.flipud(np.take(volume, index, axis=axis).T)


class LearningSnapshots:
    """Collects the learning frames of one run folder and draws them at the end."""

    def __init__(self, run_dir: Path, val_dataset: Any, class_names: Sequence[str]) -> None:
        self.run_dir, self.folder = run_dir, run_dir / "learning"
        self.val_dataset, self.class_names = val_dataset, list(class_names)
        self._fixed: tuple[np.ndarray, np.ndarray, tuple[int, ...], tuple[float, float]] | None = None

    def _reference(self) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], tuple[float, float]]:
        """The first validation volume's image (channel 0), reference, centre voxel and display window."""
        if self._fixed is None:
            item = self.val_dataset[0]
            image = np.asarray(item["image"], dtype=np.float32)[0]
            reference = np.asarray(item["label"])[0].astype(np.uint8)
            foreground = np.argwhere(reference > 0)
            centre = tuple(int(c) for c in (foreground.mean(0).round() if len(foreground) else np.array(reference.shape) // 2))
            low, high = (float(v) for v in np.percentile(image, [1.0, 99.0]))
            self._fixed = (image, reference, centre, (low, high if high > low else low + 1.0))
        return self._fixed

    def add(self, epoch: int, prediction: np.ndarray, dice: float) -> None:
        """Keep the three views of ``prediction`` (the first validation volume's label map) for ``epoch``."""
        _, reference, centre, _ = self._reference()
        if prediction.shape != reference.shape:
            log.warning("learning snapshot of epoch %d skipped: prediction %s, reference %s", epoch, prediction.shape, reference.shape)
            return
        views: dict[str, Any] = {f"view{i}": _display(prediction, axis, centre[axis]) for i, axis in enumerate(_AXES)}
        with atomic_path(self.folder / f"epoch_{epoch:04d}.npz") as tmp:
            np.savez_compressed(tmp, dice=np.float64(dice), **views)

    def frames(self) -> list[np.ndarray]:
        """One picture per kept validation, in epoch order."""
        image, reference, centre, window = self._reference()
        fixed = [(_display(image, a, centre[a]), _display(reference, a, centre[a])) for a in _AXES]
        frames = []
        for path in sorted(self.folder.glob("epoch_*.npz")):
            epoch = int(re.findall(r"\d+", path.stem)[0])
            with np.load(path) as saved:
                views = [learning_view(img, ref, saved[f"view{i}"], window=window) for i, (img, ref) in enumerate(fixed)]
                frames.append(learning_frame(views, f"epoch {epoch}  Dice {float(saved['dice']):.3f}"))
        return frames

    def finish(self) -> list[Path]:
        """Draw ``learning.png`` and ``learning.gif`` in the run folder; returns them (none without frames)."""
        if not self.folder.is_dir():
            return []
        frames = self.frames()
        if not frames:
            return []
        png, gif = self.run_dir / "learning.png", self.run_dir / "learning.gif"
        save_learning_pictures(frames, png, gif, curve_png=self.run_dir / "train_curve.png")
        return [png, gif]
