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

    python scripts/bench/time_to_accuracy.py                 # up to 2 x --cap seconds
    python scripts/bench/time_to_accuracy.py --quick         # < 1 min; the target is usually not reached
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tutorial import tutorial_training_chain  # scripts/bench/tutorial.py

TARGET_LOG = re.compile(r"val Dice (\d+\.\d+)")


class StopRun(Exception):
    """Raised from the log handler to end medunet's training once the target (or the cap) is reached."""


class DiceWatch(logging.Handler):
    """Watches medunet's per-epoch log lines: records (seconds, Dice) and stops the run at the target or the cap."""

    def __init__(self, started: float, target: float, cap: float) -> None:
        super().__init__()
        self.started, self.target, self.cap = started, target, cap
        self.curve: list[tuple[float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = TARGET_LOG.search(record.getMessage())
        if not found:
            return
        elapsed = time.perf_counter() - self.started
        self.curve.append((elapsed, float(found.group(1))))
        if float(found.group(1)) >= self.target or elapsed > self.cap:
            raise StopRun


def write_task(root: Path, args: argparse.Namespace) -> Path:
    """The fixed task: phantoms with one organ; the last ``--val`` cases form the datalist's "validation" list."""
    from medunet.synthetic import write_dataset

    path = write_dataset(root, num_train=args.train + args.val, num_test=0, shape=args.shape, num_classes=2, seed=args.seed)
    datalist = json.loads(path.read_text())
    datalist["validation"] = datalist["training"][args.train :]
    datalist["training"] = datalist["training"][: args.train]
    path.write_text(json.dumps(datalist, indent=2))
    return path


def run_medunet(datalist: Path, run_dir: Path, args: argparse.Namespace, amp: str = "auto") -> dict:
    """medunet's trainer with the demo preset; ``amp`` is train.amp (auto: bf16 on CPUs that compute it natively)."""
    from medunet.config import load_config
    from medunet.runtime import amp_dtype
    from medunet.training.trainer import train
    from medunet.workflows.demo import DEMO_OVERRIDES

    config = load_config(None, [*DEMO_OVERRIDES, "train.val_every=1", "train.device=cpu", "inference.device=cpu",
                                f"train.amp={amp}"])
    log = logging.getLogger("medunet")
    log.setLevel(logging.INFO)
    started = time.perf_counter()
    watch = DiceWatch(started, args.target, args.cap)
    log.addHandler(watch)
    try:
        train(datalist, run_dir, config, progress=False)
    except StopRun:
        pass
    finally:
        log.removeHandler(watch)
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
    from monai.networks.nets import DynUNet
    from monai.transforms import AsDiscrete

    from medunet.config import load_config
    from medunet.workflows.demo import DEMO_OVERRIDES

    config = load_config(None, list(DEMO_OVERRIDES))
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
    m = config.model
    model = DynUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        kernel_size=m.level_kernels(),
        strides=m.level_strides(),
        upsample_kernel_size=m.level_strides()[1:],
        filters=list(m.features),
        norm_name=("instance", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
    )
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (4+1 small cases, 15 s cap per side)")
    parser.add_argument("--target", type=float, default=0.85, help="validation Dice of the organ to reach")
    parser.add_argument("--cap", type=float, default=300.0, help="seconds per side before giving up")
    parser.add_argument("--train", type=int, default=10, help="training cases")
    parser.add_argument("--val", type=int, default=2, help="validation cases")
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 40], help="volume shape in voxels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both sides")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the tutorial side")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.quick:
        args.train, args.val, args.shape, args.cap = 4, 1, [48, 48, 32], 15.0
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="medunet-tta-") as tmp:
        datalist = write_task(Path(tmp) / "data", args)
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
    lines = ["| pipeline | s to Dice >= target | validations | best Dice | Dice at the end |", "|---|---|---|---|---|"]
    for name, r in results.items():
        curve = r["curve"]
        at = f"{r['seconds_to_target']:.1f}" if r["seconds_to_target"] else f"not within {args.cap:.0f} s"
        lines.append(f"| {name} | {at} | {len(curve)} | {max(d for _, d in curve):.3f} | {curve[-1][1]:.3f} |")
    setup = (
        f"target Dice {args.target} (organ), {args.train} training + {args.val} validation phantoms {tuple(args.shape)}, "
        f"validation after every epoch, cap {args.cap:.0f} s per side, torch threads {args.threads}"
    )
    print(f"\n{setup}\n\n" + "\n".join(lines) + f"\n\nmedunet vs tutorial: {ratio}")
    if args.json:
        args.json.write_text(
            json.dumps({"setup": setup, "ratio": ratio, "torch": torch.__version__, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
