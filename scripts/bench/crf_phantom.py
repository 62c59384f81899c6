"""Dense CRF on a hand-made noisy probability map: Dice against the known truth, and seconds per volume size.

An ellipsoid (class 1) around a smaller one (class 2) with distinct intensities; the "network output"
is the one-hot truth plus Gaussian noise on the logits, so the right answer is known exactly.

    PYTHONPATH=$PWD python scripts/bench/crf_phantom.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from medunet.config import CrfConfig
from medunet.postprocessing.crf import dense_crf


def phantom(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(truth, image, noisy probabilities) on a 1 x 1 x 1.5 mm grid; radii scale with the volume."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r = lambda f: ((x - shape[0] / 2) / (f * shape[0])) ** 2 + ((y - shape[1] / 2) / (f * shape[1])) ** 2 + ((z - shape[2] / 2) / (f * shape[2])) ** 2  # noqa: E731
    truth = np.zeros(shape, np.int64)
    truth[r(0.33) < 1] = 1
    truth[r(0.13) < 1] = 2
    image = (np.choose(truth, [0.1, 0.5, 0.85]) + rng.normal(0, 0.04, shape)).astype(np.float32)
    logits = 2.0 * np.eye(3)[truth].transpose(3, 0, 1, 2) + rng.normal(0, 1.2, (3, *shape))
    return truth, image, torch.softmax(torch.tensor(logits, dtype=torch.float32), dim=0)


def dice(labels: np.ndarray, truth: np.ndarray, k: int) -> float:
    a, b = labels == k, truth == k
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", default="32x32x24,64x64x48,128x128x96")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| volume | voxels | Dice 1 before -> after | Dice 2 before -> after | CRF seconds |")
    print("|---|---|---|---|---|")
    for text in args.sizes.split(","):
        shape = tuple(int(v) for v in text.split("x"))
        truth, image, probs = phantom(shape)  # type: ignore[arg-type]
        started = time.perf_counter()
        refined = dense_crf(probs, image, spacing=(1.0, 1.0, 1.5), config=CrfConfig())
        seconds = time.perf_counter() - started
        before, after = probs.argmax(0).numpy(), refined.argmax(0).numpy()
        cells = " | ".join(f"{dice(before, truth, k):.3f} -> {dice(after, truth, k):.3f}" for k in (1, 2))
        print(f"| {text} | {int(np.prod(shape))} | {cells} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
