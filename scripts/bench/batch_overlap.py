"""Batch inference over a folder: overlapped IO (read/preprocess ahead, write behind) versus one stage at a time.

``medunet.inference.batch.segment_all`` runs with ``overlap_io=False`` (each case read, preprocessed,
predicted, inverted and written before the next starts) and ``overlap_io=True`` (the next case is
read and preprocessed, and the previous one written, in background threads while the network runs),
each in its own subprocess, on the same folder of synthetic CT phantoms, the same network and
weights. Reported: wall seconds for the whole batch, CPU seconds, and whether the masks are identical.

The gain depends on how much of a case is not network time: on a GPU the network is fast and reading,
resampling and gzip dominate; on 2 CPU cores the network already keeps both cores busy.

    python scripts/bench/batch_overlap.py                               # 6 cases, a small DynUNet
    python scripts/bench/batch_overlap.py --features 32 64 128 256 320  # the CT preset's network
    python scripts/bench/batch_overlap.py --quick                       # seconds: 2 cases of 48x48x32, in-process
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from common import ROOT, bench_parser, cpu_seconds, load_average, phantom_scan, run_side, start, workdir, write_json


def worker(args: argparse.Namespace) -> None:
    """One mode over the whole folder; prints a JSON line (wall and CPU seconds)."""
    start(args.threads)
    from medunet.config import load_config
    from medunet.inference.batch import collect_inputs, segment_all
    from medunet.inference.segmenter import Segmenter
    from medunet.model.networks import build_network

    config = load_config(ROOT / "configs" / "ct.yaml", ["inference.device=cpu", f"model.features={list(args.features)}",
                                                        *args.set])
    torch.manual_seed(0)
    seg = Segmenter(build_network(config.model, in_channels=1, out_channels=2), config, class_names=["background", "organ"],
                    in_channels=1, device=torch.device("cpu"))
    cases = collect_inputs(args.scans)
    cpu0, started = cpu_seconds(), time.perf_counter()
    segment_all(seg, cases, args.out_dir, progress=False, overlap_io=args.worker == "overlapped")
    print(json.dumps({"seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu0}))


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "2 cases of 48x48x32, network 8-16-32 with window 32^3, both modes in this process")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 120))
    parser.add_argument("--features", type=int, nargs="+", default=(8, 16, 32, 64, 128))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for both modes")
    parser.add_argument("--worker", choices=["sequential", "overlapped"], help=argparse.SUPPRESS)
    parser.add_argument("--scans", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.cases, args.shape, args.features = 2, (48, 48, 32), (8, 16, 32)
        args.set = ["augmentation.patch_size=[32,32,32]", *args.set]
    results: dict = {}
    with workdir("batch") as tmp_name:
        tmp = Path(tmp_name)
        for i in range(args.cases):
            phantom_scan(tmp / "scans" / f"ct_{i:02d}.nii.gz", args.shape, (0.8, 0.8, 2.0), axcodes="LPS", seed=i, int16=True)
        for mode in ("sequential", "overlapped"):
            results[mode] = run_side(__file__, main, [
                "--worker", mode, "--scans", str(tmp / "scans"), "--out-dir", str(tmp / mode), "--threads", str(args.threads),
                "--features", *map(str, args.features), *[f"--set={s}" for s in args.set]], in_process=args.quick)
            print(f"{mode}: {results[mode]['seconds']:.1f} s for {args.cases} cases ({results[mode]['cpu_seconds']:.0f} CPU s)",
                  flush=True)
        same = all(np.array_equal(np.asarray(nib.load(p).dataobj), np.asarray(nib.load(tmp / "overlapped" / p.name).dataobj))
                   for p in sorted((tmp / "sequential").glob("*.nii.gz")))
    ratio = results["sequential"]["seconds"] / results["overlapped"]["seconds"]
    print(f"overlapped is {ratio:.2f}x as fast as sequential; identical masks: {same}; load average {load_average()}")
    write_json(args.json, {"args": {k: v for k, v in vars(args).items() if k != "json"}, "results": results, "speedup": ratio,
                           "identical_masks": same})


if __name__ == "__main__":
    main()
