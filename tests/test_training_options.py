"""Training options of issue 14: the loss choice, IoU model selection, a wall-clock budget,
experiment tracking and the learning pictures, each on a real (tiny) training run."""

from __future__ import annotations

import contextlib
import csv
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medunet.cli import main
from medunet.config import load_config
from medunet.errors import ConfigError
from medunet.synthetic import write_dataset
from medunet.training.budget import parse_duration
from medunet.training.losses import LOSSES, build_loss
from medunet.training.trainer import train
from medunet.visualize import REFERENCE_CONTOUR, learning_view

TINY = [
    "data.target_spacing=[1.5,1.5,2.5]",
    "augmentation.patch_size=[16,16,16]",
    "model.features=[4,8,16]",
    "train.device=cpu",
    "inference.device=cpu",
    "train.amp=off",
]
#: 120 steps: after 60, dice_ce was at Dice 0.93 but Dice/Tversky and generalised Dice only at 0.80-0.81 (no margin).
LEARN = [*TINY, "optim.lr=0.01", "train.iterations_per_epoch=15", "train.max_epochs=8", "train.val_every=4", "train.snapshots=false"]
#: Focal alone at the default focal_gamma=2 plateaus at validation Dice ~0.72 within these 120 steps; gamma 1 reaches
#: 0.97 (docs/training.md has the measurements), so the test trains focal with it.
FOCAL_GAMMA_FOR_SHORT_RUNS = "loss.focal_gamma=1.0"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("options-data"), num_train=4, num_test=0, shape=(24, 24, 16))


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_learns_the_phantom(loss: str, dataset: Path, tmp_path: Path) -> None:
    config = load_config(None, [*LEARN, f"loss.name={loss}", *([FOCAL_GAMMA_FOR_SHORT_RUNS] if loss == "focal" else [])])
    result = train(dataset, tmp_path / "run", config, progress=False)
    assert result.best_dice > 0.8, f"{loss}: validation Dice {result.best_dice:.3f} does not prove learning"


@pytest.mark.parametrize("loss", LOSSES)
def test_class_weights_and_deep_supervision_reach_each_loss(loss: str) -> None:
    torch.manual_seed(0)
    logits, label = torch.randn(2, 3, 8, 8, 8), torch.randint(0, 3, (2, 1, 8, 8, 8))
    plain = load_config(None, [f"loss.name={loss}"]).loss
    weighted = load_config(None, [f"loss.name={loss}", "loss.class_weights=[1.0,1.0,6.0]"]).loss
    assert float(build_loss(weighted, 3)(logits, label)) != pytest.approx(float(build_loss(plain, 3)(logits, label)), rel=1e-4)
    with pytest.raises(Exception, match="3 values"):
        build_loss(load_config(None, [f"loss.name={loss}", "loss.class_weights=[1.0,2.0]"]).loss, 3)
    from medunet.training.losses import DeepSupervisionLoss

    heads = DeepSupervisionLoss(load_config(None, [f"loss.name={loss}"]), 3)
    single = float(heads([logits], label))
    assert float(heads([logits, torch.zeros_like(logits)], label)) != pytest.approx(single, rel=1e-4)


def _fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Small fixed logits (2 cases, 3 classes, 4^3 voxels) and an index label with every class present."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, 4, 4, generator=generator)
    label = torch.randint(0, 3, (2, 1, 4, 4, 4), generator=generator)
    label[:, 0, 0, 0, :3] = torch.tensor([0, 1, 2])
    return logits, label


def _soft_counts(logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft true positives, false positives and false negatives per (case, foreground class), summed over voxels."""
    p = torch.softmax(logits, 1)[:, 1:].flatten(2)
    g = torch.nn.functional.one_hot(label[:, 0], 3).permute(0, 4, 1, 2, 3)[:, 1:].flatten(2).float()
    return (p * g).sum(2), (p * (1 - g)).sum(2), ((1 - p) * g).sum(2)


def _dice_ce_by_hand(logits: torch.Tensor, label: torch.Tensor, weights: list[float] | None) -> float:
    """Soft Dice over the foreground classes + cross-entropy, written out (MONAI's smoothing 1e-5, background excluded).

    A class weight w_k multiplies class k's Dice term (the mean over cases and classes is then taken as is) and
    each voxel's cross-entropy by the weight of its true class, normalised by the sum of those weights.
    """
    w = torch.tensor(weights if weights is not None else [1.0, 1.0, 1.0])
    tp, fp, fn = _soft_counts(logits, label)
    dice = (1 - (2 * tp + 1e-5) / (2 * tp + fp + fn + 1e-5)) * w[1:]
    nll = -torch.log_softmax(logits, 1).gather(1, label)[:, 0]
    voxel_weight = w[label[:, 0]]
    ce = (voxel_weight * nll).sum() / voxel_weight.sum()
    return float(dice.mean() + ce)


@pytest.mark.parametrize("weights", [None, [1.0, 1.0, 6.0], [0.5, 3.0, 1.0]])
def test_dice_ce_with_class_weights_equals_the_hand_computed_loss(weights: list[float] | None) -> None:
    logits, label = _fixed_batch()
    overrides = ["loss.name=dice_ce", *([f"loss.class_weights={weights}".replace(" ", "")] if weights else [])]
    loss = build_loss(load_config(None, overrides).loss, 3)
    assert float(loss(logits, label)) == pytest.approx(_dice_ce_by_hand(logits, label, weights), rel=1e-5)


def test_weighted_tversky_equals_the_hand_computed_weighted_mean_over_classes() -> None:
    logits, label = _fixed_batch()
    lc = load_config(None, ["loss.name=tversky", "loss.tversky_alpha=0.3", "loss.tversky_beta=0.7", "loss.class_weights=[1.0,1.0,3.0]"]).loss
    tp, fp, fn = _soft_counts(logits, label)
    per_class = 1 - (tp + 1e-5) / (tp + 0.3 * fp + 0.7 * fn + 1e-5)  # (case, foreground class)
    expected = (per_class * torch.tensor([1.0, 3.0]) / 4.0).sum(1).mean()
    assert float(build_loss(lc, 3)(logits, label)) == pytest.approx(float(expected), rel=1e-5)


def test_deep_supervision_is_the_halving_weighted_mean_of_the_head_losses() -> None:
    from medunet.training.losses import DeepSupervisionLoss

    logits, label = _fixed_batch()
    heads = [logits, 0.5 * logits.flip(2), torch.zeros_like(logits)]
    config = load_config(None, ["loss.name=dice_ce", "loss.class_weights=[1.0,1.0,6.0]"])
    per_head = [_dice_ce_by_hand(h, label, [1.0, 1.0, 6.0]) for h in heads]
    expected = (1.0 * per_head[0] + 0.5 * per_head[1] + 0.25 * per_head[2]) / 1.75
    assert float(DeepSupervisionLoss(config, 3)(heads, label)) == pytest.approx(expected, rel=1e-5)
    assert float(DeepSupervisionLoss(config, 3)(heads[:1], label)) == pytest.approx(per_head[0], rel=1e-5)


def test_iou_selection_picks_best_pt_and_both_scores_are_logged(dataset: Path, tmp_path: Path) -> None:
    config = load_config(None, [*TINY, "optim.lr=0.01", "train.iterations_per_epoch=4", "train.max_epochs=4", "train.val_every=1",
                                "train.selection_metric=iou", "train.snapshots=false"])
    result = train(dataset, tmp_path / "run", config, progress=False)
    table = rows(tmp_path / "run")
    iou = [float(r["val_iou_mean"]) for r in table]
    dice = [float(r["val_dice_mean"]) for r in table]
    for d, j, r in zip(dice, iou, table):  # one validation case: its IoU is D / (2 - D), per class too
        assert j == pytest.approx(d / (2 - d), abs=2e-6)
        assert float(r["val_iou_organ"]) == pytest.approx(j, abs=2e-6)
    best = int(np.argmax(iou)) + 1  # first epoch with the highest IoU
    assert result.best_epoch == best
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == best
    assert result.best_iou == pytest.approx(iou[best - 1], abs=2e-6) and result.best_dice == pytest.approx(dice[best - 1], abs=2e-6)


class FakeClock:
    """A clock that only moves when told: the budget's (medunet.training.budget.clock) in the tests below."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    from medunet.training import budget

    clock = FakeClock()
    monkeypatch.setattr(budget, "clock", clock)
    return clock


def test_time_budget_plans_the_steps_that_fit_on_a_fake_clock(fake_clock: FakeClock) -> None:
    from medunet.training.budget import TimeBudget

    budget = TimeBudget(1.0)  # 60 s, started at 0
    budget.step_seconds = [5.0, 1.0]  # the first step (one-off costs) is left out of the typical step time
    assert not budget.ready()
    budget.step_seconds.append(1.0)
    assert budget.ready() and budget.step_time() == 1.0 and budget.validation_time() == 3.0  # 3 steps' time before any
    fake_clock.now = 10.0
    # left: 60 - 10 elapsed - (3 validation + 0 overhead + 0.03 * 60 + 2 * 1 step) = 43.2 s, at 4 s per 4-step epoch
    plan = budget.plan(steps_done=4, steps_per_epoch=4, val_every=2)
    assert (plan.total_steps, plan.seconds_per_step) == (4 + 43, 1.0)
    budget.validation_seconds, budget.epoch_overhead_seconds = 6.0, 1.0
    # left: 60 - 10 - (6 + 2 + 1.8 + 2) = 38.2 s; an epoch: 4 steps + 1 s overhead + 6 s / 2 validations = 8 s
    assert budget.plan(steps_done=4, steps_per_epoch=4, val_every=2).total_steps == 4 + 19
    fake_clock.now = 60.0
    assert budget.plan(steps_done=4, steps_per_epoch=4, val_every=2).total_steps == 4  # nothing left: no more steps


def test_time_budget_stops_when_one_more_step_would_not_leave_time_to_finish(fake_clock: FakeClock) -> None:
    from medunet.training.budget import TimeBudget

    budget = TimeBudget(1.0, step_seconds=[1.0, 1.0, 1.0], validation_seconds=4.0, epoch_overhead_seconds=0.5)
    # needed after a step: 1 step + 4 validation + 2 * 0.5 overhead + 0.01 * 60 = 6.6 s
    fake_clock.now = 53.3
    assert not budget.out_of_time()
    fake_clock.now = 53.5
    assert budget.out_of_time()


def test_trainer_on_a_fake_clock_trains_exactly_the_planned_steps(fake_clock: FakeClock, dataset: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step costs exactly 1 s and nothing else takes time: a 15 s budget fits exactly 12 steps.

    After the warm-up (3 steps, at 3 s) the first plan keeps back 3 s for a validation (three steps' guess), 0.45 s
    margin and 2 steps: 3 + floor(15 - 3 - 5.45) = 9 steps. The first epoch's validation then measures 0 s, so from
    there the reserve is 2.45 s and every re-plan gives t + floor(15 - t - 2.45) = 12 steps: three epochs of 4, the
    last of which validates although val_every is 5; the safety net (1.15 s needed after a step) never fires.
    """
    from medunet.training.trainer import Trainer

    step = Trainer.step

    def one_second_step(self: Trainer, batch: dict[str, Any], *, desc: str = "step") -> float:
        loss = step(self, batch, desc=desc)
        fake_clock.now += 1.0
        return loss

    monkeypatch.setattr(Trainer, "step", one_second_step)
    config = load_config(None, [*TINY, "train.max_epochs=1000", "train.iterations_per_epoch=4", "train.val_every=5",
                                "train.max_minutes=0.25", "train.snapshots=false", "optim.lr=0.01", "optim.min_lr=1e-5"])
    result = train(dataset, tmp_path / "run", config, progress=False)
    table = rows(tmp_path / "run")
    assert fake_clock.now == 12.0 and result.epochs_completed == len(table) == 3
    assert [r["val_dice_mean"] != "" for r in table] == [True, False, True]  # the first (to time it) and the last
    assert float(table[-1]["lr"]) == pytest.approx(1e-5, rel=1e-3)  # the schedule was laid over exactly those steps
    assert result.minutes == pytest.approx(12.0 / 60)


def test_time_budget_is_honoured_on_the_real_clock(dataset: Path, tmp_path: Path) -> None:
    """The real clock, loosely: the exact plan, and the lr reaching its floor, are checked on the fake clock above.

    On a loaded machine step times can triple mid-run; the budget then stops training early to validate and
    save within it (seen here: the lr at 0.0092 of 0.01 when the time ran out), so only decay is asserted.
    """
    budget_s = 12.0
    config = load_config(None, [*TINY, "train.max_epochs=1000", "train.iterations_per_epoch=4", "train.val_every=3",
                                f"train.max_minutes={budget_s / 60}", "optim.lr=0.01", "optim.min_lr=1e-5"])
    started = time.perf_counter()
    result = train(dataset, tmp_path / "run", config, progress=False)
    took = time.perf_counter() - started
    assert took <= 1.5 * budget_s, f"training took {took:.1f} s on a {budget_s:.0f} s budget"
    assert took >= 0.5 * budget_s, f"training stopped after {took:.1f} s of a {budget_s:.0f} s budget"
    table = rows(tmp_path / "run")
    assert len(table) == result.epochs_completed < 1000
    lrs = [float(r["lr"]) for r in table]
    assert lrs[-1] < 0.01  # the schedule had started to decay (its floor: the fake-clock test)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # held, then decayed, never raised
    assert table[-1]["val_dice_mean"] != ""  # the budget's last epoch validated
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "learning.png").is_file()


@pytest.mark.parametrize(("text", "minutes"), [("90m", 90.0), ("1.5h", 90.0), ("5400s", 90.0), ("45", 45.0), ("0.5 min", 0.5)])
def test_time_budget_durations(text: str, minutes: float) -> None:
    assert parse_duration(text) == pytest.approx(minutes)


@pytest.mark.parametrize("text", ["", "ninety", "-5m", "0", "5d"])
def test_bad_time_budget_is_a_clear_error(text: str) -> None:
    with pytest.raises(ConfigError, match="90m, 1.5h or 5400s"):
        parse_duration(text)


@pytest.fixture(scope="module")
def tracked_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-epoch run validated every epoch, logged to TensorBoard and MLflow, with learning pictures."""
    run = tmp_path_factory.mktemp("tracked") / "run"
    status = main(["-q", "train", str(dataset), "-o", str(run), "--skip-check", "--track", "tensorboard", "--track", "mlflow",
                   *[arg for setting in TINY for arg in ("--set", setting)],
                   "--set", "train.max_epochs=3", "--set", "train.val_every=1", "--set", "train.iterations_per_epoch=2"])
    assert status == 0
    return run


def test_tensorboard_event_files_hold_the_run(tracked_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/lr", "time/step_seconds", "val/dice_mean", "val/dice_organ", "val/iou_mean", "val/iou_organ"):
        assert tag in tags["scalars"], tag
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3]
    assert {"pictures/learning", "pictures/train_curve"} <= set(tags["images"])
    assert any("config" in t for t in tags["tensors"])  # the config, as text


def test_mlflow_store_holds_metrics_params_and_pictures(tracked_run: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracked_run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("medunet")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_epochs"] == "3" and run.data.params["loss.name"] == "dice_ce"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/dice_organ")] == [1, 2, 3]
    assert {"train/loss", "train/lr", "val/iou_mean", "time/step_seconds"} <= set(run.data.metrics)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "train_curve.png", "learning.png", "learning.gif"} <= names


def _crash(_record: object) -> None:
    raise RuntimeError("a callback crashed")


def _interrupt(_record: object) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize(("callback", "raised", "status"), [(None, None, "FINISHED"), (_crash, RuntimeError, "FAILED"),
                                                            (_interrupt, KeyboardInterrupt, "KILLED")])
def test_mlflow_run_status_says_how_the_training_ended(callback: Any, raised: type[BaseException] | None, status: str,
                                                       dataset: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    config = load_config(None, [*TINY, "train.tracking=[mlflow]", "train.max_epochs=1", "train.iterations_per_epoch=1",
                                "train.snapshots=false"])
    run = tmp_path / "run"
    callbacks = [callback] if callback is not None else []
    with pytest.raises(raised) if raised is not None else contextlib.nullcontext():
        train(dataset, run, config, progress=False, callbacks=callbacks)
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("medunet").experiment_id])
    assert mlflow_run.info.status == status
    assert mlflow_run.info.end_time is not None


def test_learning_pictures_show_the_mask_forming(tracked_run: Path) -> None:
    from PIL import Image

    validations = [r for r in rows(tracked_run) if r["val_dice_mean"]]
    with Image.open(tracked_run / "learning.gif") as gif:
        assert gif.n_frames == len(validations) == 3
    picture = np.asarray(Image.open(tracked_run / "learning.png").convert("RGB"))
    contour = (picture == REFERENCE_CONTOUR).all(axis=-1)
    assert contour.sum() > 3 * 20  # the reference contour on every frame of the grid
    assert len(list((tracked_run / "learning").glob("epoch_*.npz"))) == 3


def test_learning_view_draws_the_reference_contour_exactly() -> None:
    image = np.zeros((20, 20))
    reference = np.zeros((20, 20), dtype=np.uint8)
    reference[5:12, 6:15] = 1
    prediction = np.zeros_like(reference)
    view = learning_view(image, reference, prediction, window=(0.0, 1.0))
    scale = view.shape[0] // 20
    yellow = (view == REFERENCE_CONTOUR).all(axis=-1)
    big = np.kron(reference, np.ones((scale, scale), dtype=np.uint8)).astype(bool)
    inner = np.zeros_like(big)
    inner[1:-1, 1:-1] = big[1:-1, 1:-1] & big[:-2, 1:-1] & big[2:, 1:-1] & big[1:-1, :-2] & big[1:-1, 2:]
    assert (yellow == (big & ~inner)).all()


@pytest.mark.parametrize(("tracker", "hidden"), [("tensorboard", ["torch.utils.tensorboard"]), ("mlflow", ["mlflow", "mlflow.tracking"])])
def test_missing_tracker_package_names_the_extra(tracker: str, hidden: list[str], dataset: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for module in hidden:
        monkeypatch.setitem(sys.modules, module, None)  # what a missing package looks like to import
    status = main(["train", str(dataset), "-o", str(tmp_path / "run"), "--track", tracker, "--set", "train.max_epochs=1"])
    err = capsys.readouterr().err.strip()
    assert status == 1
    assert f"pip install 'medunet[{tracker}]'" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing checked, planned or trained
    # the same through the config alone, as a library call would set it
    with pytest.raises(ConfigError, match=rf"pip install 'medunet\[{tracker}\]'"):
        train(dataset, tmp_path / "lib", load_config(None, [*TINY, f"train.tracking=[{tracker}]"]), progress=False)
