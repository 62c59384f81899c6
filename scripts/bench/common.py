"""What the benchmark scripts share: flags, synthetic data, a trainer on it, isolated sides, memory, results.

Every script in scripts/bench/ follows one contract (see scripts/bench/README.md):

* ``--quick`` runs every code path of the script on tiny data (volumes of a few dozen voxels a
  side, one or two steps) in seconds, and still writes its result file; the numbers mean nothing.
* ``--json PATH`` (alias ``--out``) writes the results as JSON; ``--threads`` sets torch's threads.
* ``main(argv)`` takes the argument list, so ``tests/test_bench_scripts.py`` runs each quick mode
  in one process.

Only the standard library is imported at module level: nnunet_side.py imports this file in
nnU-Net's own environment, which need not have medunet.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- flags and results


def bench_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark has: --quick, --json/--out, --threads."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"smoke run in seconds, numbers meaningless: {quick_help}")
    parser.add_argument("--json", "--out", dest="json", type=Path, help="write the results here (JSON)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every side")
    return parser


def start(threads: int) -> None:
    """What every run (and every isolated side) does first: thread count, and MONAI's deprecation notices off."""
    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)  # e.g. MONAI's Orientationd "labels" notice
    warnings.filterwarnings("ignore", category=UserWarning, module="monai")
    torch.set_num_threads(threads)


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` (when given) via a temporary name, so a killed run leaves no half file."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; cells are printed as given (format numbers before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def load_average() -> str:
    """The 1/5/15-minute load averages, to print with results measured on a shared machine."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---------------------------------------------------------------- time and memory


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (steadier than wall time on a shared machine)."""
    t = os.times()
    return t.user + t.system


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    """Resident set size now (VmRSS), MiB."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB.

    Not ``ru_maxrss``: Linux keeps it across fork + exec, so a subprocess would report its parent's
    peak whenever that is higher.
    """
    return _status_mib("VmHWM")


def timed_repeats(run: Callable[[], Any], repeats: int, *, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``run`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


# ---------------------------------------------------------------- isolated sides


def run_side(script: str, main: Callable[[list[str]], Any], argv: list[str], *, in_process: bool) -> dict[str, Any]:
    """Run one side of a benchmark (``script --worker ... argv``); its last stdout line is its JSON result.

    Normally in a fresh interpreter, so its peak RSS (VmHWM) is its own and nothing is shared with
    the other sides. ``in_process`` (the quick modes) calls the script's ``main`` here instead: the
    same arguments and code, without the seconds of a second torch start-up.
    """
    if in_process:
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            main(argv)
        out = captured.getvalue()
    else:
        done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{Path(script).name} {' '.join(argv[:2])} failed:\n{done.stderr[-4000:]}")
        out = done.stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- synthetic data


def synthetic_datalist(
    root: Path, *, cases: int, shape: Sequence[int], spacing: Sequence[float] = (1.5, 1.5, 2.5), seed: int = 0,
    validation: int = 0, num_classes: int = 2, test: int = 0,
) -> Path:
    """Synthetic CT phantoms (``medunet.synthetic.write_dataset``); the last ``validation`` cases form a "validation" list.

    ``test`` more cases (image and label) form the "test" list, for scripts that score held-out predictions.
    """
    from medunet.synthetic import write_dataset

    path = write_dataset(root, num_train=cases + validation, num_test=test, shape=tuple(shape), spacing=tuple(spacing),
                         num_classes=num_classes, seed=seed)
    if validation:
        datalist = json.loads(path.read_text())
        datalist["validation"] = datalist["training"][cases:]
        datalist["training"] = datalist["training"][:cases]
        path.write_text(json.dumps(datalist, indent=2))
    return path


def phantom_scan(
    path: Path, shape: Sequence[int], spacing: Sequence[float], *, axcodes: str = "RAS", seed: int = 0,
    origin: Sequence[float] = (0.0, 0.0, 0.0), int16: bool = False, modality: str = "CT",
) -> tuple[Path, Any]:
    """One phantom written as ``axcodes`` stores it (int16 HU as scanners store CT, or float32); returns (path, RAS label)."""
    import numpy as np

    from medunet.synthetic import as_stored, grid_affine, make_phantom, save_nifti

    image, label = make_phantom(tuple(shape), seed=seed, num_classes=2, modality=modality)
    stored = as_stored(image, axcodes)
    stored = np.round(stored).astype(np.int16) if int16 else stored.astype(np.float32)
    return save_nifti(stored, grid_affine(spacing, axcodes=axcodes, origin=origin), path), label


# ---------------------------------------------------------------- training


def bench_trainer(datalist: Path, run_dir: Path, config: Any, *, progress: bool = False) -> Any:
    """medunet's own :class:`~medunet.training.trainer.Trainer` on every training case of ``datalist``.

    Without a "validation" list in the datalist, the cases are handed over as a fold with an empty
    validation side (the public way to fix the split), so every case trains, as on the benchmark's
    other sides; with one, that list validates. Building it fills the cache.
    """
    from medunet.io.datalist import load_datalist
    from medunet.training.splits import Fold
    from medunet.training.trainer import Trainer

    listed = load_datalist(datalist)
    fold = None if listed.validation else Fold(0, tuple(c.name for c in listed.training), ())
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(datalist, run_dir, config, progress=progress, fold=fold)


def workdir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    """A temporary folder for a run's data and outputs, removed afterwards."""
    return tempfile.TemporaryDirectory(prefix=f"medunet-{prefix}-")
