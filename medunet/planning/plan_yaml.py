"""Write a plan as plain, commented YAML: a full config a person can read and edit.

PyYAML cannot write comments, so each field is dumped on its own line (flow style, the
same way the presets in configs/ are written) and the planner's reason is appended as a
``# comment``. Fields the planner did not choose carry their defaults, uncommented;
docs/configuration.md explains every one. ``load_config`` reads the file back to the same
Config (a test checks this round trip).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from medunet.config import Config, config_to_dict
from medunet.errors import OutputExistsError
from medunet.io.atomic import atomic_write_text
from medunet.planning.fingerprint import save_fingerprint
from medunet.planning.planner import Plan


def _line(name: str, value: object) -> str:
    return yaml.safe_dump({name: value}, default_flow_style=True, width=1000).strip()[1:-1]


def render_plan(plan: Plan, *, source: str = "", gpu_memory_gb: float | None = None) -> str:
    """The plan as YAML text: every config field, planned ones commented with the statistic behind them."""
    config = plan.config()
    values = config_to_dict(config)
    lines = [
        "# medunet plan" + (f" for {source}" if source else "") + (f" (GPU budget {gpu_memory_gb:g} GB)" if gpu_memory_gb else ""),
        "# Planned fields carry a comment with the statistic they come from (the fingerprint JSON beside this file",
        "# holds all of them); the other fields are defaults, documented in docs/configuration.md.",
        "# Edit freely: medunet train -c THIS_FILE reads it like any config.",
    ]
    if plan.memory is not None:
        lines.append(f"# Estimated training-step memory: {plan.memory.describe()}.")
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        lines += ["", f"{section.name}:  # {' '.join((cls.__doc__ or '').split())}"]
        for f in dataclasses.fields(cls):
            text = f"  {_line(f.name, values[section.name][f.name])}"
            comment = plan.comments.get(f"{section.name}.{f.name}")
            lines.append(f"{text}  # {comment}" if comment else text)
    return "\n".join(lines) + "\n"


def fingerprint_path(plan_path: str | Path) -> Path:
    """``configs/mydata.yaml`` -> ``configs/mydata.fingerprint.json``."""
    path = Path(plan_path)
    stem = path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else path.name
    return path.with_name(f"{stem}.fingerprint.json")


def write_plan(
    plan: Plan, fingerprint: dict[str, Any], path: str | Path, *, fingerprint_to: str | Path | None = None, overwrite: bool = False,
    source: str = "", gpu_memory_gb: float | None = None,
) -> tuple[Path, Path]:
    """Write the plan YAML and the fingerprint JSON (default: beside it), atomically.

    Raises:
        OutputExistsError: either file exists and ``overwrite`` is False.
    """
    path = Path(path)
    json_path = Path(fingerprint_to) if fingerprint_to is not None else fingerprint_path(path)
    for target in (path, json_path):
        if target.exists() and not overwrite:
            raise OutputExistsError(f"{target} already exists; pass --overwrite to replace it")
    text = render_plan(plan, source=source, gpu_memory_gb=gpu_memory_gb)
    save_fingerprint(fingerprint, json_path)
    atomic_write_text(path, text)
    return path, json_path
