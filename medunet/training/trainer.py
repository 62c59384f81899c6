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

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm.auto import tqdm

from medunet import __version__
from medunet.config import Config, config_to_dict, save_config
from medunet.errors import ConfigError, DataError, MedunetError, TrainingError, unwrap_error
from medunet.io.datalist import Case, Datalist, load_datalist, split_cases
from medunet.model.checkpoint import FORMAT_VERSION, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from medunet.model.networks import SegmentationNetwork, build_network
from medunet.model.sliding import predict_probabilities
from medunet.runtime import amp_dtype, autocast, derived_seed, seed_everything
from medunet.training import distributed as dist
from medunet.training.data import batch_cases, preprocessing_key, training_loader, validation_dataset
from medunet.training.optim import build_optimizer, build_scheduler, continue_schedule
from medunet.training.records import MetricsLog, dice_column, write_split
from medunet.training.splits import Fold

log = logging.getLogger("medunet")


@dataclass
class TrainResult:
    """What a training run achieved."""

    run_dir: Path
    best_dice: float
    best_epoch: int
    epochs_completed: int
    class_dice: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False


def resolve_labels(datalist: Datalist, config: Config) -> dict[int, str]:
    """Class names: the datalist's "labels", else data.labels, else found from the training labels."""
    if datalist.labels:
        return datalist.labels
    if config.data.labels:
        return {int(k): v for k, v in config.data.labels.items()}
    highest = 0
    for case in datalist.training:
        assert case.label is not None
        data = np.asarray(nib.load(str(case.label)).dataobj)
        highest = max(highest, int(np.nanmax(data)) if data.size else 0)
    log.warning("no \"labels\" in the datalist or config; found classes 0..%d in the training labels", highest)
    return {i: ("background" if i == 0 else f"class_{i}") for i in range(max(highest, 1) + 1)}


def split_for_run(
    datalist: Datalist, config: Config, run_dir: Path, resume: bool, fold: Fold | None = None
) -> tuple[list[Case], list[Case]]:
    """Training and validation cases: a cross-validation fold, the datalist's lists, the saved split on resume, or a new seeded split."""
    if fold is not None:
        if datalist.validation:
            raise ConfigError(f'{datalist.path} has a "validation" list, which fixes the split; it cannot be combined with folds')
        by_name = {c.name: c for c in datalist.training}
        missing = sorted(set(fold.train + fold.val) - set(by_name))
        if missing:
            raise DataError(f"fold {fold.index} names cases the datalist does not have: {missing[:5]}", path=str(datalist.path))
        train, val = [by_name[n] for n in fold.train], [by_name[n] for n in fold.val]
        if dist.is_main():
            write_split(run_dir, fold.train, fold.val, seed=config.data.split_seed, source=f"fold {fold.index}")
        return train, val
    if datalist.validation:
        train, val = list(datalist.training), list(datalist.validation)
        if dist.is_main():
            write_split(run_dir, [c.name for c in train], [c.name for c in val], seed=config.data.split_seed, source="datalist")
        return train, val
    saved = run_dir / "split.json"
    if resume and saved.is_file():
        import json

        names = set(json.loads(saved.read_text())["validation"])
        return [c for c in datalist.training if c.name not in names], [c for c in datalist.training if c.name in names]
    train, val = split_cases(datalist.training, val_fraction=config.data.val_fraction, seed=config.data.split_seed)
    if dist.is_main():
        write_split(run_dir, [c.name for c in train], [c.name for c in val], seed=config.data.split_seed, source="random")
    return train, val


class DeepSupervisionLoss(torch.nn.Module):
    """DiceCE on the main output plus halving-weight DiceCE on each deep-supervision head."""

    def __init__(self, config: Config, num_classes: int) -> None:
        super().__init__()
        lc = config.loss
        weight = torch.tensor(lc.class_weights, dtype=torch.float32) if lc.class_weights else None
        if weight is not None and len(weight) != num_classes:
            raise DataError(f"loss.class_weights needs {num_classes} values (one per class), got {len(weight)}")
        self.dice_ce = DiceCELoss(
            include_background=lc.include_background,
            to_onehot_y=True,
            softmax=True,
            lambda_dice=lc.dice_weight,
            lambda_ce=lc.ce_weight,
            weight=weight,
        )

    def forward(self, outputs: list[torch.Tensor], label: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        weights = [0.5**i for i in range(len(outputs))]
        total = sum(w * self.dice_ce(o.float(), label) for w, o in zip(weights, outputs))
        return total / sum(weights)  # type: ignore[return-value]


def _cycle(loader: Any, count: int) -> Iterator[dict[str, Any]]:
    done = 0
    while done < count:
        for batch in loader:
            yield batch
            done += 1
            if done >= count:
                return


@torch.no_grad()
def validate(
    model: SegmentationNetwork, dataset: Any, config: Config, *, num_classes: int, device: torch.device, amp: torch.dtype | None
) -> np.ndarray:
    """Mean Dice per foreground class over the validation volumes (NaN for classes absent everywhere).

    Under torchrun each rank passes its shard of the volumes; the per-class sums and counts of all
    ranks are added, so the result is the mean over every validation volume, the same on each rank.
    """
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    for i in range(len(dataset)):
        item = dataset[i]
        image = torch.as_tensor(item["image"])[None]
        label = torch.as_tensor(item["label"])[None].to(device)
        probs = predict_probabilities(model, image, config, device=device, amp=amp)
        pred = one_hot(probs.max(dim=1, keepdim=True).indices, num_classes)  # faster than argmax on CPU
        metric(y_pred=pred, y=one_hot(label.long(), num_classes))
    if not dist.is_distributed():
        return metric.aggregate().cpu().numpy().astype(np.float64)
    scores = metric.get_buffer() if len(dataset) else None  # (volumes, classes); NaN where a class is absent
    per_case = np.zeros((0, num_classes - 1)) if scores is None else scores.cpu().numpy().astype(np.float64)
    found = np.isfinite(per_case)
    sums = dist.all_reduce_sum(np.stack([np.where(found, per_case, 0.0).sum(0), found.sum(0)]))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums[1] > 0, sums[0] / np.maximum(sums[1], 1), np.nan)


def train_epoch(
    model: torch.nn.Module,
    loader: Any,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: Config,
    *,
    iterations: int,
    device: torch.device,
    amp: torch.dtype | None,
    desc: str,
    progress: bool,
) -> list[float]:
    """Run ``iterations`` optimisation steps of ``model`` (a network, or one wrapped in DDP); return the loss of each.

    Raises:
        TrainingError: the loss is NaN/Inf (the batch's cases are named; nothing is saved).
        DataError: a case failed to load while the loader filled a batch.
    """
    model.train()
    losses: list[float] = []
    bar = tqdm(total=iterations, desc=desc, unit="batch", disable=not progress, leave=False)
    try:
        for batch in _cycle(loader, iterations):
            # plain tensors: the patches' metadata is not needed here, and MetaTensor dispatch costs
            # time on every op and breaks torch.compile
            image, label = (torch.Tensor.as_subclass(batch[key], torch.Tensor).to(device) for key in ("image", "label"))
            if config.train.channels_last:
                image = image.contiguous(memory_format=torch.channels_last_3d)
            with autocast(device, amp):
                loss = loss_fn(model(image), label)
            finite = bool(torch.isfinite(loss))
            if not dist.all_true(finite):  # under torchrun every rank stops at the same step
                where = f"on a batch of cases {batch_cases(batch)}" if not finite else "on another rank's batch"
                raise TrainingError(
                    f"loss became {loss.item() if not finite else 'non-finite'} during {desc} {where}; "
                    "stopped before saving anything from it. Lower optim.lr or check those cases"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.optim.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
            bar.update()
    except RuntimeError as exc:  # a transform error inside the loader arrives wrapped by MONAI
        cause = unwrap_error(exc)
        if isinstance(cause, MedunetError) and cause is not exc:
            raise cause from None
        raise
    finally:
        bar.close()
    return losses


def train(
    datalist_path: str | Path,
    run_dir: str | Path,
    config: Config,
    *,
    resume: bool = False,
    progress: bool = True,
    fold: Fold | None = None,
) -> TrainResult:
    """Train (or resume) a model on a datalist; see the module docstring for the run folder.

    With ``fold`` (see :mod:`medunet.training.splits`) the fold's train/val case names replace the split.
    Started by torchrun, it joins the process group (if the caller has not) and trains with DDP.

    Raises:
        MedunetError: bad data, config or checkpoint, or a non-finite loss.
    """
    with dist.session():
        return _train_in_session(Path(datalist_path), Path(run_dir), config, resume=resume, progress=progress, fold=fold)


def _train_in_session(
    datalist_path: Path, run_dir: Path, config: Config, *, resume: bool, progress: bool, fold: Fold | None
) -> TrainResult:
    """:func:`train` once the process group (if any) is up: only rank 0 keeps ``log.txt``."""
    last_path = run_dir / "last.pt"
    if resume and not last_path.is_file():
        raise TrainingError(f"cannot resume: {last_path} does not exist")
    if not resume and last_path.exists():
        raise TrainingError(f"run folder {run_dir} already holds a training run; pass --resume to continue it or choose another -o")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not dist.is_main():
        progress = False
        result = _train(datalist_path, run_dir, config, resume=resume, progress=progress, fold=fold)
        dist.barrier()  # return once rank 0 has written the last files
        return result
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        result = _train(datalist_path, run_dir, config, resume=resume, progress=progress, fold=fold)
        dist.barrier()
        return result
    except MedunetError as exc:  # keep the reason in the run's log.txt too (the caller reports it)
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (exc,), None))
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


def _train(datalist_path: Path, run_dir: Path, config: Config, *, resume: bool, progress: bool, fold: Fold | None) -> TrainResult:
    tc = config.train
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    device = dist.device_for(tc.device)
    amp = amp_dtype(tc.amp, device)
    datalist = load_datalist(datalist_path, allow_outside_root=config.data.allow_outside_root)
    labels = resolve_labels(datalist, config)
    class_names = [labels[i] for i in sorted(labels)]
    num_classes = len(class_names)
    in_channels = len(datalist.training[0].image)
    train_cases, val_cases = split_for_run(datalist, config, run_dir, resume, fold)
    if dist.is_main():
        save_config(config, run_dir / "config.yaml")
    log.info(
        "medunet %s: %d training / %d validation cases, %d classes %s, device %s%s%s",
        __version__, len(train_cases), len(val_cases), num_classes, class_names, device,
        f", AMP {amp}" if amp else "",
        f"; {dist.world_size()} processes, global batch {tc.batch_size * dist.world_size()}" if dist.is_distributed() else "",
    )
    train_cases, val_cases = dist.shard(train_cases, even=True), dist.shard(val_cases, even=False)

    cache_root = Path(config.data.cache_dir) if config.data.cache_dir else run_dir / "cache"
    cache_dir = cache_root / preprocessing_key(config, num_classes=num_classes, in_channels=in_channels)
    seed_everything(tc.seed)
    share = " (rank 0's share)" if dist.is_distributed() else ""
    log.info("preprocessing and caching %d volumes%s", len(train_cases) + len(val_cases), share)
    train_ds, loader, generator = training_loader(
        train_cases, config, num_classes=num_classes, in_channels=in_channels, cache_dir=cache_dir / "train", progress=progress,
        device=device,
    )
    val_ds = validation_dataset(
        val_cases, config, num_classes=num_classes, in_channels=in_channels, cache_dir=cache_dir / "val", progress=progress
    )

    model = build_network(config.model, in_channels=in_channels, out_channels=num_classes).to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    loss_fn = DeepSupervisionLoss(config, num_classes).to(device)
    optimizer = build_optimizer(config.optim, model)
    scheduler = build_scheduler(config.optim, optimizer, tc.max_epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    metrics = MetricsLog(run_dir, class_names[1:], write=dist.is_main())
    best_dice, best_epoch, stale, start_epoch = -1.0, 0, 0, 0
    class_dice: dict[str, float] = {}
    if resume:
        state = load_checkpoint(last_path)  # on the CPU: RNG states must stay there; load_state_dict moves the rest
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        continue_schedule(scheduler, config.optim, tc.max_epochs)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        start_epoch = int(state["epoch"])
        best_dice, best_epoch, stale = float(state["best_dice"]), int(state["best_epoch"]), int(state["stale_validations"])
        class_dice = {str(k): float(v) for k, v in state.get("best_class_dice", {}).items()}
        metrics = MetricsLog(run_dir, class_names[1:], rows=state["history"][:start_epoch], write=dist.is_main())
        metrics.write_csv()
        log.info("resuming after epoch %d (best mean Dice %.4f at epoch %d)", start_epoch, best_dice, best_epoch)

    def checkpoint(epoch: int) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "medunet_version": __version__,
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": capture_rng(),
            "config": config_to_dict(config),
            "labels": {str(i): n for i, n in enumerate(class_names)},
            "in_channels": in_channels,
            "modality": datalist.modality or config.data.modality,
            "best_dice": best_dice,
            "best_epoch": best_epoch,
            "stale_validations": stale,
            "best_class_dice": class_dice,
            "history": metrics.rows,
        }

    iterations = tc.iterations_per_epoch or len(loader)  # equal on every rank: training shards are equally long
    trained = dist.wrap(model, device)  # DDP under torchrun; ``model`` stays the plain network (validation, checkpoints)
    if tc.compile:
        log.info("compiling the network (torch.compile): the first steps are slow")
        trained = torch.compile(trained)  # type: ignore[assignment]
    stopped_early = False
    for epoch in range(start_epoch, tc.max_epochs):
        started = time.perf_counter()
        epoch_seed = derived_seed(tc.seed, epoch, rank=dist.rank())
        seed_everything(epoch_seed)
        train_ds.transform.set_random_state(seed=epoch_seed)  # type: ignore[union-attr]
        generator.manual_seed(epoch_seed)
        losses = train_epoch(
            trained, loader, loss_fn, optimizer, scaler, config,
            iterations=iterations, device=device, amp=amp, desc=f"epoch {epoch + 1}/{tc.max_epochs}", progress=progress,
        )
        lr = optimizer.param_groups[0]["lr"]
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": dist.all_reduce_mean(float(np.mean(losses))), "lr": lr}
        validated = (epoch + 1) % tc.val_every == 0 or epoch + 1 == tc.max_epochs
        improved = False
        if validated:
            dice = dist.broadcast(validate(model, val_ds, config, num_classes=num_classes, device=device, amp=amp))
            mean = float(np.nanmean(dice)) if np.isfinite(dice).any() else 0.0
            class_dice_now = {n: float(d) for n, d in zip(class_names[1:], dice)}
            row["val_dice_mean"] = mean
            row.update({dice_column(n): d for n, d in class_dice_now.items()})
            improved = mean > best_dice
            if improved:
                best_dice, best_epoch, stale, class_dice = mean, epoch + 1, 0, class_dice_now
            else:
                stale += 1
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(mean)
        if not isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step()
        row["epoch_seconds"] = time.perf_counter() - started
        metrics.add(row, draw=validated)
        if dist.is_main():
            state = checkpoint(epoch + 1)
            save_checkpoint(state, last_path)
            if improved:
                save_checkpoint(state, best_path)
        message = f"epoch {epoch + 1}/{tc.max_epochs}: loss {row['train_loss']:.4f}, lr {lr:.3g}, {row['epoch_seconds']:.1f} s"
        if validated:
            per_class = ", ".join(f"{n} {d:.3f}" for n, d in zip(class_names[1:], dice))
            message += f", val Dice {row['val_dice_mean']:.4f} ({per_class}){' *best*' if improved else ''}"
        log.info(message)
        patience = tc.early_stopping_patience
        if validated and patience is not None and stale >= patience:
            log.info("early stopping: no better validation Dice for %d validations", stale)
            stopped_early = True
            break
    if math.isinf(best_dice) or best_dice < 0:
        best_dice = 0.0
    return TrainResult(run_dir, best_dice, best_epoch, len(metrics.rows), class_dice, stopped_early)
