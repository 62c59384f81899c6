"""Generated documentation and presets must match the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_generator():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "scripts" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_up_to_date() -> None:
    generator = load_generator()
    assert (ROOT / "docs" / "configuration.md").read_text() == generator.render(), "run: make docs"


def test_presets_are_up_to_date_and_load() -> None:
    from medunet.config import Config, load_config

    generator = load_generator()
    for name, values in generator.presets().items():
        path = ROOT / "configs" / f"{name}.yaml"
        assert path.read_text() == generator.render_preset(name.upper(), values), "run: make docs"
    assert load_config(ROOT / "configs" / "ct.yaml") == Config()
    assert load_config(ROOT / "configs" / "mri.yaml") == load_config(None, modality="MRI")


def config_sections() -> list[type]:
    """Every dataclass reachable from Config through its fields' types (sections, per-class entries, ...)."""
    import dataclasses
    import typing

    from medunet.config import Config

    found: list[type] = []

    def visit(tp: object) -> None:
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if tp in found:
                return
            found.append(tp)
            for hint in typing.get_type_hints(tp).values():
                visit(hint)
        for arg in typing.get_args(tp):
            visit(arg)

    visit(Config)
    return found


def test_every_config_field_is_documented() -> None:
    import dataclasses

    from medunet import config

    sections = config_sections()
    assert config.EvaluationConfig in sections and config.ClassPostprocessing in sections  # nested ones are found too
    docs = load_generator().field_docs()
    undocumented = [f"{cls.__name__}.{f.name}" for cls in sections if cls is not config.Config
                    for f in dataclasses.fields(cls) if not docs.get((cls.__name__, f.name))]
    assert not undocumented, f"fields without a docstring under them in medunet/config.py: {undocumented}"
