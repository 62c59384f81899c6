"""The training loop: patches in, checkpoints and records out.

One call, :func:`train`, runs a whole training (or resumes one) in a run folder:

    config.yaml  split.json  metrics.csv  train_curve.png  log.txt  best.pt  last.pt

Each epoch reseeds every generator from (seed, epoch), so resuming from ``last.pt``
continues exactly as the uninterrupted run would have.

Under ``torchrun`` (see :mod:`medunet.training.distributed`) each process trains on its shard of the
cases with ``train.batch_size`` volumes per step (global batch = batch_size x processes), gradients
are averaged by DDP, losses and validation Dice are reduced over ranks, and only rank 0 writes the
run folder. Generators are then seeded from (seed, epoch, rank).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm.auto import tqdm

from medunet._version import __version__
from medunet.config import Config, config_to_dict, save_config
from medunet.errors import MedunetError, TrainingError, unwrap_error
from medunet.io.datalist import DatalistSource, load_datalist
from medunet.model.checkpoint import Checkpoint, TrainState, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from medunet.model.layout import BEST_CHECKPOINT, CONFIG_FILE, LAST_CHECKPOINT
from medunet.model.networks import SegmentationNetwork, build_network
from medunet.model.sliding import predict_probabilities
from medunet.qc.reference import SharedRows, training_reference
from medunet.runtime import amp_dtype, autocast, derived_seed, seed_everything
from medunet.training import budget as time_budget
from medunet.training import distributed as dist
from medunet.training.budget import BudgetedRun
from medunet.training.cases import resolve_labels, split_for_run
from medunet.training.data import batch_cases, preprocessing_key, training_loader, validation_dataset
from medunet.training.losses import DeepSupervisionLoss
from medunet.training.optim import build_optimizer, build_scheduler, continue_schedule
from medunet.training.records import MetricsLog, dice_column, iou_column
from medunet.training.snapshots import LearningSnapshots
from medunet.training.splits import Fold
from medunet.training.tracking import RunEnd, Tracker, open_tracking, require_tracking

log = logging.getLogger("medunet")


@dataclass
class TrainResult:
    """What a training run achieved."""

    run_dir: Path
    best_dice: float
    """Mean validation Dice of the best epoch (the one train.selection_metric picked)."""
    best_epoch: int
    epochs_completed: int
    class_dice: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    best_iou: float = 0.0
    """Mean validation IoU of the best epoch."""
    minutes: float = 0.0
    """Wall-clock minutes of this training session."""


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch did; handed to every epoch callback after the epoch's checkpoint is saved."""

    epoch: int
    """1-based number of the epoch just completed."""
    max_epochs: int
    row: dict[str, Any]
    """The epoch's ``metrics.csv`` row (loss, lr, seconds, and validation scores when it validated)."""
    validated: bool
    improved: bool
    """True when this validation set a new best (and ``best.pt`` was written)."""
    class_dice: dict[str, float] | None
    """Validation Dice per foreground class, when the epoch validated."""


#: Called after each epoch; returning True stops training after that epoch (e.g. a target reached).
EpochCallback = Callable[[EpochRecord], "bool | None"]


def _cycle(loader: Any, count: int) -> Iterator[dict[str, Any]]:
    done = 0
    while done < count:
        for batch in loader:
            yield batch
            done += 1
            if done >= count:
                return


@dataclass
class ValidationScores:
    """Mean scores per foreground class over the validation volumes (NaN for classes absent everywhere)."""

    dice: np.ndarray
    iou: np.ndarray
    first_prediction: np.ndarray | None = None
    """Label map predicted for the first volume (this rank's), when asked for (the learning snapshots)."""

    def mean(self, metric: str) -> float:
        """Mean over the classes present of ``dice`` or ``iou`` (0 when none is)."""
        scores = self.iou if metric == "iou" else self.dice
        return float(np.nanmean(scores)) if np.isfinite(scores).any() else 0.0


@torch.no_grad()
def validate(
    model: SegmentationNetwork, dataset: Any, config: Config, *, num_classes: int, device: torch.device, amp: torch.dtype | None,
    keep_first: bool = False,
) -> ValidationScores:
    """Dice and IoU per foreground class, averaged over the validation volumes, in one pass.

    Each volume's IoU comes from its Dice (IoU = D / (2 - D): the same overlap counts). Under torchrun
    each rank passes its shard of the volumes; the per-class sums and counts of all ranks are added,
    so the result is the mean over every validation volume, the same on each rank.
    """
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    first = None
    for i in range(len(dataset)):
        item = dataset[i]
        image = torch.as_tensor(item["image"])[None]
        label = torch.as_tensor(item["label"])[None].to(device)
        probs = predict_probabilities(model, image, config, device=device, amp=amp)
        indices = probs.max(dim=1, keepdim=True).indices  # faster than argmax on CPU
        if keep_first and i == 0:
            first = indices[0, 0].cpu().numpy().astype(np.uint8)
        metric(y_pred=one_hot(indices, num_classes), y=one_hot(label.long(), num_classes))
    scores = metric.get_buffer() if len(dataset) else None  # (volumes, classes); NaN where a class is absent
    dice = np.zeros((0, num_classes - 1)) if scores is None else scores.cpu().numpy().astype(np.float64)
    found = np.isfinite(dice)
    iou = np.where(found, dice / (2.0 - np.where(found, dice, 0.0)), 0.0)
    sums = np.stack([np.where(found, dice, 0.0).sum(0), iou.sum(0), found.sum(0)])
    if dist.is_distributed():
        sums = dist.all_reduce_sum(sums)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(sums[2] > 0, sums[:2] / np.maximum(sums[2], 1), np.nan)
    return ValidationScores(means[0], means[1], first)


def train(
    datalist_path: DatalistSource,
    run_dir: str | Path,
    config: Config,
    *,
    resume: bool = False,
    progress: bool = True,
    fold: Fold | None = None,
    callbacks: Sequence[EpochCallback] = (),
    qc_rows: SharedRows | None = None,
    known_labels: Mapping[Path, float] | None = None,
) -> TrainResult:
    """Train (or resume) a model on a datalist; see the module docstring for the run folder.

    With ``fold`` (see :mod:`medunet.training.splits`) the fold's train/val case names replace the split.
    Started by torchrun, it joins the process group (if the caller has not) and trains with DDP.
    Each of ``callbacks`` is called after every epoch with an :class:`EpochRecord`; one returning
    True ends training there (the epoch's checkpoints are already saved). ``datalist_path`` may be the
    :class:`~medunet.io.datalist.Datalist` the caller parsed; ``qc_rows``, QC reference rows an earlier pass
    over the cases computed (:class:`~medunet.qc.reference.SharedRows`); ``known_labels``, the data check's highest value
    per label file (:func:`~medunet.training.run_config.check_before_training`), so finding the classes need not read them.

    Raises:
        MedunetError: bad data, config or checkpoint, or a non-finite loss.
    """
    run_dir = Path(run_dir)
    with dist.session():
        _check_run_folder(run_dir, resume)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not dist.is_main():
            result = Trainer(datalist_path, run_dir, config, resume=resume, progress=False, fold=fold, qc_rows=qc_rows,
                             known_labels=known_labels).fit(callbacks)
            dist.barrier()  # return once rank 0 has written the last files
            return result
        with _run_log(run_dir):
            result = Trainer(datalist_path, run_dir, config, resume=resume, progress=progress, fold=fold,
                             qc_rows=qc_rows, known_labels=known_labels).fit(callbacks)
            dist.barrier()
            return result


def _check_run_folder(run_dir: Path, resume: bool) -> None:
    last_path = run_dir / LAST_CHECKPOINT
    if resume and not last_path.is_file():
        raise TrainingError(f"cannot resume: {last_path} does not exist")
    if not resume and last_path.exists():
        raise TrainingError(f"run folder {run_dir} already holds a training run; pass --resume to continue it or choose another -o")


@contextlib.contextmanager
def _run_log(run_dir: Path) -> Iterator[None]:
    """Copy the log to ``run_dir/log.txt`` (rank 0), including the reason a run failed."""
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        yield
    except MedunetError as exc:  # keep the reason in the run's log.txt too (the caller reports it)
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (exc,), None))
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


class Trainer:
    """One training run in a folder, set up step by step: data, model, optimisation state, then epochs.

    :func:`train` is the usual entry point. The class is public so benchmarks and tools can drive
    the same step the trainer runs (:meth:`step`) on data of their own.
    """

    def __init__(
        self, datalist_path: DatalistSource, run_dir: Path, config: Config, *, resume: bool = False, progress: bool = True,
        fold: Fold | None = None, qc_rows: SharedRows | None = None, known_labels: Mapping[Path, float] | None = None,
    ) -> None:
        self.config, self.run_dir, self.progress = config, run_dir, progress
        tc = config.train
        self.started = time_budget.clock()
        self.budget = BudgetedRun(tc, config.optim, started=self.started) if tc.max_minutes else None
        self.steps_done = 0  # optimisation steps so far (a time-budgeted run's schedule counts in steps)
        self.last_lr = config.optim.lr
        self.device = dist.device_for(tc.device)
        self.amp = amp_dtype(tc.amp, self.device)
        if dist.is_main():
            require_tracking(config)  # a missing tracker package stops the run before any data is read
        self.datalist = load_datalist(datalist_path, allow_outside_root=config.data.allow_outside_root)
        labels = resolve_labels(self.datalist, config, known_labels)
        self.class_names = [labels[i] for i in sorted(labels)]
        self.in_channels = len(self.datalist.training[0].image)
        train_cases, val_cases = split_for_run(self.datalist, config, run_dir, resume, fold)
        self.qc_reference = training_reference(  # for QC at inference
            train_cases, config, self.class_names, self.datalist.modality, shared=qc_rows)
        if dist.is_main():
            save_config(config, run_dir / CONFIG_FILE)
        log.info(
            "medunet %s: %d training / %d validation cases, %d classes %s, device %s%s%s",
            __version__, len(train_cases), len(val_cases), self.num_classes, self.class_names, self.device,
            f", AMP {self.amp}" if self.amp else "",
            f"; {dist.world_size()} processes, global batch {tc.batch_size * dist.world_size()}" if dist.is_distributed() else "",
        )
        self._prepare_data(dist.shard(train_cases, even=True), dist.shard(val_cases, even=False))
        self._build_model()
        self.state = TrainState(optimizer={}, scheduler={}, rng={}, best_metric=tc.selection_metric)
        self.start_epoch = 0
        self.metrics = MetricsLog(run_dir, self.class_names[1:], write=dist.is_main())
        self.snapshots = LearningSnapshots(run_dir, self.val_ds, self.class_names) if tc.snapshots and dist.is_main() else None
        if resume:
            self._restore(run_dir / LAST_CHECKPOINT)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def steps_per_epoch(self) -> int:
        """Optimisation steps in a full epoch (equal on every rank: training shards are equally long)."""
        return self.config.train.iterations_per_epoch or len(self.loader)

    def _prepare_data(self, train_cases: list[Any], val_cases: list[Any]) -> None:
        """Preprocess and cache this rank's volumes; build the training loader and the validation set."""
        config = self.config
        cache_root = Path(config.data.cache_dir) if config.data.cache_dir else self.run_dir / "cache"
        cache_dir = cache_root / preprocessing_key(config, num_classes=self.num_classes, in_channels=self.in_channels)
        seed_everything(config.train.seed)
        share = " (rank 0's share)" if dist.is_distributed() else ""
        log.info("preprocessing and caching %d volumes%s", len(train_cases) + len(val_cases), share)
        self.train_ds, self.loader, self.generator = training_loader(
            train_cases, config, num_classes=self.num_classes, in_channels=self.in_channels, cache_dir=cache_dir / "train",
            progress=self.progress, device=self.device,
        )
        self.val_ds = validation_dataset(
            val_cases, config, num_classes=self.num_classes, in_channels=self.in_channels, cache_dir=cache_dir / "val",
            progress=self.progress,
        )

    def _build_model(self) -> None:
        """The network, loss, optimizer, schedule and scaler; ``trained`` is what steps run (DDP / compiled)."""
        config, tc = self.config, self.config.train
        model = build_network(config.model, in_channels=self.in_channels, out_channels=self.num_classes).to(self.device)
        if tc.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # Module.to's stubs omit memory_format
        self.model: SegmentationNetwork = model
        self.loss_fn = DeepSupervisionLoss(config, self.num_classes).to(self.device)
        self.optimizer = build_optimizer(config.optim, model)
        if self.budget is not None:  # the schedule counts in steps, laid over those the budget finds fit
            self.scheduler = self.budget.build_scheduler(self.optimizer, self.steps_per_epoch)
        else:
            self.scheduler = build_scheduler(config.optim, self.optimizer, tc.max_epochs)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.trained: torch.nn.Module = dist.wrap(model, self.device)  # DDP under torchrun; ``model`` stays the plain network
        if tc.compile:
            log.info("compiling the network (torch.compile): the first steps are slow")
            self.trained = torch.compile(self.trained)  # type: ignore[assignment]  # compile returns a callable wrapping the module

    def _restore(self, last_path: Path) -> None:
        """Continue from ``last.pt``: weights, optimisation state, generators and records."""
        saved = load_checkpoint(last_path)  # on the CPU: RNG states must stay there; load_state_dict moves the rest
        if saved.train_state is None:
            raise TrainingError(f"cannot resume: {last_path} holds a model only, without its training state")
        self.model.load_state_dict(saved.model)
        self.optimizer.load_state_dict(saved.train_state.optimizer)
        self.scheduler.load_state_dict(saved.train_state.scheduler)
        self._continue_steps(saved.epoch, saved.train_state.scheduler)
        continue_schedule(self.scheduler, self.config.optim, self.config.train.max_epochs)
        if saved.train_state.scaler:
            self.scaler.load_state_dict(saved.train_state.scaler)
        restore_rng(saved.train_state.rng)
        self.start_epoch, self.state = saved.epoch, saved.train_state
        self.metrics = MetricsLog(self.run_dir, self.class_names[1:], rows=self.state.history[: self.start_epoch], write=dist.is_main())
        self.metrics.write_csv()
        log.info("resuming after epoch %d (best mean %s %.4f at epoch %d)", self.start_epoch, self.state.best_metric,
                 self.state.best_score, self.state.best_epoch)

    def _continue_steps(self, epochs_done: int, saved_scheduler: dict[str, Any]) -> None:
        """Count the steps a resumed run has done and put its scheduler on them (epochs or steps).

        Resumed with a time budget, the budget does it (:meth:`BudgetedRun.resume`: a fresh budget).
        """
        if self.budget is not None:
            self.steps_done = self.budget.resume(epochs_done, saved_scheduler)
            return
        self.steps_done = epochs_done * self.steps_per_epoch
        if not isinstance(self.scheduler, ReduceLROnPlateau):
            self.scheduler.last_epoch = epochs_done  # the same number unless the saved run was time-budgeted

    def checkpoint(self, epoch: int) -> Checkpoint:
        """The run as it stands after ``epoch`` epochs (what ``last.pt`` holds)."""
        scaler = self.scaler.state_dict() if self.scaler.is_enabled() else None
        self.state.optimizer, self.state.scheduler, self.state.scaler = self.optimizer.state_dict(), self.scheduler.state_dict(), scaler
        self.state.rng, self.state.history = capture_rng(), self.metrics.rows
        return Checkpoint(
            model=self.model.state_dict(), config=config_to_dict(self.config), class_names=list(self.class_names),
            in_channels=self.in_channels, epoch=epoch, modality=self.datalist.modality or self.config.data.modality,
            medunet_version=__version__, train_state=self.state, qc_reference=self.qc_reference.to_json(),
        )

    def step(self, batch: dict[str, Any], *, desc: str = "step") -> float:
        """One optimisation step on a batch of patches (``image``, ``label``); returns the loss.

        Raises:
            TrainingError: the loss is NaN/Inf (the batch's cases are named; nothing is saved).
        """
        config = self.config
        # plain tensors: the patches' metadata is not needed here, and MetaTensor dispatch costs
        # time on every op and breaks torch.compile
        image, label = (torch.Tensor.as_subclass(batch[key], torch.Tensor).to(self.device) for key in ("image", "label"))
        if config.train.channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        with autocast(self.device, self.amp):
            loss = self.loss_fn(self.trained(image), label)
        finite = bool(torch.isfinite(loss))
        if not dist.all_true(finite):  # under torchrun every rank stops at the same step
            where = f"on a batch of cases {batch_cases(batch)}" if not finite else "on another rank's batch"
            raise TrainingError(
                f"loss became {loss.item() if not finite else 'non-finite'} during {desc} {where}; "
                "stopped before saving anything from it. Lower optim.lr or check those cases"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if config.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.item())

    def train_epoch(self, epoch: int) -> list[float]:
        """Reseed every generator from (seed, epoch, rank), then run one epoch of steps; returns their losses.

        Raises:
            TrainingError: a non-finite loss.
            DataError: a case failed to load while the loader filled a batch.
        """
        tc = self.config.train
        epoch_seed = derived_seed(tc.seed, epoch, rank=dist.rank())
        seed_everything(epoch_seed)
        self.train_ds.transform.set_random_state(seed=epoch_seed)
        self.generator.manual_seed(epoch_seed)
        # the budget's last epoch may be cut short
        iterations = self.budget.epoch_steps(self.steps_done) if self.budget is not None else self.steps_per_epoch
        desc = f"epoch {epoch + 1}/{tc.max_epochs}"
        self.trained.train()
        losses: list[float] = []
        bar = tqdm(total=iterations, desc=desc, unit="batch", disable=not self.progress, leave=False)
        try:
            tick = time_budget.clock()
            for batch in _cycle(self.loader, iterations):
                self.last_lr = self.optimizer.param_groups[0]["lr"]
                losses.append(self.step(batch, desc=desc))
                self.steps_done += 1
                bar.set_postfix(loss=f"{np.mean(losses):.4f}")
                bar.update()
                tock = time_budget.clock()
                self.step_seconds.append(tock - tick)
                tick = tock
                if self.budget is not None and self.budget.step_done(self.steps_done, self.step_seconds[-1]):
                    break
        except RuntimeError as exc:  # a transform error inside the loader arrives wrapped by MONAI
            cause = unwrap_error(exc)
            if cause is not exc and isinstance(cause, MedunetError):
                raise cause from cause.__cause__  # its own cause kept, MONAI's wrapper dropped
            raise
        finally:
            bar.close()
        return losses

    def _validate_epoch(self, row: dict[str, Any]) -> tuple[dict[str, float], bool]:
        """Validate, add the scores to ``row``, update the best score; returns the per-class Dice and whether it improved.

        ``train.selection_metric`` (mean Dice or IoU) decides what is best; ``state.best_score`` holds its best value.
        """
        started = time_budget.clock()
        scores = validate(self.model, self.val_ds, self.config, num_classes=self.num_classes, device=self.device, amp=self.amp,
                          keep_first=self.snapshots is not None)
        dice, iou = dist.broadcast((scores.dice, scores.iou))
        scores = ValidationScores(dice, iou, scores.first_prediction)
        class_dice = {n: float(d) for n, d in zip(self.class_names[1:], dice)}
        row["val_dice_mean"], row["val_iou_mean"] = scores.mean("dice"), scores.mean("iou")
        row.update({dice_column(n): d for n, d in class_dice.items()})
        row.update({iou_column(n): float(v) for n, v in zip(self.class_names[1:], iou)})
        selected = scores.mean(self.config.train.selection_metric)
        improved = selected > self.state.best_score
        if improved:
            self.state.best_score, self.state.best_epoch, self.state.stale_validations = selected, row["epoch"], 0
            self.state.best_class_dice = class_dice
        else:
            self.state.stale_validations += 1
        if isinstance(self.scheduler, ReduceLROnPlateau):
            self.scheduler.step(selected)
        if self.snapshots is not None and scores.first_prediction is not None:
            self.snapshots.add(row["epoch"], scores.first_prediction, row["val_dice_mean"])
        self.validation_seconds = time_budget.clock() - started
        return class_dice, improved

    def run_epoch(self, epoch: int) -> EpochRecord:
        """Train one epoch, validate when due, step the schedule, record and checkpoint it.

        Under a time budget the epoch also validates when it is the budget's last, and after the
        session's first epoch (to time a validation for the plan).
        """
        tc = self.config.train
        started = time_budget.clock()
        self.step_seconds: list[float] = []
        self.validation_seconds = 0.0
        losses = self.train_epoch(epoch)
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": dist.all_reduce_mean(float(np.mean(losses))), "lr": self.last_lr,
                               "step_seconds": float(np.mean(self.step_seconds))}
        last = epoch + 1 == tc.max_epochs or (self.budget is not None and self.budget.epoch_is_last(self.steps_done))
        validated = (epoch + 1) % tc.val_every == 0 or last or (self.budget is not None and epoch == self.start_epoch)
        class_dice, improved = self._validate_epoch(row) if validated else (None, False)
        if not isinstance(self.scheduler, ReduceLROnPlateau) and self.budget is None:
            self.scheduler.step()
        row["epoch_seconds"] = time_budget.clock() - started
        self.metrics.add(row, draw=validated)
        if dist.is_main():
            saved = self.checkpoint(epoch + 1)
            save_checkpoint(saved, self.run_dir / LAST_CHECKPOINT)
            if improved:
                save_checkpoint(saved, self.run_dir / BEST_CHECKPOINT)
        if self.budget is not None:
            self.budget.epoch_done(self.steps_done, seconds=time_budget.clock() - started, step_seconds=self.step_seconds,
                                   validation_seconds=self.validation_seconds, validated=validated, last=last)
        record = EpochRecord(epoch + 1, tc.max_epochs, row, validated, improved, class_dice)
        log.info(_epoch_message(record))
        return record

    # ----------------------------------------------------------------- the whole run

    def fit(self, callbacks: Sequence[EpochCallback] = ()) -> TrainResult:
        """Run the remaining epochs (early stopping, the time budget and callbacks may end it sooner)."""
        tc = self.config.train
        stopped_early = False
        tracker = open_tracking(self.config, self.run_dir) if dist.is_main() else None
        hooks = [*callbacks, *([tracker.on_epoch] if tracker is not None else [])]
        ended: RunEnd = "FAILED"  # what the trackers record unless the loop below completes or is interrupted
        try:
            for epoch in range(self.start_epoch, tc.max_epochs):
                record = self.run_epoch(epoch)
                patience = tc.early_stopping_patience
                if record.validated and patience is not None and self.state.stale_validations >= patience:
                    log.info("early stopping: no better validation %s for %d validations", tc.selection_metric,
                             self.state.stale_validations)
                    stopped_early = True
                    break
                if any([bool(callback(record)) for callback in hooks]):  # every callback sees every epoch
                    log.info("stopping after epoch %d, as a callback asked", record.epoch)
                    break
                if self.budget is not None and self.budget.finished(self.steps_done):
                    break
            self._finish(tracker)
            ended = "FINISHED"
        except KeyboardInterrupt:
            ended = "KILLED"
            raise
        finally:
            if tracker is not None:
                tracker.close(ended)
        return self._result(stopped_early)

    def _finish(self, tracker: Tracker | None) -> None:
        """Draw the learning pictures, hand them to the trackers, and say what the session did."""
        pictures = [self.run_dir / "train_curve.png"]
        if self.snapshots is not None:
            pictures += self.snapshots.finish()
        if tracker is not None:
            tracker.log_pictures([p for p in pictures if p.is_file()])
        minutes = (time_budget.clock() - self.started) / 60
        epochs = len(self.metrics.rows) - self.start_epoch
        budget = f" (budget {self.budget.minutes:.3g} min)" if self.budget is not None else ""
        log.info("trained %d epochs (%d steps) in %.2f min%s", epochs, self.steps_done, minutes, budget)

    def _result(self, stopped_early: bool) -> TrainResult:
        best_row = next((r for r in self.metrics.rows if r["epoch"] == self.state.best_epoch), {})
        return TrainResult(
            self.run_dir, float(best_row.get("val_dice_mean", 0.0)), self.state.best_epoch, len(self.metrics.rows),
            dict(self.state.best_class_dice), stopped_early, best_iou=float(best_row.get("val_iou_mean", 0.0) or 0.0),
            minutes=(time_budget.clock() - self.started) / 60,
        )


def _epoch_message(record: EpochRecord) -> str:
    row = record.row
    message = f"epoch {record.epoch}/{record.max_epochs}: loss {row['train_loss']:.4f}, lr {row['lr']:.3g}, {row['epoch_seconds']:.1f} s"
    if record.class_dice is not None:
        per_class = ", ".join(f"{n} {d:.3f}" for n, d in record.class_dice.items())
        message += f", val Dice {row['val_dice_mean']:.4f} ({per_class}), IoU {row['val_iou_mean']:.4f}{' *best*' if record.improved else ''}"
    return message
