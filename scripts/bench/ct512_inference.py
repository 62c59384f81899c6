"""End-to-end CPU inference of a 512 x 512 x 300 synthetic CT with the default CT preset network.

The target (issue 6): read -> preprocess -> sliding window -> invert -> post-process -> write in
under 2 minutes on 2 CPU cores, with peak host RSS under 6 GB, using ``configs/ct.yaml`` as it is
(DynUNet 32-64-128-256-320, window = training patch 96^3, the preset's inference settings).

One synthetic CT phantom (``medunet.synthetic.make_phantom``) of 512 x 512 x 300 voxels at
0.8 x 0.8 x 1.5 mm, stored LPS like a DICOM conversion, is written once (cached with ``--cache``).
Each configuration runs in its own subprocess so its VmHWM is that run's peak host RSS:

* ``medunet``: ``Segmenter(...).predict_file(image, output, report)`` with the preset (plus any
  ``--set`` overrides); stage timings come from the Segmenter's run report.
* ``monai`` (with ``--baseline``): the MONAI tutorial's inference section on the same network and
  weights: LoadImaged, EnsureChannelFirstd, Orientationd, Spacingd, ScaleIntensityRanged,
  CropForegroundd -> sliding_window_inference -> Invertd(nearest_interp=False) -> AsDiscreted(argmax)
  -> SaveImaged(uint8). Same window, overlap, sw_batch_size and Gaussian blending as the medunet run.

The network has random weights (seed 0); a trained network costs the same time. There is no warm-up
run: a clinical service segments each volume once, and the sliding window dominates the time.

    python scripts/bench/ct512_inference.py --cache /tmp/ct512                  # the preset, ~2-3 min
    python scripts/bench/ct512_inference.py --cache /tmp/ct512 --baseline        # + MONAI tutorial side
    python scripts/bench/ct512_inference.py --cache /tmp/ct512 --set inference.overlap=0.5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from memory import peak_rss_mib  # scripts/bench/memory.py
from tutorial import tutorial_inference_chain  # scripts/bench/tutorial.py

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (512, 512, 300)
SPACING = (0.8, 0.8, 1.5)


def make_ct(path: Path) -> Path:
    """The 512 x 512 x 300 phantom (int16 HU, as scanners store CT), written once."""
    from medunet.synthetic import as_stored, grid_affine, make_phantom

    if path.exists():
        return path
    image, _ = make_phantom(SHAPE, seed=512, num_classes=2, modality="CT")
    affine = grid_affine(SPACING, axcodes="LPS", origin=(200.0, 180.0, -300.0))
    img = nib.Nifti1Image(np.round(as_stored(image, "LPS")).astype(np.int16), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path




def cpu_seconds() -> float:
    """User + system CPU time of this process (with wall time, shows how much other load slowed a run)."""
    t = os.times()
    return t.user + t.system


def run_medunet(args: argparse.Namespace) -> dict:
    from medunet.config import load_config
    from medunet.inference.segmenter import Segmenter
    from medunet.model.networks import build_network

    config = load_config(ROOT / "configs" / "ct.yaml", ["inference.device=cpu", *args.set])
    torch.manual_seed(0)
    model = build_network(config.model, in_channels=1, out_channels=2)
    seg = Segmenter(model, config, class_names=["background", "organ"], in_channels=1, device=torch.device("cpu"))
    out = Path(args.out_dir)
    setup = peak_rss_mib()
    cpu0, started = cpu_seconds(), time.perf_counter()
    seg.predict_file(args.image, out / "medunet.nii.gz", out / "report.json", overwrite=True)
    total = time.perf_counter() - started
    report = json.loads((out / "report.json").read_text())
    inf = config.inference
    return {"seconds_total": total, "cpu_seconds": cpu_seconds() - cpu0, "stages": report["seconds"], "peak_rss_mib": peak_rss_mib(), "setup_rss_mib": setup,
            "output": str(out / "medunet.nii.gz"),
            "settings": {"roi": list(config.roi_size()), "overlap": inf.overlap, "sw_batch_size": inf.sw_batch_size,
                         "blend": inf.blend, "precision": getattr(inf, "precision", "fp32"),
                         "resample_probabilities": inf.resample_probabilities}}


def run_monai(args: argparse.Namespace) -> dict:
    from monai.inferers import sliding_window_inference

    from medunet.config import load_config
    from medunet.model.networks import build_network

    config = load_config(ROOT / "configs" / "ct.yaml", ["inference.device=cpu", *args.set])
    torch.manual_seed(0)
    model = build_network(config.model, in_channels=1, out_channels=2).eval()
    low, high = config.data.window()
    pre, post = tutorial_inference_chain(config.data.target_spacing, (low, high), args.out_dir)
    inf = config.inference
    setup = peak_rss_mib()
    stages = {}
    cpu0, started = cpu_seconds(), time.perf_counter()
    data = pre({"image": args.image})
    stages["read_preprocess"] = time.perf_counter() - started
    tick = time.perf_counter()
    with torch.no_grad():
        data["pred"] = sliding_window_inference(data["image"][None], config.roi_size(), inf.sw_batch_size, model,
                                                overlap=inf.overlap, mode=inf.blend)[0]
    stages["network"] = time.perf_counter() - tick
    tick = time.perf_counter()
    post(data)
    stages["invert_write"] = time.perf_counter() - tick
    total = time.perf_counter() - started
    name = Path(args.image).name.replace(".nii.gz", "")
    return {"seconds_total": total, "cpu_seconds": cpu_seconds() - cpu0, "stages": stages, "peak_rss_mib": peak_rss_mib(), "setup_rss_mib": setup,
            "output": str(Path(args.out_dir) / f"{name}_seg.nii.gz")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, help="folder keeping the phantom between runs (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for both sides")
    parser.add_argument("--baseline", action="store_true", help="also run the MONAI tutorial pipeline (about as long again)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", choices=["medunet", "monai"], help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        warnings.filterwarnings("ignore")
        torch.set_num_threads(args.threads)
        print(json.dumps((run_medunet if args.worker == "medunet" else run_monai)(args)))
        return
    with tempfile.TemporaryDirectory(prefix="medunet-ct512-") as tmp:
        cache = args.cache or Path(tmp)
        tick = time.perf_counter()
        image = make_ct(cache / "ct512.nii.gz")
        print(f"phantom {SHAPE} @ {SPACING} mm: {image} ({time.perf_counter() - tick:.0f} s)", flush=True)
        results: dict = {}
        for side in ["medunet"] + (["monai"] if args.baseline else []):
            out = Path(tmp) / f"out-{side}"
            out.mkdir()
            cmd = [sys.executable, __file__, "--worker", side, "--image", str(image), "--out-dir", str(out),
                   "--threads", str(args.threads)] + [f"--set={s}" for s in args.set]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{side} failed:\n{done.stderr[-4000:]}")
            results[side] = json.loads(done.stdout.strip().splitlines()[-1])
            r = results[side]
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
            print(f"{side}: {r['seconds_total']:.1f} s end to end, {r['cpu_seconds']:.0f} CPU s ({stages}); peak RSS {r['peak_rss_mib']:.0f} MiB "
                  f"(after setup {r['setup_rss_mib']:.0f})", flush=True)
        ref = nib.load(str(image))
        for r in results.values():
            mask = nib.load(r["output"])
            r["on_input_grid"] = bool(mask.shape == ref.shape and np.allclose(mask.affine, ref.affine, atol=1e-4))
        if "monai" in results:
            a = np.asarray(nib.load(results["medunet"]["output"]).dataobj) > 0
            b = np.asarray(nib.load(results["monai"]["output"]).dataobj) > 0
            results["mask_dice_medunet_vs_monai"] = float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))
            print(f"time medunet / monai: {results['medunet']['seconds_total'] / results['monai']['seconds_total']:.2f}x, "
                  f"mask Dice {results['mask_dice_medunet_vs_monai']:.4f}")
        load = Path("/proc/loadavg").read_text().split()[:3]
        print(f"target: < 120 s and < 6144 MiB peak RSS; load average after the run {' '.join(load)}")
        if args.json:
            import monai

            meta = {"shape": SHAPE, "spacing": SPACING, "overrides": args.set, "threads": args.threads, "torch": torch.__version__,
                    "monai": monai.__version__, "nibabel": nib.__version__, "python": platform.python_version(),
                    "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
