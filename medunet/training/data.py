"""Datasets and loaders for training and validation.

Deterministic preprocessing is cached (in memory with ``CacheDataset`` or on disk
with ``PersistentDataset``) so an epoch re-runs only the random transforms.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset, ThreadDataLoader, list_data_collate
from monai.transforms import Compose

from medunet._version import __version__
from medunet.config import Config, DataConfig, config_to_dict, non_preprocessing_fields
from medunet.errors import ConfigError, unwrap_error
from medunet.io.datalist import Case
from medunet.transforms import augmentation, preprocessing

CACHE_FORMAT = 2
"""What the cached chain stores; bump it when that changes (2: the per-class patch centres were added),
so a disk cache written by an older medunet is never read back by a newer one."""


def preprocessing_key(config: Config, *, num_classes: int, in_channels: int) -> str:
    """A short hash of everything that shapes the cached (preprocessed) data.

    The disk cache lives in a folder named by it, so a changed spacing, window or crop never
    reuses volumes cached under other settings.
    """
    data = config_to_dict(config.data)
    for irrelevant in non_preprocessing_fields(DataConfig):
        data.pop(irrelevant)
    payload = json.dumps(
        {"data": data, "classes": num_classes, "channels": in_channels, "version": __version__, "format": CACHE_FORMAT},
        sort_keys=True,
    )
    return hashlib.sha1(payload.encode()).hexdigest()[:12]


def make_dataset(
    cases: Sequence[Case], transform: Compose, config: Config, *, cache_dir: Path, progress: bool
) -> Dataset:
    """A dataset that caches ``transform`` up to its first random step, as ``data.cache`` says."""
    items = [c.as_dict() for c in cases]
    try:
        if config.data.cache == "memory":
            return CacheDataset(items, transform, num_workers=config.data.cache_workers, progress=progress)
        if config.data.cache == "disk":
            cache_dir.mkdir(parents=True, exist_ok=True)  # already keyed by preprocessing_key (see callers)
            return PersistentDataset(items, transform, cache_dir=cache_dir)
        return Dataset(items, transform)
    except Exception as exc:  # re-raise the typed error a transform raised, without MONAI's wrapper
        cause = unwrap_error(exc)
        if cause is exc:
            raise
        raise cause from cause.__cause__  # its own cause kept, MONAI's wrapper dropped


def augmentation_device(config: Config, train_device: torch.device) -> torch.device | None:
    """Where the random transforms after the crop run (``augmentation.device``); None: the CPU.

    On the GPU they need the loader's background thread (``data.loader_workers: 0``): CUDA does
    not work in forked worker processes.

    Raises:
        ConfigError: ``gpu`` was asked for while training on the CPU or with loader workers.
    """
    choice = config.augmentation.device
    on_gpu = train_device.type == "cuda"
    if choice == "gpu":
        if not on_gpu:
            raise ConfigError(f"augmentation.device=gpu needs training on a GPU, but train.device is {train_device}; use auto or cpu")
        if config.data.loader_workers:
            raise ConfigError(
                f"augmentation.device=gpu runs in the loader's thread, but data.loader_workers is {config.data.loader_workers}; "
                "set data.loader_workers=0 or augmentation.device=cpu"
            )
    if choice == "cpu" or not on_gpu or config.data.loader_workers:
        return None
    return train_device


def training_loader(
    cases: Sequence[Case],
    config: Config,
    *,
    num_classes: int,
    in_channels: int,
    cache_dir: Path,
    progress: bool,
    device: torch.device | None = None,
) -> tuple[Dataset, ThreadDataLoader, torch.Generator]:
    """Training dataset, its loader (shuffled, class-balanced patches) and the loader's generator.

    ``device`` is the training device (default: the CPU); it decides where augmentation runs.
    """
    pre = preprocessing(config, num_classes=num_classes, in_channels=in_channels, with_label=True)
    aug_device = augmentation_device(config, device or torch.device("cpu"))
    aug = augmentation(config, num_classes=num_classes, device=aug_device)
    dataset = make_dataset(cases, Compose([*pre.transforms, *aug.transforms]), config, cache_dir=cache_dir, progress=progress)
    generator = torch.Generator()
    loader = ThreadDataLoader(
        dataset,
        batch_size=min(config.train.batch_size, len(cases)),
        shuffle=True,
        drop_last=False,
        num_workers=config.data.loader_workers,
        collate_fn=list_data_collate,
        generator=generator,
        buffer_size=1,
        pin_memory=torch.cuda.is_available() and aug_device is None,  # patches already on the GPU need no pinning
    )
    return dataset, loader, generator


def validation_dataset(
    cases: Sequence[Case], config: Config, *, num_classes: int, in_channels: int, cache_dir: Path, progress: bool
) -> Dataset:
    """Whole preprocessed validation volumes with their labels."""
    pre = preprocessing(config, num_classes=num_classes, in_channels=in_channels, with_label=True)
    return make_dataset(cases, pre, config, cache_dir=cache_dir, progress=progress)


def batch_cases(batch: dict[str, Any]) -> list[str]:
    """Case names in a collated batch (for error messages)."""
    names = batch.get("case", [])
    return sorted(set(names)) if isinstance(names, (list, tuple)) else [str(names)]
