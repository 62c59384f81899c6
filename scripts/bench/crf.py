"""Dense CRF post-processing: its time per case and its Dice effect on the synthetic CT task.

Writes the demo's phantoms, trains the demo's small DynUNet briefly (a model whose probabilities
are still uncertain, where a CRF has something to fix), then segments the held-out cases with
and without ``postprocessing.crf`` (default settings, plus any ``--set`` variants) and scores
both against the reference labels. Prints a Markdown table and writes a JSON next to it.

    PYTHONPATH=$PWD python scripts/bench/crf.py --out /tmp/crf-bench --epochs 8 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from medunet.evaluation import dice_per_class
from medunet.inference.segmenter import Segmenter
from medunet.io.nifti import read_nifti, read_voxels
from medunet.synthetic import write_dataset
from medunet.training.trainer import train
from medunet.workflows.demo import demo_config

NO_CLEANUP = ("postprocessing.default={}", "postprocessing.classes={}")


def score(segmenter: Segmenter, cases: list[dict], root: Path) -> tuple[np.ndarray, list[float], list[int]]:
    """Mean Dice per foreground class over ``cases``, CRF seconds per case, and network-grid voxels per case."""
    dice, seconds, voxels = [], [], []
    for entry in cases:
        timings: dict[str, float] = {}
        prepared = segmenter.prepare(root / entry["image"], timings=timings)
        labels = segmenter.labels_for(prepared, timings=timings)
        reference = read_voxels(read_nifti(root / entry["label"]), case=None, path=None, dtype=np.int64)
        dice.append(dice_per_class(labels, reference, segmenter.num_classes))
        seconds.append(timings.get("crf", 0.0))
        voxels.append(int(np.prod(prepared.data["image"].shape[1:])))
    return np.mean(dice, axis=0), seconds, voxels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--num-train", type=int, default=8)
    parser.add_argument("--num-test", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    parser.add_argument("--variant", action="append", default=[], metavar="K=V[,K=V]",
                        help="extra CRF settings to try, e.g. postprocessing.crf.bilateral_weight=4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    datalist = args.out / "data" / "dataset.json"
    if not datalist.is_file():
        datalist = write_dataset(args.out / "data", num_train=args.num_train, num_test=args.num_test, shape=(64, 64, 40), num_classes=3)
    run = args.out / f"run_{args.epochs}ep"
    if not (run / "best.pt").is_file():
        train(datalist, run, demo_config(args.epochs, "cpu"), progress=False)
    test = json.loads(datalist.read_text())["test"]

    variants = {"none": [], "crf (defaults)": ["postprocessing.crf.enabled=true"]}
    for text in args.variant:
        variants[f"crf ({text.replace('postprocessing.crf.', '')})"] = ["postprocessing.crf.enabled=true", *text.split(",")]
    rows = []
    for label, overrides in variants.items():
        segmenter = Segmenter.from_checkpoint(run, device="cpu", overrides=[*NO_CLEANUP, *overrides])
        started = time.perf_counter()
        dice, seconds, voxels = score(segmenter, test, datalist.parent)
        rows.append({"setting": label, "dice": dict(zip(segmenter.class_names[1:], dice.tolist())), "mean_dice": float(dice.mean()),
                     "crf_seconds_per_case": float(np.mean(seconds)), "network_grid_voxels": int(np.mean(voxels)),
                     "total_seconds": time.perf_counter() - started})
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), "machine": platform.processor() or platform.machine(),
              "cpus": torch.get_num_threads(), "torch": torch.__version__, "epochs": args.epochs, "test_cases": len(test), "rows": rows}
    (args.out / f"crf_{args.epochs}ep.json").write_text(json.dumps(result, indent=2))
    names = list(rows[0]["dice"])
    print(f"| setting | {' | '.join(f'Dice {n}' for n in names)} | mean Dice | CRF s/case | network-grid voxels |")
    print("|---|" + "---|" * (len(names) + 3))
    for row in rows:
        cells = " | ".join(f"{row['dice'][n]:.4f}" for n in names)
        print(f"| {row['setting']} | {cells} | {row['mean_dice']:.4f} | {row['crf_seconds_per_case']:.2f} | {row['network_grid_voxels']} |")


if __name__ == "__main__":
    main()
