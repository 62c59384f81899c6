"""`medunet export`: packages whose masks equal the checkpoint's, an ONNX file that runs without medunet,
a MONAI Bundle that runs with `python -m monai.bundle run`, tampered packages refused, failed exports leaving nothing.

The networks are tiny and untrained (random weights, seeded): equality of masks needs no training, and the
fixture checks both classes really appear so the comparison is not between two empty masks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medunet.cli import main
from medunet.config import config_to_dict, load_config
from medunet.errors import ExportError, PackageError
from medunet.export import writer
from medunet.export.networks import export_onnx
from medunet.inference.segmenter import Segmenter
from medunet.io.datalist import load_datalist
from medunet.model.checkpoint import Checkpoint, TrainState, save_checkpoint
from medunet.model.networks import build_network
from medunet.model.package import read_package
from medunet.planning.fingerprint import compute_fingerprint
from medunet.synthetic import as_stored, grid_affine, make_phantom, save_nifti, write_dataset

CLASSES = ["background", "organ"]
TINY = ["model.features=[4,8,16]", "augmentation.patch_size=[16,16,16]", "data.target_spacing=[2.0,2.0,2.5]",
        "inference.sw_batch_size=4", "inference.precision=fp32", "data.ct_window=[-200,300]"]
#: Storage orders of the phantoms: RAS, LPS, permuted axes, and an oblique LPS grid.
STORAGE = {"ras": ("RAS", 0.0), "lps": ("LPS", 0.0), "permuted": ("PIR", 0.0), "oblique": ("LPS", 12.0)}


def _checkpoint(seed: int, fingerprint: dict | None) -> Checkpoint:
    config = load_config(None, TINY)
    torch.manual_seed(seed)
    network = build_network(config.model, in_channels=1, out_channels=len(CLASSES))
    state = TrainState(optimizer={}, scheduler={}, rng={}, best_dice=0.61, best_epoch=3, best_class_dice={"organ": 0.61})
    return Checkpoint(model=network.state_dict(), config=config_to_dict(config), class_names=CLASSES, in_channels=1, epoch=3,
                      modality="CT", fingerprint=fingerprint, train_state=state)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run, a two-fold crossval folder, phantoms in four storage orders, and one package of all three formats."""
    root = tmp_path_factory.mktemp("export")
    datalist = write_dataset(root / "data", num_train=2, num_test=0, shape=(24, 24, 16), num_classes=2)
    fingerprint = compute_fingerprint(load_datalist(datalist))
    save_checkpoint(_checkpoint(0, fingerprint), root / "run" / "best.pt")
    for fold in (0, 1):
        save_checkpoint(_checkpoint(10 + fold, fingerprint), root / "cv" / f"fold_{fold}" / "best.pt")
    for i, (name, (axcodes, tilt)) in enumerate(STORAGE.items()):
        image, _ = make_phantom((30, 28, 18), seed=i)
        ras_affine = grid_affine((1.4, 1.3, 2.2), axcodes="RAS")
        stored = as_stored(image, axcodes)  # the same anatomy, stored along other axes
        save_nifti(stored, grid_affine((1.4, 1.3, 2.2), axcodes=axcodes, oblique_deg=tilt, origin=ras_affine[:3, 3]),
                   root / "scans" / f"{name}.nii.gz")
    package = writer.export_model(root / "run", root / "pkg", ["onnx", "torchscript", "bundle"])
    assert main(["-q", "infer", "-m", str(root / "run"), "-i", str(root / "scans"), "-o", str(root / "ref")]) == 0
    return {"root": root, "run": root / "run", "cv": root / "cv", "scans": root / "scans", "pkg": package, "ref": root / "ref"}


def _dice_per_class(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [2.0 * np.sum((a == k) & (b == k)) / max(np.sum(a == k) + np.sum(b == k), 1) for k in range(1, len(CLASSES))]


def _assert_same_masks(got_dir: Path, made: dict[str, Path]) -> None:
    for name in STORAGE:
        image, reference = nib.load(made["scans"] / f"{name}.nii.gz"), nib.load(made["ref"] / f"{name}.nii.gz")
        got = nib.load(got_dir / f"{name}.nii.gz")  # read back with nibabel, independent of medunet's writer
        assert got.shape == image.shape == reference.shape, name
        np.testing.assert_allclose(got.affine, image.affine, atol=1e-5, err_msg=name)
        expected, labels = np.asarray(reference.dataobj), np.asarray(got.dataobj)
        assert 0.05 < np.mean(expected == 1) < 0.95, f"{name}: the checkpoint's mask is trivial, the comparison proves nothing"
        assert min(_dice_per_class(labels, expected)) >= 0.999, name


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_package_masks_equal_the_checkpoints_in_every_storage_order(made: dict[str, Path], tmp_path: Path, engine: str) -> None:
    assert main(["-q", "infer", "-m", str(made["pkg"]), "--engine", engine, "-i", str(made["scans"]), "-o", str(tmp_path)]) == 0
    _assert_same_masks(tmp_path, made)
    report = json.loads((tmp_path / "inference_report.json").read_text())
    assert f"exported package, {engine}" in report["model"]


def test_onnx_is_the_default_engine_and_agrees_on_probabilities(made: dict[str, Path]) -> None:
    package, checkpoint = Segmenter.from_checkpoint(made["pkg"]), Segmenter.from_checkpoint(made["run"])
    assert "onnxruntime" in package.source
    for section in ("data", "model", "postprocessing"):  # the package rebuilds the checkpoint's preprocessing exactly
        assert getattr(package.config, section) == getattr(checkpoint.config, section)
    assert package.config.roi_size() == checkpoint.config.roi_size()
    x = torch.rand(1, 1, 28, 24, 20, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(package.probabilities(x), checkpoint.probabilities(x), atol=1e-5, rtol=1e-4)


def test_the_onnx_file_runs_in_a_bare_onnxruntime_session(made: dict[str, Path], tmp_path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(made["pkg"] / "model.onnx"), full_check=True)
    pipeline = json.loads((made["pkg"] / "pipeline.json").read_text())
    io = pipeline["network_io"]
    window = torch.randn(2, 1, 20, 16, 24, generator=torch.Generator().manual_seed(0))  # batch 2, another size than the export's
    np.save(tmp_path / "window.npy", window.numpy())
    script = (
        "import sys, numpy as np, onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(made['pkg'] / 'model.onnx')!r}, providers=['CPUExecutionProvider'])\n"
        f"out = s.run([{io['output']['name']!r}], {{{io['input']['name']!r}: np.load({str(tmp_path / 'window.npy')!r})}})[0]\n"
        f"np.save({str(tmp_path / 'logits.npy')!r}, out)\n"
        "assert not any(m.startswith('medunet') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    network = build_network(load_config(None, TINY).model, in_channels=1, out_channels=2).eval()
    network.load_state_dict(torch.load(made["run"] / "best.pt", weights_only=True)["model"])
    with torch.no_grad():
        expected = network(window).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-4, rtol=1e-4)  # documented tolerance


def test_the_bundle_runs_with_monai_bundle_run(made: dict[str, Path], tmp_path: Path) -> None:
    assert "medunet" not in (made["pkg"] / "configs" / "inference.json").read_text()
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--meta_file",
               "configs/metadata.json", "--input_dir", str(made["scans"]), "--output_dir", str(tmp_path)]
    done = subprocess.run(command, cwd=made["pkg"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_masks(tmp_path, made)


def test_a_fold_ensemble_exports_every_fold(made: dict[str, Path], tmp_path: Path) -> None:
    package = writer.export_model(made["cv"], tmp_path / "cv_pkg", ["onnx"])
    networks = json.loads((package / "pipeline.json").read_text())["networks"]
    assert [(n["file"], n["fold"]) for n in networks] == [("model_fold0.onnx", 0), ("model_fold1.onnx", 1)]
    exported, original = Segmenter.from_checkpoint(package), Segmenter.from_checkpoint(made["cv"])
    assert len(exported.models) == 2
    x = torch.rand(1, 1, 24, 24, 20, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(exported.probabilities(x), original.probabilities(x), atol=1e-5, rtol=1e-4)
    assert len(Segmenter.from_checkpoint(package, folds=[1]).models) == 1
    with pytest.raises(PackageError, match=r"fold\(s\) \[4\]"):
        read_package(package, folds=[4])


def test_model_card_and_pipeline_describe_the_package(made: dict[str, Path]) -> None:
    card = json.loads((made["pkg"] / "model_card.json").read_text())
    on_disk = {str(p.relative_to(made["pkg"])) for p in made["pkg"].rglob("*") if p.is_file()}
    assert set(card["files"]) == on_disk - {"model_card.json"}  # every other file is checksummed
    assert card["training_data"]["num_cases"] == 2 and "cases" not in card["training_data"]  # no per-case records
    assert card["validation"]["held_out_validation"]["model"]["class_dice"] == {"organ": 0.61}
    assert card["config"]["model"]["features"] == [4, 8, 16] and {"torch", "monai", "onnxruntime"} <= set(card["software"])
    assert "organ" in (made["pkg"] / "MODEL_CARD.md").read_text()
    pipeline = json.loads((made["pkg"] / "pipeline.json").read_text())
    assert pipeline["schema_version"] == 1 and pipeline["config"]["inference"]["roi_size"] == [16, 16, 16]
    assert [s["op"] for s in pipeline["steps"]][:4] == ["orient", "resample", "clip_scale", "crop_foreground"]


def _tamper_network(pkg: Path) -> str:
    data = bytearray((pkg / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (pkg / "model.onnx").write_bytes(bytes(data))
    return "model.onnx"


def _edit_pipeline(pkg: Path) -> str:
    pipeline = json.loads((pkg / "pipeline.json").read_text())
    pipeline["config"]["inference"]["overlap"] = 0.5
    (pkg / "pipeline.json").write_text(json.dumps(pipeline))
    return "pipeline.json"


def _future_schema(pkg: Path) -> str:
    pipeline = json.loads((pkg / "pipeline.json").read_text())
    pipeline["schema_version"] = 99
    (pkg / "pipeline.json").write_text(json.dumps(pipeline))
    return "pipeline.json has schema_version 99"


def _missing_network(pkg: Path) -> str:
    (pkg / "models" / "model.ts").unlink()
    return "models/model.ts is missing"


def _missing_card(pkg: Path) -> str:
    (pkg / "model_card.json").unlink()
    return "model_card.json is missing"


@pytest.mark.parametrize("tamper", [_tamper_network, _edit_pipeline, _future_schema, _missing_network, _missing_card])
def test_a_tampered_package_is_refused_naming_the_file(made: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        tamper) -> None:  # noqa: ANN001
    pkg = tmp_path / "pkg"
    shutil.copytree(made["pkg"], pkg)
    named = tamper(pkg)
    assert main(["-q", "infer", "-m", str(pkg), "-i", str(made["scans"]), "-o", str(tmp_path / "out")]) == 1
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and named in message, message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.nii.gz"))  # nothing predicted


def test_bad_exports_end_with_one_line_and_leave_nothing(made: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty_run").mkdir()
    assert main(["-q", "export", str(tmp_path / "empty_run"), "-o", str(tmp_path / "a")]) == 1
    assert "has no best.pt or last.pt" in capsys.readouterr().err and not (tmp_path / "a").exists()

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    for flags in ([], ["--overwrite"]):  # a folder that is not a package is never replaced
        assert main(["-q", "export", str(made["run"]), "-o", str(tmp_path / "busy"), *flags]) == 1
        assert "busy" in capsys.readouterr().err and (tmp_path / "busy" / "notes.txt").read_text() == "mine"

    assert main(["-q", "export", str(made["run"]), "-o", str(tmp_path / "b"), "-f", "bundle", "--set", "inference.tta_flips=true"]) == 1
    assert "mirror TTA" in capsys.readouterr().err and not (tmp_path / "b").exists()

    def fail(*_args, **_kwargs) -> float:  # the second network fails after the first was written
        raise ExportError("the network cannot be exported to TorchScript (test)")

    monkeypatch.setattr(writer, "export_torchscript", fail)
    assert main(["-q", "export", str(made["run"]), "-o", str(tmp_path / "c"), "-f", "onnx,torchscript"]) == 1
    assert "cannot be exported" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty_run"]  # no package, no temporary folder


class Unexportable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svd(x.flatten(2))[0][..., :1].expand_as(x.flatten(2)).reshape(x.shape)


def test_a_network_the_exporter_cannot_trace_is_one_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="cannot be exported to ONNX") as caught:
        export_onnx(Unexportable(), tmp_path / "x.onnx", in_channels=1, window=[8, 8, 8], probe=[12, 8, 8])
    assert "\n" not in str(caught.value) and not (tmp_path / "x.onnx").exists()


def test_export_help_teaches_by_example(capsys: pytest.CaptureFixture) -> None:
    assert main(["export", "--help"]) == 0
    text = capsys.readouterr().out
    assert "Examples" in text and "--format" in text and "bundle" in text


def test_onnxruntime_engine_on_a_checkpoint_says_to_export_first(made: dict[str, Path]) -> None:
    with pytest.raises(Exception, match="export first"):
        Segmenter.from_checkpoint(made["run"], overrides=["inference.engine=onnxruntime"])
