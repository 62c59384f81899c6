"""Diagnostic PNGs: training curves, image/label overlays and reference/prediction contour comparisons.

Both plots use matplotlib's object API with the Agg canvas (no pyplot, no
``matplotlib.use``), so importing this module never changes global backend state
and works on headless machines. PNGs are written atomically, so a crash never
leaves a half-written figure that a report or dashboard would pick up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from medunet.io.atomic import atomic_path

if TYPE_CHECKING:
    import nibabel as nib

_DPI = 100
_ALPHA = 0.4
#: One distinct colour per label value (label 1 -> first colour, ...; cycles after 10).
_CLASS_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4",
                  "#42d4f4", "#f032e6", "#bfef45", "#ffe119", "#469990")
#: (view name, slice axis): axial slices along axis 2, coronal along 1, sagittal along 0.
_VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def _save(fig: Figure, out_png: Path) -> None:
    """Render ``fig`` with Agg and write it to ``out_png`` atomically."""
    FigureCanvasAgg(fig)
    with atomic_path(Path(out_png)) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)


def save_figure(fig: Figure, out_png: Path) -> None:
    """Render a figure built with the object API to a PNG, atomically (for other modules' plots)."""
    _save(fig, out_png)


def class_colour(label: int) -> str:
    """The colour of label value ``label`` in every overlay (label 1 is the first colour; cycles after 10)."""
    return _CLASS_COLOURS[(int(label) - 1) % len(_CLASS_COLOURS)]


def _num(value: float | int | str | None) -> float:
    """Parse a CSV/log cell as float; None, "" and unparsable cells become NaN."""
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def plot_training_curve(
    rows: Sequence[Mapping[str, float | int | str | None]],
    out_png: Path,
    *,
    class_names: Sequence[str],
) -> None:
    """Plot training loss and validation Dice per epoch to a 10x4 in PNG.

    Left: training loss (log scale when all values are positive). Right: mean
    validation Dice (thick) and per-class Dice (thin) at the epochs that were
    validated. The title names the best mean Dice and its epoch, so a run's
    progress can be judged at a glance without opening the metrics CSV.
    """
    if not rows:
        raise ValueError("rows must be a non-empty sequence of epoch rows, got 0 rows")
    epochs = np.array([_num(r.get("epoch")) for r in rows])
    epochs = np.where(np.isfinite(epochs), epochs, np.arange(1, len(rows) + 1))
    loss = np.array([_num(r.get("train_loss")) for r in rows])
    mean = np.array([_num(r.get("val_dice_mean")) for r in rows])
    val = np.isfinite(mean)

    fig = Figure(figsize=(10, 4), dpi=_DPI, layout="constrained")
    ax_loss, ax_dice = fig.subplots(1, 2, sharex=True)
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    if np.ptp(epochs) < 2:  # too few epochs for integer ticks on an autoscaled axis
        ax_loss.set_xlim(epochs.min() - 1, epochs.max() + 1)
    finite = np.isfinite(loss)
    ax_loss.plot(epochs[finite], loss[finite], marker=".", color="tab:blue")
    if finite.any() and (loss[finite] > 0).all():
        ax_loss.set_yscale("log")
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    ax_loss.grid(alpha=0.3)

    ax_dice.set(title="validation Dice", xlabel="epoch", ylabel="Dice", ylim=(0.0, 1.0))
    ax_dice.grid(alpha=0.3)
    if val.any():
        ax_dice.plot(epochs[val], mean[val], marker="o", lw=2.5, color="black", label="mean")
        for i, name in enumerate(class_names):
            dice = np.array([_num(r.get(f"val_dice_{name}")) for r in rows])[val]
            ax_dice.plot(epochs[val], dice, marker=".", lw=1,
                         color=_CLASS_COLOURS[i % len(_CLASS_COLOURS)], label=name)
        ax_dice.legend(loc="lower right", fontsize="small")
        best = int(np.nanargmax(np.where(val, mean, np.nan)))
        fig.suptitle(f"best mean Dice {mean[best]:.4f} at epoch {epochs[best]:g}")
    else:
        ax_dice.text(0.5, 0.5, "no validation yet", transform=ax_dice.transAxes,
                     ha="center", va="center", color="grey")
        fig.suptitle("best mean Dice: no validation yet")
    _save(fig, out_png)


def _check_volume(name: str, array: np.ndarray, shape: tuple[int, ...] | None) -> None:
    """Raise ValueError unless ``array`` is 3D (and has ``shape`` when given)."""
    if array.ndim != 3:
        raise ValueError(f"{name} must be a 3D array, got shape {array.shape}")
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name} must have the image's shape {shape}, got {array.shape}")


def _centre(prediction: np.ndarray, reference: np.ndarray | None) -> tuple[int, ...]:
    """Voxel index of the prediction's foreground centroid, else the reference's, else the centre."""
    for labels in (prediction, reference):
        if labels is not None and (labels > 0).any():
            return tuple(int(round(c)) for c in np.argwhere(labels > 0).mean(axis=0))
    return tuple(n // 2 for n in prediction.shape)


def _draw_labels(ax: Axes, labels: np.ndarray, aspect: float) -> None:
    """Overlay a 2D label slice (display orientation): filled colour per class plus a contour."""
    rgba = np.zeros(labels.shape + (4,))
    for value in np.unique(labels[labels > 0]):
        colour = _CLASS_COLOURS[(int(value) - 1) % len(_CLASS_COLOURS)]
        mask = labels == value
        rgba[mask] = to_rgba(colour, _ALPHA)
        if min(mask.shape) >= 2 and not mask.all():
            ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.0)
    ax.imshow(rgba, origin="lower", aspect=aspect, interpolation="nearest")


def _intensity_window(image: np.ndarray, window: tuple[float, float] | None) -> tuple[float, float]:
    """Display range: ``window`` or the image's 1st..99th percentiles (never an empty range)."""
    if window is None:
        low, high = (float(v) for v in np.nanpercentile(image, [1.0, 99.0]))
    else:
        low, high = float(window[0]), float(window[1])
    return low, (high if high > low else low + 1.0)


def save_overlay(
    image: np.ndarray,
    prediction: np.ndarray,
    out_png: Path,
    *,
    reference: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str = "",
    window: tuple[float, float] | None = None,
    class_names: Sequence[str] | None = None,
) -> None:
    """Save axial/coronal/sagittal slices of ``image`` with label overlays to a PNG.

    Slices pass through the centroid of the predicted foreground (else the
    reference's, else the volume centre), so the structure of interest is shown.
    Rows are views; columns are the plain image, image + reference (only when
    ``reference`` is given) and image + prediction, for quick visual QA of a
    segmentation. Pixels keep their physical aspect ratio via ``spacing``; the
    intensity window is ``window`` or the image's 1st..99th percentiles; the legend uses
    ``class_names`` (indexed by label value) when given.
    """
    image, prediction = np.asarray(image), np.asarray(prediction)
    _check_volume("image", image, None)
    _check_volume("prediction", prediction, image.shape)
    if reference is not None:
        reference = np.asarray(reference)
        _check_volume("reference", reference, image.shape)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive numbers, got {tuple(spacing)}")

    low, high = _intensity_window(image, window)
    columns: list[tuple[str, np.ndarray | None]] = [("image", None)]
    if reference is not None:
        columns.append(("reference", np.rint(reference).astype(np.int64)))
    columns.append(("prediction", np.rint(prediction).astype(np.int64)))
    centre = _centre(prediction, reference)

    fig = Figure(figsize=(3 * len(columns), 3 * len(_VIEWS)), dpi=_DPI, layout="constrained")
    axes = fig.subplots(len(_VIEWS), len(columns), squeeze=False)
    for row, (view, axis) in enumerate(_VIEWS):
        index = centre[axis]
        horizontal, vertical = (a for a in range(3) if a != axis)
        aspect = spacing[vertical] / spacing[horizontal]
        for col, (name, labels) in enumerate(columns):
            ax = axes[row, col]
            # Transpose so the first remaining axis runs left-right, the second bottom-up.
            ax.imshow(np.take(image, index, axis=axis).T, cmap="gray", vmin=low, vmax=high,
                      origin="lower", aspect=aspect, interpolation="nearest")
            if labels is not None:
                _draw_labels(ax, np.take(labels, index, axis=axis).T, aspect)
            ax.set_title(f"{name}: {view} {index}", fontsize="small")
            ax.set_axis_off()

    present = sorted({int(v) for _, lab in columns if lab is not None for v in np.unique(lab) if v > 0})
    if present:
        handles = [Patch(color=_CLASS_COLOURS[(v - 1) % len(_CLASS_COLOURS)], alpha=0.8,
                         label=class_names[v] if class_names and v < len(class_names) else f"label {v}")
                   for v in present]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize="small")
    if title:
        fig.suptitle(title)
    _save(fig, out_png)


def save_overlay_files(
    image_path: Path,
    prediction_path: Path,
    out_png: Path,
    *,
    reference_path: Path | None = None,
    title: str = "",
    window: tuple[float, float] | None = None,
    class_names: Sequence[str] | None = None,
) -> None:
    """:func:`save_overlay` for NIfTI files, shown in RAS so anatomy looks the same whatever the files' axis order."""
    import nibabel as nib

    def canonical(path: Path, dtype: type) -> np.ndarray:
        return np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj).astype(dtype)

    from medunet.io.image import read_image  # a NIfTI file or a DICOM series folder

    source = read_image(image_path)  # read as the Segmenter reads it: 3D (trailing singleton axes dropped), checked
    image, spacing = _canonical_image(source, str(image_path))
    save_overlay(image, canonical(prediction_path, np.int64), out_png,
                 reference=canonical(reference_path, np.int64) if reference_path is not None else None,
                 spacing=spacing, title=title, window=window, class_names=class_names)


def save_mask_overlay(
    image: nib.Nifti1Image,
    labels: np.ndarray,
    out_png: Path,
    *,
    name: str = "<image>",
    title: str = "",
    window: tuple[float, float] | None = None,
    class_names: Sequence[str] | None = None,
) -> None:
    """:func:`save_overlay_files` for an image and a label array on its grid held in memory (``name`` names it in errors)."""
    import nibabel as nib

    volume, spacing = _canonical_image(image, name)
    mask = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(np.asarray(labels), image.affine)).dataobj).astype(np.int64)
    save_overlay(volume, mask, out_png, spacing=spacing, title=title, window=window, class_names=class_names)


def _canonical_image(source: nib.Nifti1Image, name: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """An image's voxels (float32) in RAS, and its spacing in that order."""
    import nibabel as nib

    from medunet.io.nifti import read_voxels

    image = nib.as_closest_canonical(nib.Nifti1Image(read_voxels(source, case=None, path=name), source.affine))
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    return np.asarray(image.dataobj, dtype=np.float32), spacing


def save_contour_overlay(
    image: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    out_png: Path,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    centre: Sequence[int] | None = None,
    title: str = "",
    window: tuple[float, float] | None = None,
    class_names: Sequence[str] | None = None,
) -> None:
    """Save axial, coronal and sagittal slices with reference (solid) and prediction (dashed) contours.

    Where the two outlines part is where the segmentation is wrong, which a filled overlay hides.
    Slices pass through ``centre`` (a voxel index; e.g. the largest error, chosen by the caller),
    else through the reference's foreground centroid. Colours are per class as in :func:`save_overlay`.
    """
    image, reference, prediction = np.asarray(image), np.rint(reference).astype(np.int64), np.rint(prediction).astype(np.int64)
    _check_volume("image", image, None)
    _check_volume("reference", reference, image.shape)
    _check_volume("prediction", prediction, image.shape)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive numbers, got {tuple(spacing)}")
    centre = tuple(int(c) for c in centre) if centre is not None else _centre(reference, prediction)
    low, high = _intensity_window(image, window)
    present = sorted({int(v) for lab in (reference, prediction) for v in np.unique(lab) if v > 0})

    fig = Figure(figsize=(3.3 * len(_VIEWS), 3.6), dpi=_DPI, layout="constrained")
    axes = fig.subplots(1, len(_VIEWS), squeeze=False)[0]
    for ax, (view, axis) in zip(axes, _VIEWS):
        index = min(max(centre[axis], 0), image.shape[axis] - 1)
        horizontal, vertical = (a for a in range(3) if a != axis)
        aspect = spacing[vertical] / spacing[horizontal]
        ax.imshow(np.take(image, index, axis=axis).T, cmap="gray", vmin=low, vmax=high,
                  origin="lower", aspect=aspect, interpolation="nearest")
        for labels, style in ((reference, "solid"), (prediction, "dashed")):
            plane = np.take(labels, index, axis=axis).T
            for value in present:
                mask = plane == value
                if mask.any() and not mask.all() and min(mask.shape) >= 2:
                    ax.contour(mask.astype(float), levels=[0.5], linewidths=1.2, linestyles=style,
                               colors=[_CLASS_COLOURS[(value - 1) % len(_CLASS_COLOURS)]])
        ax.set_title(f"{view} {index}", fontsize="small")
        ax.set_axis_off()

    handles: list[Artist] = [Line2D([], [], color="black", ls="solid", label="reference"),
               Line2D([], [], color="black", ls="dashed", label="prediction")]
    handles += [Patch(color=_CLASS_COLOURS[(v - 1) % len(_CLASS_COLOURS)],
                      label=class_names[v] if class_names and v < len(class_names) else f"label {v}") for v in present]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize="small")
    if title:
        fig.suptitle(title)
    _save(fig, out_png)


# --------------------------------------------------------------------------- watching a run learn

#: Colour of the reference contour in the learning pictures (pure yellow, unlike every class colour).
REFERENCE_CONTOUR = (255, 255, 0)
_GAP = 4


def _rgb(colour: str) -> np.ndarray:
    return (np.array(to_rgba(colour)[:3]) * 255).astype(np.float64)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2D mask with a 4-neighbour outside it (a one-pixel contour)."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, :-2] & padded[1:-1, 2:] & padded[:-2, 1:-1] & padded[2:, 1:-1]
    return mask & ~inner


def learning_view(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, *, window: tuple[float, float]) -> np.ndarray:
    """One 2D slice as RGB (uint8): grey image, prediction filled per class, reference contour in yellow.

    The arrays are in display orientation already (rows top-down); the picture is enlarged by whole
    pixels to about 160 pixels so small structures stay visible.
    """
    low, high = window
    grey = np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0) * 255.0
    rgb: np.ndarray = np.repeat(grey[..., None], 3, axis=-1)
    for value in np.unique(prediction[prediction > 0]):
        mask = prediction == value
        rgb[mask] = (1 - _ALPHA - 0.1) * rgb[mask] + (_ALPHA + 0.1) * _rgb(class_colour(int(value)))
    scale = max(1, 160 // max(image.shape))
    rgb = np.kron(rgb, np.ones((scale, scale, 1)))
    for value in np.unique(reference[reference > 0]):
        mask = np.kron(reference == value, np.ones((scale, scale), dtype=bool))
        rgb[_boundary(mask)] = REFERENCE_CONTOUR
    return rgb.astype(np.uint8)


def learning_frame(views: Sequence[np.ndarray], caption: str) -> np.ndarray:
    """The views side by side under a caption line (RGB uint8), on a black background."""
    from PIL import Image, ImageDraw

    height = max(v.shape[0] for v in views)
    width = sum(v.shape[1] for v in views) + _GAP * (len(views) - 1)
    header = 14
    frame = np.zeros((height + header, width, 3), dtype=np.uint8)
    x = 0
    for view in views:
        frame[header : header + view.shape[0], x : x + view.shape[1]] = view
        x += view.shape[1] + _GAP
    picture = Image.fromarray(frame)
    ImageDraw.Draw(picture).text((2, 1), caption, fill=(255, 255, 255))
    return np.asarray(picture)


def save_learning_pictures(
    frames: Sequence[np.ndarray], out_png: Path, out_gif: Path, *, curve_png: Path | None = None, max_rows: int = 8
) -> None:
    """``out_png``: up to ``max_rows`` frames (first and last included) stacked, then the training curve;
    ``out_gif``: every frame in turn, the last held longer. Both written atomically."""
    from PIL import Image

    if not frames:
        raise ValueError("no learning frames to draw")
    picks = sorted({round(i * (len(frames) - 1) / max(1, max_rows - 1)) for i in range(min(max_rows, len(frames)))})
    rows = [frames[i] for i in picks]
    width = max(f.shape[1] for f in rows)
    parts = [np.pad(f, ((0, _GAP), (0, width - f.shape[1]), (0, 0))) for f in rows]
    if curve_png is not None and curve_png.is_file():
        curve = Image.open(curve_png).convert("RGB")
        curve = curve.resize((width, max(1, round(curve.height * width / curve.width))))
        parts.append(np.asarray(curve))
    with atomic_path(Path(out_png)) as tmp:
        Image.fromarray(np.concatenate(parts, axis=0)).save(tmp, format="PNG")
    images = [Image.fromarray(np.pad(f, ((0, 0), (0, width - f.shape[1]), (0, 0)))) for f in frames]
    durations = [600] * (len(images) - 1) + [2000]
    with atomic_path(Path(out_gif)) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
