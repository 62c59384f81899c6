"""Dense CRF post-processing: its time per case and its Dice effect on the synthetic CT task.

Writes the demo's phantoms, trains the demo's small DynUNet briefly (a model whose probabilities
are still uncertain, where a CRF has something to fix), then segments the held-out cases with
and without ``postprocessing.crf`` (default settings, plus any ``--variant`` settings) and scores
both against the reference labels. Prints a Markdown table (and writes the JSON with ``--json``).
``--workdir`` keeps the data and the trained run, so more variants can be tried on the same model.

    PYTHONPATH=$PWD python scripts/bench/crf.py --workdir /tmp/crf-bench --epochs 8 --json /tmp/crf-bench/crf_8ep.json
    PYTHONPATH=$PWD python scripts/bench/crf.py --quick   # seconds: 2+1 cases of 32x32x24, network 4-8-16, 1 epoch
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from common import bench_parser, markdown_table, start, synthetic_datalist, workdir, write_json

from medunet.config import Config, apply_overrides, config_from_dict, config_to_dict
from medunet.evaluation import dice_per_class
from medunet.inference.segmenter import Segmenter
from medunet.io.nifti import read_nifti, read_voxels
from medunet.training.trainer import train
from medunet.workflows.demo import demo_config

NO_CLEANUP = ("postprocessing.default={}", "postprocessing.classes={}")
SHAPE = (64, 64, 40)
QUICK_SHAPE = (32, 32, 24)
QUICK_TRAINING = ("augmentation.patch_size=[16,16,16]", "augmentation.samples_per_volume=1", "model.features=[4,8,16]",
                  "train.iterations_per_epoch=1", "train.batch_size=1")
QUICK_VARIANT = "postprocessing.crf.bilateral_weight=4"


def score(segmenter: Segmenter, cases: list[dict], root: Path) -> tuple[np.ndarray, list[float], list[int]]:
    """Mean Dice per foreground class over ``cases``, CRF seconds per case, and network-grid voxels per case."""
    dice, seconds, voxels = [], [], []
    for entry in cases:
        timings: dict[str, float] = {}
        prepared = segmenter.prepare(root / entry["image"], timings=timings)
        labels = segmenter.predict_case(prepared, timings=timings, qc=False).labels
        reference = read_voxels(read_nifti(root / entry["label"]), case=None, path=None, dtype=np.int64)
        dice.append(dice_per_class(labels, reference, segmenter.num_classes))
        seconds.append(timings.get("crf", 0.0))
        voxels.append(int(np.prod(prepared.data["image"].shape[1:])))
    return np.mean(dice, axis=0), seconds, voxels


def training_config(epochs: int, quick: bool) -> Config:
    """The demo's config for ``epochs`` on the CPU; in quick mode a tiny network and one step per epoch."""
    config = demo_config(epochs, "cpu")
    return config_from_dict(apply_overrides(config_to_dict(config), QUICK_TRAINING)) if quick else config


def settings(variants: list[str]) -> dict[str, list[str]]:
    """Row label -> overrides: no CRF, the CRF with its defaults, and each ``--variant``."""
    out: dict[str, list[str]] = {"none": [], "crf (defaults)": ["postprocessing.crf.enabled=true"]}
    for text in variants:
        out[f"crf ({text.replace('postprocessing.crf.', '')})"] = ["postprocessing.crf.enabled=true", *text.split(",")]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, f"2 training and 1 test case of {QUICK_SHAPE}, network 4-8-16, 1 epoch, one --variant")
    parser.set_defaults(threads=1)  # 1: stable CRF timings on a shared machine
    parser.add_argument("--workdir", type=Path, help="folder keeping the data and the trained run between runs (default: temporary)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--num-train", type=int, default=8)
    parser.add_argument("--num-test", type=int, default=4)
    parser.add_argument("--variant", action="append", default=[], metavar="K=V[,K=V]",
                        help="extra CRF settings to try, e.g. postprocessing.crf.bilateral_weight=4")
    args = parser.parse_args(argv)
    start(args.threads)
    if args.quick:
        args.epochs, args.num_train, args.num_test, args.variant = 1, 2, 1, [QUICK_VARIANT]
    torch.manual_seed(0)
    with workdir("crf") as tmp:
        folder, tag = args.workdir or Path(tmp), "_quick" if args.quick else ""
        datalist = folder / f"data{tag}" / "dataset.json"
        if not datalist.is_file():
            datalist = synthetic_datalist(datalist.parent, cases=args.num_train, test=args.num_test,
                                          shape=QUICK_SHAPE if args.quick else SHAPE, num_classes=3)
        run = folder / f"run_{args.epochs}ep{tag}"
        if not (run / "best.pt").is_file():
            train(datalist, run, training_config(args.epochs, args.quick), progress=False)
        test = json.loads(datalist.read_text())["test"]
        rows = []
        for label, overrides in settings(args.variant).items():
            segmenter = Segmenter.from_checkpoint(run, device="cpu", overrides=[*NO_CLEANUP, *overrides])
            started = time.perf_counter()
            dice, seconds, voxels = score(segmenter, test, datalist.parent)
            rows.append({"setting": label, "dice": dict(zip(segmenter.class_names[1:], dice.tolist())), "mean_dice": float(dice.mean()),
                         "crf_seconds_per_case": float(np.mean(seconds)), "network_grid_voxels": int(np.mean(voxels)),
                         "total_seconds": time.perf_counter() - started})
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), "machine": platform.processor() or platform.machine(),
              "cpus": torch.get_num_threads(), "torch": torch.__version__, "epochs": args.epochs, "test_cases": len(test), "rows": rows}
    write_json(args.json, result)
    names = list(rows[0]["dice"])
    print(markdown_table(
        ["setting", *(f"Dice {n}" for n in names), "mean Dice", "CRF s/case", "network-grid voxels"],
        [[row["setting"], *(f"{row['dice'][n]:.4f}" for n in names), f"{row['mean_dice']:.4f}",
          f"{row['crf_seconds_per_case']:.2f}", row["network_grid_voxels"]] for row in rows]))


if __name__ == "__main__":
    main()
