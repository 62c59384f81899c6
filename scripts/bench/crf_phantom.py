"""Dense CRF on a hand-made noisy probability map: Dice against the known truth, and seconds per volume size.

An ellipsoid (class 1) around a smaller one (class 2) with distinct intensities; the "network output"
is the one-hot truth plus Gaussian noise on the logits, so the right answer is known exactly.
Each size is refined once (no warm-up: the CRF has no first-call cost to hide).

    PYTHONPATH=$PWD python scripts/bench/crf_phantom.py --threads 1 --json crf_phantom.json
    PYTHONPATH=$PWD python scripts/bench/crf_phantom.py --quick   # seconds: one 24x24x16 volume
"""

from __future__ import annotations

import platform
import time

import numpy as np
import torch
from common import bench_parser, load_average, markdown_table, start, write_json

from medunet.config import CrfConfig
from medunet.evaluation import dice_per_class
from medunet.postprocessing.crf import dense_crf

SIZES = "32x32x24,64x64x48,128x128x96"
QUICK_SIZES = "24x24x16"
SPACING = (1.0, 1.0, 1.5)


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


def measure(shape: tuple[int, int, int]) -> dict:
    """Dice of classes 1 and 2 before and after the CRF (default settings), and the CRF's seconds."""
    truth, image, probs = phantom(shape)
    started = time.perf_counter()
    refined = dense_crf(probs, image, spacing=SPACING, config=CrfConfig())
    seconds = time.perf_counter() - started
    before = dice_per_class(probs.argmax(0).numpy(), truth, 3)
    after = dice_per_class(refined.argmax(0).numpy(), truth, 3)
    return {"shape": list(shape), "voxels": int(np.prod(shape)), "dice_before": before.tolist(), "dice_after": after.tolist(),
            "crf_seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, f"one {QUICK_SIZES} volume")
    parser.set_defaults(threads=1)  # with 2 threads on a loaded machine OpenMP spin-waiting made the CRF 10-30x slower
    parser.add_argument("--sizes", default=SIZES, help="comma-separated volume sizes, e.g. 32x32x24,64x64x48")
    args = parser.parse_args(argv)
    start(args.threads)
    sizes = QUICK_SIZES if args.quick else args.sizes
    rows = [measure(tuple(int(v) for v in text.split("x"))) for text in sizes.split(",")]  # type: ignore[arg-type]
    print(markdown_table(
        ["volume", "voxels", "Dice 1 before -> after", "Dice 2 before -> after", "CRF seconds"],
        [["x".join(map(str, r["shape"])), r["voxels"],
          *(f"{r['dice_before'][k]:.3f} -> {r['dice_after'][k]:.3f}" for k in (0, 1)), f"{r['crf_seconds']:.2f}"] for r in rows]))
    setup = {"spacing": SPACING, "crf": "defaults", "threads": args.threads, "torch": torch.__version__,
             "cpu": platform.processor() or platform.machine(), "load_after": load_average(),
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_json(args.json, {"setup": setup, "rows": rows})


if __name__ == "__main__":
    main()
