"""Does the QC score rank cases by their true Dice, does it flag corrupted inputs, and what does it cost?

1. Writes CT phantoms of varied difficulty (noise 0.5x-5x, a few with a faint organ), runs a real
   (short) ``medunet crossval`` on them, and reads what the out-of-fold calibration measured
   (``qc.json``): Spearman of score vs true Dice, AUROC for "Dice below the median minus 0.1",
   and how many bad and good cases the calibrated flag reviews.
2. Segments clean held-out phantoms and every corruption of :func:`medunet.synthetic.corrupt_phantom`
   with fold 0's model and the calibrated thresholds: flags and reasons per kind.
3. Times inference with QC against ``--no-qc`` (``Segmenter.qc_enabled=False``) on one CT-sized volume.

    python scripts/bench/qc_ranking.py --workdir /tmp/qc_bench --json /tmp/qc_bench/qc_bench.json   # 10-20 min on 2 busy cores
    python scripts/bench/qc_ranking.py --workdir /tmp/qc_bench --skip-crossval --overhead-shape 256 256 160
    python scripts/bench/qc_ranking.py --quick   # seconds: 4 phantoms of 32x32x24, 2 folds of 1 step, network 4-8-16
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, bench_parser, load_average, start, workdir, write_json

from medunet.config import Config, load_config
from medunet.inference.segmenter import Segmenter
from medunet.synthetic import CORRUPTIONS, corrupt_phantom, grid_affine, make_phantom, save_nifti
from medunet.workflows.crossval import run_crossval

SHAPE = (40, 40, 32)
SPACING = (1.5, 1.5, 2.5)
QUICK_SHAPE = (32, 32, 24)
QUICK_TRAINING = ("augmentation.patch_size=[24,24,24]", "postprocessing.crf.search=false")


def write_varied_dataset(folder: Path, count: int, seed: int, shape: tuple[int, int, int] = SHAPE) -> Path:
    """CT phantoms whose noise and organ contrast vary per case, so a short training leaves Dice spread out."""
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(count):
        noise = float(rng.uniform(0.5, 5.0))
        image, label = make_phantom(shape, seed=seed * 1000 + i, noise=noise)
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


def tiny_config(iterations: int, epochs: int, extra: tuple[str, ...] = ()) -> Config:
    """The CT preset with a tiny DynUNet (features 4/8/16) and a short schedule, so cross-validation takes minutes."""
    return load_config(ROOT / "configs" / "ct.yaml", overrides=[
        "data.target_spacing=[2.0,2.0,2.5]", "augmentation.patch_size=[32,32,32]", "augmentation.samples_per_volume=1",
        "augmentation.rotate_prob=0", "augmentation.scale_prob=0", "model.features=[4,8,16]", "inference.sw_batch_size=2",
        "optim.lr=0.01", f"train.max_epochs={epochs}", f"train.iterations_per_epoch={iterations}", "train.val_every=1000",
        "train.device=cpu", "train.amp=off", *extra,
    ])


def corrupted_flags(segmenter: Segmenter, folder: Path, shape: tuple[int, int, int] = SHAPE, clean: int = 3) -> dict[str, dict]:
    """Flag, score and reasons of ``clean`` clean phantoms and of each corruption."""
    out = {}
    for i in range(clean):
        image = make_phantom(shape, seed=9000 + i)[0]
        _, qc = segmenter.predict_with_qc(save_nifti(image, grid_affine(SPACING), folder / f"clean_{i}.nii.gz"))
        out[f"clean_{i}"] = {"flag": qc.flag, "score": qc.score, "reasons": qc.reasons, "fired": qc.fired}
    for kind in CORRUPTIONS:
        image, spacing = corrupt_phantom(kind, shape, SPACING, seed=9100)
        _, qc = segmenter.predict_with_qc(save_nifti(image, grid_affine(spacing, axcodes="LPS"), folder / f"{kind}.nii.gz"))
        out[kind] = {"flag": qc.flag, "score": qc.score, "reasons": qc.reasons, "fired": qc.fired}
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


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, f"4 phantoms of {QUICK_SHAPE}, 2 folds of 1 step, 1 clean case, overhead on {QUICK_SHAPE} once")
    parser.add_argument("--workdir", type=Path, help="folder for data and the cross-validation (default: temporary)")
    parser.add_argument("--cases", type=int, default=15)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--skip-crossval", action="store_true", help="reuse a finished cross-validation in --workdir")
    parser.add_argument("--overhead-shape", type=int, nargs=3, default=(256, 256, 128))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.skip_crossval and args.workdir is None:
        parser.error("--skip-crossval needs the --workdir of a finished run")
    start(args.threads)
    logging.basicConfig(level=logging.WARNING)
    shape, clean, extra = SHAPE, 3, ()
    if args.quick:
        args.cases, args.folds, args.iterations, args.epochs, args.repeats = 4, 2, 1, 1, 1
        args.overhead_shape, shape, clean, extra = QUICK_SHAPE, QUICK_SHAPE, 1, QUICK_TRAINING
    with workdir("qc") as tmp:
        folder, tag = args.workdir or Path(tmp), "-quick" if args.quick else ""
        datalist = write_varied_dataset(folder / f"data{tag}", args.cases, seed=1, shape=shape)
        root = folder / f"cv{tag}"
        started = time.perf_counter()
        if not args.skip_crossval:
            run_crossval(datalist, root, tiny_config(args.iterations, args.epochs, extra), folds=args.folds, device="cpu", progress=False)
        calibrated = json.loads((root / "qc.json").read_text())
        segmenter = Segmenter.from_checkpoint(root, device="cpu", folds=[0])
        result = {
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "date": time.strftime("%Y-%m-%d"),
            "crossval_seconds": round(time.perf_counter() - started, 1),
            "calibration": {"score_review": calibrated["score_review"], **calibrated["achieved"]},
            "corrupted": corrupted_flags(segmenter, folder / "corrupted", shape, clean),
            "overhead": overhead(segmenter, folder / "overhead", tuple(args.overhead_shape), args.repeats),
        }
    write_json(args.json, result)
    print(json.dumps(result, indent=2))
    print(f"load average after the run {load_average()}")


if __name__ == "__main__":
    main()
