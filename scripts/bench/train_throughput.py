"""Training throughput: medunet's cached data path vs the MONAI spleen-tutorial pipeline.

Both sides train the same network (MONAI UNet 16-32-64-128-256, 2 residual units, batch norm)
on the same synthetic CT cases, with the same patch size, batch (2 volumes x 2 patches) and
number of optimisation steps, in one process and one run:

* baseline: ``monai.data.Dataset`` (no cache) + torch ``DataLoader`` (worker processes) with
  LoadImaged, EnsureChannelFirstd, ScaleIntensityRanged, CropForegroundd, Orientationd,
  Spacingd, RandCropByPosNegLabeld; DiceLoss; Adam. Every volume is re-read and re-resampled
  every epoch.
* medunet: its own ``Trainer`` (``medunet.training.trainer``) on the same cases: its loader
  (CacheDataset + ThreadDataLoader) feeds ``Trainer.step``, the step ``medunet train`` runs
  (DiceCE with deep supervision, AdamW, gradient clipping, the configured precision). Run three times: augmentation reduced to the class-balanced crop ("crop"; the same per-patch work
  as the baseline), medunet's default augmentation ("default"), and the default in fp32
  (``train.amp=off``). medunet's default precision is bf16 autocast on CPUs with native bf16
  (AVX512-BF16/AMX), fp32 elsewhere; the printed setup line says which this CPU got.
* reference: the medunet step on one fixed in-memory batch (no data path): the compute floor.

Each side runs one warm-up epoch, then ``--epochs`` timed epochs (an epoch = cases / batch
steps); epochs are interleaved round-robin across the sides so machine noise hits all of them.
Per step we time how long ``next(iterator)`` blocks (data wait) and the whole step.
The one-off set-up (building the Trainer: cache fill and network) is reported separately and
not counted in the per-epoch numbers. All networks come from ``medunet.model.networks.build_network``.

    python scripts/bench/train_throughput.py            # ~3 min on 2 CPU cores
    python scripts/bench/train_throughput.py --quick --json out.json   # seconds; numbers meaningless

With ``--nnunet`` the comparison is with nnU-Net v2 instead, at nnU-Net's own plan: the dataset is
converted to nnU-Net's raw format and planned by ``nnUNetv2_plan_and_preprocess`` (3d_fullres);
nnU-Net's ``nnUNetTrainer`` runs blocks of iterations in its own environment (nnunet_side.py,
which also says how to create it), and medunet and the tutorial pipeline train the equivalent
MONAI DynUNet at the same patch, batch (1 volume x nnU-Net's batch in patches), spacing and CT
normalisation (nnunet_peer.medunet_sections), at their default precision and in fp32. nnU-Net
autocasts on CUDA only, so it runs fp32 on the CPU. Without nnU-Net, its side is skipped with a message
and the other sides run at nnU-Net 2.8.1's recorded plan (``nnunet_peer.FALLBACK_PLAN``; a shrunk one with --quick).

    NNUNET_PYTHON=/tmp/nnunet-venv/bin/python python scripts/bench/train_throughput.py --nnunet --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nnunet_peer  # scripts/bench/nnunet_peer.py
import numpy as np
import torch
from common import bench_parser, bench_trainer, markdown_table, start, synthetic_datalist, workdir, write_json
from monai.data import DataLoader, Dataset, list_data_collate
from monai.losses import DiceLoss
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from tutorial import tutorial_training_chain  # scripts/bench/tutorial.py

from medunet.config import Config, config_from_dict
from medunet.io.datalist import load_datalist
from medunet.model.networks import build_network
from medunet.runtime import amp_dtype

WINDOW = (-57.0, 164.0)  # the spleen tutorial's CT window, used by both sides
SPACING = (1.5, 1.5, 2.0)  # the spleen tutorial's pixdim, used by both sides
FEATURES = (16, 32, 64, 128, 256)
NUM_CLASSES = 2
AUG_OFF = ["flip_prob", "rotate_prob", "scale_prob", "elastic_prob", "intensity_scale_prob",
           "intensity_shift_prob", "gamma_prob", "noise_prob", "blur_prob"]

#: A side, built: (batches to iterate, one optimisation step, one-off set-up seconds).
Side = tuple[Any, Callable[[dict], float], float]


def medunet_config(args: argparse.Namespace, aug: str, amp: str = "auto") -> Config:
    """The tutorial comparison's settings (MONAI UNet 16-256, batch norm) as a medunet config."""
    augmentation: dict = {"patch_size": [args.patch] * 3, "samples_per_volume": args.samples}
    if aug == "crop":
        augmentation.update({name: 0.0 for name in AUG_OFF})
    return config_from_dict({
        "data": {"target_spacing": list(SPACING), "ct_window": list(WINDOW), "cache": "memory", "cache_workers": 2,
                 "loader_workers": 0},
        "augmentation": augmentation,
        "model": {"name": "unet", "features": list(FEATURES), "norm": "batch", "deep_supervision": False},
        "train": {"batch_size": args.batch, "device": "cpu", "amp": amp},
    })


def tutorial_step(model: torch.nn.Module) -> Callable[[dict], float]:
    """The spleen tutorial's step: DiceLoss (softmax, one-hot labels) and Adam 1e-4, full precision."""
    loss_fn = DiceLoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)

    def step(batch: dict) -> float:
        optimizer.zero_grad()
        loss = loss_fn(model(batch["image"]), batch["label"])
        loss.backward()
        optimizer.step()
        return loss.item()

    model.train()
    return step


def tutorial_loader(datalist: Path, transforms: Compose, batch: int, workers: int) -> DataLoader:
    """``monai.data.Dataset`` (no cache) + torch's DataLoader: every volume re-read and re-resampled every epoch."""
    files = [{"image": str(c.image[0]), "label": str(c.label)} for c in load_datalist(datalist).training]
    return DataLoader(Dataset(files, transforms), batch_size=batch, shuffle=True, num_workers=workers,
                      collate_fn=list_data_collate)


def baseline_side(datalist: Path, args: argparse.Namespace, init_state: dict) -> Side:
    """The spleen tutorial's training pipeline, unchanged apart from the shared settings."""
    transforms, _ = tutorial_training_chain(SPACING, WINDOW, (args.patch,) * 3, args.samples)
    model = build_network(medunet_config(args, "crop").model, in_channels=1, out_channels=NUM_CLASSES).net
    model.load_state_dict(init_state)
    return tutorial_loader(datalist, transforms, args.batch, args.workers), tutorial_step(model), 0.0


def medunet_side(datalist: Path, config: Config, init_state: dict, run_dir: Path) -> Side:
    """medunet's Trainer: its loader and its ``step`` (as ``medunet train`` runs them), from the shared weights.

    ``train.amp`` auto gives bf16 autocast on CPUs with native bf16 (AVX512-BF16/AMX), as in training.
    """
    started = time.perf_counter()
    trainer = bench_trainer(datalist, run_dir, config)
    setup_s = time.perf_counter() - started
    trainer.generator.manual_seed(0)
    trainer.model.net.load_state_dict(init_state)
    trainer.trained.train()
    return trainer.loader, trainer.step, setup_s


def compute_only(datalist: Path, config: Config, init_state: dict, steps_per_epoch: int, run_dir: Path) -> Side:
    """The medunet step on one pre-collated batch, repeated: the step time with no data path at all."""
    loader, step, _ = medunet_side(datalist, config, init_state, run_dir)
    return [next(iter(loader))] * steps_per_epoch, step, 0.0


#: medunet with full-precision arithmetic: what its default costs on CPUs without native bf16.
FP32_SIDE = "medunet, default augmentation, fp32 (train.amp=off)"


def precision_note() -> str:
    """What ``train.amp: auto`` chose on this CPU, for the printed setup line."""
    dtype = amp_dtype("auto", torch.device("cpu"))
    return f"medunet train.amp auto = {'bf16 autocast' if dtype else 'fp32'} on this CPU"


def planned_config(sections: dict, samples: int, amp: str = "auto") -> Config:
    """medunet defaults (default augmentation, DiceCE + deep supervision, AdamW) at nnU-Net's plan."""
    return config_from_dict({
        "data": {**sections["data"], "cache": "memory", "cache_workers": 2, "loader_workers": 0},
        "augmentation": {**sections["augmentation"], "samples_per_volume": samples},
        "model": sections["model"],
        "train": {"batch_size": 1, "device": "cpu", "amp": amp},
    })


def planned_baseline_side(datalist: Path, config: Config, init_state: dict, workers: int) -> Side:
    """The tutorial's pipeline (Dataset + DataLoader, DiceLoss, Adam) at nnU-Net's plan, same DynUNet without heads."""
    keys = ["image", "label"]
    low, high = config.data.window()
    mean, std = config.data.ct_mean, config.data.ct_std
    transforms = Compose([
        LoadImaged(keys=keys),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=config.data.target_spacing, mode=("bilinear", "nearest")),
        CropForegroundd(keys=keys, source_key="image", select_fn=lambda x: x > -500, allow_smaller=True),
        ScaleIntensityRanged(keys=["image"], a_min=low, a_max=high, b_min=(low - mean) / std, b_max=(high - mean) / std,
                             clip=True),
        SpatialPadd(keys=keys, spatial_size=config.augmentation.patch_size),  # the body crop can be smaller than a patch
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=config.augmentation.patch_size, pos=1, neg=1,
                               num_samples=config.augmentation.samples_per_volume, image_key="image",
                               image_threshold=(low - mean) / std - 1.0),  # negatives anywhere (z-scored air is < 0)
    ])
    headless = dataclasses.replace(config.model, deep_supervision=False)
    model = build_network(headless, in_channels=1, out_channels=NUM_CLASSES).net
    model.load_state_dict(init_state, strict=False)  # the medunet network's weights, less its two heads
    return tutorial_loader(datalist, transforms, 1, workers), tutorial_step(model), 0.0


def run_epoch(loader: Any, step: Callable[[dict], float], record: dict | None, max_steps: int | None = None) -> None:
    """One pass over ``loader`` (a fresh iterator: for DataLoader, fresh workers); per step: data wait, total."""
    it = iter(loader)
    for _ in range(max_steps) if max_steps else itertools.count():
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        t1 = time.perf_counter()
        step(batch)
        t2 = time.perf_counter()
        if record is not None:
            record["wait"].append(t1 - t0)
            record["step"].append(t2 - t0)
            record["patches"] += int(batch["image"].shape[0])


def summary(record: dict, epochs: int) -> dict:
    total = sum(record["step"])
    return {
        "steps": len(record["step"]),
        "patches": record["patches"],
        "total_s": total,
        "patches_per_s": record["patches"] / total,
        "s_per_epoch": total / epochs,
        "s_per_step_mean": total / len(record["step"]),
        "s_per_step_median": float(np.median(record["step"])),
        "data_wait_fraction": sum(record["wait"]) / total,
        "step_s": record["step"],
        "wait_s": record["wait"],
    }


def run_sides(sides: dict[str, Callable[[], Side]], epochs: int, warmup_steps: int | None,
              peer_round: Callable[[], None] | None = None) -> dict[str, dict]:
    """Build every side (same seeds), then one warm-up round and ``epochs`` timed rounds, round robin.

    Epochs interleave across the sides, so a slow spell of the machine hits all of them.
    ``peer_round`` (nnU-Net's block of iterations) runs at the start of every timed round.
    """
    built, records = {}, {}
    for name, build in sides.items():
        torch.manual_seed(0)
        np.random.seed(0)
        built[name] = build()
        records[name] = {"wait": [], "step": [], "patches": 0}
    for epoch in range(1 + epochs):
        if peer_round is not None and epoch > 0:
            peer_round()
        for name, (loader, step, _) in built.items():
            run_epoch(loader, step, records[name] if epoch > 0 else None, max_steps=None if epoch > 0 else warmup_steps)
        print(f"round {epoch}/{epochs} done" + (" (warm-up)" if epoch == 0 else ""), flush=True)
    return {name: {**summary(records[name], epochs), "cache_fill_s": setup} for name, (_, _, setup) in built.items()}


def nnunet_record(python: str, env: dict, iterations: int, threads: int) -> dict:
    """One block of nnU-Net trainer iterations in a fresh process (start-up and 2 warm-up iterations untimed)."""
    out = nnunet_peer.run_side(python, ["train", "--iterations", str(iterations), "--warmup", "2", "--threads", str(threads)],
                               env)
    return {"wait": out["wait_s"], "step": out["step_s"], "patches": out["batch_size"] * len(out["step_s"]),
            "startup_s": out["startup_s"], "processes": out["augmentation_processes"]}


def main_nnunet(args: argparse.Namespace) -> None:
    """nnU-Net v2's trainer, medunet and the tutorial pipeline at nnU-Net's planned network, patch and batch."""
    python, version = nnunet_peer.peer_python(args.nnunet_python)
    if args.quick:  # with nnU-Net, its planning and preprocessing alone take 1-2 min here
        args.cases, args.epochs = 5, 1
        if python is None:  # medunet's and the tutorial's side alone, at a shrunk plan (QUICK_PLAN)
            args.cases, args.shape, args.workers = 2, [40, 40, 24], 0
    results: dict[str, dict] = {}
    with workdir("bench") as tmp_name:
        tmp = Path(tmp_name)
        datalist = synthetic_datalist(tmp / "data", cases=args.cases, shape=args.shape)
        env = nnunet_peer.nnunet_env(tmp / "nnunet") if python else {}
        plan, prepare_s = (nnunet_peer.QUICK_PLAN if args.quick else nnunet_peer.FALLBACK_PLAN), 0.0
        if python:
            print("nnU-Net: converting the dataset and running nnUNetv2_plan_and_preprocess ...", flush=True)
            plan = nnunet_peer.run_side(python, ["prepare", "--datalist", str(datalist)], env)
            prepare_s = plan["plan_and_preprocess_s"]
        sections = nnunet_peer.medunet_sections(plan)
        config = planned_config(sections, samples=plan["batch_size"])
        torch.manual_seed(0)
        init_state = build_network(config.model, in_channels=1, out_channels=NUM_CLASSES).net.state_dict()
        steps_per_epoch = args.cases  # 1 volume x batch_size patches per step, as nnU-Net's batch
        fp32 = planned_config(sections, plan["batch_size"], "off")
        sides: dict[str, Callable[[], Side]] = {
            "monai-tutorial (Dataset+DataLoader)": lambda: planned_baseline_side(datalist, config, init_state, args.workers),
            "medunet, default augmentation": lambda: medunet_side(datalist, config, init_state, tmp / "r1"),
            FP32_SIDE: lambda: medunet_side(datalist, fp32, init_state, tmp / "r3"),
            "reference: no data path": lambda: compute_only(datalist, config, init_state, steps_per_epoch, tmp / "r2"),
        }
        blocks: list[dict] = []
        peer_round = (lambda: blocks.append(nnunet_record(python, env, steps_per_epoch, args.threads))) if python else None
        ours = run_sides(sides, args.epochs, warmup_steps=2, peer_round=peer_round)  # warm-up: 2 steps, as nnU-Net's
        netspeed = {}
        if python:  # the network step alone, both networks alternating in one process: is the compute the same?
            netspeed = nnunet_peer.run_side(python, ["netspeed", "--repeats", "3", "--threads", str(args.threads)], env)
        if blocks:
            merged = {key: [x for b in blocks for x in b[key]] for key in ("wait", "step")}
            merged["patches"] = sum(b["patches"] for b in blocks)
            results[f"nnU-Net v2 {version} nnUNetTrainer"] = {
                **summary(merged, args.epochs), "cache_fill_s": prepare_s, "startup_s": [b["startup_s"] for b in blocks],
                "augmentation_processes": blocks[0]["processes"]}
        results.update(ours)

    ours_per_s = results["medunet, default augmentation"]["patches_per_s"]
    table = markdown_table(
        ["pipeline", "patches/s", "s/step (median)", "data-wait fraction", "one-off preprocessing (s)",
         "medunet / this (patches/s)"],
        [[name, f"{r['patches_per_s']:.3f}", f"{r['s_per_step_median']:.2f}", f"{r['data_wait_fraction']:.1%}",
          f"{r['cache_fill_s']:.1f}" if r["cache_fill_s"] else "-", f"{ours_per_s / r['patches_per_s']:.2f}x"]
         for name, r in results.items()])
    setup = (f"{args.cases} cases {tuple(args.shape)} at 1.5x1.5x2.5 mm; nnU-Net 3d_fullres plan: patch (z,y,x) "
             f"{plan['patch_size']}, batch {plan['batch_size']}, features {plan['features_per_stage']}, strides "
             f"{plan['strides']}, spacing {plan['spacing']}; {steps_per_epoch} steps per round, 1 warm-up + {args.epochs} "
             f"timed rounds, torch threads {args.threads}, baseline workers {args.workers}"
             + ("" if python else "; nnU-Net NOT run (not installed)") + f"; {precision_note()}")
    print(f"\n{setup}\n\n{table}")
    for name, times in netspeed.items():
        print(f"network step alone (forward + backward, median of {len(times)}): {name} {np.median(times):.2f} s")
    write_json(args.json, {"setup": setup, "plan": plan, "torch": torch.__version__, "nnunetv2": version if python else None,
                           "results": results, "network_step_s": netspeed})


def main_tutorial(args: argparse.Namespace) -> None:
    """medunet against the MONAI spleen tutorial's pipeline, on the tutorial's network (UNet 16-256)."""
    if args.quick:
        args.cases, args.shape, args.patch, args.epochs, args.workers = 2, [32, 32, 24], 16, 1, 0
    steps_per_epoch = math.ceil(args.cases / args.batch)
    torch.manual_seed(0)  # same initial weights for every side
    init_state = build_network(medunet_config(args, "crop").model, in_channels=1, out_channels=NUM_CLASSES).net.state_dict()
    with workdir("bench") as tmp_name:
        tmp = Path(tmp_name)
        datalist = synthetic_datalist(tmp / "data", cases=args.cases, shape=args.shape)
        sides: dict[str, Callable[[], Side]] = {
            "monai-tutorial (Dataset+DataLoader)": lambda: baseline_side(datalist, args, init_state),
            "medunet, crop only": lambda: medunet_side(datalist, medunet_config(args, "crop"), init_state, tmp / "r1"),
            "medunet, default augmentation": lambda: medunet_side(datalist, medunet_config(args, "default"), init_state,
                                                                  tmp / "r2"),
            FP32_SIDE: lambda: medunet_side(datalist, medunet_config(args, "default", "off"), init_state, tmp / "r4"),
            "reference: no data path": lambda: compute_only(datalist, medunet_config(args, "crop"), init_state,
                                                            steps_per_epoch, tmp / "r3"),
        }
        results = run_sides(sides, args.epochs, warmup_steps=None)

    base = results["monai-tutorial (Dataset+DataLoader)"]["patches_per_s"]
    table = markdown_table(
        ["pipeline", "patches/s", "s/epoch", "s/step (median)", "data-wait fraction", "set-up (s, once)",
         "patches/s vs baseline"],
        [[name, f"{r['patches_per_s']:.3f}", f"{r['s_per_epoch']:.2f}", f"{r['s_per_step_median']:.3f}",
          f"{r['data_wait_fraction']:.1%}", f"{r['cache_fill_s']:.2f}" if r["cache_fill_s"] else "-",
          f"{r['patches_per_s'] / base:.2f}x"] for name, r in results.items()])
    setup = (f"{args.cases} cases {tuple(args.shape)} at 1.5x1.5x2.5 mm -> {SPACING} mm, patch {args.patch}^3, "
             f"batch {args.batch} x {args.samples} patches, {steps_per_epoch} steps/epoch, 1 warm-up + {args.epochs} "
             f"timed epochs, torch threads {args.threads}, baseline workers {args.workers}; {precision_note()}")
    print(f"\n{setup}\n\n{table}")
    write_json(args.json, {"setup": setup, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "torch": torch.__version__, "results": results})


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "2 cases of 32x32x24, patch 16^3, 1 timed epoch; with --nnunet and no nnU-Net, "
                                   "a 3-level plan at patch 16x32x32")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64], help="volume shape in voxels")
    parser.add_argument("--patch", type=int, default=64, help="cubic patch edge in voxels")
    parser.add_argument("--batch", type=int, default=2, help="volumes per batch")
    parser.add_argument("--samples", type=int, default=2, help="patches per volume")
    parser.add_argument("--epochs", type=int, default=10, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the baseline")
    parser.add_argument("--nnunet", action="store_true",
                        help="compare with nnU-Net v2's trainer at nnU-Net's planned network, patch and batch "
                             "(defaults then: 6 cases 64x64x40, 2 timed rounds; see nnunet_side.py for its environment)")
    parser.add_argument("--nnunet-python", help="Python of the environment with nnunetv2 (default: $NNUNET_PYTHON, "
                                                "else /tmp/nnunet-venv/bin/python)")
    args = parser.parse_args(argv)
    start(args.threads)
    if not args.nnunet:
        return main_tutorial(args)
    defaults = parser.parse_args([])
    if args.cases == defaults.cases:
        args.cases = 6
    if args.shape == defaults.shape:
        args.shape = [64, 64, 40]
    if args.epochs == defaults.epochs:
        args.epochs = 2
    return main_nnunet(args)


if __name__ == "__main__":
    main()
