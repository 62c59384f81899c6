"""``medunet demo``: the whole pipeline on a synthetic CT dataset, in minutes on a laptop CPU.

It writes phantoms with two organ classes (in RAS and LPS files), trains a small
DynUNet, segments the held-out test cases, scores them against their reference
labels and draws image / reference / prediction side by side. The run folder also shows the
network learning: ``learning.png`` / ``learning.gif`` (the prediction on one validation case at every
validation, the reference contour in yellow, above the training curve).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medunet.config import Config, load_config
from medunet.errors import OutputExistsError
from medunet.evaluation import dice_per_class
from medunet.inference.batch import collect_inputs, segment_all
from medunet.inference.segmenter import Segmenter
from medunet.io.nifti import read_nifti, read_voxels
from medunet.synthetic import write_dataset
from medunet.training.trainer import train
from medunet.visualize import save_overlay_files
from medunet.workflows.calibration import calibrate_run

log = logging.getLogger("medunet")

#: The demo's settings: a small network and patch that learn the phantoms in a few minutes on 2 CPU cores.
DEMO_OVERRIDES = (
    "data.target_spacing=[2.0, 2.0, 2.5]",
    "augmentation.patch_size=[48, 48, 32]",
    "augmentation.samples_per_volume=2",
    "augmentation.rotate_prob=0.1",
    "augmentation.scale_prob=0.1",
    "model.features=[8, 16, 32, 64]",
    "train.max_epochs=40",
    "train.batch_size=2",
    "train.val_every=4",
    "optim.lr=0.003",
    "optim.warmup_epochs=2",
    "inference.sw_batch_size=2",
    "postprocessing.default.keep_largest=true",
)


@dataclass
class DemoResult:
    """Where the demo left its outputs and how well it did."""

    out_dir: Path
    run_dir: Path
    pred_dir: Path
    preview: Path
    val_dice: float
    test_dice: dict[str, float]
    learning: list[Path]
    """learning.png and learning.gif in the run folder (watch the mask form over the epochs)."""


def demo_config(epochs: int | None = None, device: str = "auto") -> Config:
    """The demo's config: the CT defaults with :data:`DEMO_OVERRIDES` (and optionally fewer epochs)."""
    overrides = list(DEMO_OVERRIDES) + [f"train.device={device}", f"inference.device={device}"]
    if epochs is not None:
        overrides.append(f"train.max_epochs={epochs}")
    return load_config(None, overrides)


def run_demo(
    out_dir: str | Path = "medunet-demo",
    *,
    epochs: int | None = None,
    num_train: int = 12,
    num_test: int = 3,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> DemoResult:
    """Generate data, train, infer and evaluate in ``out_dir`` (data/, run/, preds/, preview.png)."""
    out = Path(out_dir)
    parts = [out / "data", out / "run", out / "preds", out / "preview.png"]
    if any(p.exists() for p in parts):
        if not overwrite:
            raise OutputExistsError(f"{out} already holds a demo; pass --overwrite to replace it or --out for another folder")
        for p in parts:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    started = time.perf_counter()
    log.info("1/4 writing %d synthetic CT phantoms to %s", num_train + num_test, out / "data")
    datalist = write_dataset(out / "data", num_train=num_train, num_test=num_test, shape=(64, 64, 40), num_classes=3)

    log.info("2/4 training a small DynUNet (run folder %s)", out / "run")
    result = train(datalist, out / "run", demo_config(epochs, device), progress=progress)
    calibrate_run(datalist, out / "run", device=device, progress=progress)  # as `medunet train` does

    log.info("3/4 segmenting the %d test cases", num_test)
    segmenter = Segmenter.from_checkpoint(out / "run")
    cases = collect_inputs(datalist)
    segment_all(segmenter, cases, out / "preds", progress=progress)

    log.info("4/4 scoring against the reference labels")
    test_entries = json.loads(datalist.read_text())["test"]
    scores = []
    for (name, _), entry in zip(cases, test_entries):
        pred = read_voxels(read_nifti(out / "preds" / f"{name}.nii.gz"), case=name, path=None, dtype=np.int64)
        ref = read_voxels(read_nifti(out / "data" / entry["label"]), case=name, path=None, dtype=np.int64)
        scores.append(dice_per_class(pred, ref, segmenter.num_classes))
    test_dice = dict(zip(segmenter.class_names[1:], np.mean(scores, axis=0).tolist()))

    first = cases[0]
    preview = out / "preview.png"
    save_overlay_files(
        out / "data" / test_entries[0]["image"],  # = first[1][0], the datalist's path as a Path
        out / "preds" / f"{first[0]}.nii.gz",
        preview,
        reference_path=out / "data" / test_entries[0]["label"],
        title=f"{first[0]}: image / reference / prediction",
        window=segmenter.config.data.window(),
        class_names=segmenter.class_names,
    )
    log.info("demo finished in %.0f s", time.perf_counter() - started)
    learning = [p for p in (out / "run" / "learning.png", out / "run" / "learning.gif") if p.is_file()]
    return DemoResult(out, out / "run", out / "preds", preview, result.best_dice, test_dice, learning)
