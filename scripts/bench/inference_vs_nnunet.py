"""End-to-end inference, medunet ``Segmenter.predict_file`` vs nnU-Net v2's ``nnUNetPredictor``, on one model.

1. Eight synthetic CT phantoms (64x64x40 at 1.5x1.5x2.5 mm) are planned by nnU-Net
   (``nnUNetv2_plan_and_preprocess``, 3d_fullres).
2. medunet trains its DynUNet at that plan (same features, kernels, strides, patch, spacing
   and CT normalisation) for ``--train-epochs`` epochs.
3. Those weights are copied into nnU-Net's PlainConvUNet (``nnunet_side.py import-weights``:
   the same network function, checked to ~1e-5), so both predictors run **one model**.
4. Each predictor segments the same held-out volumes (stored RAS, so both see the same voxel
   order), end to end: read, preprocess, sliding window (step/overlap 0.5, Gaussian), resample
   back, write .nii.gz. Settings: nnU-Net's default (mirroring TTA over 3 axes = 8 passes),
   nnU-Net without mirroring, medunet without TTA (its default), medunet with 8-flip TTA. medunet's
   overlap is set to 0.5 (nnU-Net's step) in both; its own default overlap (0.25) would be faster.

Each (pipeline, settings, volume) runs in its own process: one untimed warm-up, then
``--repeats`` timed runs (median reported), peak RSS from ``VmHWM``. Dice against the
phantom's reference label and the agreement between the two pipelines' masks are reported.

nnU-Net is not a medunet dependency: see nnunet_side.py for its environment (``NNUNET_PYTHON``).
Without it, this script says so and exits.

    python scripts/bench/inference_vs_nnunet.py --json infer_nnunet.json
    python scripts/bench/inference_vs_nnunet.py --quick      # 1 training epoch, no TTA runs (nnU-Net planning ~2 min)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
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

VOLUMES = {  # name: (shape, spacing in mm), stored RAS
    "small (MRI-sized)": ((128, 128, 64), (1.5, 1.5, 2.5)),
    "large (CT-sized)": ((256, 256, 108), (1.0, 1.0, 2.5)),
}




def load_peer():
    spec = importlib.util.spec_from_file_location("nnunet_peer", Path(__file__).resolve().with_name("nnunet_peer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def medunet_worker(args: argparse.Namespace) -> None:
    """One medunet predictor setting on one volume: warm-up, timed repeats; prints a JSON line."""
    from medunet.inference.segmenter import Segmenter

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    overrides = ["inference.overlap=0.5", "inference.blend=gaussian", f"inference.tta_flips={args.tta}", *json.loads(args.extra)]
    seg = Segmenter.from_checkpoint(args.checkpoint, device="cpu", overrides=overrides)
    output = Path(args.out_dir) / "medunet.nii.gz"
    times = []
    for i in range(1 + args.repeats):
        started = time.perf_counter()
        seg.predict_file(args.image, output, overwrite=True)
        if i:
            times.append(time.perf_counter() - started)
    peak = peak_rss_mib()
    print(json.dumps({"times": times, "peak_rss_mib": peak, "output": str(output)}))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 training epoch, small volume, no TTA settings, 1 repeat")
    parser.add_argument("--large", action="store_true", help="also the CT-sized 256x256x108 volume (slow with TTA on CPU)")
    parser.add_argument("--train-epochs", type=int, default=6, help="medunet training epochs for the shared model")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--nnunet-python", help="Python with nnunetv2 (default: $NNUNET_PYTHON, else /tmp/nnunet-venv/bin/python)"
    )
    parser.add_argument("--fp32", action="store_true", help="also medunet without TTA in fp32 (its default is bf16 on "
                        "CPUs with native bf16)")
    parser.add_argument("--diagnose-crop", action="store_true",
                        help="also medunet without its body crop: do the masks then agree with nnU-Net's?")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--checkpoint", "--image", "--out-dir", "--tta", "--extra"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return medunet_worker(args)
    peer = load_peer()
    python, version = peer.find_python(args.nnunet_python)
    if python is None:
        print(f"nnU-Net side not available, nothing to compare: {version}", file=sys.stderr)
        return
    if args.quick:
        args.train_epochs, args.repeats, args.large = 1, 1, False
    torch.set_num_threads(args.threads)
    from medunet.config import load_config
    from medunet.model.checkpoint import load_checkpoint
    from medunet.synthetic import grid_affine, make_phantom, save_nifti, write_dataset
    from medunet.training.trainer import train

    settings = [  # (name, side, TTA/mirroring, medunet overrides)
        ("nnU-Net default (mirroring, step 0.5)", "nnunet", 1, []),
        ("medunet, no TTA (its default), overlap 0.5", "medunet", 0, []),
    ]
    if not args.quick:
        settings += [("nnU-Net, no mirroring", "nnunet", 0, []), ("medunet, 8-flip TTA", "medunet", 1, [])]
    if args.fp32:
        settings.append(("medunet, no TTA, fp32 (inference.precision=fp32)", "medunet", 0, ["inference.precision=fp32"]))
    if args.diagnose_crop:
        settings.append(("medunet, no TTA, no body crop (diagnostic)", "medunet", 0, ["data.crop_foreground=false"]))
    volumes = {k: v for k, v in VOLUMES.items() if args.large or k.startswith("small")}
    results: dict = {"settings": [s[0] for s in settings], "volumes": {}}
    with tempfile.TemporaryDirectory(prefix="medunet-bench-") as tmp_name:
        tmp = Path(tmp_name)
        datalist = write_dataset(tmp / "data", num_train=8, num_test=0, shape=(64, 64, 40), spacing=(1.5, 1.5, 2.5), seed=0)
        env = peer.nnunet_env(tmp / "nnunet")
        print("nnU-Net: planning and preprocessing ...", flush=True)
        plan = peer.run_side(python, ["prepare", "--datalist", str(datalist)], env)
        sections = peer.medunet_sections(plan)
        overrides = [
            f"{section}.{key}={json.dumps(value)}" for section, values in sections.items() for key, value in values.items()
        ]
        config = load_config(
            None,
            [
                *overrides,
                f"augmentation.samples_per_volume={plan['batch_size']}",
                "train.batch_size=1",
                f"train.max_epochs={args.train_epochs}",
                f"train.val_every={args.train_epochs}",
                "train.device=cpu",
                "inference.device=cpu",
            ],
        )
        print(f"medunet: training the shared model for {args.train_epochs} epoch(s) ...", flush=True)
        started = time.perf_counter()
        trained = train(datalist, tmp / "run", config, progress=False)
        results["training"] = {
            "epochs": args.train_epochs,
            "seconds": time.perf_counter() - started,
            "validation_dice": trained.best_dice,
        }
        state = load_checkpoint(tmp / "run" / "last.pt").model
        torch.save({k.removeprefix("net."): v for k, v in state.items()}, tmp / "dynunet.pt")
        model_dir = peer.run_side(python, ["import-weights", "--state", str(tmp / "dynunet.pt")], env)["model_dir"]
        for v, (name, (shape, spacing)) in enumerate(volumes.items()):
            image, label = make_phantom(shape, seed=500 + v, num_classes=2, modality="CT")
            image_path = save_nifti(image, grid_affine(spacing, axcodes="RAS"), tmp / f"vol{v}.nii.gz")
            r: dict = {"shape": list(shape), "spacing": list(spacing), "runs": {}}
            for number, (setting, side, tta, extra) in enumerate(settings):
                out_dir = tmp / f"out{v}-{number}"
                out_dir.mkdir()
                if side == "nnunet":
                    res = peer.run_side(
                        python,
                        [
                            "predict",
                            "--model-dir",
                            model_dir,
                            "--image",
                            str(image_path),
                            "--out-dir",
                            str(out_dir),
                            "--mirroring",
                            str(tta),
                            "--repeats",
                            str(args.repeats),
                            "--threads",
                            str(args.threads),
                        ],
                        env,
                    )
                else:
                    cmd = [
                        sys.executable,
                        __file__,
                        "--worker",
                        "--checkpoint",
                        str(tmp / "run" / "last.pt"),
                        "--image",
                        str(image_path),
                        "--out-dir",
                        str(out_dir),
                        "--tta",
                        "true" if tta else "false",
                        "--extra",
                        json.dumps(extra),
                        "--repeats",
                        str(args.repeats),
                        "--threads",
                        str(args.threads),
                    ]
                    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if done.returncode:
                        sys.exit(f"medunet {setting} failed:\n{done.stderr[-3000:]}")
                    res = json.loads(done.stdout.strip().splitlines()[-1])
                mask_img = nib.load(res["output"])
                mask = np.asarray(mask_img.dataobj) > 0
                res["median_s"] = statistics.median(res["times"])
                res["dice_vs_reference"] = dice(mask, label > 0)
                res["on_input_grid"] = bool(
                    mask_img.shape == shape and np.allclose(mask_img.affine, nib.load(image_path).affine, atol=1e-4)
                )
                res["mask"] = mask
                r["runs"][setting] = res
                print(
                    f"{name} | {setting}: median {res['median_s']:.2f} s, peak RSS {res['peak_rss_mib']:.0f} MiB, "
                    f"Dice vs reference {res['dice_vs_reference']:.4f}",
                    flush=True,
                )
            nnunet_runs = {name: res for (name, side, _, _), res in zip(settings, r["runs"].values()) if side == "nnunet"}
            for (_, side, _, _), res in zip(settings, r["runs"].values()):
                if side == "medunet":  # how far each medunet mask is from each nnU-Net mask, on the same model
                    res["agreement_with"] = {n: dice(res["mask"], other["mask"]) for n, other in nnunet_runs.items()}
            for res in r["runs"].values():
                res.pop("mask")
            results["volumes"][name] = r

    lines = [
        "| volume | predictor, settings | median s/case | peak RSS MiB | Dice vs reference | nnU-Net default s / this s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["volumes"].items():
        base = r["runs"][settings[0][0]]["median_s"]
        for setting, res in r["runs"].items():
            lines.append(
                f"| {name} {tuple(r['shape'])} @ {tuple(r['spacing'])} mm | {setting} | {res['median_s']:.2f} | "
                f"{res['peak_rss_mib']:.0f} | {res['dice_vs_reference']:.4f} | {base / res['median_s']:.2f}x |"
            )
    setup = (
        f"one model (medunet DynUNet at nnU-Net's 3d_fullres plan: patch {plan['patch_size']} (z,y,x), features "
        f"{plan['features_per_stage']}), trained {args.train_epochs} epoch(s) by medunet (validation Dice "
        f"{results['training']['validation_dice']:.3f}) and copied into nnU-Net's PlainConvUNet; nnunetv2 {version}, "
        f"torch threads {args.threads}, 1 warm-up + {args.repeats} timed runs per setting"
    )
    print(f"\n{setup}\n\n" + "\n".join(lines))
    for name, r in results["volumes"].items():
        for setting, res in r["runs"].items():
            for other, value in res.get("agreement_with", {}).items():
                print(f"{name}: mask Dice between '{setting}' and '{other}': {value:.4f}")
    if args.json:
        args.json.write_text(
            json.dumps({"setup": setup, "plan": plan, "torch": torch.__version__, "nnunetv2": version, **results}, indent=2)
        )


if __name__ == "__main__":
    main()
