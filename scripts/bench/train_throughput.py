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
  Run twice: augmentation reduced to the class-balanced crop ("crop"; the same per-patch work as
  the baseline) and medunet's default augmentation ("default").

Each side runs one warm-up epoch, then ``--epochs`` timed epochs (an epoch = cases / batch
steps). Per step we time how long ``next(iterator)`` blocks (data wait) and the whole step.
The one-off cache fill is reported separately and not counted in the per-epoch numbers.

    python scripts/bench/train_throughput.py            # ~3 min on 2 CPU cores
    python scripts/bench/train_throughput.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset, list_data_collate
from monai.losses import DiceLoss
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    ScaleIntensityRanged,
    Spacingd,
)

from medunet.config import config_from_dict
from medunet.io.datalist import load_datalist
from medunet.networks import build_network
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


def medunet_config(args: argparse.Namespace, aug: str):
    augmentation: dict = {"patch_size": [args.patch] * 3, "samples_per_volume": args.samples}
    if aug == "crop":
        augmentation.update({name: 0.0 for name in AUG_OFF})
    return config_from_dict({
        "data": {"target_spacing": list(SPACING), "ct_window": list(WINDOW), "cache": "memory", "cache_workers": 2,
                 "loader_workers": 0},
        "augmentation": augmentation,
        "model": {"name": "unet", "features": list(FEATURES), "norm": "batch", "deep_supervision": False},
        "train": {"batch_size": args.batch, "device": "cpu"},
    })


def baseline_side(cases, args, init_state):
    """The spleen tutorial's training pipeline, unchanged apart from the shared settings."""
    keys = ["image", "label"]
    transforms = Compose([
        LoadImaged(keys=keys),
        EnsureChannelFirstd(keys=keys),
        ScaleIntensityRanged(keys=["image"], a_min=WINDOW[0], a_max=WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=SPACING, mode=("bilinear", "nearest")),
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=(args.patch,) * 3, pos=1, neg=1,
                               num_samples=args.samples, image_key="image", image_threshold=0),
    ])
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


def medunet_side(cases, args, init_state, aug: str, cache_dir: Path):
    """medunet's own data path and training step (as in medunet.training.trainer._train)."""
    config = medunet_config(args, aug)
    started = time.perf_counter()
    _, loader, generator = training_loader(cases, config, num_classes=NUM_CLASSES, in_channels=1,
                                           cache_dir=cache_dir, progress=False)
    cache_fill = time.perf_counter() - started
    generator.manual_seed(0)
    model = build_network(config.model, in_channels=1, out_channels=NUM_CLASSES)
    model.net.load_state_dict(init_state)
    loss_fn = DeepSupervisionLoss(config, NUM_CLASSES)
    optimizer = build_optimizer(config.optim, model)

    def step(batch) -> float:
        image, label = batch["image"], batch["label"]
        loss = loss_fn(model(image), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        return loss.item()

    model.train()
    return loader, step, cache_fill


def timed_run(loader, step, steps_per_epoch: int, epochs: int) -> dict:
    """One warm-up epoch, then ``epochs`` timed epochs; per step: data wait and total time."""
    waits, totals, patches = [], [], 0

    def batches():
        while True:
            yield from loader  # a fresh iterator (and, for DataLoader, fresh workers) every epoch

    it = batches()
    for i in range(steps_per_epoch * (1 + epochs)):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        step(batch)
        t2 = time.perf_counter()
        if i >= steps_per_epoch:
            waits.append(t1 - t0)
            totals.append(t2 - t0)
            patches += int(batch["image"].shape[0])
    total = sum(totals)
    return {
        "steps": len(totals),
        "patches": patches,
        "total_s": total,
        "patches_per_s": patches / total,
        "s_per_step": total / len(totals),
        "s_per_epoch": total / epochs,
        "data_wait_fraction": sum(waits) / total,
    }


def markdown(results: dict, baseline: str) -> str:
    rows = ["| pipeline | patches/s | s/epoch | s/step | data-wait fraction | cache fill (s, once) | patches/s vs baseline |",
            "|---|---|---|---|---|---|---|"]
    base = results[baseline]["patches_per_s"]
    for name, r in results.items():
        fill = f"{r['cache_fill_s']:.2f}" if r["cache_fill_s"] else "-"
        rows.append(f"| {name} | {r['patches_per_s']:.3f} | {r['s_per_epoch']:.2f} | {r['s_per_step']:.3f} | "
                    f"{r['data_wait_fraction']:.1%} | {fill} | {r['patches_per_s'] / base:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (4 cases, 32^3 patch, 1 timed epoch)")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64], help="volume shape in voxels")
    parser.add_argument("--patch", type=int, default=64, help="cubic patch edge in voxels")
    parser.add_argument("--batch", type=int, default=2, help="volumes per batch")
    parser.add_argument("--samples", type=int, default=2, help="patches per volume")
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every side")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the baseline")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
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
            "medunet, crop only": lambda: medunet_side(cases, args, init_state, "crop", Path(tmp) / "c1"),
            "medunet, default augmentation": lambda: medunet_side(cases, args, init_state, "default", Path(tmp) / "c2"),
        }
        for name, build in sides.items():
            torch.manual_seed(0)
            np.random.seed(0)
            loader, step, cache_fill = build()
            r = timed_run(loader, step, steps_per_epoch, args.epochs)
            r["cache_fill_s"] = cache_fill
            results[name] = r
            print(f"{name}: {r['patches_per_s']:.3f} patches/s, wait {r['data_wait_fraction']:.1%}", flush=True)

    baseline = next(iter(results))
    table = markdown(results, baseline)
    setup = (f"{args.cases} cases {tuple(args.shape)} at 1.5x1.5x2.5 mm -> {SPACING} mm, patch {args.patch}^3, "
             f"batch {args.batch} x {args.samples} patches, {steps_per_epoch} steps/epoch, 1 warm-up + {args.epochs} "
             f"timed epochs, torch threads {args.threads}, baseline workers {args.workers}")
    print(f"\n{setup}\n\n{table}")
    if args.json:
        args.json.write_text(json.dumps({"setup": setup, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                 for k, v in vars(args).items()},
                                         "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
