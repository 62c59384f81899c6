"""A MONAI Bundle of the model: ``configs/metadata.json``, ``configs/inference.json``, ``models/model.ts``.

The bundle runs with MONAI alone (no medunet import), from its own folder:

    python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \
        --input_dir scans/ --output_dir masks/

Its chain is medunet's, transform for transform: LoadImaged + EnsureChannelFirstd (medunet's reader
builds the same array and affine), Orientationd, Spacingd (float32), the body crop before or the
nonzero crop after normalisation, ScaleIntensityRanged / NormalizeIntensityd, a Gaussian
SlidingWindowInferer with the same window and overlap, softmax, Invertd of the probabilities
(linear) and argmax on the input grid, and SaveImaged. What MONAI transforms cannot express the same
way is refused at export rather than approximated (see :func:`bundle_problems`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import monai
import nibabel
import numpy
import torch

from medunet.config import Config
from medunet.model.layout import CARD_MARKDOWN, POSTPROCESSING_FILE
from medunet.transforms import CT_BODY_HU

INFERENCE_CONFIG = "configs/inference.json"
METADATA = "configs/metadata.json"
NETWORK = "models/model.ts"


def bundle_problems(config: Config, *, folds: int, in_channels: int) -> list[str]:
    """Settings a bundle cannot reproduce exactly (empty when it can)."""
    problems = []
    if folds > 1:
        problems.append(f"a bundle holds one network, this model is an ensemble of {folds} folds (export one fold folder)")
    if in_channels != 1:
        problems.append(f"the bundle reads one NIfTI file per case, this model takes {in_channels} channels")
    if config.inference.tta_flips:
        problems.append("mirror TTA (inference.tta_flips) has no MONAI inferer equivalent (export with --set inference.tta_flips=false)")
    post = config.postprocessing
    if post.crf.enabled:
        problems.append("the dense CRF (postprocessing.crf.enabled) has no MONAI transform (export with --set "
                        f"postprocessing.crf.enabled=false, which for a crossval folder also sets aside its {POSTPROCESSING_FILE}, "
                        "or export --format onnx, which keeps it)")
    settings = {"default": post.default, **post.classes}
    for name, s in settings.items():
        if s.fill_holes or s.min_size_mm3 > 0 or s.opening_mm > 0 or s.closing_mm > 0:
            problems.append(f"post-processing of {name} (only keep_largest maps onto a MONAI transform)")
    return problems


def _preprocessing(config: Config) -> list[dict[str, Any]]:
    data = config.data
    chain: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True, "dtype": "$numpy.float32"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": data.orientation.upper()},
    ]
    if data.target_spacing is not None:
        chain.append({"_target_": "Spacingd", "keys": "image", "pixdim": list(data.target_spacing), "mode": "bilinear",
                      "dtype": "$torch.float32"})
    crop = {"_target_": "CropForegroundd", "keys": "image", "source_key": "image", "allow_smaller": True}
    if data.crop_foreground and data.normalization == "ct_clip_zscore":
        chain.append({**crop, "select_fn": f"$lambda x: x > {CT_BODY_HU!r}"})
    if data.normalization in ("ct_window", "ct_clip_zscore"):
        low, high = data.window()
        b_min, b_max = (0.0, 1.0) if data.normalization == "ct_window" else ((low - data.ct_mean) / data.ct_std, (high - data.ct_mean) / data.ct_std)
        chain.append({"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": low, "a_max": high, "b_min": b_min, "b_max": b_max,
                      "clip": True})
    elif data.normalization == "zscore":
        chain.append({"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": data.zscore_nonzero, "channel_wise": True})
    if data.crop_foreground and data.normalization != "ct_clip_zscore":
        chain.append({**crop, "select_fn": "$lambda x: x != 0"})
    return chain


def _postprocessing(config: Config, class_names: list[str]) -> list[dict[str, Any]]:
    inf = config.inference
    invert = {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
              "nearest_interp": not inf.resample_probabilities}
    argmax = {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}
    chain: list[dict[str, Any]] = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]
    chain += [invert, argmax] if inf.resample_probabilities else [argmax, invert]
    post = config.postprocessing
    largest = [k for k, name in enumerate(class_names) if k > 0 and post.classes.get(name, post.classes.get(str(k), post.default)).keep_largest]
    if largest:  # 26-connectivity, removed voxels become background: as medunet.postprocessing.keep_largest_component
        chain.append({"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": largest, "is_onehot": False,
                      "independent": True, "connectivity": 3})
    chain.append({"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "", "output_ext": ".nii.gz",
                  "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False, "print_log": False})
    return chain


def inference_config(config: Config, class_names: list[str]) -> dict[str, Any]:
    """The bundle's ``configs/inference.json``: a folder of NIfTI files in, masks on their grids out."""
    inf = config.inference
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "input_dir": "input",
        "output_dir": "output",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network": f"$torch.jit.load(os.path.join(@bundle_root, '{NETWORK}'), map_location=@device).eval()",
        "datalist": "$[{'image': f} for f in sorted(glob.glob(os.path.join(@input_dir, '*.nii*')))]",
        "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(config)},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(config.roi_size()), "sw_batch_size": inf.sw_batch_size,
                    "overlap": inf.overlap, "mode": inf.blend},
        "postprocessing": {"_target_": "Compose", "transforms": _postprocessing(config, class_names)},
        "predict": "$lambda d: dict(d, pred=@inferer(d['image'][None].to(@device), @network)[0].float().cpu())",
        "run": [
            "$torch.set_grad_enabled(False)",
            "$[@postprocessing(@predict(@preprocessing(item))) for item in @datalist]",
        ],
    }


def metadata(config: Config, class_names: list[str], *, modality: str, version: str, qc_file: str) -> dict[str, Any]:
    """The bundle's ``configs/metadata.json`` (MONAI's metadata keys; the network's input and output described).

    ``quality_control`` points at the package's QC file (training reference and calibration), which the
    bundle's own chain does not apply: ``medunet infer -m`` on the package does.
    """
    channel_def = {str(k): name for k, name in enumerate(class_names)}
    window = list(config.roi_size())
    return {
        "version": version,
        "changelog": {version: "exported by medunet export"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"nibabel": nibabel.__version__},
        "name": "medunet segmentation",
        "task": f"{modality} segmentation of {', '.join(class_names[1:])}",
        "description": f"3D segmentation exported by medunet; masks are written on each input's grid. See {CARD_MARKDOWN}.",
        "authors": "medunet export",
        "copyright": f"see {CARD_MARKDOWN}",
        "quality_control": {"file": qc_file, "what": "medunet's QC training reference and calibration (temperature, review "
                            "threshold); applied by `medunet infer -m` on this folder, not by the bundle's inference.json"},
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield" if modality == "CT" else "magnitude", "modality": modality,
                                 "num_channels": 1, "spatial_shape": window, "dtype": "float32", "value_range": [],
                                 "is_patch_data": True, "channel_def": {"0": modality}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(class_names), "spatial_shape": window,
                                 "dtype": "float32", "value_range": [], "is_patch_data": True, "channel_def": channel_def}},
        },
    }


def write_bundle_configs(root: Path, config: Config, class_names: list[str], *, modality: str, version: str, qc_file: str) -> list[str]:
    """Write the two bundle configs under ``root`` (the network and ``qc_file`` are written by the caller); their relative paths."""
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / INFERENCE_CONFIG).write_text(json.dumps(inference_config(config, class_names), indent=2) + "\n")
    meta = metadata(config, class_names, modality=modality, version=version, qc_file=qc_file)
    (root / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return [INFERENCE_CONFIG, METADATA]
