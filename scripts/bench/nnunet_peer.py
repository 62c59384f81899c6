"""medunet's end of the nnU-Net v2 comparison: find nnU-Net's Python, call nnunet_side.py, mirror its plan.

nnU-Net is never imported here (it is not a medunet dependency). Its side runs in its own
environment; see nnunet_side.py for how to create it. ``NNUNET_PYTHON`` (or ``--nnunet-python``)
names that environment's interpreter; without one, the nnU-Net side is skipped with a message
(:func:`peer_python`) and medunet's side runs at a recorded plan (:data:`FALLBACK_PLAN`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SIDE_SCRIPT = Path(__file__).resolve().parent / "nnunet_side.py"
DEFAULT_PYTHON = "/tmp/nnunet-venv/bin/python"
HOW_TO = (
    "create it with: python3 -m venv /tmp/nnunet-venv --system-site-packages && /tmp/nnunet-venv/bin/pip install nnunetv2, "
    "then pass --nnunet-python /tmp/nnunet-venv/bin/python or set NNUNET_PYTHON"
)


def find_python(explicit: str | None) -> tuple[str | None, str]:
    """nnU-Net's interpreter and its nnunetv2 version, or (None, why it is unusable)."""
    python = explicit or os.environ.get("NNUNET_PYTHON") or DEFAULT_PYTHON
    if not Path(python).is_file():
        return None, f"no nnU-Net Python at {python}; {HOW_TO}"
    probe = subprocess.run(
        [python, "-c", "import importlib.metadata as m, nnunetv2; print(m.version('nnunetv2'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode:
        reason = (probe.stderr.strip().splitlines() or ["no error message"])[-1]
        return None, f"{python} cannot import nnunetv2 ({reason}); {HOW_TO}"
    return python, probe.stdout.strip()


#: What a benchmark prints when it runs without nnU-Net (the tests look for this line).
SKIPPED = "nnU-Net v2 not installed: peer side skipped"

#: nnU-Net 2.8.1's 3d_fullres plan for phantoms of 64x64x40 at 1.5x1.5x2.5 mm (8 cases, seed 0; 5 or 6 cases plan the
#: same patch, batch and network, with intensity statistics a little different), as ``nnUNetv2_plan_and_preprocess``
#: wrote it (nnU-Net axis order z, y, x). medunet's side runs at it when nnU-Net is not installed.
FALLBACK_PLAN: dict[str, Any] = {
    "patch_size": [40, 64, 64], "batch_size": 2, "spacing": [2.5, 1.5, 1.5],
    "features_per_stage": [32, 64, 128, 256, 320], "kernel_sizes": [[3, 3, 3]] * 5,
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
    "n_conv_per_stage": [2] * 5, "n_conv_per_stage_decoder": [2] * 4,
    "intensity": {"percentile_00_5": 104.84, "percentile_99_5": 157.75, "mean": 135.04, "std": 10.92},
}

#: The same kind of plan shrunk for ``--quick`` runs without nnU-Net (3 levels, 8-32 features, patch 16x32x32).
QUICK_PLAN: dict[str, Any] = {
    **FALLBACK_PLAN, "patch_size": [16, 32, 32], "features_per_stage": [8, 16, 32], "kernel_sizes": [[3, 3, 3]] * 3,
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [2] * 3, "n_conv_per_stage_decoder": [2] * 2,
}


def peer_python(explicit: str | None) -> tuple[str | None, str]:
    """Like :func:`find_python`, and says on stderr, in one agreed line, when the peer side is skipped."""
    python, version = find_python(explicit)
    if python is None:
        print(f"{SKIPPED} ({version})", file=sys.stderr, flush=True)
    return python, version


def nnunet_env(root: Path) -> dict[str, str]:
    """The environment nnU-Net reads its three folders from, all under ``root``."""
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / name)
    env.setdefault("nnUNet_compile", "false")
    return env


def run_side(python: str, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one nnunet_side.py sub-command; its last stdout line is the JSON result."""
    done = subprocess.run([python, str(SIDE_SCRIPT), *args], capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"nnU-Net side {args[0]} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def medunet_sections(plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """medunet config sections that mirror nnU-Net's planned 3d_fullres configuration.

    nnU-Net orders axes as SimpleITK arrays (z, y, x); medunet works on RAS (x, y, z) arrays,
    so every per-axis value is reversed. PlainConvUNet (2 convs per stage, instance norm,
    LeakyReLU, transposed-conv upsampling) maps onto MONAI's DynUNet with the same features,
    kernels and strides; nnU-Net's deep supervision uses the 3 highest-resolution outputs with
    weights 1, 1/2, 1/4, as medunet does with 2 heads. nnU-Net's CT normalisation (clip to the
    foreground's 0.5/99.5 percentiles, z-score with its mean/std) is medunet's ct_clip_zscore.
    """

    def rev(values: list) -> list:
        return list(reversed(values))

    intensity = plan["intensity"]
    if any(n != 2 for n in plan["n_conv_per_stage"] + plan["n_conv_per_stage_decoder"]):
        raise ValueError(f"DynUNet has 2 convolutions per stage; this plan has {plan['n_conv_per_stage']}")
    return {
        "data": {
            "target_spacing": rev(plan["spacing"]),
            "normalization": "ct_clip_zscore",
            "ct_window": [intensity["percentile_00_5"], intensity["percentile_99_5"]],
            "ct_mean": intensity["mean"],
            "ct_std": intensity["std"],
        },
        "augmentation": {"patch_size": rev(plan["patch_size"])},
        "model": {
            "name": "dynunet",
            "features": list(plan["features_per_stage"]),
            "strides": [rev(s) for s in plan["strides"]],
            "kernel_sizes": [rev(k) for k in plan["kernel_sizes"]],
            "norm": "instance",
            "deep_supervision": True,
            "deep_supervision_heads": 2,
        },
    }
