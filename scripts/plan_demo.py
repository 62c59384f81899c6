"""Show that `medunet plan` alone gives configs that train well, on two different synthetic datasets.

    python scripts/plan_demo.py [--out /tmp/plan-demo] [--gpu-memory 1] [--epochs 5] [--iterations 20]

For each dataset (isotropic single-channel CT; anisotropic two-sequence MRI) it writes the data, runs
`medunet plan`, trains with the plan changing only the training length, and prints the planned choices
with the best validation Dice and the wall time. docs/planning.md records a run of it.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medunet.cli import main  # noqa: E402
from medunet.config import load_config  # noqa: E402
from medunet.synthetic import add_second_sequence, write_dataset  # noqa: E402


def datasets(out: Path) -> dict[str, Path]:
    """The two synthetic datasets (8 training cases each; 2 are held out for validation)."""
    return {
        "CT, isotropic 2 mm, 1 channel": write_dataset(out / "ct", num_train=8, num_test=0, shape=(32, 32, 32), spacing=(2.0, 2.0, 2.0)),
        "MRI, 0.9x0.9x3.6 mm, 2 sequences": add_second_sequence(
            write_dataset(out / "mri", num_train=8, num_test=0, shape=(40, 40, 16), spacing=(0.9, 0.9, 3.6), modality="MRI")
        ),
    }


def run(name: str, datalist: Path, args: argparse.Namespace) -> dict[str, str]:
    folder = datalist.parent
    plan = folder / "plan.yaml"
    if main(["-q", "plan", str(datalist), "-o", str(plan), "--gpu-memory", str(args.gpu_memory), "--overwrite"]) != 0:
        raise SystemExit(f"planning failed for {name}")
    config = load_config(plan)
    started = time.perf_counter()
    status = main(["-q", "train", str(datalist), "-o", str(folder / "run"), "-c", str(plan), "--device", args.device,
                   "--set", f"train.max_epochs={args.epochs}", "--set", f"train.iterations_per_epoch={args.iterations}"])
    if status != 0:
        raise SystemExit(f"training failed for {name}")
    seconds = time.perf_counter() - started
    with open(folder / "run" / "metrics.csv") as handle:
        best = max(float(r["val_dice_mean"]) for r in csv.DictReader(handle) if r["val_dice_mean"])
    return {
        "dataset": name,
        "spacing": str(list(config.data.target_spacing or [])),
        "normalisation": config.data.normalization + (" (nonzero)" if config.data.normalization == "zscore" and config.data.zscore_nonzero else ""),
        "patch": str(list(config.augmentation.patch_size)),
        "features": str(list(config.model.features)),
        "strides": str([list(s) for s in config.model.level_strides()[1:]]),
        "best Dice": f"{best:.3f}",
        "train s": f"{seconds:.0f}",
    }


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("plan-demo"))
    parser.add_argument("--gpu-memory", type=float, default=1.0, help="budget the plans fit (small: a small network for CPU)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=20, help="batches per epoch")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} exists and is not empty; choose another --out")
    rows = [run(name, datalist, args) for name, datalist in datasets(args.out).items()]
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(row.values()) + " |")


if __name__ == "__main__":
    main_cli()
