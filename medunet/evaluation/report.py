"""The evaluation report: summary table, box plots per class, worst cases drawn as contours.

``report.html`` is one self-contained file (pictures embedded as base64 PNG), so it can be mailed
or attached to a ticket; ``report.md`` links the same pictures in ``figures/``. Pictures are
written with matplotlib's Agg canvas (see :mod:`medunet.visualize`), atomically.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage

from medunet.errors import DataError
from medunet.io.atomic import atomic_write_text
from medunet.io.datalist import Case
from medunet.visualize import class_colour, save_contour_overlay, save_figure

#: Metrics drawn as box plots, with their axis labels.
BOX_METRICS = (("dice", "Dice"), ("hd95_mm", "HD95 (mm)"), ("nsd", "NSD"))
#: Columns of the summary table: metric, header, digits.
TABLE = (("dice", "Dice", 3), ("iou", "IoU", 3), ("hd95_mm", "HD95 mm", 2), ("asd_mm", "ASD mm", 2),
         ("nsd", "NSD", 3), ("volume_diff_ml", "ΔV mL", 2))


def _mean_std(stats: Mapping[str, Any], digits: int) -> str:
    """``0.912 ± 0.031`` (plus ``(k n/a)`` when k values were undefined); ``n/a`` when none is defined."""
    if stats["mean"] is None:
        text = "n/a"
    else:
        text = f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
    return f"{text} ({stats['n_undefined']} n/a)" if stats["n_undefined"] else text


def format_table(
    summary: Mapping[str, Any], class_names: Sequence[str], *, columns: Sequence[str] = ("dice", "hd95_mm", "nsd")
) -> str:
    """A plain-text table, one row per class: mean ± std of ``columns`` (for the terminal)."""
    spec = {key: (head, digits) for key, head, digits in TABLE}
    header = ["class", *(spec[c][0] for c in columns)]
    body = [[name, *(_mean_std(summary[name][c], spec[c][1]) for c in columns)] for name in class_names]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    mean = summary.get("mean_dice")
    lines.append(f"mean Dice over classes: {'n/a' if mean is None else f'{mean:.4f}'}")
    return "\n".join(lines)


def case_scores(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean Dice over classes per case (Dice is always defined under the empty convention)."""
    scores: dict[str, list[float]] = {}
    for row in rows:
        scores.setdefault(row["case"], []).append(float(row["dice"]))
    return {case: float(np.mean(values)) for case, values in scores.items()}


def plot_boxes(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str], out_png: Path) -> None:
    """One panel per metric in :data:`BOX_METRICS`, one box per class, every case as a dot."""
    fig = Figure(figsize=(4.2 * len(BOX_METRICS), 3.8), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(BOX_METRICS), squeeze=False)[0]
    rng = np.random.default_rng(0)  # fixed jitter: the same results draw the same picture
    for ax, (metric, label) in zip(axes, BOX_METRICS):
        data, undefined = [], []
        for name in class_names:
            values = np.array([float(r[metric]) for r in rows if r["class"] == name])
            data.append(values[np.isfinite(values)])
            undefined.append(int((~np.isfinite(values)).sum()))
        positions = np.arange(1, len(class_names) + 1)
        filled = [(p, d) for p, d in zip(positions, data) if d.size]
        if filled:
            ax.boxplot([d for _, d in filled], positions=[p for p, _ in filled], widths=0.5, showfliers=False)
        for i, (p, d) in enumerate(zip(positions, data)):
            ax.scatter(p + rng.uniform(-0.12, 0.12, d.size), d, s=12, alpha=0.7,
                       color=class_colour(i + 1), zorder=3)
        ticks = [f"{n}\n({u} n/a)" if u else n for n, u in zip(class_names, undefined)]
        ax.set_xticks(positions, ticks, fontsize="small")
        ax.set_xlim(0.4, len(class_names) + 0.6)
        if metric in ("dice", "nsd"):
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    save_figure(fig, out_png)


def worst_error_voxel(reference: np.ndarray, prediction: np.ndarray) -> tuple[int, int, int]:
    """A voxel inside the largest connected region where prediction and reference disagree.

    Falls back to the reference's (else the prediction's, else the volume's) centre when they agree.
    """
    error = reference != prediction
    if error.any():
        components, count = ndimage.label(error)
        largest = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
        points = np.argwhere(components == largest)
    else:
        points = np.argwhere(reference > 0) if (reference > 0).any() else np.argwhere(prediction > 0)
        if not len(points):
            return reference.shape[0] // 2, reference.shape[1] // 2, reference.shape[2] // 2
    centroid = points.mean(axis=0)
    nearest = points[np.argmin(((points - centroid) ** 2).sum(axis=1))]  # a voxel of the region itself
    return int(nearest[0]), int(nearest[1]), int(nearest[2])


def draw_case(case: Case, prediction_path: Path, out_png: Path, *, class_names: Sequence[str], title: str) -> None:
    """Contours of reference and prediction over the image (first channel), in RAS, through the worst error."""

    def canonical(path: Path, dtype: type) -> np.ndarray:
        data = np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj, dtype=np.float32)
        return (np.rint(data) if dtype is np.int64 else data).astype(dtype)

    if case.label is None:
        raise DataError("case has no reference label to draw", case=case.name)
    image = nib.as_closest_canonical(nib.load(str(case.image[0])))
    voxels = np.asarray(image.dataobj, dtype=np.float32)
    reference, prediction = canonical(case.label, np.int64), canonical(prediction_path, np.int64)
    voxels = voxels.reshape(voxels.shape[:3]) if voxels.ndim > 3 and voxels.size == np.prod(voxels.shape[:3]) else voxels
    if voxels.shape != reference.shape:
        raise DataError(f"image shape {voxels.shape} differs from its label's {reference.shape}", case=case.name,
                        path=str(case.image[0]))
    save_contour_overlay(
        voxels, reference, prediction, out_png,
        spacing=tuple(float(z) for z in image.header.get_zooms()[:3]),
        centre=worst_error_voxel(reference, prediction), title=title, class_names=class_names,
    )


def _png_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def write_report(
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    *,
    cases: Mapping[str, Case],
    pred_dir: Path,
    out_dir: Path,
    class_names: Mapping[int, str],
    fmt: str = "html",
    worst_cases: int = 3,
    nsd_tolerance_mm: float = 2.0,
) -> Path:
    """Draw the figures into ``out_dir/figures`` and write ``report.html`` or ``report.md``; return its path."""
    names = [class_names[k] for k in sorted(class_names) if k != 0]
    by_value = [class_names.get(k, f"label {k}") for k in range(max(class_names) + 1)]
    figures = Path(out_dir) / "figures"
    boxes = figures / "boxplots.png"
    for stale in figures.glob("worst_*.png"):  # from an earlier evaluation into this folder
        stale.unlink()
    plot_boxes(rows, names, boxes)
    scores = sorted(case_scores(rows).items(), key=lambda item: (item[1], item[0]))
    worst: list[tuple[str, float, Path]] = []
    for rank, (case, score) in enumerate(scores[: max(worst_cases, 0)], start=1):
        png = figures / f"worst_{rank}_{case}.png"
        draw_case(cases[case], Path(pred_dir) / f"{case}.nii.gz", png, class_names=by_value,
                  title=f"{case}: mean Dice {score:.3f} (solid: reference, dashed: prediction)")
        worst.append((case, score, png))
    if fmt == "html":
        path = Path(out_dir) / "report.html"
        atomic_write_text(path, _html(rows=rows, summary=summary, names=names, scores=scores, worst=worst, boxes=boxes,
                                      tolerance=nsd_tolerance_mm))
    else:
        path = Path(out_dir) / "report.md"
        atomic_write_text(path, _markdown(out_dir=Path(out_dir), rows=rows, summary=summary, names=names, scores=scores,
                                          worst=worst, boxes=boxes, tolerance=nsd_tolerance_mm))
    return path


_NOTE = ("Dice, IoU and NSD are 1 when prediction and reference are both empty and 0 when exactly one is; "
         "HD95 and ASD are then undefined (n/a) and left out of means, which are over defined values only. "
         "ΔV is predicted minus reference volume.")


def _summary_rows(summary: Mapping[str, Any], names: Sequence[str]) -> list[list[str]]:
    return [[name, *(_mean_std(summary[name][key], digits) for key, _, digits in TABLE)] for name in names]


def _html(*, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], names: Sequence[str],
          scores: Sequence[tuple[str, float]], worst: Sequence[tuple[str, float, Path]], boxes: Path, tolerance: float) -> str:
    esc = html.escape

    def table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        lines = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in body)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{lines}</tbody></table>"

    mean = summary.get("mean_dice")
    dice = {(r["case"], r["class"]): float(r["dice"]) for r in rows}
    per_case = [[case, f"{score:.3f}", *(_fmt(dice.get((case, n), math.nan)) for n in names)] for case, score in scores]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>medunet evaluation</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}.note{color:#555}</style></head><body>",
        "<h1>medunet evaluation</h1>",
        f"<p>{len(scores)} case(s), {len(names)} class(es); mean Dice over classes "
        f"<b>{'n/a' if mean is None else f'{mean:.4f}'}</b>; NSD tolerance {tolerance:g} mm.</p>",
        "<h2>Summary (mean ± std over cases)</h2>",
        table(["class", *(h for _, h, _ in TABLE)], _summary_rows(summary, names)),
        f"<p class='note'>{esc(_NOTE)}</p>",
        "<h2>Distribution per class</h2>", _png_tag(boxes, "box plots per class"),
        "<h2>Worst cases (lowest mean Dice)</h2>",
        *(f"<h3>{esc(case)}: mean Dice {score:.3f}</h3>{_png_tag(png, case)}" for case, score, png in worst),
        "<h2>Cases (worst first)</h2>",
        table(["case", "mean Dice", *(f"Dice {n}" for n in names)], per_case),
        "<p class='note'>Every number per case and class: metrics.csv; summary statistics: summary.json.</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _markdown(*, out_dir: Path, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], names: Sequence[str],
              scores: Sequence[tuple[str, float]], worst: Sequence[tuple[str, float, Path]], boxes: Path,
              tolerance: float) -> str:
    def table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in body)]

    mean = summary.get("mean_dice")
    lines = [
        "# medunet evaluation", "",
        f"{len(scores)} case(s), {len(names)} class(es); mean Dice over classes **{'n/a' if mean is None else f'{mean:.4f}'}**; "
        f"NSD tolerance {tolerance:g} mm.", "",
        "## Summary (mean ± std over cases)", "",
        *table(["class", *(h for _, h, _ in TABLE)], _summary_rows(summary, names)), "", _NOTE, "",
        "## Distribution per class", "", f"![box plots per class]({boxes.relative_to(out_dir).as_posix()})", "",
        "## Worst cases (lowest mean Dice)", "",
    ]
    for case, score, png in worst:
        lines += [f"### {case}: mean Dice {score:.3f}", "", f"![{case}]({png.relative_to(out_dir).as_posix()})", ""]
    lines += ["## Cases (worst first)", "", *table(["case", "mean Dice"], [[c, f"{s:.3f}"] for c, s in scores]), ""]
    return "\n".join(lines)
