"""Does the QC score rank cases by their true Dice, does it flag corrupted inputs, and what does it cost?

1. Writes CT phantoms of varied difficulty (noise 0.5x-5x, a few with a faint organ), runs a real
   (short) ``medunet crossval`` on them, and reads what the out-of-fold calibration measured
   (``qc.json``): Spearman of score vs true Dice, AUROC for "Dice below the median minus 0.1",
   and how many bad and good cases the calibrated flag reviews.
2. Segments clean held-out phantoms and every corruption of :func:`medunet.synthetic.corrupt_phantom`
   with fold 0's model and the calibrated thresholds: flags and reasons per kind.
3. Times inference with QC against ``--no-qc`` (``Segmenter.qc_enabled=False``) on one CT-sized volume.

    python scripts/bench/qc_ranking.py --out /tmp/qc_bench            # about 10-20 min on 2 busy cores
    python scripts/bench/qc_ranking.py --out /tmp/qc_bench --skip-crossval --overhead-shape 256 256 160
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from medunet.config import load_config
from medunet.inference.segmenter import Segmenter
from medunet.synthetic import CORRUPTIONS, corrupt_phantom, grid_affine, make_phantom, save_nifti
from medunet.workflows.crossval import run_crossval

SHAPE = (40, 40, 32)
SPACING = (1.5, 1.5, 2.5)
ROOT = Path(__file__).resolve().parents[2]


def write_varied_dataset(folder: Path, count: int, seed: int) -> Path:
    """CT phantoms whose noise and organ contrast vary per case, so a short training leaves Dice spread out."""
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(count):
        noise = float(rng.uniform(0.5, 5.0))
        image, label = make_phantom(SHAPE, seed=seed * 1000 + i, noise=noise)
        if i % 4 == 3:  # a faint organ: 60 % of its contrast against the body removed
            body = image[(label == 0) & (image > -500)].mean()
            image[label == 1] = body + 0.4 * (image[label == 1] - body)
        affine = grid_affine(SPACING, origin=(-30.0 + i, 20.0, -15.0))
        save_nifti(image, affine, folder / "imagesTr" / f"case_{i:03d}.nii.gz")
        save_nifti(label.astype(np.uint8), affine, folder / "labelsTr" / f"case_{i:03d}.nii.gz")
        entries.append({"image": f"imagesTr/case_{i:03d}.nii.gz", "label": f"labelsTr/case_{i:03d}.nii.gz"})
    datalist = {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ"}, "training": entries}
    path = folder / "dataset.json"
    path.write_text(json.dumps(datalist, indent=1))
    return path


def tiny_config(iterations: int, epochs: int) -> object:
    return load_config(ROOT / "configs" / "ct.yaml", overrides=[
        "data.target_spacing=[2.0,2.0,2.5]", "augmentation.patch_size=[32,32,32]", "augmentation.samples_per_volume=1",
        "augmentation.rotate_prob=0", "augmentation.scale_prob=0", "model.features=[4,8,16]", "inference.sw_batch_size=2",
        "optim.lr=0.01", f"train.max_epochs={epochs}", f"train.iterations_per_epoch={iterations}", "train.val_every=1000",
        "train.device=cpu", "train.amp=off",
    ])


def corrupted_flags(segmenter: Segmenter, folder: Path) -> dict[str, dict]:
    """Flag, score and reasons of clean phantoms and of each corruption."""
    out = {}
    for i in range(3):
        image = make_phantom(SHAPE, seed=9000 + i)[0]
        _, qc = segmenter.predict_with_qc(save_nifti(image, grid_affine(SPACING), folder / f"clean_{i}.nii.gz"))
        out[f"clean_{i}"] = {"flag": qc["flag"], "score": qc["score"], "reasons": qc["reasons"]}
    for kind in CORRUPTIONS:
        image, spacing = corrupt_phantom(kind, SHAPE, SPACING, seed=9100)
        _, qc = segmenter.predict_with_qc(save_nifti(image, grid_affine(spacing, axcodes="LPS"), folder / f"{kind}.nii.gz"))
        out[kind] = {"flag": qc["flag"], "score": qc["score"], "reasons": qc["reasons"]}
    return out


def overhead(segmenter: Segmenter, folder: Path, shape: tuple[int, int, int], repeats: int) -> dict[str, float]:
    """Median seconds per case with and without QC (read + preprocess + network + inversion + QC) on one volume."""
    image = make_phantom(shape, seed=5)[0]
    path = save_nifti(image, grid_affine((0.8, 0.8, 1.5)), folder / "ct_sized.nii.gz")
    seconds: dict[str, list[float]] = {"qc": [], "no_qc": [], "qc_part": []}
    for _ in range(repeats):
        for enabled in (True, False):
            segmenter.qc_enabled = enabled
            timings: dict[str, float] = {}
            started = time.perf_counter()
            segmenter.predict_case(segmenter.prepare(path, timings=timings), timings=timings)
            seconds["qc" if enabled else "no_qc"].append(time.perf_counter() - started)
            if enabled:
                seconds["qc_part"].append(timings.get("qc", 0.0))
    segmenter.qc_enabled = True
    med = {k: float(np.median(v)) for k, v in seconds.items()}
    return {"shape": list(shape), "seconds_with_qc": med["qc"], "seconds_without_qc": med["no_qc"], "qc_seconds": med["qc_part"],
            "overhead_percent": 100.0 * med["qc_part"] / med["no_qc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", type=int, default=15)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--skip-crossval", action="store_true", help="reuse a finished cross-validation in --out")
    parser.add_argument("--overhead-shape", type=int, nargs=3, default=(256, 256, 128))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    datalist = write_varied_dataset(args.out / "data", args.cases, seed=1)
    root = args.out / "cv"
    started = time.perf_counter()
    if not args.skip_crossval:
        run_crossval(datalist, root, tiny_config(args.iterations, args.epochs), folds=args.folds, device="cpu", progress=False)
    calibrated = json.loads((root / "qc.json").read_text())
    segmenter = Segmenter.from_checkpoint(root, device="cpu", folds=[0])
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "crossval_seconds": round(time.perf_counter() - started, 1),
        "calibration": {"score_review": calibrated["score_review"], **calibrated["achieved"]},
        "corrupted": corrupted_flags(segmenter, args.out / "corrupted"),
        "overhead": overhead(segmenter, args.out / "overhead", tuple(args.overhead_shape), args.repeats),
    }
    (args.out / "qc_bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
