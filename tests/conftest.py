"""Models trained once per test session, the way users train them, for every test that claims something about a user's model.

Features were once proven on hand-built or untrained checkpoints and then broke on the first model a
user trained (export crashed, QC flagged clean cases). So QC, export, DICOM outputs, evaluation, the
Segmenter API and the benchmarks' quick runs use these instead:

* :func:`trained_run` — ``medunet train -c <demo-style config>`` through the CLI on the demo's kind of
  data (synthetic CT phantoms, organ + vessel, RAS and LPS files), the default config apart from size;
  it must reach a test Dice of at least :data:`MIN_TEST_DICE`;
* :func:`planned_run` — ``medunet plan`` then ``medunet train -c plan.yaml`` on the same data;
* :func:`crossval_root` — ``medunet crossval --folds 2`` on the same data.

Each is trained on first use and shared by every module after that (session scope), and, when the
suite runs in several processes (pytest-xdist, as ``make test`` does), by every process: the first
to need a model trains it under a file lock and the others wait for it (:func:`build_once`). Tests
must treat them as read-only: copy a folder before changing it (:func:`copy_run`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from filelock import FileLock

from medunet.cli import main
from medunet.evaluation import dice_per_class
from medunet.io.nifti import read_nifti, read_voxels
from medunet.synthetic import write_dataset

#: The demo's data at a smaller size (the demo writes 64 x 64 x 40 voxels; training time grows with the volume).
DATA_SHAPE = (48, 48, 32)
NUM_TRAIN, NUM_TEST = 10, 4
#: What a user would change from the defaults to train fast on a small CPU: size only (network, patch, steps).
SIZE = (
    "data.target_spacing=[2.0,2.0,2.5]",
    "augmentation.patch_size=[32,32,24]",
    "model.features=[4,8,16]",
    "train.max_epochs=6",
    "train.iterations_per_epoch=16",
    "train.batch_size=2",
    "train.val_every=3",
    "optim.lr=0.02",
    "optim.warmup_epochs=1",
    "inference.sw_batch_size=2",
    "postprocessing.default.keep_largest=true",
)
#: The test Dice (mean over classes and test cases) the shared plain model must reach to count as "trained".
MIN_TEST_DICE = 0.85
PRESET = Path(__file__).resolve().parents[1] / "configs" / "ct.yaml"


@dataclass(frozen=True)
class Dataset:
    """The shared synthetic dataset: ``dataset.json`` with labelled ``"test"`` entries."""

    root: Path
    datalist: Path

    @property
    def test_cases(self) -> list[tuple[str, Path, Path]]:
        """(name, image, label) of every test case."""
        entries = json.loads(self.datalist.read_text())["test"]
        return [(Path(e["image"]).name.removesuffix(".nii.gz"), self.root / e["image"], self.root / e["label"]) for e in entries]

    @property
    def test_dir(self) -> Path:
        return self.root / "imagesTs"


def sets(overrides: Sequence[str]) -> list[str]:
    """``--set`` arguments for the CLI."""
    return [arg for o in overrides for arg in ("--set", o)]


def cli(*args: str) -> None:
    """Run a medunet command as a user would; fail the fixture with the command line if it does not succeed."""
    status = main(["-q", *args])
    assert status == 0, f"medunet {' '.join(args)} exited {status}"


def mean_test_dice(pred_dir: Path, dataset: Dataset, num_classes: int = 3) -> float:
    """Mean Dice over classes and test cases of the masks ``medunet infer`` wrote to ``pred_dir``."""
    scores = []
    for name, _, label in dataset.test_cases:
        pred = read_voxels(read_nifti(pred_dir / f"{name}.nii.gz"), case=name, path=None, dtype=np.int64)
        ref = read_voxels(read_nifti(label), case=name, path=None, dtype=np.int64)
        scores.append(dice_per_class(pred, ref, num_classes))
    return float(np.mean(scores))


def copy_run(source: Path, target: Path) -> Path:
    """A private copy of a shared run folder (without its cache) that a test may change."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("cache"))
    return target


XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def pytest_configure(config: pytest.Config) -> None:
    """In a worker process of a parallel run, one torch thread (and one for its subprocesses): the workers share the cores."""
    if XDIST_WORKER is not None:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def build_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder ``name``, made by ``build(folder)`` once per test session, however many worker processes ask.

    The first process to ask builds it under a file lock; the others wait, then reuse it. A folder left
    by a build that failed is rebuilt (``<name>.done`` marks a finished one).
    """
    base = tmp_path_factory.getbasetemp()
    if XDIST_WORKER is not None:
        base = base.parent  # the session's folder, above each worker's own (pytest-N/popen-gwK)
    shared = base / "shared"
    shared.mkdir(exist_ok=True)
    target, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            if target.exists():
                shutil.rmtree(target)
            build(target)
            done.touch()
    return target


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    root = build_once(tmp_path_factory, "data", lambda root: write_dataset(
        root, num_train=NUM_TRAIN, num_test=NUM_TEST, shape=DATA_SHAPE, num_classes=3, seed=0))
    return Dataset(root, root / "dataset.json")


@pytest.fixture(scope="session")
def trained_run(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder trained by ``medunet train -c configs/ct.yaml`` (size overrides only), with its calibrated ``qc.json``."""
    return build_once(tmp_path_factory, "plain", lambda run: cli(
        "train", str(dataset.datalist), "-o", str(run), "-c", str(PRESET), "--device", "cpu", *sets(SIZE)))


@pytest.fixture(scope="session")
def trained_predictions(trained_run: Path, dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``medunet infer`` of the shared plain model on the test images (masks and inference_report.json)."""
    return build_once(tmp_path_factory, "plain_predictions", lambda out: cli(
        "infer", "-m", str(trained_run), "-i", str(dataset.test_dir), "-o", str(out), "--device", "cpu"))


@pytest.fixture(scope="session")
def planned_run(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``medunet plan`` then ``medunet train -c plan.yaml``, the network made small (features, epochs) as for the plain run.

    The plan keeps its depth (4 levels here) and starts at 8 features: at 4 (4-8-16-32) the 96 steps never
    learned the vessel (test Dice organ 0.94, vessel 0.00), at 8 they reach 0.96 / 0.98.
    """
    def plan_and_train(root: Path) -> None:
        root.mkdir()
        plan = root / "plan.yaml"
        cli("plan", str(dataset.datalist), "-o", str(plan))
        size = [o for o in SIZE if not o.startswith(("data.target_spacing", "augmentation.patch_size", "model.features"))]
        levels = len(yaml.safe_load(plan.read_text())["model"]["strides"])  # the plan's strides fix the number of levels
        features = [8 * 2**k for k in range(levels)]
        cli("train", str(dataset.datalist), "-o", str(root / "run"), "-c", str(plan), "--device", "cpu",
            *sets([*size, f"model.features={features}".replace(" ", ""), "augmentation.patch_size=[32,32,24]"]))

    return build_once(tmp_path_factory, "planned", plan_and_train) / "run"


@pytest.fixture(scope="session")
def crossval_root(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``medunet crossval --folds 2`` with the plain run's config (a fold ensemble, chosen post-processing, calibrated QC)."""
    size = [*SIZE, "postprocessing.crf.search=false"]
    return build_once(tmp_path_factory, "crossval", lambda root: cli(
        "crossval", str(dataset.datalist), "-o", str(root), "--folds", "2", "-c", str(PRESET), "--device", "cpu", *sets(size)))


#: The shared models each worker of a parallel run trains first (worker k: group k modulo the number of
#: workers), so that they are trained side by side at the start instead of one worker waiting for another's.
PREBUILD = (("trained_run", "trained_predictions", "planned_run"), ("crossval_root",))


@pytest.fixture(scope="session", autouse=True)
def _prebuild_shared_models(request: pytest.FixtureRequest) -> None:
    """Under pytest-xdist, train this worker's group of :data:`PREBUILD` when any collected test uses one of them."""
    if XDIST_WORKER is None:
        return
    index, count = int(XDIST_WORKER.removeprefix("gw")), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    used = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    for k, group in enumerate(PREBUILD):
        if k % count == index:
            for name in group:
                if name in used:
                    request.getfixturevalue(name)
