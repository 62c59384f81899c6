"""Every benchmark script runs end to end in its ``--quick`` mode and writes its result file.

The benchmarks measure the library through its public API (Trainer.step, train's callbacks,
build_network, Segmenter), so a change there that breaks a script fails here, not months later
when someone re-measures. Each script's ``main(argv)`` runs in this process (a fresh interpreter
per script would cost more than the runs themselves); nnU-Net is forced absent, so its side is
skipped with the agreed message and medunet's side still runs.

To add a script: one entry in QUICK_RUNS (file, extra arguments, the JSON keys it must write, and
a check of its results that a user would make). The ``--quick`` contract is in scripts/bench/README.md.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench"
SKIPPED = "nnU-Net v2 not installed: peer side skipped"


def _all_on_grid(result: dict[str, Any]) -> bool:
    return all(run["on_input_grid"] for volume in result["volumes"].values() for run in volume["runs"].values())


def _throughput_sides(result: dict[str, Any]) -> bool:
    return all(r["steps"] >= 1 and r["patches_per_s"] > 0 for r in result["results"].values())


def _crf_rows(result: dict[str, Any]) -> bool:
    """Every setting scored (Dice in [0, 1]); the CRF settings spent time in the CRF, the plain one none."""
    rows = {row["setting"]: row for row in result["rows"]}
    dice_ok = all(0.0 <= d <= 1.0 for row in rows.values() for d in row["dice"].values())
    return dice_ok and rows.pop("none")["crf_seconds_per_case"] == 0.0 and len(rows) == 2 and all(
        row["crf_seconds_per_case"] > 0 for row in rows.values())


def _qc_ranking(result: dict[str, Any]) -> bool:
    """Calibration statistics in range (None: undefined on a few cases), and every corrupted kind flagged for review."""
    from medunet.synthetic import CORRUPTIONS

    calibration = result["calibration"]
    in_range = (calibration["spearman"] is None or -1.0 <= calibration["spearman"] <= 1.0) and (
        calibration["auroc"] is None or 0.0 <= calibration["auroc"] <= 1.0)
    flagged = all(result["corrupted"][kind]["flag"] == "review" and result["corrupted"][kind]["reasons"] for kind in CORRUPTIONS)
    return in_range and flagged and result["overhead"]["qc_seconds"] > 0


def _qc_calibration(result: dict[str, Any]) -> bool:
    """Both sides of every model measured (rates and statistics in range), graded sets from severity 0 to 1, every corrupted kind flagged."""
    from medunet.synthetic import CORRUPTIONS

    def in_range(s: dict[str, Any]) -> bool:
        counts = s["bad_flagged"] <= s["bad_cases"] and s["good_flagged"] <= s["cases"] - s["bad_cases"]
        return counts and 0.0 <= s["false_alarm_rate"] <= 1.0 and 0.0 <= s["good_flagged_rate"] <= 1.0 and all(
            s[k] is None or -1.0 <= s[k] <= 1.0 for k in ("spearman", "auroc"))

    def graded(s: dict[str, Any]) -> bool:
        severity = [c["severity"] for c in s["per_case"]]
        return s["cases"] == len(severity) >= 3 and min(severity) == 0.0 and max(severity) == 1.0

    sets = {"demo": ("clean", "graded"), "planned": ("clean", "graded"), "absent_class": ("lesion_free", "lesion")}
    measured = all(in_range(result[m][side][name]) for m, names in sets.items() for side in ("calibrated", "defaults") for name in names)
    measured &= all(graded(result[m][side]["graded"]) for m in ("demo", "planned") for side in ("calibrated", "defaults"))
    flagged = all(result[m][side]["corrupted"]["per_kind"][kind]["flag"] == "review"
                  for m in ("demo", "planned") for side in ("calibrated", "defaults") for kind in CORRUPTIONS)
    return measured and flagged and set(result["absent_class"]["old_rule"]) == {"calibrated", "defaults"}


def _engines_agree(result: dict[str, Any]) -> bool:
    """Both modalities ran; both engines' masks are on the input grid and agree (Dice >= 0.99 on a non-empty mask)."""
    runs = result["results"]
    return set(runs) == {"CT", "MRI"} and all(
        run["torch"]["on_input_grid"] and run["onnxruntime"]["on_input_grid"] and run["foreground_fraction"] > 0
        and min(run["dice_torch_vs_onnxruntime"].values()) >= 0.99 for run in runs.values())


#: id: (script, extra arguments, keys its JSON must have, a check of the results, whether it consults nnU-Net)
QUICK_RUNS: dict[str, tuple[str, list[str], set[str], Callable[[dict[str, Any]], bool], bool]] = {
    "train_throughput": (
        "train_throughput.py", [], {"setup", "args", "results"},
        lambda r: _throughput_sides(r) and {"monai-tutorial (Dataset+DataLoader)", "medunet, default augmentation"} <= set(r["results"]),
        False,
    ),
    "train_throughput_nnunet": (
        "train_throughput.py", ["--nnunet"], {"setup", "plan", "results", "nnunetv2"},
        lambda r: _throughput_sides(r) and r["nnunetv2"] is None and not any("nnU-Net" in name for name in r["results"]),
        True,
    ),
    "time_to_accuracy": (
        "time_to_accuracy.py", [], {"setup", "ratio", "results"},
        lambda r: all(len(side["curve"]) == 1 and 0.0 <= side["curve"][0][1] <= 1.0 for side in r["results"].values()),
        False,
    ),
    "step_options": (
        "step_options.py", [], {"setup", "step_s", "warmup_s"},
        lambda r: set(r["step_s"]) == {"fp32", "bf16 autocast", "fp32, channels_last_3d", "bf16, channels_last_3d"},
        False,
    ),
    "inference_latency": (
        "inference_latency.py", [], {"setup", "results"},
        lambda r: r["results"]["quick"]["agreement"]["on_input_grid"] == {"medunet": True, "monai": True},
        False,
    ),
    "ct512_inference": (
        "ct512_inference.py", [], {"meta", "results"},
        lambda r: r["results"]["medunet"]["on_input_grid"] and r["results"]["monai"]["on_input_grid"],
        False,
    ),
    "batch_overlap": (
        "batch_overlap.py", [], {"results", "speedup", "identical_masks"}, lambda r: r["identical_masks"] is True, False,
    ),
    "overlap_tradeoff": (
        "overlap_tradeoff.py", [], {"results"},
        lambda r: len(r["results"]) == 6 and all(0.0 <= s["dice_mean"] <= 1.0 for s in r["results"].values()),
        False,
    ),
    "inference_vs_nnunet": (
        "inference_vs_nnunet.py", [], {"setup", "plan", "training", "volumes"},
        lambda r: _all_on_grid(r) and r["nnunetv2"] is None and all("medunet" in s for s in r["settings"]),
        True,
    ),
    "crf": ("crf.py", [], {"epochs", "test_cases", "rows"}, _crf_rows, False),
    "crf_phantom": (
        "crf_phantom.py", [], {"setup", "rows"},
        lambda r: all(r["crf_seconds"] > 0 and all(0.0 <= d <= 1.0 for d in r["dice_before"] + r["dice_after"]) for r in r["rows"]),
        False,
    ),
    "qc_ranking": ("qc_ranking.py", [], {"calibration", "corrupted", "overhead"}, _qc_ranking, False),
    "qc_calibration": ("qc_calibration.py", [], {"demo", "planned", "absent_class"}, _qc_calibration, False),
    "export_engines": ("export_engines.py", [], {"meta", "results"}, _engines_agree, False),
    "budget_schedule": (
        "budget_schedule.py", [], {"meta", "results"},
        lambda r: len(r["results"]) == 2 and all(0.0 <= d <= 1.0 and x["final_lr"] > 0 for x in r["results"] for d in x["dice"].values()),
        False,
    ),
}


def _load(script: str) -> ModuleType:
    """The script as a module (scripts/bench is not a package; its siblings import each other by name)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}", BENCH / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_script_has_a_quick_run() -> None:
    """A new script in scripts/bench/ must join QUICK_RUNS (helpers that measure nothing are listed here)."""
    helpers = {"common.py", "tutorial.py", "nnunet_peer.py", "nnunet_side.py"}
    covered = {entry[0] for entry in QUICK_RUNS.values()}
    assert {p.name for p in BENCH.glob("*.py")} - helpers == covered


@pytest.mark.slow
@pytest.mark.parametrize("run_id", list(QUICK_RUNS))
def test_quick_mode_runs_and_writes_its_results(
    run_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script, extra, keys, check, consults_nnunet = QUICK_RUNS[run_id]
    monkeypatch.setenv("NNUNET_PYTHON", str(tmp_path / "no-nnunet" / "python"))  # nnU-Net absent, whatever the machine has
    out = tmp_path / "result.json"
    _load(script).main(["--quick", "--threads", "1", "--json", str(out), *extra])
    result = json.loads(out.read_text())
    assert keys <= set(result), f"{script} wrote {sorted(result)}"
    assert check(result), f"{script} --quick wrote implausible results: {json.dumps(result)[:2000]}"
    if consults_nnunet:
        assert SKIPPED in capsys.readouterr().err


def _load_gpu_check() -> ModuleType:
    path = BENCH.parent / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_refuses_cleanly_without_cuda(tmp_path: Path) -> None:
    import os
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot happen here")
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(BENCH.parent / "gpu_check.sh"), str(out)], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert "no CUDA device" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.slow
def test_gpu_check_runs_its_cpu_paths(tmp_path: Path) -> None:
    """With --device cpu the checks that have a CPU path run for real; the CUDA-only ones say they were skipped."""
    out = tmp_path / "gpu.json"
    assert _load_gpu_check().main([str(out), "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert report["passed"] is True and report["failed"] == []
    assert {name for name, c in checks.items() if c["passed"] is None} == {"amp_fp16", "stitching", "ddp", "planner_memory"}
    assert checks["amp_bf16"]["autocast"] == "torch.bfloat16" and not checks["amp_bf16"]["grad_scaler"]
    assert checks["gpu_augmentation"]["max_image_difference"] == 0.0  # on the CPU the "moved" chain is the host chain
    assert checks["end_to_end"]["on_input_grid"] is True
