"""Dice versus time of sliding-window settings (overlap, blending, precision, body crop) with a trained model.

A small DynUNet is trained on synthetic CT phantoms by ``medunet demo`` (or an existing demo folder
is reused with ``--demo``); held-out phantoms, larger than the training ones so each needs many
windows, are then segmented with each setting through ``Segmenter.predict`` (the full pipeline:
read, preprocess, sliding window, invert, post-process). Reported per setting: mean Dice per class
against the reference labels, and seconds per case, wall and CPU (process time of all threads: steadier
than wall time on a shared machine), medians over cases after one warm-up case.

    python scripts/bench/overlap_tradeoff.py --demo /tmp/medunet-demo          # trains first if needed (~3 min)
    python scripts/bench/overlap_tradeoff.py --demo /tmp/medunet-demo --cases 6 --json tradeoff.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="a medunet demo folder (trained here when it has no run/)")
    parser.add_argument("--cases", type=int, default=4, help="held-out phantoms to segment per setting")
    parser.add_argument("--shape", type=int, nargs=3, default=(112, 112, 72), help="phantom shape in voxels")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    from medunet.errors import ConfigError
    from medunet.evaluation import dice_per_class
    from medunet.inference.segmenter import Segmenter
    from medunet.synthetic import write_dataset
    from medunet.workflows.demo import run_demo

    if not (args.demo / "run" / "best.pt").exists():
        run_demo(args.demo, device="cpu", progress=False)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="medunet-tradeoff-") as tmp:
        datalist = write_dataset(Path(tmp), num_train=0, num_test=args.cases + 1, shape=tuple(args.shape), num_classes=3, seed=77)
        spec = json.loads(datalist.read_text())
        cases = [(Path(tmp) / e["image"], Path(tmp) / e["label"]) for e in spec["test"]]
        for name, overrides in SETTINGS.items():
            try:
                seg = Segmenter.from_checkpoint(args.demo / "run", device="cpu", overrides=overrides)
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
                ref = np.asarray(__import__("nibabel").load(str(label)).dataobj).astype(np.int64)
                dices.append(dice_per_class(np.asarray(mask.dataobj).astype(np.int64), ref, seg.num_classes))
            mean = np.mean(dices, axis=0).tolist()
            results[name] = {"seconds_median": statistics.median(times), "cpu_seconds_median": statistics.median(cpu),
                             "dice_per_class": mean, "dice_mean": float(np.mean(mean))}
            print(f"{name}: {results[name]['seconds_median']:.2f} s/case ({results[name]['cpu_seconds_median']:.2f} CPU s), Dice {', '.join(f'{d:.4f}' for d in mean)}", flush=True)
    base = results.get("overlap 0.5, gaussian, fp32")
    print("\n| setting | s/case | CPU s/case | CPU time vs overlap 0.5 gaussian fp32 | mean Dice | Dice per class |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{r['cpu_seconds_median'] / base['cpu_seconds_median']:.2f}x" if base else "-"
        print(f"| {name} | {r['seconds_median']:.2f} | {r['cpu_seconds_median']:.2f} | {ratio} | {r['dice_mean']:.4f} | {', '.join(f'{d:.4f}' for d in r['dice_per_class'])} |")
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "cases": args.cases, "results": results}, indent=2))


if __name__ == "__main__":
    main()
