"""Compare `medunet plan` with nnU-Net v2's default 3d_fullres planner on the same synthetic datasets.

nnU-Net is NOT a medunet dependency. Install it into its own environment that reuses medunet's (and its
torch), e.g.:

    python -m venv /tmp/nnunet-venv
    echo "$(python -c 'import site; print(site.getsitepackages()[0])')" > /tmp/nnunet-venv/lib/python3.11/site-packages/medunet.pth
    /tmp/nnunet-venv/bin/pip install --no-deps nnunetv2 dynamic-network-architectures acvl-utils batchgenerators batchgeneratorsv2
    /tmp/nnunet-venv/bin/pip install blosc2 pandas
    /tmp/nnunet-venv/bin/python scripts/compare_nnunet_plan.py --out /tmp/plan-compare [--gpu-memory 8]

It writes each dataset once, converts it to nnU-Net's raw layout, runs nnU-Net's fingerprint extraction and
ExperimentPlanner, runs medunet's planner, and prints one Markdown table (axes in x, y, z order for both;
nnU-Net's arrays are z, y, x). docs/planning.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import plan_demo  # noqa: E402  (scripts/plan_demo.py: the same two small datasets)

from medunet.synthetic import write_dataset  # noqa: E402


def datasets(out: Path) -> dict[str, Path]:
    """The plan_demo datasets (under this script's shorter labels), plus a larger anisotropic CT where the memory budget decides the patch."""
    ct, mri = plan_demo.datasets(out).values()
    return {
        "CT 32^3, 2 mm iso": ct,
        "MRI 40x40x16, 0.9x0.9x3.6 mm, 2 seq": mri,
        "CT 256x256x64, 0.8x0.8x3 mm": write_dataset(
            out / "ct_large", num_train=6, num_test=0, shape=(256, 256, 64), spacing=(0.8, 0.8, 3.0), num_classes=3
        ),
    }


def to_nnunet_raw(datalist: Path, raw_root: Path, dataset_id: int) -> None:
    """Copy a medunet datalist's training cases into nnU-Net's raw layout (imagesTr/<case>_<channel>.nii.gz)."""
    spec = json.loads(datalist.read_text())
    folder = raw_root / f"Dataset{dataset_id:03d}_medunet{dataset_id}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i, entry in enumerate(spec["training"]):
        images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        for channel, image in enumerate(images):
            shutil.copy(datalist.parent / image, folder / "imagesTr" / f"case{i:03d}_{channel:04d}.nii.gz")
        shutil.copy(datalist.parent / entry["label"], folder / "labelsTr" / f"case{i:03d}.nii.gz")
    channels = {str(k): v for k, v in spec["modality"].items()}
    labels = {name: int(k) for k, name in spec["labels"].items()}
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": channels, "labels": labels, "numTraining": len(spec["training"]), "file_ending": ".nii.gz",
    }))


def nnunet_plan(dataset_id: int, gpu_memory: float) -> dict:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    extract_fingerprints([dataset_id], num_processes=2, check_dataset_integrity=False, clean=True, verbose=False)
    plan_experiments([dataset_id], gpu_memory_target_in_gb=gpu_memory)
    folder = next(Path(os.environ["nnUNet_preprocessed"]).glob(f"Dataset{dataset_id:03d}_*"))
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    arch = cfg["architecture"]["arch_kwargs"]
    fingerprint = json.loads((folder / "dataset_fingerprint.json").read_text())
    ct = fingerprint["foreground_intensity_properties_per_channel"]["0"]
    return {
        "spacing": [round(s, 3) for s in cfg["spacing"][::-1]],
        "patch": list(cfg["patch_size"][::-1]),
        "batch": cfg["batch_size"],
        "features": list(arch["features_per_stage"]),
        "strides": [list(s[::-1]) for s in arch["strides"][1:]],
        "norm": ", ".join(cfg["normalization_schemes"]) + (" (mask)" if any(cfg["use_mask_for_norm"]) else ""),
        "clip": [round(ct["percentile_00_5"], 1), round(ct["percentile_99_5"], 1)],
    }


def medunet_plan(datalist: Path, gpu_memory: float) -> dict:
    from medunet.io.datalist import load_datalist
    from medunet.planning.fingerprint import compute_fingerprint
    from medunet.planning.planner import make_plan

    config = make_plan(compute_fingerprint(load_datalist(datalist)), gpu_memory_gb=gpu_memory).config()
    data = config.data
    return {
        "spacing": list(data.target_spacing or []),
        "patch": list(config.augmentation.patch_size),
        "batch": config.train.batch_size * config.augmentation.samples_per_volume,
        "features": list(config.model.features),
        "strides": [list(s) for s in config.model.level_strides()[1:]],
        "norm": data.normalization + (" (nonzero)" if data.normalization == "zscore" and data.zscore_nonzero else ""),
        "clip": list(data.window()) if data.normalization == "ct_clip_zscore" else "-",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("plan-compare"))
    parser.add_argument("--gpu-memory", type=float, default=8.0)
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} exists and is not empty; choose another --out")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # nnU-Net reads these when imported
        os.environ[name] = str((args.out / name).resolve())
        Path(os.environ[name]).mkdir(parents=True, exist_ok=True)
    rows = []
    for number, (name, datalist) in enumerate(datasets(args.out / "data").items()):
        dataset_id = 990 + number
        to_nnunet_raw(datalist, Path(os.environ["nnUNet_raw"]), dataset_id)
        rows.append((name, "nnU-Net v2", nnunet_plan(dataset_id, args.gpu_memory)))
        rows.append((name, "medunet", medunet_plan(datalist, args.gpu_memory)))
    keys = list(rows[0][2])
    print(f"\nGPU budget {args.gpu_memory:g} GB; batch = patches per step\n")
    print("| dataset | planner | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for name, planner, values in rows:
        print(f"| {name} | {planner} | " + " | ".join(str(values[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
