"""Does calibrated QC leave clean cases alone, rank cases by true Dice, flag every corruption, and spare absent classes?

Three models, each segmenting many new clean phantoms with ``medunet infer`` twice: once as trained
(the run's ``qc.json``, fitted by ``medunet train``'s calibration on its validation cases) and once
with that file left out (the default :class:`~medunet.qc.decide.Thresholds`: review below 0.5,
temperature 1), so before and after are measured on the same masks.

1. **demo**: ``medunet demo``'s model (:func:`medunet.workflows.demo.run_demo`, its defaults), then
   ``--cases`` clean phantoms of the demo's kind (64 x 64 x 40, organ + vessel, RAS and LPS files, new
   seeds), a graded set and every kind of :data:`medunet.synthetic.CORRUPTIONS`.
2. **planned**: ``medunet plan`` then ``medunet train -c plan.yaml`` (a small network, a short schedule) on
   a harder task: the demo's phantoms with 2.5x the noise; ``--cases`` clean cases, a graded set and the
   corruptions.
3. **absent_class**: organ + lesion, the lesion (a small bright sphere inside the organ) in half the
   training cases; lesion-free and lesion-containing clean cases. For each case the rule QC had before
   (an absent class's expected Dice taken as 0 once its summed probability exceeds one voxel, which
   zeroes the score) is recomputed from the network's probabilities (``Segmenter.probabilities``).

A **graded** set (``--graded-cases``, :func:`graded_phantom`) holds the model's kind of phantom with
severity spread evenly from 0 to 1: the organs' contrast lowered (geometrically, to :data:`GRADED`'s
floor) and the noise raised (to 1.8x, below QC's noise check), the label unchanged, so the true Dice
runs from the model's best to poor and the score's ranking (Spearman, AUROC) is measured on real bad
cases, with bad and good cases flagged.

Per side: false alarms (clean cases flagged ``review``, or on a graded set the cases flagged that are
not bad; goal at most 5 %), Spearman of score against true Dice (the lowest over classes,
:func:`medunet.qc.calibrate.case_dice`), AUROC for "bad" (Dice below the median - 0.1,
:func:`medunet.qc.calibrate.bad_cases`), bad and good cases flagged, the temperature and threshold,
and which checks fired on each corrupted kind.

    python scripts/bench/qc_calibration.py --workdir /tmp/qccal --json /tmp/qccal/qc_calibration.json   # ~25 min on 2 busy cores
    python scripts/bench/qc_calibration.py --workdir /tmp/qccal --skip-train   # reuse the trained models in --workdir
    python scripts/bench/qc_calibration.py --quick   # about a minute: a 1-epoch demo, tiny planned and lesion runs, 3 cases a set
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import bench_parser, load_average, markdown_table, start, workdir, write_json

from medunet.cli import main as medunet
from medunet.config import load_config
from medunet.evaluation import dice_per_class
from medunet.inference.segmenter import Segmenter
from medunet.io.nifti import read_nifti, read_voxels
from medunet.model.layout import QC_FILE
from medunet.qc.calibrate import auroc, bad_cases, case_dice, spearman
from medunet.qc.decide import load_thresholds
from medunet.qc.signals import tempered
from medunet.synthetic import CORRUPTIONS, as_stored, corrupt_phantom, grid_affine, make_phantom, save_nifti
from medunet.workflows.demo import run_demo

SPACING = (1.5, 1.5, 2.5)
DEMO_SHAPE = (64, 64, 40)
TASK_SHAPE = (48, 48, 32)
QUICK_SHAPE = (32, 32, 24)
#: The harder task's voxel noise, times make_phantom's default.
HARD_NOISE = 2.5
#: Lesion: this many HU brighter than the organ, radius in mm.
LESION_HU = 90.0
LESION_RADIUS_MM = 6.0
#: Graded sets: at severity 1 the organs keep this share of their contrast to the tissue around them, and
#: the voxel noise is this many times the model's training noise (below QC's noise check at 2.5x). The
#: planned model's noisier task loses its organs at higher contrast, so its range stops earlier; both were
#: chosen (on 21 probe cases of the earlier models) so that the true Dice runs from about 0.95 to about 0.
GRADED = {"graded": (0.1, 1.8), "graded_hard": (0.3, 1.8)}
#: Seeds of the evaluated cases (training data uses 0..999 and 1000+).
EVAL_SEED = 50_000
#: What a user would change from the plan to train in minutes on a small CPU: size only (as tests/conftest.py).
SIZE = ("train.batch_size=2", "train.val_every=1000", "optim.lr=0.02", "optim.warmup_epochs=1",
        "inference.sw_batch_size=2", "postprocessing.default.keep_largest=true", "postprocessing.crf.search=false")


# ---------------------------------------------------------------- data


def _write_case(image: np.ndarray, label: np.ndarray | None, folder: Path, split: str, name: str, index: int) -> dict[str, str]:
    """One case written as write_dataset writes it: RAS and LPS files alternating, a varying origin."""
    codes = ("RAS", "LPS")[index % 2]
    affine = grid_affine(SPACING, axcodes=codes, origin=(-30.0 + index % 7, 20.0, -15.0 - 2 * (index % 5)))
    save_nifti(as_stored(image, codes).astype(np.float32), affine, folder / f"images{split}" / f"{name}.nii.gz")
    entry = {"image": f"images{split}/{name}.nii.gz"}
    if label is not None:
        save_nifti(as_stored(label, codes).astype(np.uint8), affine, folder / f"labels{split}" / f"{name}.nii.gz")
        entry["label"] = f"labels{split}/{name}.nii.gz"
    return entry


def _datalist(folder: Path, labels: Sequence[str], **lists: list[dict[str, str]]) -> Path:
    spec = {"modality": {"0": "CT"}, "labels": {str(i): n for i, n in enumerate(labels)}, **lists}
    path = folder / "dataset.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def lesion_phantom(shape: Sequence[int], *, seed: int, lesion: bool) -> tuple[np.ndarray, np.ndarray]:
    """make_phantom's organ (class 1) and, with ``lesion``, a sphere of :data:`LESION_RADIUS_MM` inside it (class 2)."""
    image, label = make_phantom(shape, seed=seed, num_classes=2)
    if lesion:
        from scipy import ndimage

        rng = np.random.default_rng(seed + 7)
        radius = LESION_RADIUS_MM / np.asarray(SPACING)
        inside = ndimage.distance_transform_edt(label == 1, sampling=SPACING) > LESION_RADIUS_MM + 1.5
        candidates = np.argwhere(inside) if inside.any() else np.argwhere(label == 1)
        centre = candidates[rng.integers(len(candidates))]
        grids = np.ogrid[tuple(slice(0, s) for s in label.shape)]
        sphere = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radius)) <= 1.0
        sphere &= label == 1
        image[sphere] += LESION_HU
        label[sphere] = 2
    return image, label


def graded_phantom(shape: Sequence[int], *, seed: int, severity: float, noise: float, contrast: float,
                   noise_gain: float) -> tuple[np.ndarray, np.ndarray]:
    """make_phantom's case with its organs' contrast lowered and its noise raised by ``severity`` (0..1); the label is unchanged.

    The organs (classes 1 and 2) move towards the tissue around them, keeping ``contrast ** severity`` of
    their contrast (even steps in log, 1 down to ``contrast``), and the noise grows from ``noise`` to
    ``noise * noise_gain`` (the same noise field, scaled): the anatomy, and so the label, stays what it
    was, only harder to see.
    """
    flat, label = make_phantom(shape, seed=seed, num_classes=3, noise=0.0)
    scale = noise * (1.0 + severity * (noise_gain - 1.0))
    noisy, _ = make_phantom(shape, seed=seed, num_classes=3, noise=scale)
    tissue = float(np.median(flat[(label == 0) & (flat > -500.0)]))
    organs = label > 0
    image = flat.copy()
    image[organs] = tissue + contrast ** severity * (flat[organs] - tissue)
    return (image + (noisy - flat)).astype(np.float32), label


def training_data(folder: Path, kind: str, shape: Sequence[int], train: int, validation: int) -> Path:
    """The training datalist of the planned (``hard``) or the ``lesion`` model, with its own validation list."""
    entries = []
    for i in range(train + validation):
        if kind == "hard":
            image, label = make_phantom(shape, seed=1000 + i, num_classes=3, noise=HARD_NOISE)
        else:
            image, label = lesion_phantom(shape, seed=2000 + i, lesion=i % 2 == 0)
        entries.append(_write_case(image, label, folder, "Tr", f"{kind}_{i:03d}", i))
    names = ("background", "organ", "vessel") if kind == "hard" else ("background", "organ", "lesion")
    return _datalist(folder, names, training=entries[:train], validation=entries[train:])


def severity_of(index: int, count: int) -> float:
    """The severity of a graded set's case ``index`` of ``count``: evenly from 0 to 1."""
    return round(index / max(count - 1, 1), 4)


def clean_cases(folder: Path, kind: str, shape: Sequence[int], count: int, *, seed: int) -> Path:
    """``count`` new labelled phantoms as a datalist's "test" list (what ``medunet infer`` segments): clean, or a graded set."""
    entries = []
    for i in range(count):
        if kind in GRADED:  # severity spread evenly from 0 to 1
            contrast, gain = GRADED[kind]
            image, label = graded_phantom(shape, seed=seed + i, severity=severity_of(i, count), noise=HARD_NOISE if kind == "graded_hard" else 1.0,
                                          contrast=contrast, noise_gain=gain)
        elif kind == "lesion_free":
            image, label = lesion_phantom(shape, seed=seed + i, lesion=False)
        elif kind == "lesion":
            image, label = lesion_phantom(shape, seed=seed + i, lesion=True)
        else:
            image, label = make_phantom(shape, seed=seed + i, num_classes=3, noise=HARD_NOISE if kind == "hard" else 1.0)
        entries.append(_write_case(image, label, folder, "Ts", f"{kind}_{i:03d}", i))
    names = ("background", "organ", "lesion") if kind.startswith("lesion") else ("background", "organ", "vessel")
    return _datalist(folder, names, test=entries)


def corrupted_cases(folder: Path, shape: Sequence[int], num_classes: int) -> Path:
    """One file per kind of :data:`CORRUPTIONS` (saved LPS, as qc_ranking.py does)."""
    for kind in CORRUPTIONS:
        image, spacing = corrupt_phantom(kind, shape, SPACING, seed=9100, num_classes=num_classes)
        save_nifti(image.astype(np.float32), grid_affine(spacing, axcodes="LPS"), folder / f"{kind}.nii.gz")
    return folder


# ---------------------------------------------------------------- segmenting and scoring


def cli(*args: str) -> None:
    status = medunet(["-q", *args])
    if status != 0:
        raise SystemExit(f"medunet {' '.join(args)} exited {status}")


def without_calibration(run: Path, target: Path) -> Path:
    """A copy of the run folder without its ``qc.json`` (QC then uses the default thresholds)."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("cache", QC_FILE, "*.png", "*.gif"))
    return target


def infer(model: Path, source: Path, out: Path) -> dict[str, dict[str, Any]]:
    """``medunet infer`` of ``source`` (a datalist or a folder): each case's QC record and mask path, by case name."""
    shutil.rmtree(out, ignore_errors=True)
    cli("infer", "-m", str(model), "-i", str(source), "-o", str(out), "--device", "cpu")
    report = json.loads((out / "inference_report.json").read_text())
    return {c["case"]: {**c["qc"], "output": c["output"]} for c in report["cases"]}


def true_dice(datalist: Path, records: dict[str, dict[str, Any]], num_classes: int) -> dict[str, list[float]]:
    """Per case, the Dice of each foreground class of its mask against its label."""
    out = {}
    for entry in json.loads(datalist.read_text())["test"]:
        name = Path(entry["image"]).name.removesuffix(".nii.gz")
        pred = read_voxels(read_nifti(records[name]["output"]), case=name, path=None, dtype=np.int64)
        ref = read_voxels(read_nifti(datalist.parent / entry["label"]), case=name, path=None, dtype=np.int64)
        out[name] = [float(d) for d in dice_per_class(pred, ref, num_classes)]
    return out


def severities(datalist: Path) -> dict[str, float]:
    """Each case of a graded datalist's severity, from its place in the list (as clean_cases made it)."""
    entries = json.loads(datalist.read_text())["test"]
    return {Path(e["image"]).name.removesuffix(".nii.gz"): severity_of(i, len(entries)) for i, e in enumerate(entries)}


def _finite(value: float) -> float | None:
    return None if value != value else round(float(value), 4)


def side_summary(records: dict[str, dict[str, Any]], dice: dict[str, list[float]], severity: dict[str, float] | None = None) -> dict[str, Any]:
    """Flags, ranking quality and the per-case table of one side (calibrated or defaults) on one set of labelled cases.

    ``false_alarms`` counts every case flagged (on a clean set all are false alarms); ``good_flagged``
    only those that are not bad (:func:`~medunet.qc.calibrate.bad_cases`), the false alarms of a graded set.
    """
    names = sorted(dice)
    scores = [records[n]["score"] for n in names]
    targets = [case_dice(dice[n]) for n in names]
    flagged = [records[n]["flag"] == "review" for n in names]
    bad, cut = bad_cases(targets)
    fired: dict[str, int] = {}
    for n in names:
        for check in records[n]["fired"]:
            fired[check] = fired.get(check, 0) + 1
    return {
        "cases": len(names),
        "false_alarms": int(sum(flagged)),
        "false_alarm_rate": round(sum(flagged) / max(len(names), 1), 4),
        "fired": fired,
        "spearman": _finite(spearman(scores, targets)),
        "auroc": _finite(auroc(scores, bad)),
        "bad_dice_below": round(cut, 4),
        "bad_cases": int(bad.sum()),
        "bad_flagged": int(sum(f for f, b in zip(flagged, bad) if b)),
        "good_flagged": int(sum(f for f, b in zip(flagged, bad) if not b)),
        "good_flagged_rate": round(sum(f for f, b in zip(flagged, bad) if not b) / max(int((~bad).sum()), 1), 4),
        "min_true_dice": round(float(np.min(targets)), 4),
        "max_true_dice": round(float(np.max(targets)), 4),
        "mean_true_dice": round(float(np.mean(targets)), 4),
        "mean_score": round(float(np.mean(scores)), 4),
        "mean_abs_error": round(float(np.mean(np.abs(np.asarray(scores) - np.asarray(targets)))), 4),
        "per_case": [{"case": n, **({"severity": severity[n]} if severity else {}), "dice": round(t, 4), "dice_per_class": [round(d, 4) for d in dice[n]], "score": records[n]["score"],
                      "flag": records[n]["flag"], "fired": records[n]["fired"]} for n, t in zip(names, targets)],
    }


def corrupted_summary(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    kinds = {k: {"flag": records[k]["flag"], "score": records[k]["score"], "fired": records[k]["fired"]} for k in CORRUPTIONS}
    return {"flagged": sum(v["flag"] == "review" for v in kinds.values()), "kinds": len(kinds), "per_kind": kinds}


def calibration_of(run: Path) -> dict[str, Any]:
    """What ``medunet train`` stored in the run's ``qc.json`` (None values when it calibrated nothing)."""
    path = run / QC_FILE
    if not path.is_file():
        return {"qc_json": False, "temperature": None, "score_review": None, "source": None, "achieved": {}}
    t = load_thresholds(path)
    return {"qc_json": True, "temperature": t.temperature, "score_review": t.score_review, "source": t.source, "achieved": t.achieved}


def evaluate_model(run: Path, folder: Path, sets: dict[str, Path], corrupted: Path | None, class_names: Sequence[str]) -> dict[str, Any]:
    """Both sides (calibrated, defaults) of one model on each set of clean cases and on the corruptions."""
    plain = without_calibration(run, folder / "run-defaults")
    out: dict[str, Any] = {"calibration": calibration_of(run)}
    for side, model in (("calibrated", run), ("defaults", plain)):
        out[side] = {}
        for name, datalist in sets.items():
            records = infer(model, datalist, folder / f"preds-{side}-{name}")
            out[side][name] = side_summary(records, true_dice(datalist, records, len(class_names)), severities(datalist) if name == "graded" else None)
        if corrupted is not None:
            out[side]["corrupted"] = corrupted_summary(infer(model, corrupted, folder / f"preds-{side}-corrupted"))
    return out


def old_rule(run: Path, datalist: Path, temperatures: dict[str, float], absent_class: int) -> dict[str, dict[str, bool]]:
    """Per case and side: would the old rule have zeroed the score (class absent from the mask, its tempered mass above one voxel)?"""
    segmenter = Segmenter.from_checkpoint(run, device="cpu")
    captured: list[torch.Tensor] = []
    network = segmenter.probabilities

    def keep(image: torch.Tensor, member_labels: list[torch.Tensor] | None = None) -> torch.Tensor:
        probs = network(image, member_labels)
        captured.append(probs[0].detach().cpu())
        return probs

    segmenter.probabilities = keep  # type: ignore[method-assign]
    out = {}
    for entry in json.loads(datalist.read_text())["test"]:
        name = Path(entry["image"]).name.removesuffix(".nii.gz")
        captured.clear()
        segmenter.predict_case(segmenter.prepare(datalist.parent / entry["image"], case=name), qc=False)
        probs = captured[-1]
        in_mask = bool((probs.max(dim=0).indices == absent_class).any())
        out[name] = {side: (not in_mask) and float(tempered(probs, t)[absent_class].sum()) > 1.0 for side, t in temperatures.items()}
    return out


def absent_summary(result: dict[str, Any], zeroed: dict[str, dict[str, bool]]) -> dict[str, Any]:
    """Old-rule false alarms on the lesion-free cases: flagged now, or zeroed by the old rule."""
    out = {}
    for side in ("calibrated", "defaults"):
        cases = result[side]["lesion_free"]["per_case"]
        old = [c["flag"] == "review" or zeroed[c["case"]][side] for c in cases]
        out[side] = {"old_rule_false_alarms": int(sum(old)), "old_rule_false_alarm_rate": round(sum(old) / max(len(cases), 1), 4),
                     "old_rule_zeroed": int(sum(zeroed[c["case"]][side] for c in cases))}
    return out


# ---------------------------------------------------------------- the three models


def demo_model(folder: Path, *, quick: bool, skip_train: bool) -> Path:
    if not (skip_train and (folder / "run" / "best.pt").is_file()):
        if quick:
            run_demo(folder, epochs=1, num_train=4, num_test=1, device="cpu", overwrite=True, progress=False)
        else:
            run_demo(folder, device="cpu", overwrite=True, progress=False)
    return folder / "run"


def planned_model(folder: Path, datalist: Path, epochs: int, iterations: int, patch: str, *, skip_train: bool) -> Path:
    run = folder / "run"
    if not (skip_train and (run / "best.pt").is_file()):
        shutil.rmtree(run, ignore_errors=True)
        plan = folder / "plan.yaml"
        cli("plan", str(datalist), "-o", str(plan), "--overwrite")
        levels = len(load_config(plan).model.strides)  # the plan's depth, with 4, 8, 16, ... features
        features = ",".join(str(4 * 2 ** i) for i in range(levels))
        overrides = [*SIZE, f"model.features=[{features}]", f"train.max_epochs={epochs}", f"train.iterations_per_epoch={iterations}",
                     f"augmentation.patch_size={patch}"]
        cli("train", str(datalist), "-o", str(run), "-c", str(plan), "--device", "cpu", "--skip-check",
            *[a for o in overrides for a in ("--set", o)])
    return run


def table(result: dict[str, Any]) -> str:
    """The clean sets' table (false alarms, ranking on a narrow spread, corruptions) of the parts that ran."""
    rows = []
    for model, sets in (("demo", ("clean",)), ("planned", ("clean",)), ("absent_class", ("lesion_free", "lesion"))):
        if model not in result:
            continue
        m = result[model]
        cal = m["calibration"]
        for side in ("calibrated", "defaults"):
            for name in sets:
                s = m[side][name]
                corrupted = m[side].get("corrupted")
                rows.append([model, name, side, s["cases"], f"{s['false_alarms']} ({s['false_alarm_rate']:.0%})", s["mean_true_dice"],
                             s["mean_score"], s["spearman"], s["auroc"], s["bad_cases"],
                             cal["temperature"] if side == "calibrated" else 1.0,
                             cal["score_review"] if side == "calibrated" else 0.5,
                             f"{corrupted['flagged']}/{corrupted['kinds']}" if corrupted and name == sets[0] else ""])
    header = ["model", "cases", "QC", "n", "review (clean)", "true Dice", "score", "Spearman", "AUROC", "bad", "T", "threshold",
              "corrupted flagged"]
    return markdown_table(header, rows)


def graded_table(result: dict[str, Any]) -> str:
    """The graded sets' table: ranking against true Dice, bad and good cases flagged."""
    rows = []
    for model in ("demo", "planned"):
        if model not in result:
            continue
        for side in ("calibrated", "defaults"):
            s = result[model][side]["graded"]
            good = s["cases"] - s["bad_cases"]
            rows.append([model, side, s["cases"], f"{s['min_true_dice']:.2f}-{s['max_true_dice']:.2f}", s["spearman"], s["auroc"],
                         f"{s['bad_cases']} (< {s['bad_dice_below']:.2f})", f"{s['bad_flagged']}/{s['bad_cases']}",
                         f"{s['good_flagged']}/{good} ({s['good_flagged_rate']:.0%})"])
    header = ["model", "QC", "graded cases", "true Dice", "Spearman", "AUROC", "bad (Dice below)", "bad flagged", "good flagged"]
    return markdown_table(header, rows)


def clean_graded_corrupted(run: Path, folder: Path, kinds: tuple[str, str], shape: Sequence[int], args: Any, *, seed: int) -> dict[str, Any]:
    """``run`` on ``args.cases`` clean cases of ``kinds[0]``, ``args.graded_cases`` graded ones of ``kinds[1]`` and every corruption."""
    sets = {"clean": clean_cases(folder, kinds[0], shape, args.cases, seed=seed),
            "graded": clean_cases(folder / "graded", kinds[1], shape, args.graded_cases, seed=seed + 4000)}
    corrupted = corrupted_cases(folder / "corrupted", shape, num_classes=3)
    return evaluate_model(run, folder, sets, corrupted, ("background", "organ", "vessel"))


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, f"a 1-epoch demo, planned and lesion runs of 1 step on {QUICK_SHAPE}, 3 clean cases per set")
    parser.add_argument("--workdir", type=Path, help="folder for data, runs and predictions (default: temporary)")
    parser.add_argument("--cases", type=int, default=40, help="clean cases per model (and lesion-free cases)")
    parser.add_argument("--graded-cases", type=int, default=40, help="cases of each graded set (demo and planned models)")
    parser.add_argument("--lesion-cases", type=int, default=16, help="lesion-containing cases for the absent-class model")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the planned and lesion models")
    parser.add_argument("--iterations", type=int, default=16, help="steps per epoch of the planned and lesion models")
    parser.add_argument("--train", type=int, default=12, help="training cases of the planned and lesion models")
    parser.add_argument("--validation", type=int, default=8, help="validation (= calibration) cases of the planned and lesion models")
    parser.add_argument("--skip-train", action="store_true", help="reuse the models already trained in --workdir (train those missing)")
    parser.add_argument("--only", nargs="*", choices=("demo", "planned", "absent_class"), help="run only these parts")
    args = parser.parse_args(argv)
    if args.skip_train and args.workdir is None:
        parser.error("--skip-train needs the --workdir of a finished run")
    start(args.threads)
    logging.basicConfig(level=logging.WARNING)
    demo_shape, shape, patch = DEMO_SHAPE, TASK_SHAPE, "[32,32,24]"
    if args.quick:
        args.cases, args.graded_cases, args.lesion_cases, args.epochs, args.iterations, args.train, args.validation = 3, 3, 2, 1, 1, 4, 2
        shape, patch = QUICK_SHAPE, "[24,24,24]"
    parts = set(args.only or ("demo", "planned", "absent_class"))
    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "load_average_start": load_average(),
        "settings": {"cases": args.cases, "graded_cases": args.graded_cases, "graded": GRADED, "lesion_cases": args.lesion_cases, "epochs": args.epochs, "iterations": args.iterations,
                     "train": args.train, "validation": args.validation, "hard_noise": HARD_NOISE, "quick": args.quick},
    }
    with workdir("qccal") as tmp:
        root = (args.workdir or Path(tmp)) / ("quick" if args.quick else "full")
        if "demo" in parts:
            tick = time.perf_counter()
            run = demo_model(root / "demo", quick=args.quick, skip_train=args.skip_train)
            result["demo"] = clean_graded_corrupted(run, root / "demo-eval", ("demo", "graded"), demo_shape, args, seed=EVAL_SEED)
            result["demo"]["seconds"] = round(time.perf_counter() - tick, 1)
        if "planned" in parts:
            tick = time.perf_counter()
            datalist = training_data(root / "planned-data", "hard", shape, args.train, args.validation)
            run = planned_model(root / "planned", datalist, args.epochs, args.iterations, patch, skip_train=args.skip_train)
            result["planned"] = clean_graded_corrupted(run, root / "planned-eval", ("hard", "graded_hard"), shape, args,
                                                       seed=EVAL_SEED + 1000)
            result["planned"]["seconds"] = round(time.perf_counter() - tick, 1)
        if "absent_class" in parts:
            tick = time.perf_counter()
            datalist = training_data(root / "lesion-data", "lesion", shape, args.train, args.validation)
            run = planned_model(root / "lesion", datalist, args.epochs, args.iterations, patch, skip_train=args.skip_train)
            sets = {"lesion_free": clean_cases(root / "lesion-eval" / "free", "lesion_free", shape, args.cases, seed=EVAL_SEED + 2000),
                    "lesion": clean_cases(root / "lesion-eval" / "lesion", "lesion", shape, args.lesion_cases, seed=EVAL_SEED + 3000)}
            names = ("background", "organ", "lesion")
            absent = evaluate_model(run, root / "lesion-eval", sets, None, names)
            temperature = absent["calibration"]["temperature"] or 1.0
            zeroed = old_rule(run, sets["lesion_free"], {"calibrated": temperature, "defaults": 1.0}, absent_class=2)
            absent["old_rule"] = absent_summary(absent, zeroed)
            absent["lesion_dice"] = {side: round(float(np.mean([c["dice_per_class"][1] for c in absent[side]["lesion"]["per_case"]])), 4)
                                     for side in ("calibrated", "defaults")}
            absent["seconds"] = round(time.perf_counter() - tick, 1)
            result["absent_class"] = absent
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["load_average_end"] = load_average()
    write_json(args.json, result)
    print(table(result))
    if parts & {"demo", "planned"}:
        print(graded_table(result))
    print(json.dumps({k: v for k, v in result.items() if k not in ("demo", "planned", "absent_class")}, indent=1))
    print(f"load average after the run {load_average()}")


if __name__ == "__main__":
    main()
