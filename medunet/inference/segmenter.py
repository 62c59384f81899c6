"""The Segmenter: load a trained model once, segment many volumes onto their own grids.

    seg = Segmenter.from_checkpoint("runs/liver")        # a run folder or a .pt file
    mask = seg.predict("ct.nii.gz")                       # nibabel image, exactly on the input grid
    seg.predict_file("ct.nii.gz", "preds/ct.nii.gz")      # written atomically

Geometry: the input is preprocessed with the training chain (orientation, spacing,
crop), predicted with a sliding window, and brought back with MONAI's ``Invertd``.
The result is then checked against the input's shape and affine, and written with
the input's own header, so the mask sits on exactly the input's grid whatever its
orientation, obliquity or anisotropy. A mismatch is an error, never a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from medunet.config import Config, apply_overrides, config_from_dict
from medunet.errors import GeometryError, MedunetError, OutputExistsError
from medunet.inference.sliding import predict_probabilities
from medunet.io.nifti import ImageSource, label_dtype, mask_image, read_nifti, same_grid, spacing_of, write_mask
from medunet.networks import build_network
from medunet.postprocessing import postprocess_labels
from medunet.runtime import amp_dtype, select_device
from medunet.training.checkpoint import load_checkpoint, resolve_checkpoint
from medunet.training.data import unwrap_error
from medunet.transforms import IMAGE, preprocessing

log = logging.getLogger("medunet")

PRED = "pred"


@dataclass(frozen=True)
class CaseResult:
    """Outcome of one case in a batch run."""

    case: str
    input: str
    output: str | None
    error: str | None = None


class Segmenter:
    """A trained model ready to segment volumes. Build it with :meth:`from_checkpoint`."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: Config,
        *,
        class_names: Sequence[str],
        in_channels: int,
        device: torch.device,
        source: str = "",
    ) -> None:
        self.model = model.to(device).eval()
        self.config = config
        self.class_names = list(class_names)
        self.in_channels = in_channels
        self.device = device
        self.source = source
        self._amp = amp_dtype(config.train.amp, device)
        self._preprocess = preprocessing(config, num_classes=self.num_classes, in_channels=in_channels, with_label=False)

    @property
    def num_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.class_names)

    def __repr__(self) -> str:
        return (
            f"Segmenter(model={self.config.model.name!r}, classes={self.class_names}, in_channels={self.in_channels}, "
            f"spacing={self.config.data.target_spacing}, device={self.device})"
        )

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, device: str = "auto", overrides: Sequence[str] = ()
    ) -> Segmenter:
        """Load a checkpoint (or a run folder's best.pt) safely; ``overrides`` may change inference settings.

        Args:
            path: a run folder or a checkpoint file.
            device: auto, cpu, cuda or cuda:N.
            overrides: dotted config overrides, e.g. ``["inference.overlap=0.25"]``.
        """
        checkpoint = resolve_checkpoint(path)
        state = load_checkpoint(checkpoint)
        config = config_from_dict(apply_overrides(state["config"], overrides))
        labels = state["labels"]
        class_names = [labels[str(i)] for i in range(len(labels))]
        torch_device = select_device(device if device != "auto" else config.inference.device)
        model = build_network(config.model, in_channels=int(state["in_channels"]), out_channels=len(class_names))
        model.load_state_dict(state["model"])
        log.debug("loaded %s (epoch %s)", checkpoint, state["epoch"])
        return cls(model, config, class_names=class_names, in_channels=int(state["in_channels"]), device=torch_device, source=str(checkpoint))

    def predict(self, image: ImageSource | Sequence[ImageSource], *, case: str | None = None) -> nib.Nifti1Image:
        """Segment one volume (a path, a list of per-channel paths, or a nibabel image).

        Returns:
            A label image (uint8 up to 256 classes) with the input's shape, affine and header geometry.

        Raises:
            DataError: the input is unreadable or not a valid volume.
            GeometryError: the result would not lie exactly on the input grid.
        """
        labels, reference = self._segment(image, case=case)
        return mask_image(labels, reference, num_classes=self.num_classes)

    def predict_file(
        self, image: ImageSource | Sequence[ImageSource], output: str | Path, *, overwrite: bool = False, case: str | None = None
    ) -> Path:
        """Segment ``image`` and write the mask to ``output`` (.nii.gz) atomically."""
        output = Path(output)
        if output.exists() and not overwrite:  # before the (slow) prediction, not only at writing
            raise OutputExistsError(f"output {output} already exists; pass --overwrite to replace it")
        labels, reference = self._segment(image, case=case)
        return write_mask(labels, reference, output, num_classes=self.num_classes, overwrite=overwrite)

    def _segment(self, image: ImageSource | Sequence[ImageSource], *, case: str | None) -> tuple[np.ndarray, nib.Nifti1Image]:
        """Labels on the input grid, and the input (first channel) image whose header they take."""
        sources = list(image) if isinstance(image, (list, tuple)) else [image]
        reference = read_nifti(sources[0], case=case)
        return self.predict_labels(sources, reference=reference, case=case), reference

    def predict_labels(self, sources: Sequence[ImageSource], *, reference: nib.Nifti1Image, case: str | None = None) -> np.ndarray:
        """Label array on ``reference``'s grid (after inversion and post-processing)."""
        try:
            data: dict[str, Any] = self._preprocess({IMAGE: list(sources), "case": case})
        except Exception as exc:  # MONAI wraps transform errors; surface our typed one
            cause = unwrap_error(exc)
            if isinstance(cause, MedunetError):
                raise cause from None
            raise
        pre_image = data[IMAGE]
        probs = predict_probabilities(self.model, torch.as_tensor(pre_image)[None], self.config, device=self.device, amp=self._amp)[0]
        # Invert either the probabilities (linear; argmax on the input grid) or the hard labels (nearest).
        soft = self.config.inference.resample_probabilities
        values = probs.cpu() if soft else probs.max(dim=0, keepdim=True).indices.float().cpu()  # max().indices: argmax is ~20x slower on CPU
        data[PRED] = MetaTensor(values, meta=dict(pre_image.meta), applied_operations=list(pre_image.applied_operations))
        inverted = Invertd(keys=PRED, transform=self._preprocess, orig_keys=IMAGE, nearest_interp=not soft)(data)[PRED]
        labels_t = torch.as_tensor(inverted).max(dim=0).indices if soft else torch.as_tensor(inverted)[0].round()
        labels = labels_t.numpy().astype(label_dtype(self.num_classes))
        expected = tuple(int(s) for s in reference.shape[:3])
        if labels.shape != expected or not same_grid(np.asarray(inverted.affine), reference.affine, tolerance=1e-4):
            raise GeometryError(
                f"case {case!r}: inverted prediction has shape {labels.shape} (input {expected}) or a different affine; "
                "refusing to write a mask off the input grid"
            )
        return postprocess_labels(
            labels,
            spacing=spacing_of(reference.affine),
            config=self.config.postprocessing,
            class_names=dict(enumerate(self.class_names)),
        )
