"""End-to-end inference latency per case: medunet ``Segmenter.predict_file`` vs the MONAI tutorial.

Per case, both pipelines read a NIfTI CT, preprocess it (orient RAS, resample to 1.5x1.5x2.0 mm,
CT window, foreground crop), run a sliding window (same roi, overlap, sw_batch_size, Gaussian
blending), invert back to the input grid, take the argmax and write a .nii.gz mask:

* medunet: ``Segmenter(...).predict_file(image, output)`` (checks, probability inversion,
  post-processing, atomic write with the input's header).
* baseline (spleen tutorial, inference section): LoadImaged, EnsureChannelFirstd, Orientationd,
  Spacingd, ScaleIntensityRanged, CropForegroundd -> sliding_window_inference -> Invertd
  (nearest_interp=False), mt.AsDiscreted(argmax=True), SaveImaged (uint8, as medunet writes).

Both use the same untrained MONAI UNet (16-32-64-128-256, batch norm) with the same weights,
saved once and loaded by each side. Every (pipeline, volume) pair runs in its own subprocess,
so its VmHWM is that pipeline's peak host RSS (torch allocations included). Each subprocess
runs one untimed warm-up case, then ``--repeats`` timed ones; the median is reported. The two
masks are compared voxel by voxel (Dice of the foreground) so the timings compare like with like.

    python scripts/bench/inference_latency.py
    python scripts/bench/inference_latency.py --quick --json out.json   # seconds: a 48x48x32 volume, sides in-process
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from common import (
    bench_parser,
    markdown_table,
    peak_rss_mib,
    phantom_scan,
    rss_mib,
    run_side,
    start,
    timed_repeats,
    workdir,
    write_json,
)
from tutorial import tutorial_inference_chain  # scripts/bench/tutorial.py

from medunet.config import Config, config_from_dict
from medunet.model.networks import build_network

SPACING = (1.5, 1.5, 2.0)
WINDOW = (-57.0, 164.0)
FEATURES = (16, 32, 64, 128, 256)
VOLUMES = {  # name: (shape, spacing in mm, axis codes)
    "large": ((256, 256, 108), (1.0, 1.0, 2.5), "LPS"),
    "small": ((128, 128, 64), (1.5, 1.5, 2.5), "RAS"),
}
QUICK_VOLUME = ((48, 48, 32), (1.5, 1.5, 2.5), "LPS")


def bench_config(args: argparse.Namespace) -> Config:
    """The shared settings: the tutorial's spacing and window, MONAI UNet 16-256 with batch norm, one window size."""
    return config_from_dict({
        "data": {"target_spacing": list(SPACING), "ct_window": list(WINDOW)},
        "augmentation": {"patch_size": [args.roi] * 3},
        "model": {"name": "unet", "features": list(FEATURES), "norm": "batch", "deep_supervision": False},
        "inference": {"overlap": args.overlap, "sw_batch_size": args.sw_batch_size, "blend": "gaussian", "device": "cpu"},
    })


def medunet_runner(args: argparse.Namespace, state: dict):
    from medunet.inference.segmenter import Segmenter

    config = bench_config(args)
    model = build_network(config.model, in_channels=1, out_channels=2)
    model.net.load_state_dict(state)
    seg = Segmenter(model, config, class_names=["background", "organ"], in_channels=1, device=torch.device("cpu"))
    output = Path(args.out_dir) / "medunet.nii.gz"
    return lambda: seg.predict_file(args.image, output, overwrite=True), output


def monai_runner(args: argparse.Namespace, state: dict):
    from monai.inferers import sliding_window_inference

    model = build_network(bench_config(args).model, in_channels=1, out_channels=2).net
    model.load_state_dict(state)
    model.eval()
    pre, post = tutorial_inference_chain(SPACING, WINDOW, args.out_dir)

    def run() -> None:
        data = pre({"image": args.image})
        with torch.no_grad():
            data["pred"] = sliding_window_inference(data["image"][None], (args.roi,) * 3, args.sw_batch_size, model,
                                                    overlap=args.overlap, mode="gaussian")[0]
        post(data)

    name = Path(args.image).name.replace(".nii.gz", "")
    return run, Path(args.out_dir) / f"{name}_seg.nii.gz"


def worker(args: argparse.Namespace) -> None:
    """One pipeline on one volume: warm-up, timed repeats; prints a JSON line."""
    start(args.threads)
    state = torch.load(args.weights, weights_only=True)
    run, output = (medunet_runner if args.worker == "medunet" else monai_runner)(args, state)
    setup_rss = rss_mib()
    times = timed_repeats(run, args.repeats)  # the warm-up: lazy imports, oneDNN kernel selection
    peak = peak_rss_mib()
    print(json.dumps({"times": times, "peak_rss_mib": peak, "setup_rss_mib": setup_rss, "output": str(output)}))


def compare(image: Path, a: Path, b: Path) -> dict:
    ref, ma, mb = nib.load(str(image)), nib.load(str(a)), nib.load(str(b))
    x, y = np.asarray(ma.dataobj) > 0, np.asarray(mb.dataobj) > 0
    on_grid = {n: bool(m.shape == ref.shape and np.allclose(m.affine, ref.affine, atol=1e-4)) for n, m in (("medunet", ma), ("monai", mb))}
    dice = 2 * np.logical_and(x, y).sum() / max(1, x.sum() + y.sum())
    return {"dice": float(dice), "voxel_agreement": float((x == y).mean()), "fg_fraction_medunet": float(x.mean()),
            "fg_fraction_monai": float(y.mean()), "on_input_grid": on_grid}


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "one 48x48x32 volume, roi 32, 1 repeat, both sides in this process")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--roi", type=int, default=96, help="cubic sliding-window edge in voxels")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--worker", choices=["medunet", "monai"], help=argparse.SUPPRESS)
    for hidden in ("--image", "--weights", "--out-dir"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    start(args.threads)
    if args.quick:
        args.repeats, args.roi = 1, 32
    volumes = {"quick": QUICK_VOLUME} if args.quick else VOLUMES
    results: dict[str, dict] = {}
    with workdir("bench") as tmp_name:
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        weights = tmp / "weights.pt"
        torch.save(build_network(bench_config(args).model, in_channels=1, out_channels=2).net.state_dict(), weights)
        for i, (vol, (shape, spacing, axcodes)) in enumerate(volumes.items()):
            image, _ = phantom_scan(tmp / f"{vol}.nii.gz", shape, spacing, axcodes=axcodes, seed=100 + i)
            r: dict = {"shape": list(shape), "spacing": list(spacing), "axcodes": axcodes}
            for side in ("monai", "medunet"):
                out_dir = tmp / f"out-{vol}-{side}"
                out_dir.mkdir()
                r[side] = run_side(__file__, main, [
                    "--worker", side, "--image", str(image), "--weights", str(weights), "--out-dir", str(out_dir),
                    "--repeats", str(args.repeats), "--roi", str(args.roi), "--overlap", str(args.overlap),
                    "--sw-batch-size", str(args.sw_batch_size), "--threads", str(args.threads)], in_process=args.quick)
                r[side]["median_s"] = statistics.median(r[side]["times"])
                print(f"{vol} {side}: median {r[side]['median_s']:.2f} s, peak RSS {r[side]['peak_rss_mib']:.0f} MiB",
                      flush=True)
            r["agreement"] = compare(image, Path(r["medunet"]["output"]), Path(r["monai"]["output"]))
            results[vol] = r

    rows = []
    for vol, r in results.items():
        base = r["monai"]
        for side, label in (("monai", "monai-tutorial"), ("medunet", "medunet predict_file")):
            s = r[side]
            rows.append([f"{vol} {tuple(r['shape'])} @ {tuple(r['spacing'])} mm {r['axcodes']}", label, f"{s['median_s']:.2f}",
                         f"{min(s['times']):.2f}", f"{s['peak_rss_mib']:.0f} ({s['setup_rss_mib']:.0f})",
                         f"{s['median_s'] / base['median_s']:.2f}x", f"{s['peak_rss_mib'] / base['peak_rss_mib']:.2f}x",
                         "-" if side == "monai" else format(r["agreement"]["dice"], ".4f")])
    table = markdown_table(["volume", "pipeline", "median s/case", "min s", "peak RSS MiB (after setup)", "time vs baseline",
                            "peak RSS vs baseline", "mask Dice vs baseline"], rows)
    setup = (f"roi {args.roi}^3, overlap {args.overlap}, sw_batch_size {args.sw_batch_size}, gaussian blending, "
             f"target spacing {SPACING} mm, torch threads {args.threads}, 1 warm-up + {args.repeats} timed runs"
             + ("; --quick: both sides in one process, so peak RSS is not per side" if args.quick else ""))
    print(f"\n{setup}\n\n{table}")
    for vol, r in results.items():
        print(f"{vol}: agreement {json.dumps(r['agreement'])}")
    write_json(args.json, {"setup": setup, "torch": torch.__version__, "results": results})


if __name__ == "__main__":
    main()
