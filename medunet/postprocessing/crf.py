"""Dense (fully connected) 3D CRF on softmax probabilities, in physical units.

    refined = dense_crf(probabilities, image, spacing=(1.5, 1.5, 2.0), config=cfg.postprocessing.crf)

Mean-field inference of a fully connected CRF with Potts compatibility (Krähenbühl & Koltun, 2011):
the unary term is the network's -log p, and every voxel is pulled towards the classes of

- its spatial neighbourhood (a Gaussian of ``spatial_sigma_mm``: smoothness), and
- its neighbours of similar intensity (a bilateral kernel, ``bilateral_sigma_mm`` in space and
  ``intensity_sigma`` in normalised intensity: edges of the image become edges of the mask).

Each iteration sets ``Q = softmax(log p + w_s * G(Q) + w_b * B(Q))``. Unlike the original, both
filters are *normalised* (each message is a weighted average of the neighbours' Q, between 0 and
1), so the weights mean the same at any resolution: a weight w lets full agreement of the
neighbourhood shift a voxel's log-probabilities by w. The voxel itself is not excluded from its
neighbourhood (its share is small for kernels wider than a voxel).

How the filters are computed (no compiled extension; plain torch, CPU or GPU):

- the spatial Gaussian is exact: separable 1D convolutions, sigma converted to voxels per axis,
  truncated at 3 sigma, normalised at the borders;
- the bilateral filter is approximated with a *bilateral grid* (Paris & Durand 2006; Chen et al.
  2007): the class maps are splatted (linear weights) into a 4D grid with one cell per sigma along
  x, y, z and intensity, blurred there with a binomial kernel (standard deviation one cell) and sliced
  back (linear interpolation). The effective kernel is close to a Gaussian about 1.15x the widths
  set (the linear splat and slice add their own spread). This replaces the permutohedral lattice of
  the original; SimpleCRF (does not build against NumPy 2) and MONAI's CRF (needs MONAI's compiled
  C++/CUDA extension) were not usable.

The CRF runs on the network's grid (resampled to ``data.target_spacing``, intensities normalised),
before the probabilities are inverted to the input grid: there the spacing is the one the model
was trained on, the intensities are in known units, and the cost is bounded by the network grid,
not the scanner's. The inversion and the input-grid checks that follow are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medunet.config import CrfConfig
from medunet.errors import DataError

#: Spatial Gaussian kernels are truncated at this many standard deviations.
TRUNCATE = 3.0
#: Probabilities are clamped to at least this before the logarithm (a voxel is never certain).
MIN_PROBABILITY = 1e-6


def dense_crf(
    probabilities: torch.Tensor | np.ndarray,
    image: torch.Tensor | np.ndarray,
    *,
    spacing: Sequence[float] | np.ndarray,
    config: CrfConfig,
) -> torch.Tensor:
    """Refined class probabilities (K, X, Y, Z), same shape, device and grid as ``probabilities``.

    Args:
        probabilities: softmax output (K, X, Y, Z), classes along axis 0.
        image: the normalised image on the same grid, (X, Y, Z) or (C, X, Y, Z); the appearance kernel
            uses the first channel.
        spacing: voxel size in mm along X, Y, Z.
        config: kernel widths, weights and iterations (``enabled`` is not looked at: calling it is enabling it).

    Raises:
        DataError: shapes disagree or the spacing is not 3 positive numbers.
    """
    probs = torch.as_tensor(probabilities).float()
    feature = torch.as_tensor(image, device=probs.device).float()
    feature = feature[0] if feature.ndim == 4 else feature
    if probs.ndim != 4 or tuple(feature.shape) != tuple(probs.shape[1:]):
        raise DataError(f"dense CRF needs probabilities (K, X, Y, Z) and an image on the same grid, got {tuple(probs.shape)} "
                        f"and {tuple(torch.as_tensor(image).shape)}")
    spacing_mm = tuple(float(s) for s in spacing)
    if len(spacing_mm) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing_mm):
        raise DataError(f"dense CRF needs the voxel spacing as 3 positive numbers (mm), got {spacing!r}")
    unary = torch.log(probs.clamp_min(MIN_PROBABILITY))
    grid = BilateralGrid(feature, spacing_mm, config.bilateral_sigma_mm, config.intensity_sigma)
    sigmas = [config.spatial_sigma_mm / s for s in spacing_mm]
    q = probs
    for _ in range(config.iterations):
        message = torch.zeros_like(unary)
        if config.spatial_weight > 0:
            message += config.spatial_weight * gaussian_filter(q, sigmas)
        if config.bilateral_weight > 0:
            message += config.bilateral_weight * grid.filter(q)
        q = torch.softmax(unary + message, dim=0)
    return q


def gaussian_filter(values: torch.Tensor, sigmas_voxels: Sequence[float]) -> torch.Tensor:
    """Normalised separable Gaussian filter of (K, X, Y, Z) maps, sigma per axis in voxels (borders renormalised)."""
    out = values[:, None]  # (K, 1, X, Y, Z): classes as the batch
    norm = torch.ones_like(values[:1, None])
    for axis, sigma in enumerate(sigmas_voxels):
        radius = int(math.ceil(TRUNCATE * sigma))
        if radius < 1:
            continue
        taps = torch.arange(-radius, radius + 1, dtype=values.dtype, device=values.device)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        kernel = (kernel / kernel.sum()).reshape(shape)
        padding = [0, 0, 0, 0, 0, 0]
        padding[2 * (2 - axis)] = padding[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
        out = F.conv3d(F.pad(out, padding), kernel)
        norm = F.conv3d(F.pad(norm, padding), kernel)
    return (out / norm.clamp_min(1e-12))[:, 0]


class BilateralGrid:
    """Approximate normalised bilateral filtering of (K, X, Y, Z) maps on a fixed image (see the module docstring).

    The 4D cell coordinates of every voxel are computed once; :meth:`filter` splats, blurs and slices.
    """

    PAD = 2  # cells of margin around the data, so the blur never reaches the grid's edge

    def __init__(self, feature: torch.Tensor, spacing: Sequence[float], sigma_mm: float, intensity_sigma: float) -> None:
        axes = [torch.arange(n, dtype=torch.float32, device=feature.device) * (s / sigma_mm) for n, s in zip(feature.shape, spacing)]
        xs, ys, zs = torch.meshgrid(*axes, indexing="ij")
        intensity = (feature - feature.min()) / intensity_sigma
        coords = torch.stack([xs, ys, zs, intensity]).reshape(4, -1) + self.PAD
        base = coords.floor()
        frac = coords - base  # (4, N) position inside the cell
        self.weights = torch.stack([1.0 - frac, frac])  # (lower/upper, 4, N) linear weights along each grid axis
        base = base.long()  # (4, N) lower corner of each voxel's cell
        self.size = [int(base[d].max()) + 2 + self.PAD for d in range(4)]
        strides = [self.size[1] * self.size[2] * self.size[3], self.size[2] * self.size[3], self.size[3], 1]
        self.base = torch.stack([base[d] * strides[d] for d in range(4)]).sum(0)  # (N,) flat index of the lower corner
        self.offsets = [sum(strides[d] for d in range(4) if (corner >> d) & 1) for corner in range(16)]
        self.norm = self._slice(self._blur(self._splat(torch.ones_like(feature).reshape(1, -1)))).clamp_min(1e-12)

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Bilateral-weighted average of each class map over similar-looking neighbours."""
        flat = values.reshape(values.shape[0], -1)
        return (self._slice(self._blur(self._splat(flat))) / self.norm).reshape(values.shape)

    def _corners(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(flat cell index, linear weight) of each voxel for the 16 corners of its cell."""
        w = self.weights
        for corner, offset in enumerate(self.offsets):
            bits = [(corner >> d) & 1 for d in range(4)]
            yield self.base + offset, w[bits[0], 0] * w[bits[1], 1] * w[bits[2], 2] * w[bits[3], 3]

    def _splat(self, flat: torch.Tensor) -> torch.Tensor:
        grid = torch.zeros(flat.shape[0], math.prod(self.size), dtype=flat.dtype, device=flat.device)
        for index, weight in self._corners():
            grid.scatter_add_(1, index.expand(flat.shape[0], -1), flat * weight)
        return grid.reshape(flat.shape[0], *self.size)

    def _blur(self, grid: torch.Tensor) -> torch.Tensor:
        """Binomial [1, 4, 6, 4, 1] / 16 along each of the 4 grid axes (standard deviation one cell)."""
        for axis in range(1, 5):
            for _ in range(2):  # [1, 2, 1] / 4 twice
                grid = 0.5 * grid + 0.25 * (torch.roll(grid, 1, axis) + torch.roll(grid, -1, axis))  # margin: no wrap-around reaches data
        return grid.reshape(grid.shape[0], -1)

    def _slice(self, grid: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(grid.shape[0], self.base.numel(), dtype=grid.dtype, device=grid.device)
        for index, weight in self._corners():
            out += torch.index_select(grid, 1, index) * weight
        return out
