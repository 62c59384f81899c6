"""The training step under each speed option: fp32, bf16 autocast, channels_last_3d, torch.compile.

One process builds every variant as a medunet ``Trainer`` (on a tiny synthetic datalist; the
variant is its config: ``train.amp``, ``train.channels_last``, ``train.compile``) from the same
initial weights, and times ``Trainer.step``: the step ``medunet train`` runs (DynUNet, DiceCE with
deep supervision, AdamW, gradient clipping), on one fixed random batch. It warms each up
(compilation included, timed separately), then times the variants round-robin, one step each per
round, on the same fixed batch, so a slow spell of the machine hits all of them alike.

Networks (``--network``):

* ``nnunet-plan``: features 32-64-128-256-320, strides 1,2,2,2,(2,2,1), patch 64x64x40, batch 2:
  nnU-Net v2's 3d_fullres plan of the throughput benchmark (train_throughput.py --nnunet).
* ``demo``: medunet's demo preset, features 8-16-32-64, patch 48x48x32, batch 4 patches.

    python scripts/bench/step_options.py --json steps.json              # ~4 min on 2 CPU cores
    python scripts/bench/step_options.py --network demo --no-compile    # ~1 min
    python scripts/bench/step_options.py --quick                        # seconds: demo network, small patch, no compile
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import bench_parser, bench_trainer, markdown_table, start, synthetic_datalist, workdir, write_json

from medunet.config import load_config
from medunet.model.networks import build_network
from medunet.runtime import cpu_has_native_bf16

NETWORKS = {  # name: (config overrides, batch, patch)
    "nnunet-plan": (["model.features=[32,64,128,256,320]", "model.strides=[[1,1,1],[2,2,2],[2,2,2],[2,2,2],[2,2,1]]"],
                    2, (64, 64, 40)),
    "demo": (["model.features=[8,16,32,64]"], 4, (48, 48, 32)),
}
VARIANTS = {  # name: config overrides
    "fp32": ["train.amp=off"],
    "bf16 autocast": ["train.amp=bf16"],
    "fp32, channels_last_3d": ["train.amp=off", "train.channels_last=true"],
    "bf16, channels_last_3d": ["train.amp=bf16", "train.channels_last=true"],
    "fp32, torch.compile": ["train.amp=off", "train.compile=true"],
    "bf16, torch.compile": ["train.amp=bf16", "train.compile=true"],
}


def build_variant(datalist: Path, run_dir: Path, overrides: list[str], init_state: dict, batch: dict[str, Any]):
    """One variant's Trainer, on its own copy of the initial weights; returns a closure running one step on ``batch``."""
    trainer = bench_trainer(datalist, run_dir, load_config(None, [*overrides, "train.device=cpu"]))
    trainer.model.load_state_dict(init_state)
    trainer.trained.train()
    return lambda: trainer.step(batch)


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "demo network, batch 2 x 32x32x16, 1 round, no torch.compile")
    parser.add_argument("--network", choices=sorted(NETWORKS), default="nnunet-plan")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants (they compile for 30-60 s)")
    args = parser.parse_args(argv)
    start(args.threads)
    overrides, batch_size, patch = NETWORKS[args.network]
    if args.quick:
        overrides, batch_size, patch = NETWORKS["demo"][0], 2, (32, 32, 16)
        args.network, args.rounds, args.no_compile = "demo", 1, True
    config = load_config(None, overrides)
    batch = {"image": torch.randn(batch_size, 1, *patch), "label": (torch.rand(batch_size, 1, *patch) > 0.7).long()}
    variants = {k: v for k, v in VARIANTS.items() if not (args.no_compile and "train.compile=true" in v)}
    steps, warmup = {}, {}
    with workdir("steps") as tmp:
        datalist = synthetic_datalist(Path(tmp) / "data", cases=1, shape=(24, 24, 16))  # the Trainer needs cases; unused
        torch.manual_seed(0)
        init_state = build_network(config.model, in_channels=1, out_channels=2).state_dict()
        for number, (name, variant) in enumerate(variants.items()):
            steps[name] = build_variant(datalist, Path(tmp) / f"run{number}", [*overrides, *variant], init_state, batch)
            started = time.perf_counter()
            steps[name]()
            steps[name]()
            warmup[name] = time.perf_counter() - started
            print(f"{name}: warm-up (2 steps, compilation included) {warmup[name]:.1f} s", flush=True)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, step in steps.items():
                started = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - started)
    base = statistics.median(times["fp32"])
    setup = (f"network {args.network} (features {list(config.model.features)}), batch {batch_size} x {patch}, "
             f"torch {torch.__version__}, threads {args.threads}, native bf16 on this CPU: {cpu_has_native_bf16()}, "
             f"{args.rounds} timed rounds after 2 warm-up steps per variant")
    table = markdown_table(["variant", "median s/step", "steps/s vs fp32", "warm-up s (2 steps)"],
                           [[name, f"{statistics.median(t):.3f}", f"{base / statistics.median(t):.2f}x", f"{warmup[name]:.1f}"]
                            for name, t in times.items()])
    print(f"\n{setup}\n\n{table}")
    write_json(args.json, {"setup": setup, "step_s": times, "warmup_s": warmup})


if __name__ == "__main__":
    main()
