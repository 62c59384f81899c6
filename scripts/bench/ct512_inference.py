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
    python scripts/bench/ct512_inference.py --quick     # seconds: a 48x48x32 phantom, a 3-level network, both sides in-process
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from common import ROOT, bench_parser, cpu_seconds, load_average, peak_rss_mib, phantom_scan, run_side, start, workdir, write_json
from tutorial import tutorial_inference_chain  # scripts/bench/tutorial.py

SHAPE = (512, 512, 300)
SPACING = (0.8, 0.8, 1.5)
QUICK_SHAPE = (48, 48, 32)
QUICK_OVERRIDES = ["augmentation.patch_size=[32,32,32]", "model.features=[8,16,32]"]


def make_ct(path: Path, shape: tuple[int, int, int]) -> Path:
    """The phantom (int16 HU, as scanners store CT, LPS like a DICOM conversion), written once."""
    if not path.exists():
        phantom_scan(path, shape, SPACING, axcodes="LPS", seed=512, origin=(200.0, 180.0, -300.0), int16=True)
    return path


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


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, f"a {QUICK_SHAPE} phantom, network 8-16-32 with window 32^3, --baseline, sides in-process")
    parser.add_argument("--cache", type=Path, help="folder keeping the phantom between runs (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for both sides")
    parser.add_argument("--baseline", action="store_true", help="also run the MONAI tutorial pipeline (about as long again)")
    parser.add_argument("--worker", choices=["medunet", "monai"], help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    start(args.threads)
    if args.worker:
        print(json.dumps((run_medunet if args.worker == "medunet" else run_monai)(args)))
        return
    shape = QUICK_SHAPE if args.quick else SHAPE
    if args.quick:
        args.set, args.baseline = [*QUICK_OVERRIDES, *args.set], True
    with workdir("ct512") as tmp:
        cache = args.cache or Path(tmp)
        tick = time.perf_counter()
        image = make_ct(cache / ("ct_quick.nii.gz" if args.quick else "ct512.nii.gz"), shape)
        print(f"phantom {shape} @ {SPACING} mm: {image} ({time.perf_counter() - tick:.0f} s)", flush=True)
        results: dict = {}
        for side in ["medunet"] + (["monai"] if args.baseline else []):
            out = Path(tmp) / f"out-{side}"
            out.mkdir()
            results[side] = run_side(__file__, main, ["--worker", side, "--image", str(image), "--out-dir", str(out),
                                                      "--threads", str(args.threads), *[f"--set={s}" for s in args.set]],
                                     in_process=args.quick)
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
        print(f"target: < 120 s and < 6144 MiB peak RSS; load average after the run {load_average()}")
        if args.json:
            import monai

            meta = {"shape": shape, "spacing": SPACING, "overrides": args.set, "threads": args.threads, "torch": torch.__version__,
                    "monai": monai.__version__, "nibabel": nib.__version__, "python": platform.python_version(),
                    "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            write_json(args.json, {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
