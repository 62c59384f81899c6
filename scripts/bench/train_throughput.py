"""Training throughput: medunet's cached data path vs the MONAI spleen-tutorial pipeline.

Both sides train the same network (MONAI UNet 16-32-64-128-256, 2 residual units, batch norm)
on the same synthetic CT cases, with the same patch size, batch (2 volumes x 2 patches) and
number of optimisation steps, in one process and one run:

* baseline: ``monai.data.Dataset`` (no cache) + torch ``DataLoader`` (worker processes) with
  LoadImaged, EnsureChannelFirstd, ScaleIntensityRanged, CropForegroundd, Orientationd,
  Spacingd, RandCropByPosNegLabeld; DiceLoss; Adam. Every volume is re-read and re-resampled
  every epoch.
* medunet: ``medunet.training.data.training_loader`` (CacheDataset + ThreadDataLoader),
  ``DeepSupervisionLoss`` (DiceCE), ``build_optimizer`` (AdamW) and the trainer's gradient clip.
  Run three times: augmentation reduced to the class-balanced crop ("crop"; the same per-patch work
  as the baseline), medunet's default augmentation ("default"), and the default in fp32
  (``train.amp=off``). medunet's default precision is bf16 autocast on CPUs with native bf16
  (AVX512-BF16/AMX), fp32 elsewhere; the printed setup line says which this CPU got.
* reference: the medunet step on one fixed in-memory batch (no data path): the compute floor.

Each side runs one warm-up epoch, then ``--epochs`` timed epochs (an epoch = cases / batch
steps); epochs are interleaved round-robin across the sides so machine noise hits all of them.
Per step we time how long ``next(iterator)`` blocks (data wait) and the whole step.
The one-off cache fill is reported separately and not counted in the per-epoch numbers.

    python scripts/bench/train_throughput.py            # ~3 min on 2 CPU cores
    python scripts/bench/train_throughput.py --quick --json out.json

With ``--nnunet`` the comparison is with nnU-Net v2 instead, at nnU-Net's own plan: the dataset is
converted to nnU-Net's raw format and planned by ``nnUNetv2_plan_and_preprocess`` (3d_fullres);
nnU-Net's ``nnUNetTrainer`` runs blocks of iterations in its own environment (nnunet_side.py,
which also says how to create it), and medunet and the tutorial pipeline train the equivalent
MONAI DynUNet at the same patch, batch (1 volume x nnU-Net's batch in patches), spacing and CT
normalisation (nnunet_peer.medunet_sections), at their default precision and in fp32. nnU-Net
autocasts on CUDA only, so it runs fp32 on the CPU. Without nnU-Net, its side is skipped with a message
and the other sides run at nnU-Net 2.8.1's recorded plan.

    NNUNET_PYTHON=/tmp/nnunet-venv/bin/python python scripts/bench/train_throughput.py --nnunet --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset, list_data_collate
from monai.losses import DiceLoss
from monai.networks.nets import DynUNet, UNet
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

from medunet.config import config_from_dict
from medunet.io.datalist import load_datalist
from medunet.model.networks import build_network
from medunet.runtime import amp_dtype, autocast
from medunet.synthetic import write_dataset
from medunet.training.data import training_loader
from medunet.training.optim import build_optimizer
from medunet.training.trainer import DeepSupervisionLoss

WINDOW = (-57.0, 164.0)  # the spleen tutorial's CT window, used by both sides
SPACING = (1.5, 1.5, 2.0)  # the spleen tutorial's pixdim, used by both sides
FEATURES = (16, 32, 64, 128, 256)
NUM_CLASSES = 2
AUG_OFF = ["flip_prob", "rotate_prob", "scale_prob", "elastic_prob", "intensity_scale_prob",
           "intensity_shift_prob", "gamma_prob", "noise_prob", "blur_prob"]


def baseline_network() -> torch.nn.Module:
    return UNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES, channels=FEATURES, strides=(2, 2, 2, 2),
                num_res_units=2, norm="batch")


def medunet_config(args: argparse.Namespace, aug: str, amp: str = "auto"):
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


def baseline_side(cases, args, init_state):
    """The spleen tutorial's training pipeline, unchanged apart from the shared settings."""
    transforms, _ = tutorial_training_chain(SPACING, WINDOW, (args.patch,) * 3, args.samples)
    files = [{"image": str(c.image[0]), "label": str(c.label)} for c in cases]
    loader = DataLoader(Dataset(files, transforms), batch_size=args.batch, shuffle=True, num_workers=args.workers,
                        collate_fn=list_data_collate)
    model = baseline_network()
    model.load_state_dict(init_state)
    loss_fn = DiceLoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)

    def step(batch) -> float:
        image, label = batch["image"], batch["label"]
        optimizer.zero_grad()
        loss = loss_fn(model(image), label)
        loss.backward()
        optimizer.step()
        return loss.item()

    model.train()
    return loader, step, 0.0


def medunet_side(cases, config, init_state, cache_dir: Path):
    """medunet's own data path and training step (as in medunet.training.trainer.train_epoch).

    ``train.amp`` auto gives bf16 autocast on CPUs with native bf16 (AVX512-BF16/AMX), as in the trainer.
    """
    started = time.perf_counter()
    _, loader, generator = training_loader(cases, config, num_classes=NUM_CLASSES, in_channels=1,
                                           cache_dir=cache_dir, progress=False)
    cache_fill = time.perf_counter() - started
    generator.manual_seed(0)
    model = build_network(config.model, in_channels=1, out_channels=NUM_CLASSES)
    model.net.load_state_dict(init_state)
    loss_fn = DeepSupervisionLoss(config, NUM_CLASSES)
    optimizer = build_optimizer(config.optim, model)
    amp = amp_dtype(config.train.amp, torch.device("cpu"))

    def step(batch) -> float:
        image, label = (torch.Tensor.as_subclass(batch[key], torch.Tensor) for key in ("image", "label"))
        with autocast(torch.device("cpu"), amp):
            loss = loss_fn(model(image), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        return loss.item()

    model.train()
    return loader, step, cache_fill


def compute_only(cases, config, init_state, steps_per_epoch: int, cache_dir: Path):
    """The medunet step on one pre-collated batch, repeated: the step time with no data path at all."""
    loader, step, _ = medunet_side(cases, config, init_state, cache_dir)
    return [next(iter(loader))] * steps_per_epoch, step, 0.0


#: medunet with full-precision arithmetic: what its default costs on CPUs without native bf16.
FP32_SIDE = "medunet, default augmentation, fp32 (train.amp=off)"


def precision_note() -> str:
    """What ``train.amp: auto`` chose on this CPU, for the printed setup line."""
    dtype = amp_dtype("auto", torch.device("cpu"))
    return f"medunet train.amp auto = {'bf16 autocast' if dtype else 'fp32'} on this CPU"


def load_peer():
    """scripts/bench/nnunet_peer.py, loaded by path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("nnunet_peer", Path(__file__).resolve().with_name("nnunet_peer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: nnU-Net 2.8.1's 3d_fullres plan for phantoms of 64x64x40 at 1.5x1.5x2.5 mm (8 cases, seed 0; 5 or 6 cases plan the
#: same patch, batch and network, with intensity statistics a little different), as ``nnUNetv2_plan_and_preprocess``
#: wrote it (nnU-Net axis order z, y, x). Used for the medunet and MONAI sides when nnU-Net is not installed.
FALLBACK_PLAN = {
    "patch_size": [40, 64, 64], "batch_size": 2, "spacing": [2.5, 1.5, 1.5],
    "features_per_stage": [32, 64, 128, 256, 320], "kernel_sizes": [[3, 3, 3]] * 5,
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
    "n_conv_per_stage": [2] * 5, "n_conv_per_stage_decoder": [2] * 4,
    "intensity": {"percentile_00_5": 104.84, "percentile_99_5": 157.75, "mean": 135.04, "std": 10.92},
}


def planned_config(sections: dict, samples: int, amp: str = "auto"):
    """medunet defaults (default augmentation, DiceCE + deep supervision, AdamW) at nnU-Net's plan."""
    return config_from_dict({
        "data": {**sections["data"], "cache": "memory", "cache_workers": 2, "loader_workers": 0},
        "augmentation": {**sections["augmentation"], "samples_per_volume": samples},
        "model": sections["model"],
        "train": {"batch_size": 1, "device": "cpu", "amp": amp},
    })


def planned_baseline_side(cases, config, init_state, workers: int):
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
    files = [{"image": str(c.image[0]), "label": str(c.label)} for c in cases]
    loader = DataLoader(Dataset(files, transforms), batch_size=1, shuffle=True, num_workers=workers,
                        collate_fn=list_data_collate)
    m = config.model
    model = DynUNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES, kernel_size=m.level_kernels(),
                    strides=m.level_strides(), upsample_kernel_size=m.level_strides()[1:], filters=list(m.features),
                    norm_name=("instance", {"affine": True}), act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}))
    model.load_state_dict(init_state, strict=False)  # the medunet network's weights, less its two heads
    loss_fn = DiceLoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)

    def step(batch) -> float:
        optimizer.zero_grad()
        loss = loss_fn(model(batch["image"]), batch["label"])
        loss.backward()
        optimizer.step()
        return loss.item()

    model.train()
    return loader, step, 0.0


def run_epoch(loader, step, record: dict | None, max_steps: int | None = None) -> None:
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


def markdown(results: dict, baseline: str) -> str:
    rows = ["| pipeline | patches/s | s/epoch | s/step (median) | data-wait fraction | cache fill (s, once) "
            "| patches/s vs baseline |", "|---|---|---|---|---|---|---|"]
    base = results[baseline]["patches_per_s"]
    for name, r in results.items():
        fill = f"{r['cache_fill_s']:.2f}" if r["cache_fill_s"] else "-"
        rows.append(f"| {name} | {r['patches_per_s']:.3f} | {r['s_per_epoch']:.2f} | {r['s_per_step_median']:.3f} | "
                    f"{r['data_wait_fraction']:.1%} | {fill} | {r['patches_per_s'] / base:.2f}x |")
    return "\n".join(rows)


def nnunet_record(peer, python: str, env: dict, iterations: int, threads: int) -> dict:
    """One block of nnU-Net trainer iterations in a fresh process (start-up and 2 warm-up iterations untimed)."""
    out = peer.run_side(python, ["train", "--iterations", str(iterations), "--warmup", "2", "--threads", str(threads)], env)
    return {"wait": out["wait_s"], "step": out["step_s"], "patches": out["batch_size"] * len(out["step_s"]),
            "startup_s": out["startup_s"], "processes": out["augmentation_processes"]}


def main_nnunet(args: argparse.Namespace) -> None:
    """nnU-Net v2's trainer, medunet and the tutorial pipeline at nnU-Net's planned network, patch and batch."""
    peer = load_peer()
    python, version = peer.find_python(args.nnunet_python)
    if python is None:
        print(f"nnU-Net side skipped: {version}\nmedunet and the MONAI pipeline still run, at nnU-Net 2.8.1's recorded plan.",
              file=sys.stderr)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="medunet-bench-") as tmp:
        datalist_path = write_dataset(Path(tmp) / "data", num_train=args.cases, num_test=0, shape=args.shape,
                                      spacing=(1.5, 1.5, 2.5), seed=0)
        cases = load_datalist(datalist_path).training
        env = peer.nnunet_env(Path(tmp) / "nnunet") if python else {}
        plan, prepare_s = FALLBACK_PLAN, 0.0
        if python:
            print("nnU-Net: converting the dataset and running nnUNetv2_plan_and_preprocess ...", flush=True)
            plan = peer.run_side(python, ["prepare", "--datalist", str(datalist_path)], env)
            prepare_s = plan["plan_and_preprocess_s"]
        sections = peer.medunet_sections(plan)
        config = planned_config(sections, samples=plan["batch_size"])
        torch.manual_seed(0)
        init_state = build_network(config.model, in_channels=1, out_channels=NUM_CLASSES).net.state_dict()
        steps_per_epoch = args.cases  # 1 volume x batch_size patches per step, as nnU-Net's batch
        sides = {
            "monai-tutorial (Dataset+DataLoader)": lambda: planned_baseline_side(cases, config, init_state, args.workers),
            "medunet, default augmentation": lambda: medunet_side(cases, config, init_state, Path(tmp) / "c1"),
            FP32_SIDE: lambda: medunet_side(cases, planned_config(sections, plan["batch_size"], "off"), init_state,
                                            Path(tmp) / "c3"),
            "reference: no data path": lambda: compute_only(cases, config, init_state, steps_per_epoch, Path(tmp) / "c2"),
        }
        built, records = {}, {}
        for name, build in sides.items():
            torch.manual_seed(0)
            np.random.seed(0)
            built[name] = build()
            records[name] = {"wait": [], "step": [], "patches": 0}
        nnunet_name = f"nnU-Net v2 {version} nnUNetTrainer"
        nnunet_blocks: list[dict] = []
        for epoch in range(1 + args.epochs):  # round robin, as in the default mode; nnU-Net runs one block per round
            if python and epoch > 0:
                nnunet_blocks.append(nnunet_record(peer, python, env, steps_per_epoch, args.threads))
            for name, (loader, step, _) in built.items():  # warm-up round: 2 steps, as nnU-Net's blocks
                run_epoch(loader, step, records[name] if epoch > 0 else None, max_steps=None if epoch > 0 else 2)
            print(f"round {epoch}/{args.epochs} done" + (" (warm-up)" if epoch == 0 else ""), flush=True)
        netspeed = {}
        if python:  # the network step alone, both networks alternating in one process: is the compute the same?
            netspeed = peer.run_side(python, ["netspeed", "--repeats", "3", "--threads", str(args.threads)], env)
        if nnunet_blocks:
            merged = {key: [x for b in nnunet_blocks for x in b[key]] for key in ("wait", "step")}
            merged["patches"] = sum(b["patches"] for b in nnunet_blocks)
            results[nnunet_name] = {**summary(merged, args.epochs), "cache_fill_s": prepare_s,
                                    "startup_s": [b["startup_s"] for b in nnunet_blocks],
                                    "augmentation_processes": nnunet_blocks[0]["processes"]}
        for name, (_, _, cache_fill) in built.items():
            results[name] = {**summary(records[name], args.epochs), "cache_fill_s": cache_fill}

    lines = ["| pipeline | patches/s | s/step (median) | data-wait fraction | one-off preprocessing (s) | "
             "medunet / this (patches/s) |", "|---|---|---|---|---|---|"]
    ours = results["medunet, default augmentation"]["patches_per_s"]
    for name, r in results.items():
        fill = f"{r['cache_fill_s']:.1f}" if r["cache_fill_s"] else "-"
        lines.append(f"| {name} | {r['patches_per_s']:.3f} | {r['s_per_step_median']:.2f} | {r['data_wait_fraction']:.1%} | "
                     f"{fill} | {ours / r['patches_per_s']:.2f}x |")
    setup = (f"{args.cases} cases {tuple(args.shape)} at 1.5x1.5x2.5 mm; nnU-Net 3d_fullres plan: patch (z,y,x) "
             f"{plan['patch_size']}, batch {plan['batch_size']}, features {plan['features_per_stage']}, strides "
             f"{plan['strides']}, spacing {plan['spacing']}; {steps_per_epoch} steps per round, 1 warm-up + {args.epochs} "
             f"timed rounds, torch threads {args.threads}, baseline workers {args.workers}"
             + ("" if python else "; nnU-Net NOT run (not installed)") + f"; {precision_note()}")
    table = "\n".join(lines)
    print(f"\n{setup}\n\n{table}")
    for name, times in netspeed.items():
        print(f"network step alone (forward + backward, median of {len(times)}): {name} {np.median(times):.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"setup": setup, "plan": plan, "torch": torch.__version__, "nnunetv2": version,
                                         "results": results, "network_step_s": netspeed}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (4 cases, 32^3 patch, 1 timed epoch)")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64], help="volume shape in voxels")
    parser.add_argument("--patch", type=int, default=64, help="cubic patch edge in voxels")
    parser.add_argument("--batch", type=int, default=2, help="volumes per batch")
    parser.add_argument("--samples", type=int, default=2, help="patches per volume")
    parser.add_argument("--epochs", type=int, default=10, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every side")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the baseline")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--nnunet", action="store_true",
                        help="compare with nnU-Net v2's trainer at nnU-Net's planned network, patch and batch "
                             "(defaults then: 6 cases 64x64x40, 2 timed rounds; see nnunet_side.py for its environment)")
    parser.add_argument("--nnunet-python", help="Python of the environment with nnunetv2 (default: $NNUNET_PYTHON, "
                                                "else /tmp/nnunet-venv/bin/python)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI's Orientationd "labels" notice
    if args.nnunet:
        defaults = parser.parse_args([])
        if args.cases == defaults.cases:
            args.cases = 6
        if args.shape == defaults.shape:
            args.shape = [64, 64, 40]
        if args.epochs == defaults.epochs:
            args.epochs = 2
        if args.quick:  # nnU-Net's planning and preprocessing alone take 1-2 min here
            args.cases, args.epochs = 5, 1
        torch.set_num_threads(args.threads)
        return main_nnunet(args)
    if args.quick:
        args.cases, args.shape, args.patch, args.epochs = 4, [64, 64, 48], 32, 1
    torch.set_num_threads(args.threads)
    steps_per_epoch = math.ceil(args.cases / args.batch)

    torch.manual_seed(0)
    init_state = baseline_network().state_dict()  # same initial weights for every side
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="medunet-bench-") as tmp:
        datalist_path = write_dataset(Path(tmp) / "data", num_train=args.cases, num_test=0, shape=args.shape,
                                      spacing=(1.5, 1.5, 2.5), seed=0)
        cases = load_datalist(datalist_path).training
        sides = {
            "monai-tutorial (Dataset+DataLoader)": lambda: baseline_side(cases, args, init_state),
            "medunet, crop only": lambda: medunet_side(cases, medunet_config(args, "crop"), init_state, Path(tmp) / "c1"),
            "medunet, default augmentation": lambda: medunet_side(cases, medunet_config(args, "default"), init_state,
                                                                  Path(tmp) / "c2"),
            FP32_SIDE: lambda: medunet_side(cases, medunet_config(args, "default", "off"), init_state, Path(tmp) / "c4"),
            "reference: no data path": lambda: compute_only(cases, medunet_config(args, "crop"), init_state, steps_per_epoch,
                                                            Path(tmp) / "c3"),
        }
        built, records = {}, {}
        for name, build in sides.items():
            torch.manual_seed(0)
            np.random.seed(0)
            built[name] = build()  # (loader, step, cache fill seconds)
            records[name] = {"wait": [], "step": [], "patches": 0}
        # Epochs interleave across the sides (round robin), so a slow spell of the machine hits all of them.
        for epoch in range(1 + args.epochs):
            for name, (loader, step, _) in built.items():
                run_epoch(loader, step, records[name] if epoch > 0 else None)  # epoch 0: warm-up
            print(f"epoch {epoch}/{args.epochs} done" + (" (warm-up)" if epoch == 0 else ""), flush=True)
        for name, (_, _, cache_fill) in built.items():
            results[name] = {**summary(records[name], args.epochs), "cache_fill_s": cache_fill}

    baseline = next(iter(results))
    table = markdown(results, baseline)
    setup = (f"{args.cases} cases {tuple(args.shape)} at 1.5x1.5x2.5 mm -> {SPACING} mm, patch {args.patch}^3, "
             f"batch {args.batch} x {args.samples} patches, {steps_per_epoch} steps/epoch, 1 warm-up + {args.epochs} "
             f"timed epochs, torch threads {args.threads}, baseline workers {args.workers}; {precision_note()}")
    print(f"\n{setup}\n\n{table}")
    if args.json:
        args.json.write_text(json.dumps({"setup": setup, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                 for k, v in vars(args).items()},
                                         "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
