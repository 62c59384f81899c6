"""The training step under each speed option: fp32, bf16 autocast, channels_last_3d, torch.compile.

One process builds every variant from the same initial weights (MONAI DynUNet as medunet builds
it, DiceCE with deep supervision, AdamW, gradient clipping: the trainer's step), warms each up
(compilation included, timed separately), then times the variants round-robin, one step each per
round, on the same fixed batch, so a slow spell of the machine hits all of them alike.

Networks (``--network``):

* ``nnunet-plan``: features 32-64-128-256-320, strides 1,2,2,2,(2,2,1), patch 64x64x40, batch 2:
  nnU-Net v2's 3d_fullres plan of the throughput benchmark (train_throughput.py --nnunet).
* ``demo``: medunet's demo preset, features 8-16-32-64, patch 48x48x32, batch 4 patches.

    python scripts/bench/step_options.py --json steps.json              # ~4 min on 2 CPU cores
    python scripts/bench/step_options.py --network demo --no-compile    # ~1 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from medunet.config import load_config
from medunet.model.networks import build_network
from medunet.runtime import cpu_has_native_bf16
from medunet.training.trainer import DeepSupervisionLoss

NETWORKS = {  # name: (config overrides, batch, patch)
    "nnunet-plan": (["model.features=[32,64,128,256,320]", "model.strides=[[1,1,1],[2,2,2],[2,2,2],[2,2,2],[2,2,1]]"],
                    2, (64, 64, 40)),
    "demo": (["model.features=[8,16,32,64]"], 4, (48, 48, 32)),
}
VARIANTS = {  # name: (autocast dtype, channels_last, compile)
    "fp32": (None, False, False),
    "bf16 autocast": (torch.bfloat16, False, False),
    "fp32, channels_last_3d": (None, True, False),
    "bf16, channels_last_3d": (torch.bfloat16, True, False),
    "fp32, torch.compile": (None, False, True),
    "bf16, torch.compile": (torch.bfloat16, False, True),
}


def build_variant(config, init_state: dict, dtype, channels_last: bool, compiled: bool, batch: tuple):
    """A model, optimiser and one-step closure for one variant, on its own copy of the weights and batch."""
    model = build_network(config.model, in_channels=1, out_channels=2)
    model.load_state_dict(init_state)
    image, label = batch
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        image = image.contiguous(memory_format=torch.channels_last_3d)
    loss_fn = DeepSupervisionLoss(config, 2)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    trained = torch.compile(model) if compiled else model
    model.train()

    def step() -> float:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(trained(image), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        optimizer.step()
        return loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--network", choices=sorted(NETWORKS), default="nnunet-plan")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants (they compile for 30-60 s)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    overrides, batch_size, patch = NETWORKS[args.network]
    config = load_config(None, overrides)
    torch.manual_seed(0)
    init_state = build_network(config.model, in_channels=1, out_channels=2).state_dict()
    batch = (torch.randn(batch_size, 1, *patch), (torch.rand(batch_size, 1, *patch) > 0.7).long())
    variants = {k: v for k, v in VARIANTS.items() if not (args.no_compile and v[2])}
    steps, warmup = {}, {}
    for name, (dtype, channels_last, compiled) in variants.items():
        steps[name] = build_variant(config, init_state, dtype, channels_last, compiled, batch)
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
    lines = ["| variant | median s/step | steps/s vs fp32 | warm-up s (2 steps) |", "|---|---|---|---|"]
    for name, t in times.items():
        median = statistics.median(t)
        lines.append(f"| {name} | {median:.3f} | {base / median:.2f}x | {warmup[name]:.1f} |")
    print(f"\n{setup}\n\n" + "\n".join(lines))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"setup": setup, "step_s": times, "warmup_s": warmup}, handle, indent=2)


if __name__ == "__main__":
    main()
