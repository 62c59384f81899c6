"""Tests of medunet.model.checkpoint (safe loading, atomic saving, RNG state) and medunet.training.optim."""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from medunet.config import Config, OptimConfig, config_from_dict, config_to_dict
from medunet.errors import CheckpointError
from medunet.model.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    TrainState,
    capture_rng,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
)
from medunet.training.optim import build_optimizer, build_scheduler, lr_factor


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.InstanceNorm3d(2, affine=True))


def make_state(epoch: int = 3, rng: dict[str, Any] | None = None) -> Checkpoint:
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 1, 5, 5, 5)).mean().backward()
    optimizer.step()
    state = TrainState(optimizer=optimizer.state_dict(), scheduler={}, rng=rng or {}, best_score=0.5, best_epoch=2,
                       history=[{"epoch": 0, "loss": 0.9, "dice": None}])
    return Checkpoint(model=model.state_dict(), config=config_to_dict(Config()), class_names=["background", "liver"],
                      in_channels=1, epoch=epoch, train_state=state)


def make_marker(path: str) -> None:
    """What a malicious pickle would run on load: here it only creates a file."""
    Path(path).write_text("pwned")


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (make_marker, (self.marker,))


# --- save / load ------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    state = make_state(epoch=7)
    path = save_checkpoint(state, tmp_path / "run" / "last.pt")
    assert path == tmp_path / "run" / "last.pt"
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary files

    loaded = load_checkpoint(path)
    assert loaded.epoch == 7
    assert loaded.labels() == {0: "background", 1: "liver"}
    assert loaded.in_channels == 1
    assert loaded.train_state is not None and state.train_state is not None
    assert loaded.train_state.history == state.train_state.history
    assert (loaded.train_state.best_score, loaded.train_state.best_metric, loaded.train_state.best_epoch) == (0.5, "dice", 2)
    assert config_from_dict(loaded.config) == Config()
    assert loaded.model.keys() == state.model.keys()
    for key, value in state.model.items():
        torch.testing.assert_close(loaded.model[key], value)
    # the weights drive a model again, and so does the optimizer state
    model = tiny_model()
    model.load_state_dict(loaded.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.load_state_dict(loaded.train_state.optimizer)
    torch.testing.assert_close(model[0].weight, state.model["0.weight"])


@pytest.mark.parametrize("selection", ["dice", "iou"])
def test_an_old_train_state_with_best_dice_still_loads(tmp_path: Path, selection: str) -> None:
    """Before ``best_score``/``best_metric`` a last.pt stored the best score as ``best_dice``, IoU under IoU selection."""
    checkpoint = make_state(epoch=3)
    checkpoint.config["train"]["selection_metric"] = selection
    stored = checkpoint.to_dict()
    stored["best_dice"] = stored.pop("best_score")
    del stored["best_metric"]
    torch.save(stored, tmp_path / "last.pt")
    state = load_checkpoint(tmp_path / "last.pt").train_state
    assert state is not None
    assert (state.best_score, state.best_metric, state.best_epoch) == (0.5, selection, 2)  # what the old run selected by
    resaved = save_checkpoint(load_checkpoint(tmp_path / "last.pt"), tmp_path / "again.pt")
    assert {"best_score", "best_metric"} <= set(torch.load(resaved, weights_only=True)) and "best_dice" not in torch.load(resaved, weights_only=True)


def test_best_mean_dice_is_dice_under_either_selection() -> None:
    history = [{"epoch": 1, "val_dice_mean": 0.6, "val_iou_mean": 0.43}, {"epoch": 2, "train_loss": 0.5}]
    state = TrainState(optimizer={}, scheduler={}, rng={}, best_score=0.43, best_metric="iou", best_epoch=1, history=history)
    assert state.best_mean_dice() == 0.6
    assert TrainState(optimizer={}, scheduler={}, rng={}, best_score=0.7, best_epoch=4).best_mean_dice() == 0.7  # no row: the Dice score
    assert TrainState(optimizer={}, scheduler={}, rng={}, best_score=0.43, best_metric="iou", best_epoch=4).best_mean_dice() == 0.0
    assert TrainState(optimizer={}, scheduler={}, rng={}).best_mean_dice() == 0.0  # before any validation


def test_a_model_only_checkpoint_loads_without_train_state(tmp_path: Path) -> None:
    """What an export ships: weights and config, nothing that only resuming needs."""
    path = save_checkpoint(make_state(epoch=5).without_train_state(), tmp_path / "model.pt")
    stored = torch.load(path, weights_only=True)
    assert "optimizer" not in stored and "rng" not in stored
    loaded = load_checkpoint(path)
    assert loaded.train_state is None and loaded.epoch == 5 and loaded.class_names == ["background", "liver"]


def test_labels_must_be_numbered_from_zero(tmp_path: Path) -> None:
    path = tmp_path / "gappy.pt"
    torch.save(make_state().to_dict() | {"labels": {"0": "background", "2": "liver"}}, path)
    with pytest.raises(CheckpointError, match="numbered 0..1") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_load_refuses_pickled_object_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save(make_state().to_dict() | {"evil": Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it (so the check above can fail)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_truncated_checkpoint(tmp_path: Path) -> None:
    path = save_checkpoint(make_state(), tmp_path / "last.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage text",
        b'{"format": 1}',
        b"these are my notes, not weights",
    ],
)
def test_not_a_checkpoint_at_all(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "weights_only.pt"
    torch.save({"model": tiny_model().state_dict()}, path)
    with pytest.raises(CheckpointError, match="not a medunet checkpoint") as info:
        load_checkpoint(path)
    for key in ("format", "config", "labels", "in_channels", "epoch"):
        assert key in str(info.value)
    assert "'model'" not in str(info.value)


def test_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="not a medunet checkpoint"):
        load_checkpoint(path)


def test_newer_format_refused(tmp_path: Path) -> None:
    path = save_checkpoint(dataclasses.replace(make_state(), format=FORMAT_VERSION + 1), tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="upgrade medunet"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_resolve_run_folder_prefers_best_then_last(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match="no best.pt or last.pt"):
        resolve_checkpoint(run)
    save_checkpoint(make_state(epoch=9), run / "last.pt")
    assert resolve_checkpoint(run) == run / "last.pt"
    save_checkpoint(make_state(epoch=4), run / "best.pt")
    assert resolve_checkpoint(run) == run / "best.pt"
    assert load_checkpoint(run).epoch == 4
    assert resolve_checkpoint(run / "last.pt") == run / "last.pt"


def fake_torch_save(error: BaseException):
    def fake(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")  # something is written, then the disk fills
        raise error

    return fake


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint(make_state(epoch=1), tmp_path / "last.pt")
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", fake_torch_save(OSError(28, "No space left on device")))
    with pytest.raises(CheckpointError, match="previous one is intact") as info:
        save_checkpoint(make_state(epoch=2), path)
    assert "No space left on device" in str(info.value)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path).epoch == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_failed_save_any_error_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint(make_state(epoch=1), tmp_path / "last.pt")
    monkeypatch.setattr(torch, "save", fake_torch_save(RuntimeError("killed mid-way")))
    with pytest.raises((RuntimeError, CheckpointError)):
        save_checkpoint(make_state(epoch=2), path)
    monkeypatch.undo()
    assert load_checkpoint(path).epoch == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_disk_full_from_torch_is_a_checkpoint_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint(make_state(epoch=1), tmp_path / "last.pt")
    monkeypatch.setattr(
        torch, "save", fake_torch_save(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"))
    )
    with pytest.raises(CheckpointError):
        save_checkpoint(make_state(epoch=2), path)


# --- RNG state ----------------------------------------------------------------------------------


def draw() -> tuple:
    return (
        [random.random() for _ in range(3)],
        np.random.standard_normal(3).tolist(),  # odd count: leaves a cached Gaussian (has_gauss) behind
        np.random.randint(0, 1000, 3).tolist(),
        torch.rand(3).tolist(),
        torch.randn(2).tolist(),
    )


def test_capture_restore_reproduces_all_generators() -> None:
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    draw()
    state = capture_rng()
    expected = draw()
    scrambled = draw()
    assert scrambled != expected
    restore_rng(state)
    assert draw() == expected


def test_rng_state_survives_checkpoint(tmp_path: Path) -> None:
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    np.random.standard_normal(1)
    rng = capture_rng()
    expected = draw()
    path = save_checkpoint(make_state(rng=rng), tmp_path / "last.pt")  # make_state itself draws numbers
    draw()
    restore_rng(load_checkpoint(path).train_state.rng)  # type: ignore[union-attr]  # through weights_only loading
    assert draw() == expected


# --- optim -----------------------------------------------------------------------------------------


def test_warmup_goes_from_tenth_to_one() -> None:
    cfg = OptimConfig(warmup_epochs=5, scheduler="constant")
    factors = [lr_factor(cfg, e, 20) for e in range(8)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[5:] == pytest.approx([1.0, 1.0, 1.0])
    assert all(a < b for a, b in zip(factors[:5], factors[1:6], strict=True))
    assert factors[:5] == pytest.approx([0.1, 0.28, 0.46, 0.64, 0.82])


@pytest.mark.parametrize("scheduler", ["cosine", "poly"])
def test_warmup_then_decay_starts_at_one(scheduler: str) -> None:
    cfg = OptimConfig(warmup_epochs=3, scheduler=scheduler)
    assert lr_factor(cfg, 0, 10) == pytest.approx(0.1)
    assert lr_factor(cfg, 3, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 10, 10) < lr_factor(cfg, 5, 10) < 1.0


def test_cosine_reaches_min_lr() -> None:
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, scheduler="cosine")
    factors = [lr_factor(cfg, e, 10) for e in range(11)]
    assert factors[0] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1e-5 / 1e-3)
    assert factors[5] == pytest.approx(0.01 + 0.99 * 0.5)
    assert all(a > b for a, b in zip(factors[:-1], factors[1:], strict=True))
    assert lr_factor(cfg, 15, 10) == pytest.approx(0.01)  # stays at the floor past the end


def test_cosine_with_warmup_reaches_min_lr_at_end() -> None:
    cfg = OptimConfig(lr=2e-3, min_lr=2e-5, scheduler="cosine", warmup_epochs=4)
    assert lr_factor(cfg, 20, 20) == pytest.approx(0.01)


def test_poly_reaches_zero() -> None:
    cfg = OptimConfig(scheduler="poly", poly_power=0.9)
    assert lr_factor(cfg, 0, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 5, 10) == pytest.approx(0.5**0.9)
    assert lr_factor(cfg, 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(cfg, 12, 10) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_steps_the_optimizer_lr() -> None:
    cfg = OptimConfig(lr=1e-2, min_lr=1e-4, scheduler="cosine", warmup_epochs=2)
    model = torch.nn.Linear(2, 1)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, max_epochs=6)
    assert isinstance(scheduler, LambdaLR)
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-2 * lr_factor(cfg, e, 6) for e in range(7)]
    assert seen == pytest.approx(expected)
    assert seen[0] == pytest.approx(1e-3)
    assert seen[2] == pytest.approx(1e-2)
    assert seen[6] == pytest.approx(1e-4)
    assert all(math.isfinite(x) for x in seen)


def test_plateau_scheduler() -> None:
    cfg = OptimConfig(lr=1e-2, scheduler="plateau", plateau_patience=1, plateau_factor=0.5, min_lr=3e-3)
    model = torch.nn.Linear(2, 1)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, max_epochs=10)
    assert isinstance(scheduler, ReduceLROnPlateau)
    for dice in (0.5, 0.6, 0.6, 0.6):  # "max" mode: higher Dice is better
        scheduler.step(dice)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)
    for _ in range(6):
        scheduler.step(0.6)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-3)  # floored at min_lr


def test_build_optimizer_kinds() -> None:
    model = torch.nn.Linear(2, 1)
    sgd = build_optimizer(OptimConfig(name="sgd", lr=0.01, momentum=0.9), model)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["nesterov"] is True
    assert sgd.param_groups[0]["momentum"] == 0.9
    adamw = build_optimizer(OptimConfig(lr=3e-4, weight_decay=0.01), model)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["lr"] == 3e-4
    assert adamw.param_groups[0]["weight_decay"] == 0.01


def test_torch_raises_unpickling_error_for_unsafe_globals() -> None:
    """load_checkpoint relies on torch.load(weights_only=True) raising pickle.UnpicklingError for unsafe payloads."""
    data = io.BytesIO()
    torch.save({"x": Path}, data)  # any global that is not allow-listed
    data.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(data, weights_only=True)
