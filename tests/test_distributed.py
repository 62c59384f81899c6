"""Training under torchrun: 2 processes with DDP (Gloo on the CPU) against one process with the same global batch.

The comparison is exact in its mathematics: with augmentation off and the patch covering each whole
(preprocessed) volume, every sample is deterministic. Two training cases, one per rank with
batch_size 1, make each DDP step average the gradients of the same two volumes that the one-process
run (batch_size 2) puts in one batch; instance norm and a per-sample Dice make the loss a plain mean
over samples. What remains is float32 summation order, so results agree to float precision, not bits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medunet.cli import main
from medunet.config import config_from_dict
from medunet.model.networks import build_network
from medunet.synthetic import write_dataset
from medunet.training.distributed import split_among

PRESET = Path(__file__).resolve().parents[1] / "configs" / "ct.yaml"
NO_AUGMENTATION = [
    f"augmentation.{name}_prob=0"
    for name in ("flip", "rotate", "scale", "elastic", "intensity_scale", "intensity_shift", "gamma", "noise", "blur")
]
SETTINGS = [
    "data.target_spacing=[3.0,3.0,5.0]",
    "augmentation.patch_size=[16,16,16]",  # larger than every preprocessed volume: the crop is the whole volume
    "augmentation.samples_per_volume=1",
    *NO_AUGMENTATION,
    "model.features=[4,8,16]",
    "inference.sw_batch_size=2",
    "optim.lr=0.003",
    "optim.scheduler=constant",  # as the end-to-end resume test: --resume keeps the LR a cosine schedule had reached
    "train.iterations_per_epoch=2",
    "train.val_every=1",
    "train.amp=off",  # fp32: bf16 rounding would hide the float-precision agreement this test checks
]
WEIGHT_ATOL = 1e-4
"""Measured difference after 4 AdamW steps: 4e-6 (float32 summation order); one step may move a weight by lr = 3e-3."""
LOSS_RTOL = 1e-5
"""Measured: 5e-8 relative."""


def cli_args(datalist: Path, run: Path, *extra: str) -> list[str]:
    sets = [a for s in SETTINGS for a in ("--set", s)]
    return ["train", str(datalist), "-o", str(run), "-c", str(PRESET), "--device", "cpu", *sets, *extra]


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2 -m medunet ARGS``, as a user would start it."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "medunet", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One process (batch 2, 2 epochs); 2 processes (batch 1 each) for 1 epoch, then resumed to 2 epochs."""
    root = tmp_path_factory.mktemp("ddp")
    datalist = write_dataset(root / "data", num_train=4, num_test=0, shape=(32, 32, 20), num_classes=2)
    spec = json.loads(datalist.read_text())
    spec["training"], spec["validation"] = spec["training"][:2], spec["training"][2:]
    datalist.write_text(json.dumps(spec))

    single = root / "single"
    assert main(["-q", *cli_args(datalist, single, "--set", "train.batch_size=2", "--set", "train.max_epochs=2")]) == 0
    ddp = root / "ddp"
    first = torchrun(
        cli_args(datalist, ddp, "--set", "train.batch_size=1", "--set", "train.max_epochs=1", "--set", "data.cache=disk"),
        cwd=root,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    epoch1 = shutil.copy(ddp / "last.pt", root / "ddp_epoch1.pt")
    first_log = (ddp / "log.txt").read_text()
    resumed = torchrun(["train", str(datalist), "-o", str(ddp), "--resume", "--set", "train.max_epochs=2"], cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"single": single, "ddp": ddp, "epoch1": Path(epoch1), "first": first, "resumed": resumed, "first_log": first_log}


def test_split_among_ranks_is_disjoint_and_complete() -> None:
    for count in range(0, 11):
        items = [f"case_{i}" for i in range(count)]
        for ranks in (1, 2, 3, 4):
            shards = split_among(items, ranks, even=False)
            assert len(shards) == ranks
            assert sorted(sum(shards, [])) == sorted(items), "validation shards must hold each case exactly once"
            even = split_among(items, ranks, even=True)
            assert set(sum(even, [])) == set(items), "training shards must cover every case"
            assert len({len(s) for s in even}) == 1, "training shards must be equally long (same steps on every rank)"
            if count >= ranks:
                assert len(sum(even, [])) - count < ranks, "only the padding to equal length may repeat cases"
                assert all(len(set(s)) == len(s) for s in even)
    assert split_among(["a", "b", "c", "d", "e"], 2, even=True) == [["a", "c", "e"], ["b", "d", "a"]]


@pytest.mark.slow
def test_torchrun_writes_one_set_of_files(runs: dict[str, object]) -> None:
    single, ddp = Path(runs["single"]), Path(runs["ddp"])  # type: ignore[arg-type]
    assert sorted(p.name for p in ddp.iterdir() if p.name != "cache") == sorted(p.name for p in single.iterdir())
    log = (ddp / "log.txt").read_text()
    assert log.count("epoch 1/1: loss") == 1 and log.count("epoch 2/2: loss") == 1, log
    assert runs["first_log"].count("2 training / 2 validation cases") == 1  # type: ignore[union-attr]
    first: subprocess.CompletedProcess[str] = runs["first"]  # type: ignore[assignment]
    assert first.stderr.count("2 training / 2 validation cases") == 1, "rank 1 must log warnings only"
    assert first.stderr.count("data check:") == 1, "the pre-flight check runs on rank 0 only"
    assert first.stdout.count("best validation mean Dice") == 1
    cached = sorted(p.relative_to(ddp / "cache") for p in (ddp / "cache").rglob("*.pt"))
    assert [p.parts[1] for p in cached] == ["train", "train", "val", "val"], "each case preprocessed once, by its rank"


@pytest.mark.slow
def test_torchrun_equals_one_process_with_the_same_global_batch_and_resumes(runs: dict[str, object]) -> None:
    single = torch.load(Path(runs["single"]) / "last.pt", weights_only=True)  # type: ignore[arg-type]
    ddp = torch.load(Path(runs["ddp"]) / "last.pt", weights_only=True)  # type: ignore[arg-type]
    epoch1 = torch.load(runs["epoch1"], weights_only=True)  # type: ignore[arg-type]
    assert ddp["epoch"] == single["epoch"] == 2
    assert ddp["history"][0] == epoch1["history"][0], "resume must keep the first epoch's record"
    for a, b in zip(single["history"], ddp["history"]):
        assert a["lr"] == b["lr"]
        np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=LOSS_RTOL)
        np.testing.assert_allclose(b["val_dice_mean"], a["val_dice_mean"], rtol=LOSS_RTOL)
    worst = max((single["model"][k] - t).abs().max().item() for k, t in ddp["model"].items())
    moved = max((epoch1["model"][k] - t).abs().max().item() for k, t in ddp["model"].items())
    assert worst < WEIGHT_ATOL, f"DDP weights differ from one process by {worst:.2e}"
    assert moved > 10 * WEIGHT_ATOL, "the tolerance must be far below what one epoch changes"
    # the checkpoint holds the plain network's weights: it loads without DDP
    net = build_network(config_from_dict(ddp["config"]).model, in_channels=1, out_channels=2)
    net.load_state_dict(ddp["model"])


def test_world_size_without_torchrun_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", str(tmp_path / "dataset.json"), "-o", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "torchrun" in err and "RANK" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_crossval_under_torchrun_is_refused_with_the_alternative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["crossval", str(tmp_path / "dataset.json"), "-o", str(tmp_path / "cv")]) == 1
    assert "--fold K" in capsys.readouterr().err


def test_a_data_error_under_torchrun_is_printed_once(tmp_path: Path) -> None:
    datalist = write_dataset(tmp_path / "data", num_train=4, num_test=0, shape=(24, 24, 16), num_classes=2)
    missing = Path(json.loads(datalist.read_text())["training"][1]["label"])
    (datalist.parent / missing).unlink()
    result = torchrun(cli_args(datalist, tmp_path / "run"), cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.count("medunet: error:") == 1, result.stderr[-3000:]  # rank 0's reason, not one copy per rank
    error_line = result.stderr.split("medunet: error:")[1].splitlines()[0]
    assert "label" in error_line  # one line that says what is wrong
    frames = [line for line in result.stderr.splitlines() if line.strip().startswith("File ")]
    assert not any("/medunet/" in f for f in frames)  # no medunet traceback (torchrun prints its own about the failed ranks)
    assert not (tmp_path / "run" / "last.pt").exists()
