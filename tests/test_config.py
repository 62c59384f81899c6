"""Tests of medunet.config: strict loading, "did you mean" hints, type checks, overrides, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medunet.config import (
    CT_WINDOWS,
    ClassPostprocessing,
    Config,
    DataConfig,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from medunet.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- defaults and shipped configs ---------------------------------------------


def test_defaults_load_and_match_documented_values() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.name == "dynunet"
    assert cfg.data.modality == "CT"
    assert cfg.data.window() == (-160.0, 240.0)
    assert cfg.augmentation.patch_size == (96, 96, 96)
    assert cfg.roi_size() == (96, 96, 96)
    assert cfg.model.total_stride() == (16, 16, 16)  # 5 levels: [1,1,1] then 4 x [2,2,2]


@pytest.mark.parametrize("name, modality", [("ct.yaml", "CT"), ("mri.yaml", "MRI")])
def test_shipped_configs_load_and_round_trip(name: str, modality: str) -> None:
    cfg = load_config(REPO / "configs" / name)  # shipped: a missing preset is a failure
    assert cfg.data.modality == modality
    assert config_from_dict(config_to_dict(cfg)) == cfg
    stride = cfg.model.total_stride()
    assert all(p % s == 0 for p, s in zip(cfg.augmentation.patch_size, stride, strict=True)), (
        "patch must be divisible by the total stride"
    )


# --- unknown keys ----------------------------------------------------------------


def test_unknown_top_level_key_suggests_section() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean 'train'"):
        config_from_dict({"trian": {"max_epochs": 3}})


def test_unknown_key_in_section_suggests_field() -> None:
    with pytest.raises(ConfigError, match=r"'train\.max_epoch'.*did you mean 'max_epochs'"):
        config_from_dict({"train": {"max_epoch": 3}})


def test_unknown_key_in_class_postprocessing_entry() -> None:
    with pytest.raises(ConfigError, match=r"'postprocessing\.classes\.liver\.keep_larges'.*did you mean 'keep_largest'"):
        config_from_dict({"postprocessing": {"classes": {"liver": {"keep_larges": True}}}})


def test_unknown_key_in_yaml_file_names_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", "optim:\n  learning_rate: 0.01\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "optim.learning_rate" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("trian.max_epochs=3", "trian", "train"),
        ("train.max_epoch=3", "train.max_epoch", "max_epochs"),
        ("augmentation.patchsize=[32,32,32]", "augmentation.patchsize", "patch_size"),
        ("postprocessing.classes.liver.keep_larget=true", "postprocessing.classes.liver.keep_larget", "keep_largest"),
    ],
)
def test_unknown_key_in_override_suggests(override: str, key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    message = str(info.value)
    assert repr(key) in message
    assert f"did you mean {suggestion!r}" in message


def test_override_into_a_scalar_is_refused() -> None:
    with pytest.raises(ConfigError, match="train.max_epochs"):
        load_config(overrides=["train.max_epochs.value=3"])


def test_override_without_equals_is_refused() -> None:
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(overrides=["train.max_epochs"])


# --- type checks -------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, phrase",
    [
        ("train.max_epochs=ten", "train.max_epochs", "integer"),
        ("train.max_epochs=true", "train.max_epochs", "integer"),  # bool is not an int here
        ("train.max_epochs=3.5", "train.max_epochs", "integer"),
        ("augmentation.patch_size=[64,64]", "augmentation.patch_size", "3 values"),
        ("augmentation.patch_size=[64,64,64,64]", "augmentation.patch_size", "3 values"),
        ("augmentation.patch_size=64", "augmentation.patch_size", "list"),
        ("optim.scheduler=cosin", "optim.scheduler", "did you mean 'cosine'"),
        ("data.normalization=zscor", "data.normalization", "one of"),
        ("model.deep_supervision=1", "model.deep_supervision", "true or false"),
        ("optim.lr=fast", "optim.lr", "number"),
        ("data.target_spacing=[1.0,1.0]", "data.target_spacing", "got [1.0, 1.0]"),
        ("data.orientation=5", "data.orientation", "string"),
        ("train=5", "train", "mapping"),
    ],
)
def test_type_errors_name_the_key(override: str, key: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    message = str(info.value)
    assert key in message
    assert phrase in message


def test_type_error_in_yaml_names_key_and_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", "train:\n  batch_size: two\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "train.batch_size" in str(info.value)
    assert str(path) in str(info.value)


def test_exponent_string_accepted_for_float(tmp_path: Path) -> None:
    # YAML 1.1 reads 3e-3 (no dot) as the *string* "3e-3"
    assert yaml.safe_load("lr: 3e-3")["lr"] == "3e-3"
    path = write_yaml(tmp_path / "c.yaml", "optim:\n  lr: 3e-3\n  min_lr: 1e-7\n")
    cfg = load_config(path)
    assert cfg.optim.lr == pytest.approx(3e-3)
    assert isinstance(cfg.optim.lr, float)
    assert cfg.optim.min_lr == pytest.approx(1e-7)
    assert load_config(overrides=["optim.lr=3e-3"]).optim.lr == pytest.approx(3e-3)


def test_int_accepted_for_float_and_stored_as_float() -> None:
    cfg = config_from_dict({"optim": {"lr": 1}, "data": {"target_spacing": [1, 1, 3]}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.target_spacing == (1.0, 1.0, 3.0)
    assert all(isinstance(s, float) for s in cfg.data.target_spacing)


def test_bare_off_reads_as_the_off_choice(tmp_path: Path) -> None:
    # YAML 1.1 turns an unquoted off into False; a field whose choices include "off" takes it as meant
    path = write_yaml(tmp_path / "c.yaml", "train:\n  amp: off\n")
    assert load_config(path).train.amp == "off"
    assert load_config(overrides=["train.amp=off"]).train.amp == "off"
    with pytest.raises(ConfigError, match="inference.blend must be one of"):
        load_config(overrides=["inference.blend=off"])  # no "off" among its choices: still refused


def test_null_for_optional_field() -> None:
    cfg = load_config(overrides=["data.target_spacing=null", "optim.grad_clip=null"])
    assert cfg.data.target_spacing is None
    assert cfg.optim.grad_clip is None


def test_value_check_after_types() -> None:
    with pytest.raises(ConfigError, match="data.val_fraction"):
        load_config(overrides=["data.val_fraction=1.5"])
    with pytest.raises(ConfigError, match="augmentation.flip_prob"):
        load_config(overrides=["augmentation.flip_prob=2"])


# --- overrides ---------------------------------------------------------------------


def test_override_nested_dict_field() -> None:
    cfg = load_config(
        overrides=[
            "postprocessing.classes.liver.keep_largest=true",
            "postprocessing.classes.liver.min_size_mm3=100",
            "postprocessing.classes.2.fill_holes=true",
        ]
    )
    classes = cfg.postprocessing.classes
    assert set(classes) == {"liver", "2"}
    assert classes["liver"] == ClassPostprocessing(keep_largest=True, min_size_mm3=100.0)
    assert classes["2"] == ClassPostprocessing(fill_holes=True)
    assert cfg.postprocessing.default == ClassPostprocessing()


def test_overrides_merge_with_file_and_win(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", "train:\n  batch_size: 4\n  max_epochs: 50\nmodel:\n  name: unet\n")
    cfg = load_config(path, overrides=["train.max_epochs=10", "augmentation.patch_size=[64, 64, 32]"])
    assert cfg.train.batch_size == 4  # kept from the file
    assert cfg.train.max_epochs == 10  # override wins
    assert cfg.model.name == "unet"
    assert cfg.augmentation.patch_size == (64, 64, 32)


def test_last_override_wins() -> None:
    assert load_config(overrides=["train.seed=1", "train.seed=7"]).train.seed == 7


# --- round trips ---------------------------------------------------------------------


def non_default_config() -> Config:
    return config_from_dict(
        {
            "data": {
                "modality": "MRI",
                "normalization": "zscore",
                "ct_window": [-100, 300],
                "labels": {"0": "bg", "1": "tumour"},
            },
            "augmentation": {"patch_size": [64, 64, 32], "samples_per_volume": 4},
            "model": {
                "name": "dynunet",
                "features": [8, 16, 32, 64],
                "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]],
                "kernel_sizes": [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
            },
            "loss": {"class_weights": [0.5, 2.0]},
            "optim": {"lr": "3e-3", "grad_clip": None},
            "postprocessing": {"default": {"fill_holes": True}, "classes": {"tumour": {"keep_largest": True, "opening_mm": 1.5}}},
        }
    )


def test_dict_round_trip_is_equal_and_plain() -> None:
    cfg = non_default_config()
    values = config_to_dict(cfg)
    # plain YAML-safe values only (no tuples, no dataclasses)
    text = yaml.safe_dump(values)
    assert yaml.safe_load(text) == values
    assert isinstance(values["augmentation"]["patch_size"], list)
    assert config_from_dict(values) == cfg
    assert config_from_dict(config_to_dict(Config())) == Config()


def test_save_then_load_gives_equal_config(tmp_path: Path) -> None:
    cfg = non_default_config()
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary files left


# --- CT window ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CT_WINDOWS))
def test_ct_window_presets(name: str) -> None:
    cfg = load_config(overrides=[f"data.ct_window={name}"])
    assert cfg.data.window() == CT_WINDOWS[name]
    low, high = cfg.data.window()
    assert low < high


def test_ct_window_as_low_high() -> None:
    cfg = load_config(overrides=["data.ct_window=[-100, 300]"])
    assert cfg.data.window() == (-100.0, 300.0)


def test_unknown_ct_window_preset_suggests() -> None:
    with pytest.raises(ConfigError, match=r"data\.ct_window.*did you mean 'liver'"):
        load_config(overrides=["data.ct_window=livr"])


@pytest.mark.parametrize("window", ["[100, 100]", "[300, -100]"])
def test_ct_window_low_must_be_below_high(window: str) -> None:
    with pytest.raises(ConfigError, match="low < high"):
        load_config(overrides=[f"data.ct_window={window}"])
    with pytest.raises(ConfigError, match="low < high"):
        DataConfig(ct_window=tuple(yaml.safe_load(window)))


def test_ct_window_wrong_length() -> None:
    with pytest.raises(ConfigError, match="data.ct_window"):
        load_config(overrides=["data.ct_window=[-100, 0, 300]"])


# --- model strides ---------------------------------------------------------------------------


def test_total_stride_anisotropic() -> None:
    cfg = load_config(overrides=["model.features=[8, 16, 32, 64]", "model.strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]"])
    assert cfg.model.level_strides() == [(1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)]
    assert cfg.model.total_stride() == (8, 8, 4)
    assert ModelConfig(features=(4, 8, 16), strides=((1, 2, 1), (2, 1, 3), (1, 1, 2))).total_stride() == (2, 2, 6)


def test_default_strides_follow_feature_count() -> None:
    assert ModelConfig(features=(4, 8, 16, 32)).total_stride() == (8, 8, 8)
    assert ModelConfig(features=(4, 8)).total_stride() == (2, 2, 2)


def test_strides_need_one_entry_per_level() -> None:
    with pytest.raises(ConfigError, match="model.strides"):
        load_config(overrides=["model.features=[8, 16, 32]", "model.strides=[[1, 1, 1], [2, 2, 2]]"])


# --- YAML files ---------------------------------------------------------------------------------


def test_yaml_not_a_mapping(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "list.yaml", "- train\n- model\n")
    with pytest.raises(ConfigError, match="mapping") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "bad.yaml", "train:\n  max_epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_yaml(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_empty_yaml_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write_yaml(tmp_path / "empty.yaml", "")) == Config()


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.train.max_epochs = 5  # type: ignore[misc]


# --- value checks -------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ["RA", "RASL", "XYZ", "RA1"])
def test_orientation_must_be_three_axis_codes(orientation: str) -> None:
    with pytest.raises(ConfigError, match="data.orientation"):
        load_config(overrides=[f"data.orientation={orientation}"])


def test_orientation_lower_case_accepted() -> None:
    assert load_config(overrides=["data.orientation=lps"]).data.orientation.upper() == "LPS"


@pytest.mark.parametrize("orientation", ["RLS", "RRS", "ASA"])
def test_orientation_must_name_three_different_axes(orientation: str) -> None:
    with pytest.raises(ConfigError, match="data.orientation"):
        load_config(overrides=[f"data.orientation={orientation}"])


@pytest.mark.parametrize("value", ["0", "-1e-3"])
def test_lr_must_be_positive(value: str) -> None:
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(overrides=[f"optim.lr={value}"])


@pytest.mark.parametrize("value", ["nan", ".nan"])
def test_lr_nan_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(overrides=[f"optim.lr={value}"])


# --- settings that do not change preprocessing ------------------------------------


def test_cache_key_and_ensemble_check_ignore_only_the_settings_that_do_not_change_preprocessing() -> None:
    # Each data field set to a non-default value: the disk-cache key must change exactly when the cached volumes would,
    # and folds may differ in the others without being refused as an ensemble.
    import dataclasses

    from medunet.model.checkpoint import Checkpoint
    from medunet.model.loader import check_ensemble
    from medunet.training.data import preprocessing_key

    changed = {
        "modality": "MRI", "labels": {"0": "background", "1": "organ"}, "orientation": "LPS", "target_spacing": (1.0, 1.0, 1.0),
        "normalization": "zscore", "ct_window": "liver", "ct_mean": 40.0, "ct_std": 50.0, "zscore_nonzero": False,
        "crop_foreground": False, "cache": "disk", "cache_dir": "/tmp/cache", "cache_workers": 7, "loader_workers": 3,
        "val_fraction": 0.5, "split_seed": 9, "allow_outside_root": True,
    }
    not_preprocessing = {"cache", "cache_dir", "cache_workers", "loader_workers", "val_fraction", "split_seed", "allow_outside_root"}
    assert set(changed) == {f.name for f in dataclasses.fields(DataConfig)}, "give a new data field a changed value here"

    def checkpoint(config: Config) -> Checkpoint:
        return Checkpoint(model={}, config=config_to_dict(config), class_names=["background", "organ"], in_channels=1, epoch=1)

    base = Config()
    base_key = preprocessing_key(base, num_classes=2, in_channels=1)
    for name, value in changed.items():
        other = dataclasses.replace(base, data=dataclasses.replace(base.data, **{name: value}))
        assert getattr(other.data, name) != getattr(base.data, name)
        key_changed = preprocessing_key(other, num_classes=2, in_channels=1) != base_key
        assert key_changed == (name not in not_preprocessing), name
        if name in not_preprocessing:
            check_ensemble([checkpoint(base), checkpoint(other)], ["fold_0", "fold_1"])
        else:
            with pytest.raises(CheckpointError, match=f"data.{name}"):
                check_ensemble([checkpoint(base), checkpoint(other)], ["fold_0", "fold_1"])
