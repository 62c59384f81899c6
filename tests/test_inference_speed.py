"""Inference at scale: where windows are stitched, overlapped IO in batch mode, sharded batches and resume.

The network is a real DynUNet with seeded random weights: its masks are arbitrary but depend on every
input voxel, so "identical masks" between two ways of running a batch means the same work was done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medunet.cli import EXIT_ERROR, main
from medunet.config import config_to_dict, load_config
from medunet.errors import ConfigError, DataError, OutputExistsError
from medunet.inference.batch import Shard, collect_inputs, segment_all
from medunet.inference.pipeline import Job, run_jobs
from medunet.inference.segmenter import Segmenter
from medunet.model.checkpoint import Checkpoint, save_checkpoint
from medunet.model.networks import build_network
from medunet.model.sliding import choose_stitch_device, predict_probabilities, stitch_bytes
from medunet.synthetic import as_stored, grid_affine, make_phantom, save_nifti

GiB = 2**30
CUDA = torch.device("cuda:0")
CPU = torch.device("cpu")
OVERRIDES = ["inference.roi_size=[32,32,32]", "inference.sw_batch_size=2", "data.target_spacing=[2.0,2.0,2.5]",
             "data.ct_window=[-200,300]", "model.features=[4,8,16]"]


# --------------------------------------------------------------------------- where to stitch


def test_stitch_estimate_counts_classes_voxels_weight_map_and_tta() -> None:
    # 2 classes: sum + softmax copy (2 x 2 maps) + weight map, float32
    assert stitch_bytes(2, (100, 100, 100)) == 4 * 10**6 * 5
    assert stitch_bytes(14, (10, 10, 10), tta=True) == 4 * 1000 * (14 * 3 + 1)
    assert stitch_bytes(3, (10, 10, 10), batch=2) == 2 * stitch_bytes(3, (10, 10, 10)) - 4 * 1000


def test_auto_stitches_on_the_gpu_when_the_result_fits_and_on_the_host_when_not() -> None:
    small = stitch_bytes(3, (256, 256, 200))  # ~0.5 GiB
    huge = stitch_bytes(2, (1500, 1500, 560))  # the RELIABILITY.md CT: ~23.5 GiB
    assert choose_stitch_device("auto", CUDA, needed_bytes=small, free_bytes=20 * GiB) == CUDA
    assert choose_stitch_device("auto", CUDA, needed_bytes=huge, free_bytes=20 * GiB) == CPU
    assert choose_stitch_device("auto", CUDA, needed_bytes=huge, free_bytes=70 * GiB) == CUDA
    # half the free memory is left for the network's activations: 6 GiB needed, 11 GiB free -> host
    assert choose_stitch_device("auto", CUDA, needed_bytes=6 * GiB, free_bytes=11 * GiB) == CPU
    assert choose_stitch_device("auto", CUDA, needed_bytes=6 * GiB, free_bytes=13 * GiB) == CUDA


def test_forced_stitch_devices_and_the_cpu_are_obeyed() -> None:
    huge = stitch_bytes(2, (1500, 1500, 560))
    assert choose_stitch_device("device", CUDA, needed_bytes=huge, free_bytes=GiB) == CUDA  # the user asked for it
    assert choose_stitch_device("cpu", CUDA, needed_bytes=1, free_bytes=80 * GiB) == CPU
    for mode in ("auto", "device", "cpu"):
        assert choose_stitch_device(mode, CPU, needed_bytes=huge, free_bytes=None) == CPU


def test_stitch_device_setting_is_checked_and_host_stitching_gives_the_same_probabilities() -> None:
    with pytest.raises(ConfigError, match="stitch_device"):
        load_config(None, ["inference.stitch_device=gpu"])
    torch.manual_seed(0)
    config = load_config(None, OVERRIDES)
    model = build_network(config.model, in_channels=1, out_channels=3).eval()
    image = torch.rand(1, 1, 40, 36, 30)
    a = predict_probabilities(model, image, config, device=CPU)
    b = predict_probabilities(model, image, load_config(None, [*OVERRIDES, "inference.stitch_device=cpu"]), device=CPU)
    assert a.shape == (1, 3, 40, 36, 30) and a.device == CPU
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inverting_a_few_classes_at_a_time_gives_the_same_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medunet.inference.stages as stages_module

    assert stages_module.classes_per_inversion(14, 512 * 512 * 300) == 3  # 3 x 315 MB within the 1 GiB budget
    assert stages_module.classes_per_inversion(2, 64**3) == 2 and stages_module.classes_per_inversion(5, 10**12) == 1
    torch.manual_seed(1)
    config = load_config(None, OVERRIDES)
    model = build_network(config.model, in_channels=1, out_channels=4)
    seg = Segmenter(model, config, class_names=["background", "a", "b", "c"], in_channels=1, device=CPU)
    (path,) = write_cases(tmp_path, 1)
    whole = np.asarray(seg.predict(path).dataobj)
    monkeypatch.setattr(stages_module, "INVERT_BUDGET_BYTES", 1)  # one class map at a time
    one_by_one = np.asarray(seg.predict(path).dataobj)
    assert len(np.unique(whole)) >= 3  # the running argmax really has to pick between groups
    assert np.array_equal(whole, one_by_one)


# --------------------------------------------------------------------------- the overlapped pipeline


def test_pipeline_reads_the_next_case_while_the_current_one_is_predicted() -> None:
    second_prepared = threading.Event()
    overlapped = []

    def prepare(job: Job) -> None:
        if job.name == "b":
            second_prepared.set()

    def predict(job: Job) -> None:
        if job.name == "a":  # only true if "b" is read while "a" is still being predicted
            overlapped.append(second_prepared.wait(timeout=10))

    jobs = [Job(n, []) for n in "abcd"]
    done = [j.name for j in run_jobs(jobs, prepare, predict, lambda job: None, overlap=True)]
    assert done == list("abcd") and overlapped == [True]


def test_pipeline_isolates_case_errors_and_raises_other_errors_without_hanging() -> None:
    def predict(job: Job) -> None:
        if job.name == "bad":
            raise DataError("cannot read voxel data", case=job.name)

    written: list[str] = []
    jobs = [Job(n, []) for n in ("a", "bad", "c")]
    done = list(run_jobs(jobs, lambda job: None, predict, lambda job: written.append(job.name), overlap=True))
    assert [j.error is None for j in done] == [True, False, True] and written == ["a", "c"]

    def crash(job: Job) -> None:
        if job.name == "c":
            raise RuntimeError("out of memory")

    for stage in ("prepare", "predict", "write"):
        stages = {"prepare": lambda job: None, "predict": lambda job: None, "write": lambda job: None, stage: crash}
        with pytest.raises(RuntimeError, match="out of memory"):
            list(run_jobs([Job(n, []) for n in "abcdefg"], stages["prepare"], stages["predict"], stages["write"]))
    assert not [t for t in threading.enumerate() if t.name.startswith("medunet-")]


def write_cases(folder: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        image, _ = make_phantom((28 + 2 * i, 24, 18), seed=i, num_classes=2)
        codes = ("RAS", "LPS", "PIR")[i % 3]
        paths.append(save_nifti(as_stored(image, codes), grid_affine((1.6, 1.4, 2.2), axcodes=codes), folder / f"case_{i}.nii.gz"))
    return paths


def make_segmenter() -> Segmenter:
    torch.manual_seed(0)
    config = load_config(None, OVERRIDES)
    model = build_network(config.model, in_channels=1, out_channels=2)
    return Segmenter(model, config, class_names=["background", "organ"], in_channels=1, device=CPU)


def test_overlapped_batch_equals_sequential_batch(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    write_cases(scans, 5)
    (scans / "broken.nii.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 50)
    cases = collect_inputs(scans)
    segmenter = make_segmenter()
    runs = {}
    for mode, overlap in (("sequential", False), ("overlapped", True)):
        out = tmp_path / mode
        results = segment_all(segmenter, cases, out, progress=False, stats_csv=out / "stats.csv", overlap_io=overlap)
        report = json.loads((out / "inference_report.json").read_text())
        runs[mode] = (results, report, (out / "stats.csv").read_text())
    (seq_results, seq_report, seq_stats), (ovl_results, ovl_report, ovl_stats) = runs["sequential"], runs["overlapped"]
    assert [r.case for r in ovl_results] == [r.case for r in seq_results] == [name for name, _ in cases]
    strip = [{k: v for k, v in c.items() if k not in ("seconds", "output")} for c in seq_report["cases"]]
    assert strip == [{k: v for k, v in c.items() if k not in ("seconds", "output")} for c in ovl_report["cases"]]
    assert [c["status"] for c in ovl_report["cases"]] == ["failed"] + ["done"] * 5  # "broken" sorts first
    assert "broken.nii.gz" in ovl_report["cases"][0]["error"]
    assert ovl_stats == seq_stats
    for name, paths in cases[1:]:
        a, b = nib.load(tmp_path / "sequential" / f"{name}.nii.gz"), nib.load(tmp_path / "overlapped" / f"{name}.nii.gz")
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        reference = nib.load(paths[0])  # on the input's own grid
        assert b.shape == reference.shape and np.allclose(b.affine, reference.affine, atol=1e-5)
    assert not [p for p in (tmp_path / "overlapped").iterdir() if ".tmp" in p.name]


# --------------------------------------------------------------------------- shards and resume


def test_shards_are_disjoint_cover_every_case_and_ignore_listing_order() -> None:
    cases = [(f"c{i:02d}", i) for i in range(11)]
    shards = [Shard(k, 3).select(cases) for k in range(3)]
    names = [n for share in shards for n, _ in share]
    assert sorted(names) == [n for n, _ in cases] and len(names) == len(set(names))
    assert Shard(1, 3).select(cases[::-1]) == Shard(1, 3).select(cases)[::-1]  # same share, input order kept
    assert Shard(0, 1).select(cases) == cases
    assert Shard.parse(" 2/4 ") == Shard(2, 4)
    assert Shard(2, 4).path(Path("out/inference_report.json")) == Path("out/inference_report.shard-2-of-4.json")
    for bad in ("2/2", "1", "-1/2", "a/b"):
        with pytest.raises(ConfigError, match="K/N"):
            Shard.parse(bad)


def test_torchrun_environment_chooses_the_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert Shard.from_env() == Shard(3, 4)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert Shard.from_env() == Shard(0, 1)


def checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    config = load_config(None, OVERRIDES)
    state = build_network(config.model, in_channels=1, out_channels=2).state_dict()
    return save_checkpoint(Checkpoint(model=state, config=config_to_dict(config), class_names=["background", "organ"],
                                      in_channels=1, epoch=0), path)


def shard_report(preds: Path, k: int) -> dict[str, str]:
    report = json.loads((preds / f"inference_report.shard-{k}-of-2.json").read_text())
    assert report["shard"] == {"index": k, "count": 2}
    return {c["case"]: c["status"] for c in report["cases"]}


def test_two_processes_share_a_batch_and_a_restart_redoes_only_the_missing_case(tmp_path: Path) -> None:
    model = checkpoint(tmp_path / "model.pt")
    write_cases(tmp_path / "scans", 6)
    preds = tmp_path / "preds"
    common = ["-q", "infer", "-m", str(model), "-i", str(tmp_path / "scans"), "-o", str(preds), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # one process by --shard, the other as a torchrun worker would see it (RANK / WORLD_SIZE)
    procs = [subprocess.Popen([sys.executable, "-m", "medunet", *common, "--shard", "0/2"], env=env),
             subprocess.Popen([sys.executable, "-m", "medunet", *common], env={**env, "RANK": "1", "WORLD_SIZE": "2"})]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    first, second = shard_report(preds, 0), shard_report(preds, 1)
    assert not set(first) & set(second)
    assert sorted({**first, **second}) == [f"case_{i}" for i in range(6)]
    assert set(first.values()) == set(second.values()) == {"done"}
    masks = sorted(preds.glob("*.nii.gz"))
    assert [p.name for p in masks] == [f"case_{i}.nii.gz" for i in range(6)]
    assert not (preds / "inference_report.json").exists()

    # interrupted run: one output lost; without --skip-existing nothing is overwritten
    kept = {p.name: p.stat().st_mtime_ns for p in masks if p.name != "case_3.nii.gz"}
    (preds / "case_3.nii.gz").unlink()
    shard_of_3 = 0 if "case_3" in first else 1
    assert main([*common, "--shard", f"{shard_of_3}/2"]) == EXIT_ERROR
    for k in (0, 1):
        assert main([*common, "--shard", f"{k}/2", "--skip-existing"]) == 0
    statuses = {**shard_report(preds, 0), **shard_report(preds, 1)}
    assert statuses == {f"case_{i}": "done" if i == 3 else "skipped" for i in range(6)}
    assert {p.name: p.stat().st_mtime_ns for p in preds.glob("*.nii.gz") if p.name != "case_3.nii.gz"} == kept
    assert (preds / "case_3.nii.gz").is_file()


def test_existing_outputs_are_refused_before_any_work(tmp_path: Path) -> None:
    write_cases(tmp_path / "scans", 2)
    cases = collect_inputs(tmp_path / "scans")
    segmenter = make_segmenter()
    segment_all(segmenter, cases[:1], tmp_path / "preds", progress=False)
    with pytest.raises(OutputExistsError, match="--skip-existing"):
        segment_all(segmenter, cases, tmp_path / "preds", progress=False)
    assert not (tmp_path / "preds" / "case_1.nii.gz").exists()
