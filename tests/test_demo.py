"""The demo's plumbing (a short run; the full demo's learning is covered by the end-to-end test's bar)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medunet.cli import main
from medunet.errors import OutputExistsError
from medunet.workflows.demo import run_demo


def test_demo_leaves_a_usable_run_folder(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "demo", epochs=1, num_train=4, num_test=1, device="cpu", progress=False)
    assert (result.run_dir / "best.pt").is_file() and (result.run_dir / "train_curve.png").is_file()
    assert result.preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in result.learning] == ["learning.png", "learning.gif"]  # one validation: one frame
    assert set(result.test_dice) == {"organ", "vessel"}
    assert all(0.0 <= d <= 1.0 for d in result.test_dice.values())
    masks = sorted(result.pred_dir.glob("*.nii.gz"))
    assert len(masks) == 1
    image = nib.load(tmp_path / "demo" / "data" / "imagesTs" / masks[0].name)
    np.testing.assert_allclose(nib.load(masks[0]).affine, image.affine, atol=1e-5)

    # the run folder is a real model that `medunet infer -m` accepts
    out = tmp_path / "again"
    assert main(["-q", "infer", "-m", str(result.run_dir), "-i", str(image.get_filename()), "-o", str(out)]) == 0
    assert (out / masks[0].name).is_file()

    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_demo(tmp_path / "demo", epochs=1, num_train=4, num_test=1, device="cpu", progress=False)
