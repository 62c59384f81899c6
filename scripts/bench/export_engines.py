"""End-to-end inference with the torch engine against onnxruntime, same model, both sides in one run.

For each volume (a synthetic CT, by default 512 x 512 x 300 at 0.8 x 0.8 x 1.5 mm stored LPS, and a
small synthetic MRI) the preset network of its modality (``configs/ct.yaml`` / ``configs/mri.yaml``,
random weights, seed 0) is saved as a checkpoint and exported with ``medunet export -f onnx``. Then,
each in its own subprocess so its VmHWM is that side's peak host RSS:

* ``torch``: ``Segmenter.from_checkpoint(run)`` (the checkpoint's PyTorch module);
* ``onnxruntime``: ``Segmenter.from_checkpoint(package)`` (the package's model.onnx in an
  onnxruntime session; reading, preprocessing, inversion and writing are the same medunet code).

Both run in float32 (``inference.precision=fp32``: the ONNX graph is float32; on CPUs with native
bf16 the torch engine's default would be bf16, which is another comparison). Reported: wall and CPU
seconds, the network stage, peak RSS, the time ratio and the Dice agreement of the two masks per class.

    python scripts/bench/export_engines.py --cache /tmp/engines                   # CT 512x512x300 + MRI
    python scripts/bench/export_engines.py --ct-shape 256 256 150 --json out.json  # a smaller CT
    python scripts/bench/export_engines.py --modalities MRI                        # the MRI only
    python scripts/bench/export_engines.py --device cuda                           # GPU: onnxruntime-gpu's CUDA provider
    python scripts/bench/export_engines.py --quick   # seconds: CT 32x32x24 and MRI 24^3, network 4-8-16, sides in-process
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

CLASSES = ["background", "organ"]
QUICK_SHAPES = {"CT": (32, 32, 24), "MRI": (24, 24, 24)}
QUICK_OVERRIDES = ("augmentation.patch_size=[24,24,24]", "model.features=[4,8,16]")


def make_volume(path: Path, modality: str, shape: tuple[int, ...], spacing: tuple[float, ...]) -> Path:
    """A phantom stored LPS (CT as int16 HU, as scanners store it), written once."""
    if not path.exists():
        phantom_scan(path, shape, spacing, axcodes="LPS", seed=7, origin=(200.0, 180.0, -300.0), int16=modality == "CT",
                     modality=modality)
    return path


def make_model(folder: Path, modality: str, overrides: tuple[str, ...] = ()) -> tuple[Path, Path, float]:
    """A random-weight preset checkpoint in ``folder/run`` and its ONNX package in ``folder/pkg`` (export seconds)."""
    from medunet.config import config_to_dict, load_config
    from medunet.export.writer import export_model
    from medunet.model.checkpoint import Checkpoint, save_checkpoint
    from medunet.model.networks import build_network

    run, pkg = folder / "run", folder / "pkg"
    config = load_config(ROOT / "configs" / f"{modality.lower()}.yaml", ["inference.precision=fp32", *overrides])
    torch.manual_seed(0)
    network = build_network(config.model, in_channels=1, out_channels=len(CLASSES))
    save_checkpoint(Checkpoint(network.state_dict(), config_to_dict(config), CLASSES, 1, 0, modality=modality), run / "best.pt")
    started = time.perf_counter()
    export_model(run, pkg, ["onnx"], overwrite=True)
    return run, pkg, time.perf_counter() - started


def worker(args: argparse.Namespace) -> dict:
    """One engine end to end on one volume (read, preprocess, network, invert, write): times, stages and peak RSS."""
    from medunet.inference.segmenter import Segmenter

    overrides = [f"inference.engine={args.worker}", "inference.precision=fp32"]
    segmenter = Segmenter.from_checkpoint(args.model, device=args.device, overrides=overrides)
    setup = peak_rss_mib()
    out = Path(args.out_dir)
    cpu0, started = cpu_seconds(), time.perf_counter()
    segmenter.predict_file(args.image, out / "mask.nii.gz", out / "report.json", overwrite=True)
    total = time.perf_counter() - started
    stages = json.loads((out / "report.json").read_text())["seconds"]
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    return {"seconds_total": total, "cpu_seconds": cpu_seconds() - cpu0, "stages": stages, "peak_rss_mib": peak_rss_mib(),
            "setup_rss_mib": setup, "torch_cuda_peak_mib": gpu_peak, "output": str(out / "mask.nii.gz"), "source": segmenter.source}


def compare(image: Path, model: dict[str, Path], device: str, threads: int, tmp: Path, *, in_process: bool) -> dict:
    """Both engines on ``image`` (each in its own interpreter unless ``in_process``), their masks on the input grid and their agreement."""
    results: dict = {}
    for engine in ("torch", "onnxruntime"):
        out = tmp / f"out-{engine}-{image.stem}"
        out.mkdir(exist_ok=True)
        argv = ["--worker", engine, "--image", str(image), "--out-dir", str(out), "--threads", str(threads),
                "--model", str(model[engine]), "--device", device]
        results[engine] = r = run_side(__file__, main, argv, in_process=in_process)
        print(f"  {engine}: {r['seconds_total']:.1f} s end to end, {r['cpu_seconds']:.0f} CPU s, network {r['stages']['network']:.1f} s, "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    ref = nib.load(str(image))
    a, b = (np.asarray(nib.load(results[e]["output"]).dataobj) for e in ("torch", "onnxruntime"))
    for engine in ("torch", "onnxruntime"):
        mask = nib.load(results[engine]["output"])
        results[engine]["on_input_grid"] = bool(mask.shape == ref.shape and np.allclose(mask.affine, ref.affine, atol=1e-4))
    results["dice_torch_vs_onnxruntime"] = {CLASSES[k]: float(2 * ((a == k) & (b == k)).sum() / max(1, (a == k).sum() + (b == k).sum()))
                                            for k in range(1, len(CLASSES))}
    results["voxels_differing"] = int((a != b).sum())
    results["foreground_fraction"] = float((a > 0).mean())
    results["time_ratio_onnxruntime_over_torch"] = results["onnxruntime"]["seconds_total"] / results["torch"]["seconds_total"]
    print(f"  onnxruntime / torch: {results['time_ratio_onnxruntime_over_torch']:.2f}x time; Dice {results['dice_torch_vs_onnxruntime']}, "
          f"{results['voxels_differing']} voxels differ", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, f"CT {QUICK_SHAPES['CT']} and MRI {QUICK_SHAPES['MRI']}, network 4-8-16, window 24^3, sides in-process")
    parser.add_argument("--cache", type=Path, help="folder keeping the volumes and models between runs (default: temporary)")
    parser.add_argument("--ct-shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--mri-shape", type=int, nargs=3, default=[160, 160, 96])
    parser.add_argument("--modalities", nargs="+", choices=["CT", "MRI"], default=["CT", "MRI"], help="which volumes to run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (onnxruntime then uses its CUDA provider if installed)")
    parser.add_argument("--worker", choices=["torch", "onnxruntime"], help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    start(args.threads)  # torch's threads; onnxruntime uses its default, one per core
    if args.worker:
        print(json.dumps(worker(args)))
        return
    overrides = QUICK_OVERRIDES if args.quick else ()
    if args.quick:
        args.ct_shape, args.mri_shape = QUICK_SHAPES["CT"], QUICK_SHAPES["MRI"]
    tag = "-quick" if args.quick else ""
    with workdir("engines") as tmp_name:
        tmp = Path(tmp_name)
        cache = args.cache or tmp
        volumes = {"CT": (tuple(args.ct_shape), (0.8, 0.8, 1.5)), "MRI": (tuple(args.mri_shape), (1.0, 1.0, 1.2))}
        results: dict = {}
        for modality in args.modalities:
            shape, spacing = volumes[modality]
            image = make_volume(cache / f"{modality.lower()}_{'x'.join(map(str, shape))}.nii.gz", modality, shape, spacing)
            run, pkg, export_seconds = make_model(cache / f"model-{modality.lower()}{tag}", modality, overrides)
            print(f"{modality} {shape} @ {spacing} mm; export to ONNX {export_seconds:.1f} s", flush=True)
            results[modality] = {"shape": shape, "spacing": spacing, "export_seconds": export_seconds,
                                 **compare(image, {"torch": run, "onnxruntime": pkg}, args.device, args.threads, tmp,
                                           in_process=args.quick)}
        load = load_average()
        print(f"load average after the runs {load}")
        if args.json:
            import monai
            import onnxruntime

            meta = {"device": args.device, "threads": args.threads, "torch": torch.__version__, "monai": monai.__version__,
                    "onnxruntime": onnxruntime.__version__, "python": platform.python_version(), "load_after": load.split(),
                    "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            write_json(args.json, {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
