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
Without it, this script says so, and medunet's side still trains and predicts at nnU-Net 2.8.1's
recorded plan (``nnunet_peer.FALLBACK_PLAN``; a shrunk one with --quick) with nothing to compare to.

    python scripts/bench/inference_vs_nnunet.py --json infer_nnunet.json
    python scripts/bench/inference_vs_nnunet.py --quick      # 1 training epoch, no TTA runs (nnU-Net planning ~2 min)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import nnunet_peer  # scripts/bench/nnunet_peer.py
import numpy as np
import torch
from common import (
    bench_parser,
    markdown_table,
    peak_rss_mib,
    phantom_scan,
    run_side,
    start,
    synthetic_datalist,
    workdir,
    write_json,
)

VOLUMES = {  # name: (shape, spacing in mm), stored RAS
    "small (MRI-sized)": ((128, 128, 64), (1.5, 1.5, 2.5)),
    "large (CT-sized)": ((256, 256, 108), (1.0, 1.0, 2.5)),
}
QUICK_VOLUMES = {"quick": ((48, 48, 32), (1.5, 1.5, 2.5))}

#: A predictor setting: (name, side, TTA/mirroring on, medunet overrides).
Setting = tuple[str, str, int, list[str]]


def medunet_worker(args: argparse.Namespace) -> None:
    """One medunet predictor setting on one volume: warm-up, timed repeats; prints a JSON line."""
    from medunet.inference.segmenter import Segmenter

    start(args.threads)
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


def choose_settings(args: argparse.Namespace, with_nnunet: bool) -> list[Setting]:
    settings: list[Setting] = [
        ("nnU-Net default (mirroring, step 0.5)", "nnunet", 1, []),
        ("medunet, no TTA (its default), overlap 0.5", "medunet", 0, []),
    ]
    if not args.quick:
        settings += [("nnU-Net, no mirroring", "nnunet", 0, []), ("medunet, 8-flip TTA", "medunet", 1, [])]
    if args.fp32:
        settings.append(("medunet, no TTA, fp32 (inference.precision=fp32)", "medunet", 0, ["inference.precision=fp32"]))
    if args.diagnose_crop:
        settings.append(("medunet, no TTA, no body crop (diagnostic)", "medunet", 0, ["data.crop_foreground=false"]))
    return [s for s in settings if with_nnunet or s[1] == "medunet"]


def train_shared_model(args: argparse.Namespace, tmp: Path, python: str | None, env: dict) -> tuple[dict, dict]:
    """Plan with nnU-Net (or take the recorded plan), train medunet's DynUNet at it; returns (plan, training record)."""
    from medunet.config import load_config
    from medunet.training.trainer import train

    datalist = synthetic_datalist(tmp / "data", cases=args.cases, shape=(40, 40, 24) if args.quick and not python else (64, 64, 40))
    plan = nnunet_peer.QUICK_PLAN if args.quick else nnunet_peer.FALLBACK_PLAN  # replaced by nnU-Net's own when it runs
    if python:
        print("nnU-Net: planning and preprocessing ...", flush=True)
        plan = nnunet_peer.run_side(python, ["prepare", "--datalist", str(datalist)], env)
    sections = nnunet_peer.medunet_sections(plan)
    overrides = [f"{section}.{key}={json.dumps(value)}" for section, values in sections.items() for key, value in values.items()]
    config = load_config(None, [*overrides, f"augmentation.samples_per_volume={plan['batch_size']}", "train.batch_size=1",
                                f"train.max_epochs={args.train_epochs}", f"train.val_every={args.train_epochs}",
                                "train.device=cpu", "inference.device=cpu"])
    print(f"medunet: training the shared model for {args.train_epochs} epoch(s) ...", flush=True)
    started = time.perf_counter()
    trained = train(datalist, tmp / "run", config, progress=False)
    return plan, {"epochs": args.train_epochs, "seconds": time.perf_counter() - started, "validation_dice": trained.best_dice}


def predict_one(args: argparse.Namespace, setting: Setting, image: Path, out_dir: Path, model_dir: str | None,
                python: str | None, env: dict) -> dict[str, Any]:
    """One predictor setting on one volume, in its own process (in this one for medunet with --quick)."""
    _, side, tta, extra = setting
    if side == "nnunet":
        assert python is not None and model_dir is not None
        return nnunet_peer.run_side(python, [
            "predict", "--model-dir", model_dir, "--image", str(image), "--out-dir", str(out_dir), "--mirroring", str(tta),
            "--repeats", str(args.repeats), "--threads", str(args.threads)], env)
    checkpoint = out_dir.parent / "run" / "last.pt"
    return run_side(__file__, main, [
        "--worker", "--checkpoint", str(checkpoint), "--image", str(image), "--out-dir", str(out_dir),
        "--tta", "true" if tta else "false", "--extra", json.dumps(extra), "--repeats", str(args.repeats),
        "--threads", str(args.threads)], in_process=args.quick)


def run_volume(args: argparse.Namespace, settings: list[Setting], v: int, name: str, shape: tuple, spacing: tuple,
               tmp: Path, model_dir: str | None, python: str | None, env: dict) -> dict:
    """Every setting on one phantom: times, peak RSS, Dice against the reference, mask agreement between the pipelines."""
    image_path, label = phantom_scan(tmp / f"vol{v}.nii.gz", shape, spacing, axcodes="RAS", seed=500 + v)
    r: dict = {"shape": list(shape), "spacing": list(spacing), "runs": {}}
    masks = {}
    for number, setting in enumerate(settings):
        out_dir = tmp / f"out{v}-{number}"
        out_dir.mkdir()
        res = predict_one(args, setting, image_path, out_dir, model_dir, python, env)
        mask_img = nib.load(res["output"])
        masks[setting[0]] = np.asarray(mask_img.dataobj) > 0
        res["median_s"] = statistics.median(res["times"])
        res["dice_vs_reference"] = dice(masks[setting[0]], label > 0)
        res["on_input_grid"] = bool(mask_img.shape == shape and np.allclose(mask_img.affine, nib.load(image_path).affine, atol=1e-4))
        r["runs"][setting[0]] = res
        print(f"{name} | {setting[0]}: median {res['median_s']:.2f} s, peak RSS {res['peak_rss_mib']:.0f} MiB, "
              f"Dice vs reference {res['dice_vs_reference']:.4f}", flush=True)
    nnunet_runs = [s[0] for s in settings if s[1] == "nnunet"]
    for setting in settings:
        if setting[1] == "medunet":  # how far each medunet mask is from each nnU-Net mask, on the same model
            r["runs"][setting[0]]["agreement_with"] = {n: dice(masks[setting[0]], masks[n]) for n in nnunet_runs}
    return r


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "1 training epoch on 2 cases at a 3-level plan, one 48x48x32 volume, no TTA, 1 repeat")
    parser.add_argument("--large", action="store_true", help="also the CT-sized 256x256x108 volume (slow with TTA on CPU)")
    parser.add_argument("--train-epochs", type=int, default=6, help="medunet training epochs for the shared model")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up")
    parser.add_argument("--nnunet-python", help="Python with nnunetv2 (default: $NNUNET_PYTHON, else /tmp/nnunet-venv/bin/python)")
    parser.add_argument("--fp32", action="store_true", help="also medunet without TTA in fp32 (its default is bf16 on "
                        "CPUs with native bf16)")
    parser.add_argument("--diagnose-crop", action="store_true",
                        help="also medunet without its body crop: do the masks then agree with nnU-Net's?")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--checkpoint", "--image", "--out-dir", "--tta", "--extra"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return medunet_worker(args)
    start(args.threads)
    python, version = nnunet_peer.peer_python(args.nnunet_python)
    args.cases = 8
    if args.quick:
        args.train_epochs, args.repeats, args.large = 1, 1, False
        args.cases = 8 if python else 2
    settings = choose_settings(args, with_nnunet=python is not None)
    volumes = QUICK_VOLUMES if args.quick else {k: v for k, v in VOLUMES.items() if args.large or k.startswith("small")}
    results: dict = {"settings": [s[0] for s in settings], "volumes": {}}
    with workdir("bench") as tmp_name:
        tmp = Path(tmp_name)
        env = nnunet_peer.nnunet_env(tmp / "nnunet") if python else {}
        plan, results["training"] = train_shared_model(args, tmp, python, env)
        model_dir = None
        if python:
            from medunet.model.checkpoint import load_checkpoint

            state = load_checkpoint(tmp / "run" / "last.pt").model
            torch.save({k.removeprefix("net."): v for k, v in state.items()}, tmp / "dynunet.pt")
            model_dir = nnunet_peer.run_side(python, ["import-weights", "--state", str(tmp / "dynunet.pt")], env)["model_dir"]
        for v, (name, (shape, spacing)) in enumerate(volumes.items()):
            results["volumes"][name] = run_volume(args, settings, v, name, shape, spacing, tmp, model_dir, python, env)
    report(args, results, plan, settings, version if python else None)


def report(args: argparse.Namespace, results: dict, plan: dict, settings: list[Setting], version: str | None) -> None:
    """Print the table and the mask agreements; write the JSON."""
    rows = []
    for name, r in results["volumes"].items():
        base = r["runs"][settings[0][0]]["median_s"]
        for setting, res in r["runs"].items():
            rows.append([f"{name} {tuple(r['shape'])} @ {tuple(r['spacing'])} mm", setting, f"{res['median_s']:.2f}",
                         f"{res['peak_rss_mib']:.0f}", f"{res['dice_vs_reference']:.4f}", f"{base / res['median_s']:.2f}x"])
    first = settings[0][0] if version else "the first setting"
    table = markdown_table(["volume", "predictor, settings", "median s/case", "peak RSS MiB", "Dice vs reference",
                            f"{'nnU-Net default' if version else first} s / this s"], rows)
    setup = (
        f"one model (medunet DynUNet at nnU-Net's 3d_fullres plan: patch {plan['patch_size']} (z,y,x), features "
        f"{plan['features_per_stage']}), trained {args.train_epochs} epoch(s) by medunet (validation Dice "
        f"{results['training']['validation_dice']:.3f})"
        + (f" and copied into nnU-Net's PlainConvUNet; nnunetv2 {version}" if version else "; nnU-Net NOT run (not installed)")
        + f", torch threads {args.threads}, 1 warm-up + {args.repeats} timed runs per setting"
    )
    print(f"\n{setup}\n\n{table}")
    for name, r in results["volumes"].items():
        for setting, res in r["runs"].items():
            for other, value in res.get("agreement_with", {}).items():
                print(f"{name}: mask Dice between '{setting}' and '{other}': {value:.4f}")
    write_json(args.json, {"setup": setup, "plan": plan, "torch": torch.__version__, "nnunetv2": version, **results})


if __name__ == "__main__":
    main()
