"""Which learning-rate schedule should a short, time-budgeted run use? Measured on a small low-contrast organ.

A time budget (``train.max_minutes``) lays the schedule over the N steps that fit. With few steps,
decaying from the first step can leave the hardest class unlearnt. This script trains the same network
from the same initial weights on the same batches for N steps under several schedules (each a
:class:`~medunet.training.optim.StepSchedule` as the budget lays it, except the references) and scores
the validation cases after the last step, per class: what matters is the small organ of
:func:`medunet.synthetic.make_small_organ_phantom` (brighter than its surroundings by less than the noise).

    python scripts/bench/budget_schedule.py --steps 100 --seeds 2 --json budget_schedule.json   # ~25 min on 2 busy cores
    python scripts/bench/budget_schedule.py --quick --json /tmp/b.json                           # smoke run: 2 steps, 2 schedules

Settings are the demo's (features 8-16-32-64, patch 32^3, 2 volumes x 2 patches per step, AdamW).
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from common import bench_parser, start, write_json
from torch.optim.lr_scheduler import LambdaLR

from medunet.config import load_config
from medunet.runtime import seed_everything
from medunet.synthetic import write_dataset
from medunet.training.optim import StepSchedule, build_optimizer
from medunet.training.trainer import Trainer, validate

COMMON = [
    "data.target_spacing=[2.0,2.0,2.5]", "augmentation.patch_size=[32,32,32]", "augmentation.samples_per_volume=2",
    "model.features=[8,16,32,64]", "train.batch_size=2", "train.device=cpu", "inference.device=cpu",
    "inference.sw_batch_size=2", "data.val_fraction=0.25", "train.snapshots=false",
]
#: name: (scheduler, hold fraction, peak lr, steps the schedule is laid over as a multiple of N)
SCHEDULES = {
    "cosine over N": ("cosine", 0.0, 3e-3, 1),
    "cosine, hold 0.5": ("cosine", 0.5, 3e-3, 1),
    "cosine, hold 0.75": ("cosine", 0.75, 3e-3, 1),
    "poly 0.9 over N": ("poly", 0.0, 3e-3, 1),
    "poly 0.9, hold 0.5": ("poly", 0.5, 3e-3, 1),
    "cosine, hold 0.5, lr 1e-2": ("cosine", 0.5, 1e-2, 1),
    "constant (no decay)": ("constant", 0.0, 3e-3, 1),
    "first N of a 3N cosine": ("cosine", 0.0, 3e-3, 3),
}


def batches(trainer: Trainer, seed: int):
    """The trainer's loader, reseeded so every schedule sees the same patches in the same order."""
    seed_everything(seed)
    trainer.train_ds.transform.set_random_state(seed=seed)
    trainer.generator.manual_seed(seed)
    while True:
        yield from trainer.loader


def run(trainer: Trainer, init: dict, name: str, steps: int, seed: int) -> dict:
    kind, hold, lr, stretch = SCHEDULES[name]
    optim_cfg = replace(trainer.config.optim, scheduler=kind, hold_fraction=hold, lr=lr)
    trainer.model.load_state_dict(init)
    trainer.optimizer = build_optimizer(optim_cfg, trainer.model)
    schedule = LambdaLR(trainer.optimizer, StepSchedule(optim_cfg, warmup_steps=0, total_steps=steps * stretch))
    started = time.perf_counter()
    feed = batches(trainer, seed)
    trainer.trained.train()
    for _ in range(steps):
        trainer.step(next(feed))
        schedule.step()
    scores = validate(trainer.model, trainer.val_ds, trainer.config, num_classes=trainer.num_classes, device=trainer.device,
                      amp=trainer.amp)
    return {"schedule": name, "seed": seed, "final_lr": trainer.optimizer.param_groups[0]["lr"],
            "dice": dict(zip(trainer.class_names[1:], scores.dice.round(4).tolist())), "seconds": time.perf_counter() - started}


def main(argv: Sequence[str] | None = None) -> None:
    parser = bench_parser(__doc__ or "", "4 tiny phantoms, a 4-8-16 network, 2 steps of 2 schedules")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=1, help="repeats with other initial weights and batch orders")
    parser.add_argument("--cases", type=int, default=12, help="phantoms (a quarter validates)")
    parser.add_argument("--only", nargs="*", default=None, help="schedule names to run (default: all)")
    args = parser.parse_args(argv)
    start(args.threads)
    logging.basicConfig(level=logging.WARNING)
    shape, common = (48, 48, 40), list(COMMON)
    if args.quick:
        args.steps, args.seeds, args.cases = 2, 1, 4
        args.only = args.only or ["cosine over N", "cosine, hold 0.5"]
        shape = (32, 32, 24)
        common += ["model.features=[4,8,16]", "augmentation.patch_size=[16,16,16]", "augmentation.samples_per_volume=1"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        datalist = write_dataset(Path(tmp) / "data", num_train=args.cases, num_test=0, shape=shape, small_organ=True)
        for seed in range(args.seeds):
            config = load_config(None, [*common, f"train.seed={seed}"])
            trainer = Trainer(datalist, Path(tmp) / f"run{seed}", config, progress=False)
            init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            for name in args.only or SCHEDULES:
                result = run(trainer, init, name, args.steps, seed)
                results.append(result)
                print(json.dumps(result), flush=True)
    print(f"\n{args.steps} steps, mean over {args.seeds} seed(s): validation Dice per class")
    for name in args.only or SCHEDULES:
        mine = [r for r in results if r["schedule"] == name]
        means = {c: sum(r["dice"][c] for r in mine) / len(mine) for c in mine[0]["dice"]}
        print(f"  {name:28s} " + "  ".join(f"{c} {v:.3f}" for c, v in means.items()) + f"   final lr {mine[0]['final_lr']:.2g}")
    meta = {"steps": args.steps, "seeds": args.seeds, "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "quick": args.quick}
    write_json(args.json, {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
