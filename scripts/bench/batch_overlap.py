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
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch


def worker(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from medunet.config import load_config
    from medunet.inference.batch import collect_inputs, segment_all
    from medunet.inference.segmenter import Segmenter
    from medunet.model.networks import build_network

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "ct.yaml",
                         ["inference.device=cpu", f"model.features={list(args.features)}"])
    torch.manual_seed(0)
    seg = Segmenter(build_network(config.model, in_channels=1, out_channels=2), config, class_names=["background", "organ"],
                    in_channels=1, device=torch.device("cpu"))
    cases = collect_inputs(args.scans)
    cpu0, started = sum(os.times()[:2]), time.perf_counter()
    segment_all(seg, cases, args.out, progress=False, overlap_io=args.worker == "overlapped")
    print(json.dumps({"seconds": time.perf_counter() - started, "cpu_seconds": sum(os.times()[:2]) - cpu0}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 120))
    parser.add_argument("--features", type=int, nargs="+", default=(8, 16, 32, 64, 128))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=["sequential", "overlapped"], help=argparse.SUPPRESS)
    parser.add_argument("--scans", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from medunet.synthetic import as_stored, grid_affine, make_phantom, save_nifti

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="medunet-batch-") as tmp:
        scans = Path(tmp) / "scans"
        for i in range(args.cases):
            image, _ = make_phantom(tuple(args.shape), seed=i, num_classes=2)
            save_nifti(np.round(as_stored(image, "LPS")).astype(np.int16), grid_affine((0.8, 0.8, 2.0), axcodes="LPS"),
                       scans / f"ct_{i:02d}.nii.gz")
        for mode in ("sequential", "overlapped"):
            cmd = [sys.executable, __file__, "--worker", mode, "--scans", str(scans), "--out", str(Path(tmp) / mode),
                   "--threads", str(args.threads), "--features", *map(str, args.features)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{mode}: {results[mode]['seconds']:.1f} s for {args.cases} cases ({results[mode]['cpu_seconds']:.0f} CPU s)",
                  flush=True)
        same = all(np.array_equal(np.asarray(nib.load(p).dataobj), np.asarray(nib.load(Path(tmp) / "overlapped" / p.name).dataobj))
                   for p in sorted((Path(tmp) / "sequential").glob("*.nii.gz")))
    ratio = results["sequential"]["seconds"] / results["overlapped"]["seconds"]
    print(f"overlapped is {ratio:.2f}x as fast as sequential; identical masks: {same}; "
          f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"}, "results": results,
                                         "speedup": ratio, "identical_masks": same}, indent=2, default=str))


if __name__ == "__main__":
    main()
