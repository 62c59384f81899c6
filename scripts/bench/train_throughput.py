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
* reference: the medunet step on one fixed in-memory batch (no data path): the compute floor.

Each side runs one warm-up epoch, then ``--epochs`` timed epochs (an epoch = cases / batch
steps); epochs are interleaved round-robin across the sides so machine noise hits all of them.
Per step we time how long ``next(iterator)`` blocks (data wait) and the whole step.
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
import warnings
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


def compute_only(cases, args, init_state, steps_per_epoch: int, cache_dir: Path):
    """The medunet step on one pre-collated batch, repeated: the step time with no data path at all."""
    loader, step, _ = medunet_side(cases, args, init_state, "crop", cache_dir)
    return [next(iter(loader))] * steps_per_epoch, step, 0.0


def run_epoch(loader, step, record: dict | None) -> None:
    """One pass over ``loader`` (a fresh iterator: for DataLoader, fresh workers); per step: data wait, total."""
    it = iter(loader)
    while True:
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
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI's Orientationd "labels" notice
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
            "reference: no data path": lambda: compute_only(cases, args, init_state, steps_per_epoch, Path(tmp) / "c3"),
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
             f"timed epochs, torch threads {args.threads}, baseline workers {args.workers}")
    print(f"\n{setup}\n\n{table}")
    if args.json:
        args.json.write_text(json.dumps({"setup": setup, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                 for k, v in vars(args).items()},
                                         "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
