"""Time to accuracy: wall time until the validation Dice first reaches a target, medunet vs the MONAI tutorial.

Both sides train the same network (medunet's demo preset: DynUNet 8-16-32-64, patch 48x48x32
at 2.0x2.0x2.5 mm, batches of 2 volumes x 2 patches) on the same synthetic CT task (phantoms
with one organ written by ``medunet.synthetic.write_dataset``; the same training and validation
cases), validate after every epoch and stop at the target Dice or the time cap:

* medunet: ``medunet.training.trainer.train`` with the demo preset (40 epochs; its defaults otherwise:
  cached preprocessing, ThreadDataLoader, default augmentation, DiceCE with deep supervision,
  AdamW + warm-up + cosine, gradient clipping, Gaussian sliding-window validation), ``val_every=1``.
  Run twice: with its default precision (``train.amp: auto``, bf16 autocast on CPUs with native
  bf16) and in fp32 (``train.amp=off``), to show what the default costs in accuracy.
* monai-tutorial: the spleen tutorial's loop (``Dataset`` + ``DataLoader`` with worker processes,
  LoadImaged ... RandCropByPosNegLabeld, DiceLoss, Adam 1e-4, sliding-window validation with the
  tutorial's defaults), with the same DynUNet (no deep-supervision heads).

The clock starts before any data is touched (medunet's cache fill counts) and stops when a
validation reaches the target; the sides run one after the other with the same thread count.
medunet's run is ended by an epoch callback of ``train`` (:class:`DiceWatch`) that records each
validation and asks the trainer to stop at the target or the cap.

    python scripts/bench/time_to_accuracy.py                 # up to 3 x --cap seconds
    python scripts/bench/time_to_accuracy.py --quick         # seconds: one epoch per side on tiny phantoms
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import bench_parser, markdown_table, start, synthetic_datalist, workdir, write_json
from tutorial import tutorial_training_chain  # scripts/bench/tutorial.py

from medunet.training.trainer import EpochRecord


class DiceWatch:
    """An epoch callback for medunet's ``train``: records (seconds, mean Dice) per validation; True (stop) at the target or the cap."""

    def __init__(self, started: float, target: float, cap: float) -> None:
        self.started, self.target, self.cap = started, target, cap
        self.curve: list[tuple[float, float]] = []

    def __call__(self, record: EpochRecord) -> bool:
        if not record.validated:
            return False
        elapsed = time.perf_counter() - self.started
        dice = float(record.row["val_dice_mean"])
        self.curve.append((elapsed, dice))
        return dice >= self.target or elapsed > self.cap


def quick_overrides(args: argparse.Namespace) -> list[str]:
    """--quick shrinks the patch for both sides (the demo's 48x48x32 costs seconds per step)."""
    return ["augmentation.patch_size=[32,32,16]"] if args.quick else []


def run_medunet(datalist: Path, run_dir: Path, args: argparse.Namespace, amp: str = "auto") -> dict:
    """medunet's trainer with the demo preset; ``amp`` is train.amp (auto: bf16 on CPUs that compute it natively)."""
    from medunet.config import load_config
    from medunet.runtime import amp_dtype
    from medunet.training.trainer import train
    from medunet.workflows.demo import DEMO_OVERRIDES

    config = load_config(None, [*DEMO_OVERRIDES, *quick_overrides(args), "train.val_every=1", "train.device=cpu",
                                "inference.device=cpu", f"train.amp={amp}"])
    started = time.perf_counter()
    watch = DiceWatch(started, args.target, args.cap)
    train(datalist, run_dir, config, progress=False, callbacks=[watch])
    return {
        "curve": watch.curve,
        "wall_s": time.perf_counter() - started,
        "config": {
            "patch": list(config.augmentation.patch_size),
            "features": list(config.model.features),
            "spacing": list(config.data.target_spacing),
            "batch": config.train.batch_size,
            "samples_per_volume": config.augmentation.samples_per_volume,
            "lr": config.optim.lr,
            "amp": str(amp_dtype(config.train.amp, torch.device("cpu"))),
        },
    }


def run_tutorial(datalist: Path, args: argparse.Namespace) -> dict:
    """The spleen tutorial's training loop with medunet's demo network, patch, spacing, window and batch."""
    from monai.data import DataLoader, Dataset, decollate_batch, list_data_collate
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceLoss
    from monai.metrics import DiceMetric
    from monai.transforms import AsDiscrete

    from medunet.config import load_config
    from medunet.model.networks import build_network
    from medunet.workflows.demo import DEMO_OVERRIDES

    config = load_config(None, [*DEMO_OVERRIDES, *quick_overrides(args)])
    low, high = config.data.window()
    patch = config.augmentation.patch_size
    train_tf, val_tf = tutorial_training_chain(config.data.target_spacing, (low, high), patch,
                                               config.augmentation.samples_per_volume, pad_to_patch=True)
    listing = json.loads(datalist.read_text())

    def files(entries):
        return [{"image": str(datalist.parent / e["image"]), "label": str(datalist.parent / e["label"])} for e in entries]

    started = time.perf_counter()
    train_loader = DataLoader(
        Dataset(files(listing["training"]), train_tf),
        batch_size=config.train.batch_size,
        shuffle=True,
        num_workers=args.workers,
        collate_fn=list_data_collate,
    )
    val_loader = DataLoader(Dataset(files(listing["validation"]), val_tf), batch_size=1, num_workers=args.workers)
    model = build_network(dataclasses.replace(config.model, deep_supervision=False), in_channels=1, out_channels=2).net
    loss_fn = DiceLoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    metric = DiceMetric(include_background=False, reduction="mean")
    post_pred, post_label = AsDiscrete(argmax=True, to_onehot=2), AsDiscrete(to_onehot=2)
    curve: list[tuple[float, float]] = []
    while True:  # the time cap ends it
        model.train()
        for batch in train_loader:
            optimizer.zero_grad()
            loss = loss_fn(model(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for batch in val_loader:
                outputs = sliding_window_inference(batch["image"], patch, 4, model)
                metric(
                    y_pred=[post_pred(i) for i in decollate_batch(outputs)],
                    y=[post_label(i) for i in decollate_batch(batch["label"])],
                )
        dice = float(metric.aggregate().item())
        metric.reset()
        elapsed = time.perf_counter() - started
        curve.append((elapsed, dice))
        if dice >= args.target or elapsed > args.cap:
            break
    return {
        "curve": curve,
        "wall_s": time.perf_counter() - started,
        "config": {"optimizer": "Adam 1e-4", "loss": "DiceLoss", "workers": args.workers},
    }


OURS = "medunet (demo preset)"
OURS_FP32 = "medunet (demo preset), fp32 (train.amp=off)"
TUTORIAL = "monai-tutorial (Dataset+DataLoader)"


def reached(curve: list[tuple[float, float]], target: float) -> float | None:
    """Seconds at the first validation with Dice >= target, or None."""
    return next((t for t, d in curve if d >= target), None)


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "2 training + 1 validation phantoms of 32x32x24, one epoch and one validation per side")
    parser.add_argument("--target", type=float, default=0.85, help="validation Dice of the organ to reach")
    parser.add_argument("--cap", type=float, default=300.0, help="seconds per side before giving up")
    parser.add_argument("--train", type=int, default=10, help="training cases")
    parser.add_argument("--val", type=int, default=2, help="validation cases")
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 40], help="volume shape in voxels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the tutorial side")
    args = parser.parse_args(argv)
    if args.quick:  # a cap of 0 s: every side stops after its first validation
        args.train, args.val, args.shape, args.cap, args.workers = 2, 1, [32, 32, 24], 0.0, 0
    start(args.threads)
    results = {}
    with workdir("tta") as tmp:
        datalist = synthetic_datalist(Path(tmp) / "data", cases=args.train, validation=args.val, shape=args.shape,
                                      spacing=(1.5, 1.5, 2.5), seed=args.seed)
        for name, run in (
            (OURS, lambda: run_medunet(datalist, Path(tmp) / "run", args)),
            (OURS_FP32, lambda: run_medunet(datalist, Path(tmp) / "run-fp32", args, amp="off")),
            (TUTORIAL, lambda: run_tutorial(datalist, args)),
        ):
            torch.manual_seed(0)
            np.random.seed(0)
            results[name] = run()
            results[name]["seconds_to_target"] = reached(results[name]["curve"], args.target)
            best = max((d for _, d in results[name]["curve"]), default=float("nan"))
            print(
                f"{name}: {len(results[name]['curve'])} validations, best Dice {best:.3f}, "
                f"target reached at {results[name]['seconds_to_target']} s",
                flush=True,
            )
    ours, theirs = (results[k]["seconds_to_target"] for k in (OURS, TUTORIAL))
    if ours and theirs:
        ratio = f"{theirs / ours:.2f}x faster"
    elif ours:
        ratio = f"> {args.cap / ours:.2f}x faster (the tutorial did not reach {args.target} within {args.cap:.0f} s)"
    else:
        ratio = f"not measured: medunet did not reach {args.target} within {args.cap:.0f} s"
    rows = []
    for name, r in results.items():
        curve = r["curve"]
        at = f"{r['seconds_to_target']:.1f}" if r["seconds_to_target"] else f"not within {args.cap:.0f} s"
        rows.append([name, at, len(curve), f"{max(d for _, d in curve):.3f}", f"{curve[-1][1]:.3f}"])
    table = markdown_table(["pipeline", "s to Dice >= target", "validations", "best Dice", "Dice at the end"], rows)
    setup = (
        f"target Dice {args.target} (organ), {args.train} training + {args.val} validation phantoms {tuple(args.shape)}, "
        f"validation after every epoch, cap {args.cap:.0f} s per side, torch threads {args.threads}"
    )
    print(f"\n{setup}\n\n{table}\n\nmedunet vs tutorial: {ratio}")
    write_json(args.json, {"setup": setup, "ratio": ratio, "torch": torch.__version__, "results": results})


if __name__ == "__main__":
    main()
