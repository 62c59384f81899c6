"""The CUDA paths of medunet, checked on synthetic data in a few minutes: one JSON of pass/fail and numbers.

    bash scripts/gpu_check.sh gpu_check.json          # on a CUDA machine, after bash scripts/setup.sh
    python scripts/gpu_check.py out.json --device cpu  # the checks that have a CPU path (what the tests run)

Checks (each records ``passed``, its numbers, and an ``error`` when it raised; CUDA-only checks are
``skipped`` with --device cpu):

* ``amp_bf16``, ``amp_fp16``: Trainer steps under ``train.amp`` bf16 / fp16 with ``augmentation.device``
  auto (on the GPU under CUDA): losses finite, and fp16 scaled by an enabled GradScaler.
* ``gpu_augmentation``: the random chain with its patches moved to the device against the host chain,
  same seed: images within 1e-4, labels differing on < 0.1 % of voxels (nearest-neighbour ties).
* ``stitching``: one volume predicted with ``inference.stitch_device`` device and cpu (masks equal), and
  with auto while a filler tensor leaves too little free GPU memory: the host fallback must be chosen
  and give the same mask.
* ``ddp``: ``torchrun -m medunet train`` with 1 process, and 2 when there are 2 GPUs (NCCL).
* ``planner_memory``: ``medunet.planning.memory.training_step_memory`` against
  ``torch.cuda.max_memory_allocated`` for a few plans (the ratio; passes within 0.7-1.5).
* ``end_to_end``: ``train`` then ``Segmenter.predict_file``, timed; the mask lies on the input grid.

Exit status: 0 all passed, 1 a check failed, 2 no CUDA (unless --device cpu).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))  # common.py: synthetic data and a Trainer on it

Check = Callable[["Context"], dict[str, Any]]


class Context:
    """What every check shares: the device, a scratch folder, sizes scaled to the device, one synthetic dataset."""

    def __init__(self, device: str, scratch: Path) -> None:
        import torch
        from common import synthetic_datalist

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.scratch = scratch
        self.shape = (64, 64, 48) if self.cuda else (32, 32, 24)
        self.patch = [48, 48, 32] if self.cuda else [16, 16, 16]
        self.datalist = synthetic_datalist(scratch / "data", cases=4, validation=1, shape=self.shape)

    def config(self, *overrides: str) -> Any:
        from medunet.config import load_config

        small = [f"augmentation.patch_size={self.patch}", "model.features=[8,16,32,64]", "train.batch_size=2",
                 f"train.device={self.device.type}", f"inference.device={self.device.type}", "inference.sw_batch_size=2"]
        return load_config(None, [*small, *overrides])


def skipped(why: str = "needs CUDA") -> dict[str, Any]:
    return {"passed": None, "skipped": why}


def check_amp(ctx: Context, amp: str) -> dict[str, Any]:
    """Three Trainer steps under ``train.amp`` (GPU augmentation under CUDA)."""
    import math

    from common import bench_trainer

    if amp == "fp16" and not ctx.cuda:
        return skipped("fp16 autocast runs on CUDA only")
    trainer = bench_trainer(ctx.datalist, ctx.scratch / f"amp-{amp}", ctx.config(f"train.amp={amp}"))
    trainer.trained.train()
    batches = itertools.chain.from_iterable(trainer.loader for _ in range(4))  # epochs of 2 batches, back to back
    started = time.perf_counter()
    losses = [trainer.step(next(batches)) for _ in range(3)]
    seconds = time.perf_counter() - started
    batch = next(batches)
    scaler = trainer.scaler
    result = {"losses": losses, "seconds_3_steps": seconds, "autocast": str(trainer.amp),
              "patch_device": str(batch["image"].device), "grad_scaler": scaler.is_enabled(),
              "scale": float(scaler.get_scale()) if scaler.is_enabled() else None}
    result["passed"] = all(math.isfinite(x) for x in losses) and (scaler.is_enabled() == (amp == "fp16"))
    if ctx.cuda:  # augmentation.device auto: the patches come out of the loader on the GPU
        result["passed"] = result["passed"] and batch["image"].device.type == "cuda"
    return result


def check_gpu_augmentation(ctx: Context) -> dict[str, Any]:
    """The random chain with patches moved to the device, against the host chain with the same seed."""
    import torch

    from medunet.io.datalist import load_datalist
    from medunet.transforms import augmentation, preprocessing

    all_on = {"rotate_prob": 1.0, "scale_prob": 1.0, "intensity_scale_prob": 1.0, "intensity_shift_prob": 1.0,
              "gamma_prob": 1.0, "noise_prob": 1.0, "blur_prob": 1.0}
    config = ctx.config(*(f"augmentation.{k}={v}" for k, v in all_on.items()))
    case = load_datalist(ctx.datalist).training[0]
    volume = preprocessing(config, num_classes=2, in_channels=1, with_label=True)(case.as_dict())
    moved = augmentation(config, num_classes=2, device=ctx.device).set_random_state(seed=7)(dict(volume))
    host = augmentation(config, num_classes=2).set_random_state(seed=7)(dict(volume))
    image_diff = max(float((torch.as_tensor(x["image"]).cpu() - torch.as_tensor(y["image"])).abs().max())
                     for x, y in zip(moved, host, strict=True))
    label_diff = max(float((torch.as_tensor(x["label"]).cpu() != torch.as_tensor(y["label"])).float().mean())
                     for x, y in zip(moved, host, strict=True))
    on_device = all(torch.as_tensor(x["image"]).device.type == ctx.device.type for x in moved)
    shapes = all(tuple(x["image"].shape) == tuple(y["image"].shape) for x, y in zip(moved, host, strict=True))
    return {"patches": len(moved), "max_image_difference": image_diff, "label_mismatch_fraction": label_diff,
            "on_device": on_device, "passed": on_device and shapes and image_diff < 1e-4 and label_diff < 1e-3}


def check_stitching(ctx: Context) -> dict[str, Any]:
    """Stitching on the device and in host memory give the same mask; auto falls back to the host when memory is short."""
    import torch

    from medunet.model.networks import build_network
    from medunet.model.sliding import free_device_memory, predict_probabilities, stitch_bytes

    if not ctx.cuda:
        return skipped()
    config = ctx.config()
    torch.manual_seed(0)
    model = build_network(config.model, in_channels=1, out_channels=2).to(ctx.device)
    image = torch.randn(1, 1, 160, 160, 128)

    def mask(mode: str) -> tuple[torch.Tensor, str, float]:
        started = time.perf_counter()
        probs = predict_probabilities(model, image, ctx.config(f"inference.stitch_device={mode}"), device=ctx.device)
        torch.cuda.synchronize()
        return probs.argmax(1).cpu(), str(probs.device), time.perf_counter() - started

    on_device, device_where, device_s = mask("device")
    on_host, host_where, host_s = mask("cpu")
    free = free_device_memory(ctx.device) or 0
    needed = stitch_bytes(2, image.shape[2:])
    filler = torch.empty(max(free - needed, 0), dtype=torch.uint8, device=ctx.device)  # leave less than the result needs
    try:
        fallback, fallback_where, fallback_s = mask("auto")
    finally:
        del filler
        torch.cuda.empty_cache()
    return {"device_stitch": device_where, "host_stitch": host_where, "auto_with_little_memory": fallback_where,
            "seconds": {"device": device_s, "cpu": host_s, "auto_fallback": fallback_s},
            "masks_equal": bool(torch.equal(on_device, on_host) and torch.equal(on_device, fallback)),
            "passed": device_where.startswith("cuda") and host_where == "cpu" and fallback_where == "cpu"
            and bool(torch.equal(on_device, on_host) and torch.equal(on_device, fallback))}


def check_ddp(ctx: Context) -> dict[str, Any]:
    """``torchrun -m medunet train`` with 1 process, and with 2 when two GPUs are visible (NCCL)."""
    import torch

    if not ctx.cuda:
        return skipped()
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    result: dict[str, Any] = {}
    for processes in sorted({1, min(2, torch.cuda.device_count())}):
        run = ctx.scratch / f"ddp{processes}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), "-m",
                   "medunet", "-q", "train", str(ctx.datalist), "-o", str(run), "--device", "cuda",
                   "--set", f"augmentation.patch_size={ctx.patch}", "--set", "model.features=[8,16,32,64]",
                   "--set", "train.batch_size=1", "--set", "train.max_epochs=2", "--set", "train.val_every=1"]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)
        log = (run / "log.txt").read_text() if (run / "log.txt").exists() else ""
        result[f"{processes}_process"] = {"exit": done.returncode, "seconds": time.perf_counter() - started,
                                          "nccl": "nccl" in log, "checkpoint": (run / "last.pt").exists(),
                                          "stderr_tail": done.stderr[-1500:] if done.returncode else ""}
    result["passed"] = all(r["exit"] == 0 and r["checkpoint"] for r in result.values())
    return result


def check_planner_memory(ctx: Context) -> dict[str, Any]:
    """The planner's step estimate against the CUDA allocator's peak, for a few plans (bf16 autocast, AdamW)."""
    import torch

    from medunet.config import ModelConfig, config_from_dict
    from medunet.model.networks import build_network
    from medunet.planning.memory import training_step_memory
    from medunet.training.losses import DeepSupervisionLoss

    if not ctx.cuda:
        return skipped()
    plans = [((32, 64, 128, 256, 320), (128, 128, 128), 2), ((32, 64, 128, 256, 320), (96, 96, 96), 2),
             ((16, 32, 64, 128), (64, 64, 64), 4)]
    rows = []
    for features, patch, batch in plans:
        model = ModelConfig(features=features)
        net = build_network(model, in_channels=1, out_channels=3).cuda().train()
        optimizer = torch.optim.AdamW(net.parameters())
        loss_fn = DeepSupervisionLoss(config_from_dict({}), 3)
        x = torch.randn(batch, 1, *patch, device="cuda")
        y = torch.randint(0, 3, (batch, 1, *patch), device="cuda")
        for _ in range(2):  # the second step has the optimizer state allocated
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        peak = torch.cuda.max_memory_allocated()
        estimate = training_step_memory(model, patch, batch, in_channels=1, out_channels=3, activation_bytes=2).total
        rows.append({"features": list(features), "patch": list(patch), "batch": batch, "estimate_gib": estimate / 2**30,
                     "measured_gib": peak / 2**30, "ratio": estimate / peak})
        del net, optimizer, x, y, loss
        torch.cuda.empty_cache()
    return {"plans": rows, "passed": all(0.7 <= r["ratio"] <= 1.5 for r in rows)}


def check_end_to_end(ctx: Context) -> dict[str, Any]:
    """Train a few epochs, segment a held-out phantom from the file, check the mask's grid; timed."""
    import nibabel as nib
    import numpy as np
    from common import phantom_scan

    from medunet.inference.segmenter import Segmenter
    from medunet.training.trainer import train

    epochs = 5 if ctx.cuda else 1
    # On the CPU, full precision: bf16 autocast on a CPU is the amp_bf16 check's. One suite run in four saw this
    # 1-epoch CPU run's bf16 loss turn nan after other tests had run in the same process (not reproduced alone).
    precision = [] if ctx.cuda else ["train.amp=off"]
    started = time.perf_counter()
    result = train(ctx.datalist, ctx.scratch / "e2e", ctx.config(f"train.max_epochs={epochs}", "train.val_every=1", *precision),
                   progress=False)
    train_s = time.perf_counter() - started
    scan, _ = phantom_scan(ctx.scratch / "scan.nii.gz", ctx.shape, (1.2, 1.2, 2.0), axcodes="LPS", seed=99)
    segmenter = Segmenter.from_checkpoint(ctx.scratch / "e2e", device=ctx.device.type)
    started = time.perf_counter()
    output = segmenter.predict_file(scan, ctx.scratch / "mask.nii.gz")
    infer_s = time.perf_counter() - started
    mask, ref = nib.load(str(output)), nib.load(str(scan))
    on_grid = mask.shape == ref.shape and bool(np.allclose(mask.affine, ref.affine, atol=1e-4))
    return {"epochs": epochs, "train_s": train_s, "infer_s": infer_s, "best_dice": result.best_dice, "on_input_grid": on_grid,
            "passed": on_grid}


CHECKS: dict[str, Check] = {
    "amp_bf16": lambda ctx: check_amp(ctx, "bf16"),
    "amp_fp16": lambda ctx: check_amp(ctx, "fp16"),
    "gpu_augmentation": check_gpu_augmentation,
    "stitching": check_stitching,
    "ddp": check_ddp,
    "planner_memory": check_planner_memory,
    "end_to_end": check_end_to_end,
}


def run_checks(ctx: Context, names: list[str]) -> dict[str, dict[str, Any]]:
    """Every named check; one that raises is a failure with its error, and the others still run."""
    results = {}
    for name in names:
        started = time.perf_counter()
        try:
            results[name] = CHECKS[name](ctx)
        except Exception as exc:  # noqa: BLE001 - a failed check is a result, not the end of the run
            results[name] = {"passed": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        results[name]["check_seconds"] = time.perf_counter() - started
        verdict = {True: "PASS", False: "FAIL", None: "skipped"}[results[name]["passed"]]
        print(f"{name}: {verdict} ({results[name]['check_seconds']:.1f} s)", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the JSON to write")
    parser.add_argument("--device", default="cuda", help="cuda (the default, required for a real check) or cpu")
    parser.add_argument("--only", nargs="+", choices=sorted(CHECKS), help="run these checks only")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a GPU machine, or pass --device cpu "
              "for the checks that have a CPU path", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("medunet").setLevel(logging.WARNING)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medunet-gpu-check-") as tmp:
        ctx = Context(args.device, Path(tmp))
        checks = run_checks(ctx, args.only or list(CHECKS))
    failed = [name for name, r in checks.items() if r["passed"] is False]
    report = {"device": torch.cuda.get_device_name(ctx.device) if ctx.cuda else "cpu", "torch": torch.__version__,
              "cuda": torch.version.cuda, "gpus": torch.cuda.device_count() if ctx.cuda else 0,
              "seconds": time.perf_counter() - started, "passed": not failed, "failed": failed, "checks": checks}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"gpu_check: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}; results in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
