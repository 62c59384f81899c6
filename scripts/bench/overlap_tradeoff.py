"""Dice versus time of sliding-window settings (overlap, blending, precision, body crop) with a trained model.

A small DynUNet is trained on synthetic CT phantoms by ``medunet demo`` (or an existing demo folder
is reused with ``--demo``); held-out phantoms, larger than the training ones so each needs many
windows, are then segmented with each setting through ``Segmenter.predict`` (the full pipeline:
read, preprocess, sliding window, invert, post-process). Reported per setting: mean Dice per class
against the reference labels, and seconds per case, wall and CPU (process time of all threads: steadier
than wall time on a shared machine), medians over cases after one warm-up case.

    python scripts/bench/overlap_tradeoff.py --demo /tmp/medunet-demo          # trains first if needed (~3 min)
    python scripts/bench/overlap_tradeoff.py --demo /tmp/medunet-demo --cases 6 --json tradeoff.json
    python scripts/bench/overlap_tradeoff.py --quick     # seconds: a 1-epoch demo on 2 cases, one 40x40x24 phantom
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from common import bench_parser, markdown_table, start, workdir, write_json

SETTINGS = {  # name: overrides (precision pinned, so the table does not depend on the CPU's bf16 support)
    "overlap 0.5, gaussian, fp32": ["inference.overlap=0.5", "inference.blend=gaussian", "inference.precision=fp32"],
    "overlap 0.25, gaussian, fp32": ["inference.overlap=0.25", "inference.blend=gaussian", "inference.precision=fp32"],
    "overlap 0.25, constant, fp32": ["inference.overlap=0.25", "inference.blend=constant", "inference.precision=fp32"],
    "overlap 0.5, constant, fp32": ["inference.overlap=0.5", "inference.blend=constant", "inference.precision=fp32"],
    "overlap 0.25, gaussian, bf16": ["inference.overlap=0.25", "inference.blend=gaussian", "inference.precision=bf16"],
    # the body crop before the sliding window is a speed measure: does it cost Dice with a trained model?
    "overlap 0.25, gaussian, fp32, no body crop": ["inference.overlap=0.25", "inference.blend=gaussian",
                                                   "inference.precision=fp32", "data.crop_foreground=false"],
}


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "a 1-epoch demo on 2 cases (in a temporary folder unless --demo), one 40x40x24 phantom")
    parser.add_argument("--demo", type=Path, help="a medunet demo folder (trained here when it has no run/); needed unless --quick")
    parser.add_argument("--cases", type=int, default=4, help="held-out phantoms to segment per setting")
    parser.add_argument("--shape", type=int, nargs=3, default=(112, 112, 72), help="phantom shape in voxels")
    args = parser.parse_args(argv)
    if args.demo is None and not args.quick:
        parser.error("--demo is required (a folder for the demo model), except with --quick")
    start(args.threads)
    if args.quick:
        args.cases, args.shape = 1, (40, 40, 24)
    with workdir("tradeoff") as tmp:
        results = measure(args, args.demo or Path(tmp) / "demo", Path(tmp) / "cases")
    base = results.get("overlap 0.5, gaussian, fp32")
    rows = [[name, f"{r['seconds_median']:.2f}", f"{r['cpu_seconds_median']:.2f}",
             f"{r['cpu_seconds_median'] / base['cpu_seconds_median']:.2f}x" if base else "-", f"{r['dice_mean']:.4f}",
             ", ".join(f"{d:.4f}" for d in r["dice_per_class"])] for name, r in results.items()]
    print("\n" + markdown_table(["setting", "s/case", "CPU s/case", "CPU time vs overlap 0.5 gaussian fp32", "mean Dice",
                                 "Dice per class"], rows))
    write_json(args.json, {"shape": args.shape, "cases": args.cases, "results": results})


def measure(args: argparse.Namespace, demo: Path, cases_dir: Path) -> dict[str, dict]:
    """Train the demo if needed, then segment ``args.cases`` held-out phantoms with each setting (after one warm-up case)."""
    from medunet.errors import ConfigError
    from medunet.evaluation import dice_per_class
    from medunet.inference.segmenter import Segmenter
    from medunet.synthetic import write_dataset
    from medunet.workflows.demo import run_demo

    if not (demo / "run" / "best.pt").exists():
        quick = {"epochs": 1, "num_train": 2, "num_test": 1} if args.quick else {}
        run_demo(demo, device="cpu", progress=False, **quick)
    datalist = write_dataset(cases_dir, num_train=0, num_test=args.cases + 1, shape=tuple(args.shape), num_classes=3, seed=77)
    cases = [(cases_dir / e["image"], cases_dir / e["label"]) for e in json.loads(datalist.read_text())["test"]]
    results: dict[str, dict] = {}
    for name, overrides in SETTINGS.items():
        try:
            seg = Segmenter.from_checkpoint(demo / "run", device="cpu", overrides=overrides)
        except ConfigError as exc:
            print(f"{name}: skipped ({exc})")
            continue
        seg.predict(cases[0][0])  # warm-up
        times, cpu, dices = [], [], []
        for image, label in cases[1:]:
            started, cpu0 = time.perf_counter(), time.process_time()
            mask = seg.predict(image)
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu0)
            ref = np.asarray(nib.load(str(label)).dataobj).astype(np.int64)
            dices.append(dice_per_class(np.asarray(mask.dataobj).astype(np.int64), ref, seg.num_classes))
        mean = np.mean(dices, axis=0).tolist()
        results[name] = {"seconds_median": statistics.median(times), "cpu_seconds_median": statistics.median(cpu),
                         "dice_per_class": mean, "dice_mean": float(np.mean(mean))}
        print(f"{name}: {results[name]['seconds_median']:.2f} s/case ({results[name]['cpu_seconds_median']:.2f} CPU s), "
              f"Dice {', '.join(f'{d:.4f}' for d in mean)}", flush=True)
    return results


if __name__ == "__main__":
    main()
