"""Training-loop behaviours: early stopping, plateau schedule, disk cache, validation of settings."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from medunet.config import load_config
from medunet.errors import ConfigError
from medunet.synthetic import write_dataset
from medunet.training.data import augmentation_device
from medunet.training.trainer import train

TINY = [
    "data.target_spacing=[3.0,3.0,3.0]",
    "augmentation.patch_size=[16,16,16]",
    "model.features=[4,8,16]",
    "train.device=cpu",
    "inference.device=cpu",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("trainer-data"), num_train=4, num_test=0, shape=(24, 24, 16))


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_early_stopping_stops_after_patience_validations(dataset: Path, tmp_path: Path) -> None:
    # a learning rate of ~0 keeps the validation Dice constant, so no validation improves on the first
    config = load_config(None, [*TINY, "optim.lr=1e-12", "optim.min_lr=1e-13", "train.max_epochs=10", "train.val_every=1",
                                "train.early_stopping_patience=2"])
    result = train(dataset, tmp_path / "run", config, progress=False)
    assert result.stopped_early
    assert result.epochs_completed == 3 and len(rows(tmp_path / "run")) == 3
    assert result.best_epoch == 1
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == 1


def test_plateau_schedule_lowers_the_learning_rate_when_dice_stalls(dataset: Path, tmp_path: Path) -> None:
    config = load_config(None, [*TINY, "optim.lr=1e-9", "optim.min_lr=1e-12", "optim.scheduler=plateau",
                                "optim.plateau_patience=0", "optim.plateau_factor=0.5", "train.max_epochs=3", "train.val_every=1"])
    train(dataset, tmp_path / "run", config, progress=False)
    lrs = [float(r["lr"]) for r in rows(tmp_path / "run")]
    assert lrs[0] == pytest.approx(1e-9)
    assert lrs[2] == pytest.approx(0.5e-9)  # epoch 2's validation did not improve on epoch 1's


def test_disk_cache_gives_the_same_training_as_memory_and_is_keyed_by_settings(dataset: Path, tmp_path: Path) -> None:
    common = [*TINY, "train.max_epochs=2", "train.val_every=1"]
    memory = train(dataset, tmp_path / "memory", load_config(None, common), progress=False)
    shared = tmp_path / "shared-cache"
    disk_cfg = load_config(None, [*common, "data.cache=disk", f"data.cache_dir={shared}"])
    disk = train(dataset, tmp_path / "disk", disk_cfg, progress=False)
    assert disk.best_dice == pytest.approx(memory.best_dice)
    a = torch.load(tmp_path / "memory" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "disk" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = [p.name for p in shared.iterdir()]
    assert len(keys) == 1 and any((shared / keys[0] / "train").iterdir())
    # other preprocessing settings get their own cache folder instead of reusing stale volumes
    other = load_config(None, [*common, "data.cache=disk", f"data.cache_dir={shared}", "data.target_spacing=[2.5,2.5,2.5]"])
    train(dataset, tmp_path / "disk2", other, progress=False)
    assert len(list(shared.iterdir())) == 2


def test_channels_last_trains_like_the_default_memory_layout(dataset: Path, tmp_path: Path) -> None:
    # the option changes how tensors sit in memory, not what is computed: same losses, same weights
    common = [*TINY, "train.max_epochs=1", "train.amp=off"]
    train(dataset, tmp_path / "plain", load_config(None, common), progress=False)
    train(dataset, tmp_path / "cl", load_config(None, [*common, "train.channels_last=true"]), progress=False)
    assert float(rows(tmp_path / "cl")[0]["train_loss"]) == pytest.approx(float(rows(tmp_path / "plain")[0]["train_loss"]), rel=1e-4)
    a = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cl" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)


def test_compiled_training_learns_the_same_and_saves_a_plain_checkpoint(dataset: Path, tmp_path: Path) -> None:
    # Nearly all of this test's time is torch.compile building the training graph (forward and backward) on the
    # CPU: ~30 s cold per graph. One case per batch (two patches) keeps every batch the same shape, so one graph
    # is compiled; with two cases per batch the epoch's last, smaller batch compiled a second, dynamic-shape graph.
    # Two steps: the second step's loss and the saved weights show the compiled update equals the eager one.
    common = [*TINY, "train.max_epochs=1", "train.amp=off", "train.batch_size=1", "train.iterations_per_epoch=2"]
    train(dataset, tmp_path / "eager", load_config(None, common), progress=False)
    train(dataset, tmp_path / "compiled", load_config(None, [*common, "train.compile=true"]), progress=False)
    eager_loss, compiled_loss = (float(rows(tmp_path / r)[0]["train_loss"]) for r in ("eager", "compiled"))
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-3)
    state = torch.load(tmp_path / "compiled" / "last.pt", weights_only=True)["model"]
    assert not any("_orig_mod" in key for key in state)  # loadable into a plain network for inference
    eager = torch.load(tmp_path / "eager" / "last.pt", weights_only=True)["model"]
    assert state.keys() == eager.keys()
    for key in eager:
        torch.testing.assert_close(state[key], eager[key], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(
    ("choice", "device", "workers", "expected"),
    [
        ("auto", "cpu", 0, None),
        ("auto", "cuda", 0, "cuda"),  # a GPU run keeps the volumes on the host and augments patches on the GPU
        ("auto", "cuda:1", 0, "cuda:1"),
        ("auto", "cuda", 2, None),  # worker processes cannot use CUDA: they augment on the CPU
        ("cpu", "cuda", 0, None),
        ("gpu", "cuda", 0, "cuda"),
    ],
)
def test_augmentation_device_choice(choice: str, device: str, workers: int, expected: str | None) -> None:
    config = load_config(None, [f"augmentation.device={choice}", f"data.loader_workers={workers}"])
    got = augmentation_device(config, torch.device(device))
    assert (str(got) if got is not None else None) == expected


@pytest.mark.parametrize(("device", "workers", "phrase"), [("cpu", 0, "needs training on a GPU"), ("cuda", 2, "loader_workers")])
def test_augmentation_on_gpu_refused_where_it_cannot_run(device: str, workers: int, phrase: str) -> None:
    config = load_config(None, ["augmentation.device=gpu", f"data.loader_workers={workers}"])
    with pytest.raises(ConfigError, match=phrase):
        augmentation_device(config, torch.device(device))


def test_disk_cache_key_changes_when_the_cached_chain_does(monkeypatch: pytest.MonkeyPatch) -> None:
    # a disk cache written by an older medunet (without, e.g., the cached patch centres) must not be read back
    from medunet.training import data

    config = load_config(None, TINY)
    before = data.preprocessing_key(config, num_classes=2, in_channels=1)
    assert data.preprocessing_key(config, num_classes=2, in_channels=1) == before
    monkeypatch.setattr(data, "CACHE_FORMAT", data.CACHE_FORMAT + 1)
    assert data.preprocessing_key(config, num_classes=2, in_channels=1) != before
