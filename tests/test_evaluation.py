"""Evaluation metrics against an independent numpy/scipy implementation, the empty convention, and `medunet evaluate`."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from medunet.cli import EXIT_ERROR, main
from medunet.errors import DataError, GeometryError
from medunet.evaluation import COLUMNS, binary_metrics, evaluate, evaluate_pair, summarize
from medunet.evaluation.report import worst_error_voxel
from medunet.io.datalist import Case, load_datalist
from medunet.synthetic import grid_affine, write_dataset
from medunet.visualize import save_contour_overlay

# --------------------------------------------------------------------------- an independent implementation


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask minus its 6-connected erosion (voxels outside the array count as background)."""
    return mask & ~ndimage.binary_erosion(mask)


def directed_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance in mm from every surface voxel of ``a`` to the nearest surface voxel of ``b``."""
    return ndimage.distance_transform_edt(~surface(b), sampling=spacing)[surface(a)]


def expected(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tolerance: float) -> dict[str, float]:
    """Every metric from its textbook formula (both masks non-empty)."""
    inter, p, r = (pred & ref).sum(), pred.sum(), ref.sum()
    d_pr, d_rp = directed_distances(pred, ref, spacing), directed_distances(ref, pred, spacing)
    both = np.concatenate([d_pr, d_rp])
    voxel_ml = float(np.prod(spacing)) / 1000
    return {
        "dice": 2 * inter / (p + r), "iou": inter / (pred | ref).sum(),
        "sensitivity": inter / r, "precision": inter / p,
        "hd95_mm": max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)),
        "asd_mm": both.mean(), "nsd": (both <= tolerance).mean(),
        "volume_pred_ml": p * voxel_ml, "volume_ref_ml": r * voxel_ml, "volume_diff_ml": (p - r) * voxel_ml,
    }


def ball(shape: tuple[int, ...], centre_mm: tuple[float, ...], radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g * s) - c) ** 2 for g, s, c in zip(grids, spacing, centre_mm)) <= radius_mm**2


def box(shape: tuple[int, ...], start: tuple[int, ...], size: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


# --------------------------------------------------------------------------- metrics


def test_offset_cubes_have_the_analytic_overlap_and_distance() -> None:
    """Two 10-voxel cubes, one shifted 2 voxels along axis 0 of a (3, 0.7, 1.3) mm grid."""
    spacing = (3.0, 0.7, 1.3)
    ref, pred = box((20, 20, 20), (4, 5, 5), 10), box((20, 20, 20), (6, 5, 5), 10)
    got = binary_metrics(pred, ref, spacing, nsd_tolerance_mm=1.0)
    assert got["flag"] == ""
    assert got["dice"] == pytest.approx(0.8)  # 2*800 / (1000+1000)
    assert got["iou"] == pytest.approx(800 / 1200)
    assert got["sensitivity"] == pytest.approx(0.8) and got["precision"] == pytest.approx(0.8)
    # 100 of the 488 surface voxels of each cube sit on the far face, 2 voxels * 3 mm from the other surface
    assert got["hd95_mm"] == pytest.approx(6.0)
    assert got["volume_pred_ml"] == pytest.approx(1000 * 3.0 * 0.7 * 1.3 / 1000)
    assert got["volume_diff_ml"] == pytest.approx(0.0)
    for key, value in expected(pred, ref, spacing, 1.0).items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


def test_concentric_spheres_on_an_anisotropic_grid() -> None:
    """Radii 12 and 8 mm on a 0.8 x 0.8 x 2 mm grid: surface distances are about the 4 mm radius difference."""
    spacing, shape, centre = (0.8, 0.8, 2.0), (40, 40, 16), (16.0, 16.0, 15.0)
    ref, pred = ball(shape, centre, 12.0, spacing), ball(shape, centre, 8.0, spacing)
    got = binary_metrics(pred, ref, spacing, nsd_tolerance_mm=2.0)
    assert got["hd95_mm"] == pytest.approx(4.0, abs=2.0)  # within one (coarsest) voxel of the radius difference
    assert got["asd_mm"] == pytest.approx(4.0, abs=1.0)
    assert got["sensitivity"] < 0.4 < got["precision"] == pytest.approx(1.0)
    for key, value in expected(pred, ref, spacing, 2.0).items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


def test_spacing_scales_distances_and_volumes() -> None:
    """The same voxels on a grid twice as coarse along every axis: distances x2, volumes x8, overlap unchanged."""
    rng = np.random.default_rng(3)
    ref = ndimage.gaussian_filter(rng.normal(size=(24, 20, 18)), 2.0) > 0.05  # smooth random blobs
    assert 0.1 < ref.mean() < 0.6
    pred = ndimage.binary_dilation(ref, iterations=1) & (rng.random(ref.shape) > 0.05)
    fine = binary_metrics(pred, ref, (1.0, 1.0, 1.0), nsd_tolerance_mm=1.0)
    coarse = binary_metrics(pred, ref, (2.0, 2.0, 2.0), nsd_tolerance_mm=2.0)
    assert coarse["dice"] == fine["dice"] and coarse["nsd"] == pytest.approx(fine["nsd"])
    for key in ("hd95_mm", "asd_mm"):
        assert coarse[key] == pytest.approx(2 * fine[key])
    assert coarse["volume_ref_ml"] == pytest.approx(8 * fine["volume_ref_ml"])
    for key, value in expected(pred, ref, (1.0, 1.0, 1.0), 1.0).items():
        assert fine[key] == pytest.approx(value, rel=1e-6), key


def test_nsd_counts_surface_within_the_tolerance() -> None:
    spacing = (3.0, 1.0, 1.0)
    ref, pred = box((20, 20, 20), (4, 5, 5), 10), box((20, 20, 20), (6, 5, 5), 10)
    assert binary_metrics(pred, ref, spacing, nsd_tolerance_mm=6.0)["nsd"] == 1.0  # every distance <= 2 voxels * 3 mm
    strict = binary_metrics(pred, ref, spacing, nsd_tolerance_mm=0.0)["nsd"]
    assert 0.0 < strict < 1.0
    assert strict == pytest.approx(expected(pred, ref, spacing, 0.0)["nsd"])


def test_single_pass_equals_monai_metric_functions() -> None:
    """HD95, ASD and NSD from one surface pass are what MONAI's three compute_* functions return."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

    spacing = (0.9, 1.1, 2.5)
    ref, pred = ball((36, 30, 14), (15, 16, 17), 9.0, spacing), ball((36, 30, 14), (18, 15, 15), 8.0, spacing)
    got = binary_metrics(pred, ref, spacing, nsd_tolerance_mm=1.5)
    y_pred, y = (torch.as_tensor(m, dtype=torch.float32)[None, None] for m in (pred, ref))
    kw = {"include_background": True, "spacing": list(spacing)}
    assert got["hd95_mm"] == pytest.approx(float(compute_hausdorff_distance(y_pred, y, percentile=95, **kw)), rel=1e-5)
    assert got["asd_mm"] == pytest.approx(float(compute_average_surface_distance(y_pred, y, symmetric=True, **kw)), rel=1e-5)
    assert got["nsd"] == pytest.approx(float(compute_surface_dice(y_pred, y, [1.5], **kw)), rel=1e-5)


@pytest.mark.parametrize(
    ("pred_on", "ref_on", "flag", "dice", "sensitivity", "precision"),
    [
        (False, False, "both_empty", 1.0, None, None),
        (False, True, "pred_empty", 0.0, 0.0, None),
        (True, False, "ref_empty", 0.0, None, 0.0),
    ],
)
def test_empty_convention(
    pred_on: bool, ref_on: bool, flag: str, dice: float, sensitivity: float | None, precision: float | None
) -> None:
    cube = box((10, 10, 10), (2, 2, 2), 4)
    empty = np.zeros_like(cube)
    got = binary_metrics(cube if pred_on else empty, cube if ref_on else empty, (1.0, 2.0, 1.0))
    assert got["flag"] == flag
    assert got["dice"] == got["iou"] == got["nsd"] == dice
    assert math.isnan(got["hd95_mm"]) and math.isnan(got["asd_mm"])
    for key, value in (("sensitivity", sensitivity), ("precision", precision)):
        assert math.isnan(got[key]) if value is None else got[key] == value
    assert got["volume_diff_ml"] == pytest.approx((int(pred_on) - int(ref_on)) * 64 * 2.0 / 1000)


def test_summary_is_never_silently_nan() -> None:
    rows = [
        {"case": "a", "class": "organ", **binary_metrics(box((8, 8, 8), (1, 1, 1), 4), box((8, 8, 8), (2, 1, 1), 4), (1, 1, 1))},
        {"case": "b", "class": "organ", **binary_metrics(np.zeros((8, 8, 8)), box((8, 8, 8), (2, 1, 1), 4), (1, 1, 1))},
        {"case": "c", "class": "organ", **binary_metrics(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), (1, 1, 1))},
    ]
    summary = summarize(rows, ["organ"])
    assert summary["organ"]["dice"]["n"] == 3 and summary["organ"]["dice"]["n_undefined"] == 0
    assert summary["organ"]["dice"]["mean"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    hd = summary["organ"]["hd95_mm"]
    assert hd["n"] == 1 and hd["n_undefined"] == 2 and hd["mean"] == pytest.approx(rows[0]["hd95_mm"])
    assert summary["mean_dice"] == pytest.approx(summary["organ"]["dice"]["mean"])
    only_undefined = summarize(rows[2:], ["organ"])["organ"]["hd95_mm"]
    assert only_undefined["mean"] is None and only_undefined["n_undefined"] == 1
    assert "NaN" not in json.dumps(summary)


# --------------------------------------------------------------------------- geometry and inputs


def image(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    return nib.Nifti1Image(array.astype(np.uint8), affine)


def test_evaluate_pair_uses_the_reference_spacing_and_names_classes() -> None:
    affine = grid_affine((2.0, 1.0, 0.5), axcodes="LPS", origin=(5, -3, 7))
    labels = np.zeros((16, 16, 16), dtype=np.uint8)
    labels[2:8, 2:8, 2:8], labels[9:14, 9:14, 9:14] = 1, 2
    rows = evaluate_pair(image(labels, affine), image(labels, affine), {0: "background", 1: "liver", 2: "tumour"}, case="c1")
    assert [(r["case"], r["class"], r["label"], r["dice"]) for r in rows] == [("c1", "liver", 1, 1.0), ("c1", "tumour", 2, 1.0)]
    assert rows[0]["volume_ref_ml"] == pytest.approx(216 * 1.0 / 1000)
    assert rows[0]["hd95_mm"] == 0.0


@pytest.mark.parametrize("change", ["shape", "origin", "axes"])
def test_geometry_mismatch_names_the_case_and_both_grids(change: str) -> None:
    affine = grid_affine((1.0, 1.0, 2.0))
    labels = np.zeros((12, 12, 8), dtype=np.uint8)
    labels[3:6, 3:6, 2:5] = 1
    pred_labels, pred_affine = labels, affine.copy()
    if change == "shape":
        pred_labels = np.zeros((12, 12, 9), dtype=np.uint8)
    elif change == "origin":
        pred_affine[:3, 3] += [0.0, 0.0, 2.0]  # one slice off
    else:
        pred_affine = grid_affine((1.0, 1.0, 2.0), axcodes="LPS")
    with pytest.raises(GeometryError, match=r"case 'scan_7'.*prediction grid differs from the reference's: shape .* vs ") as info:
        evaluate_pair(image(pred_labels, pred_affine), image(labels, affine), {0: "bg", 1: "organ"}, case="scan_7")
    assert str(info.value).count("spacing") == 2


def test_tiny_affine_differences_are_the_same_grid() -> None:
    affine = grid_affine((1.0, 1.0, 2.0))
    labels = np.zeros((12, 12, 8), dtype=np.uint8)
    labels[3:6, 3:6, 2:5] = 1
    rounded = affine + 1e-6
    rounded[3] = affine[3]
    assert evaluate_pair(image(labels, rounded), image(labels, affine), {0: "bg", 1: "organ"})[0]["dice"] == 1.0


def test_labels_outside_the_classes_are_refused() -> None:
    labels = np.zeros((8, 8, 8), dtype=np.uint8)
    labels[1:3, 1:3, 1:3] = 5
    with pytest.raises(DataError, match=r"case 'x'.*label values \[5\] outside the classes 0..1"):
        evaluate_pair(image(labels, np.eye(4)), image(labels * 0, np.eye(4)), {0: "bg", 1: "organ"}, case="x")


def test_missing_predictions_are_all_named(tmp_path: Path) -> None:
    datalist = write_dataset(tmp_path / "data", num_train=0, num_test=3, shape=(16, 16, 12))
    cases = load_datalist(datalist, need_training=False).test
    preds = tmp_path / "preds"
    preds.mkdir()
    shutil.copy(cases[1].label, preds / f"{cases[1].name}.nii.gz")
    with pytest.raises(DataError, match=r"2 of 3 prediction\(s\) missing") as info:
        evaluate(preds, cases, {0: "background", 1: "organ"}, tmp_path / "eval")
    assert f"{cases[0].name}.nii.gz" in str(info.value) and f"{cases[2].name}.nii.gz" in str(info.value)
    assert not (tmp_path / "eval").exists()


def test_cases_without_labels_are_refused(tmp_path: Path) -> None:
    case = Case(name="a", image=(tmp_path / "a.nii.gz",))
    with pytest.raises(DataError, match="no reference label: a"):
        evaluate(tmp_path, [case], {0: "background", 1: "organ"}, tmp_path / "eval")


# --------------------------------------------------------------------------- report pictures


def test_worst_error_voxel_lies_in_the_largest_disagreement() -> None:
    ref = np.zeros((20, 20, 20), dtype=np.int64)
    ref[2:8, 2:8, 2:8] = 1
    pred = ref.copy()
    pred[2, 2, 2] = 0  # a one-voxel error
    pred[12:17, 12:17, 12:17] = 1  # a large false positive elsewhere
    assert all(12 <= c < 17 for c in worst_error_voxel(ref, pred))


def test_contour_overlay_draws_both_outlines(tmp_path: Path) -> None:
    from matplotlib.image import imread

    ref = np.zeros((24, 24, 16), dtype=np.int64)
    ref[6:16, 6:16, 4:12] = 1
    pred = np.roll(ref, 4, axis=0) * 2  # drawn in the second class colour
    out = tmp_path / "contours.png"
    save_contour_overlay(np.zeros(ref.shape), ref, pred, out, spacing=(1.0, 1.0, 2.0), centre=(10, 10, 8),
                         class_names=["background", "a", "b"])
    pixels = imread(out)[..., :3]
    red = (pixels[..., 0] > 0.7) & (pixels[..., 1] < 0.3)  # class 1 colour
    green = (pixels[..., 1] > 0.5) & (pixels[..., 0] < 0.4)  # class 2 colour
    assert red.sum() > 50 and green.sum() > 50


# --------------------------------------------------------------------------- the command line, end to end


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three labelled test cases (RAS and LPS on disk), two foreground classes."""
    return write_dataset(tmp_path_factory.mktemp("eval-data"), num_train=1, num_test=3, shape=(24, 24, 16), num_classes=3)


def write_predictions(dataset: Path, out: Path, *, degrade: bool) -> Path:
    """Predictions on each reference's grid: the reference itself, or with class 1 shifted / class 2 removed."""
    out.mkdir(parents=True)
    for i, case in enumerate(load_datalist(dataset).test):
        reference = nib.load(case.label)
        labels = np.asarray(reference.dataobj).copy()
        if degrade and i == 0:
            labels[labels == 2] = 0
        elif degrade:
            labels = np.where(labels == 1, 0, labels)
            labels[np.roll(np.asarray(reference.dataobj) == 1, 2, axis=0) & (labels == 0)] = 1
        nib.save(nib.Nifti1Image(labels.astype(np.uint8), reference.affine, reference.header), out / f"{case.name}.nii.gz")
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_cli_perfect_then_degraded_predictions(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    perfect = write_predictions(dataset, tmp_path / "perfect", degrade=False)
    assert main(["-q", "evaluate", "--pred", str(perfect), "--datalist", str(dataset), "-o", str(tmp_path / "e1")]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"organ\s+1\.000 ± 0\.000", printed) and "mean Dice over classes: 1.0000" in printed
    rows = read_csv(tmp_path / "e1" / "metrics.csv")
    assert tuple(rows[0]) == COLUMNS and len(rows) == 3 * 2
    assert {r["class"] for r in rows} == {"organ", "vessel"}
    assert all(float(r["dice"]) == 1.0 and float(r["hd95_mm"]) == 0.0 for r in rows)
    summary = json.loads((tmp_path / "e1" / "summary.json").read_text())
    assert summary["mean_dice"] == 1.0 and summary["n_cases"] == 3 and summary["nsd_tolerance_mm"] == 2.0
    assert set(summary["organ"]["dice"]) == {"mean", "median", "std", "min", "max", "n", "n_undefined"}

    degraded = write_predictions(dataset, tmp_path / "degraded", degrade=True)
    assert main(["-q", "evaluate", "--pred", str(degraded), "--datalist", str(dataset), "-o", str(tmp_path / "e2"),
                 "--tolerance-mm", "1", "--workers", "2"]) == 0
    rows = read_csv(tmp_path / "e2" / "metrics.csv")
    summary = json.loads((tmp_path / "e2" / "summary.json").read_text())
    assert 0.0 < summary["mean_dice"] < 1.0 and summary["nsd_tolerance_mm"] == 1.0
    emptied = [r for r in rows if r["flag"] == "pred_empty"]
    assert [r["class"] for r in emptied] == ["vessel"] and emptied[0]["hd95_mm"] == "nan"
    assert summary["vessel"]["hd95_mm"]["n_undefined"] == 1
    html = (tmp_path / "e2" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1 + 3  # box plots + the three worst cases
    assert not re.search(r"""src=["'](?!data:)""", html)  # self-contained: nothing loaded from elsewhere
    worst = min(rows, key=lambda r: float(r["dice"]))["case"]
    assert html.index(worst) < html.index("Cases (worst first)")


def test_cli_markdown_report_and_split(dataset: Path, tmp_path: Path) -> None:
    degraded = write_predictions(dataset, tmp_path / "preds", degrade=True)
    out = tmp_path / "eval"
    assert main(["-q", "evaluate", "--pred", str(degraded), "--datalist", str(dataset), "--split", "test", "-o", str(out),
                 "--report", "md", "--worst", "1"]) == 0
    text = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 2 and all((out / link).is_file() for link in links)
    assert main(["-q", "evaluate", "--pred", str(degraded), "--datalist", str(dataset), "-o", str(tmp_path / "no"),
                 "--report", "none"]) == 0
    assert sorted(p.name for p in (tmp_path / "no").iterdir()) == ["metrics.csv", "summary.json"]
    assert main(["-q", "evaluate", "--pred", str(degraded), "--datalist", str(dataset), "-o", str(tmp_path / "threads"),
                 "--report", "none", "--workers", "3"]) == 0
    assert (tmp_path / "threads" / "metrics.csv").read_text() == (tmp_path / "no" / "metrics.csv").read_text()


def test_cli_errors_exit_1_with_one_line(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preds = write_predictions(dataset, tmp_path / "preds", degrade=False)
    victim = sorted(preds.iterdir())[0]
    victim.unlink()
    assert main(["evaluate", "--pred", str(preds), "--datalist", str(dataset), "-o", str(tmp_path / "e")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert victim.name in err and len(err.strip().splitlines()) == 1

    case = next(c for c in load_datalist(dataset).test if c.name == victim.name.removesuffix(".nii.gz"))
    reference = nib.load(case.label)
    shifted = reference.affine.copy()
    shifted[:3, 3] += 3.0
    nib.save(nib.Nifti1Image(np.asarray(reference.dataobj), shifted), victim)
    assert main(["evaluate", "--pred", str(preds), "--datalist", str(dataset), "-o", str(tmp_path / "e")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"case {case.name!r}" in err and "grid differs" in err

    args = ["evaluate", "--pred", str(preds), "--datalist", str(dataset), "--split", "validation", "-o", str(tmp_path / "e")]
    assert main(args) == EXIT_ERROR
    assert 'no "validation" cases' in capsys.readouterr().err
