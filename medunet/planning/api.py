"""One call from a datalist to a written plan: fingerprint, plan, YAML + JSON, and a summary.

Used by ``medunet plan`` and by ``medunet train`` when no ``-c`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medunet.config import Config, apply_overrides, config_from_dict, parse_override, read_yaml
from medunet.errors import ConfigError
from medunet.io.datalist import DatalistSource, datalist_file, load_datalist
from medunet.planning.fingerprint import compute_fingerprint
from medunet.planning.plan_yaml import write_plan
from medunet.planning.planner import Plan, make_plan
from medunet.qc.reference import SharedRows

#: Budget used when no GPU is visible and none is given.
DEFAULT_GPU_MEMORY_GB = 8.0


@dataclass(frozen=True)
class PlanResult:
    """A written plan: the plan, the fingerprint it came from and the files."""

    plan: Plan
    fingerprint: dict[str, Any]
    plan_path: Path
    fingerprint_path: Path


def default_gpu_memory_gb() -> float:
    """The visible GPU's memory in GiB, else DEFAULT_GPU_MEMORY_GB."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 1024**3
    return DEFAULT_GPU_MEMORY_GB


def plan_datalist(
    datalist_path: DatalistSource,
    out: str | Path,
    *,
    gpu_memory_gb: float | None = None,
    modality: str | None = None,
    workers: int = 2,
    overwrite: bool = False,
    allow_outside_root: bool = False,
    fingerprint_to: str | Path | None = None,
    qc_rows: SharedRows | None = None,
) -> PlanResult:
    """Fingerprint the datalist's training cases, plan a config and write it (YAML) with the fingerprint (JSON).

    ``qc_rows``: see :func:`~medunet.planning.fingerprint.compute_fingerprint` (a training run's QC reference).

    Raises:
        DataError: a case cannot be read. ConfigError: nothing fits the budget. OutputExistsError: outputs exist.
    """
    budget = gpu_memory_gb if gpu_memory_gb is not None else default_gpu_memory_gb()
    datalist = load_datalist(datalist_path, allow_outside_root=allow_outside_root)
    fingerprint = compute_fingerprint(datalist, workers=workers, qc_rows=qc_rows)
    plan = make_plan(fingerprint, modality=modality, gpu_memory_gb=budget)
    if allow_outside_root:
        plan.set("data.allow_outside_root", True, "the datalist's paths leave its folder (--allow-outside-root)")
    plan_path, json_path = write_plan(
        plan, fingerprint, out, fingerprint_to=fingerprint_to, overwrite=overwrite, source=datalist_file(datalist_path).name,
        gpu_memory_gb=budget,
    )
    return PlanResult(plan, fingerprint, plan_path, json_path)


def load_planned_config(plan_path: str | Path, overrides: list[str]) -> tuple[Config, str | None]:
    """A plan plus ``--set`` overrides, as a Config; and a note when an override forced a planned choice out.

    Overriding ``model.features`` with another depth (and not the strides) drops the planned per-level
    strides and kernel sizes, which no longer fit: the model then uses DynUNet's defaults.
    """
    values = apply_overrides(read_yaml(plan_path), overrides)
    keys = {".".join(parse_override(o)[0]) for o in overrides}
    model = values.get("model") or {}
    note = None
    depth_changed = model.get("strides") is not None and len(model.get("features") or []) != len(model["strides"])
    if "model.features" in keys and depth_changed and not keys & {"model.strides", "model.kernel_sizes"}:
        note = f"--set model.features has {len(model['features'])} levels, the plan {len(model['strides'])}: planned strides/kernels dropped"
        model["strides"] = model["kernel_sizes"] = None
    try:
        return config_from_dict(values), note
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in the plan {plan_path} with --set overrides)") from exc


def summary(result: PlanResult) -> list[str]:
    """A few lines saying what was planned and why (printed by ``medunet plan``)."""
    values, comments = result.plan.values, result.plan.comments
    fp = result.fingerprint
    lines = [f"{fp['num_cases']} training cases, {fp['channels']} channel(s), {len(fp['classes'])} classes"]
    for key in ("data.target_spacing", "data.normalization", "data.ct_window", "data.zscore_nonzero", "augmentation.patch_size",
                "train.batch_size", "model.features", "model.strides", "augmentation.class_ratios",
                "augmentation.rotate_range_deg"):
        section, name = key.split(".")
        if name in values.get(section, {}):
            lines.append(f"  {key} = {values[section][name]}  ({comments[key]})")
    return lines
