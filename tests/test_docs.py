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


def test_every_config_field_is_documented() -> None:
    generator = load_generator()
    import dataclasses

    from medunet import config

    docs = generator.field_docs()
    for cls in (config.DataConfig, config.AugmentationConfig, config.ModelConfig, config.LossConfig, config.OptimConfig,
                config.TrainConfig, config.InferenceConfig, config.ClassPostprocessing, config.PostprocessingConfig):
        for field in dataclasses.fields(cls):
            assert docs.get((cls.__name__, field.name)), f"{cls.__name__}.{field.name} has no docstring"
