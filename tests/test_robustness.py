"""Robustness of issue 23: every NIfTI output on one header rule, a batch that survives any one case's crash,
missing optional packages named in one line, and no traceback reaching a user.

The model is the session's shared trained run (tests/conftest.py); these tests claim nothing about
segmentation quality, only that outputs are written on the input grid and failures are reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medunet.cli import main
from medunet.synthetic import grid_affine, make_phantom, save_nifti


@pytest.fixture(scope="module")
def run_dir(trained_run: Path) -> Path:
    """The session's shared trained run (read-only here: these tests write outputs elsewhere)."""
    return trained_run


def _scan(path: Path, seed: int = 0) -> Path:
    image, _ = make_phantom((24, 22, 14), seed=seed)
    save_nifti(image, grid_affine((1.4, 1.3, 2.2), axcodes="LPS"), path)
    return path


def _uncoded_bad_qform(path: Path) -> Path:
    """A valid scan (geometry in its sform) whose uncoded qform holds a quaternion with b² + c² + d² > 1."""
    source = nib.load(str(_scan(path)))
    image = nib.Nifti1Image(np.asanyarray(source.dataobj), source.affine, source.header)
    image.set_sform(source.affine, code=2)
    header = image.header
    header["qform_code"] = 0
    header["quatern_b"], header["quatern_c"], header["quatern_d"] = 0.9, 0.9, 0.9
    nib.save(image, str(path))
    return path


def test_an_uncoded_invalid_qform_is_what_broke_float_maps(tmp_path: Path) -> None:
    """The input of the regression below really is one nibabel cannot compute a qform for."""
    header = nib.load(str(_uncoded_bad_qform(tmp_path / "scan.nii.gz"))).header
    assert int(header["qform_code"]) == 0
    with pytest.raises(ValueError, match="w2 should be positive"):
        header.get_qform()


def test_uncertainty_map_and_mask_of_an_uncoded_invalid_qform_lie_on_the_input_grid(run_dir: Path, tmp_path: Path) -> None:
    scan = _uncoded_bad_qform(tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    assert main(["-q", "infer", "-m", str(run_dir), "-i", str(scan), "-o", str(out), "--uncertainty-map"]) == 0
    reference, reference_itk = nib.load(str(scan)), sitk.ReadImage(str(scan))
    for written in (out / "scan.nii.gz", out / "scan_uncertainty.nii.gz"):
        image = nib.load(str(written))
        assert image.shape == reference.shape
        np.testing.assert_allclose(image.affine, reference.affine, atol=1e-5)
        itk = sitk.ReadImage(str(written))
        assert itk.GetSize() == reference_itk.GetSize()
        np.testing.assert_allclose(itk.GetOrigin(), reference_itk.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(itk.GetSpacing(), reference_itk.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(itk.GetDirection(), reference_itk.GetDirection(), atol=1e-5)
    uncertainty = np.asanyarray(nib.load(str(out / "scan_uncertainty.nii.gz")).dataobj)
    assert uncertainty.dtype == np.float32 and 0.0 <= uncertainty.min() <= uncertainty.max() <= 1.0


def test_an_unexpected_error_in_one_case_fails_that_case_only(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from medunet.inference.segmenter import Segmenter

    scans = tmp_path / "scans"
    for i, name in enumerate(["a", "b", "c"]):
        _scan(scans / f"{name}.nii.gz", seed=i)
    predict_case = Segmenter.predict_case

    def crash_on_b(self: Segmenter, prepared: object, **kwargs: object) -> object:
        if getattr(prepared, "case", None) == "b":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return predict_case(self, prepared, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Segmenter, "predict_case", crash_on_b)
    out = tmp_path / "out"
    assert main(["-q", "infer", "-m", str(run_dir), "-i", str(scans), "-o", str(out)]) == 3
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a.nii.gz", "c.nii.gz"]
    cases = {c["case"]: c for c in json.loads((out / "inference_report.json").read_text())["cases"]}
    assert [cases[n]["status"] for n in "abc"] == ["done", "failed", "done"]
    error = cases["b"]["error"]
    assert "'b'" in error and "RuntimeError: CUDA error: an illegal memory access" in error and "\n" not in error
    assert "Traceback" not in capsys.readouterr().err


#: Per CLI command: its arguments (paths under a temporary folder, none need exist) and the first library function
#: it calls, which the test makes fail with an error medunet does not raise on purpose.
COMMANDS = {
    "train": (["train", "{t}/dataset.json", "-o", "{t}/run"], "medunet.training.run_config.check_before_training"),
    "crossval": (["crossval", "{t}/dataset.json", "-o", "{t}/cv"], "medunet.training.run_config.check_before_training"),
    "infer": (["infer", "-m", "{t}/run", "-i", "{t}/scans", "-o", "{t}/preds"], "medunet.inference.batch.collect_inputs"),
    "check": (["check", "{t}/dataset.json"], "medunet.check.check_datalist"),
    "plan": (["plan", "{t}/dataset.json", "-o", "{t}/plan.yaml"], "medunet.planning.api.plan_datalist"),
    "evaluate": (["evaluate", "--pred", "{t}/preds", "--datalist", "{t}/dataset.json", "-o", "{t}/eval"],
                 "medunet.io.datalist.load_datalist"),
    "export": (["export", "{t}/run", "-o", "{t}/pkg"], "medunet.export.writer.export_model"),
    "demo": (["demo", "--out", "{t}/demo"], "medunet.workflows.demo.run_demo"),
    "dicom ls": (["dicom", "ls", "{t}/series"], "medunet.io.dicom.list_series"),
    "pacs": (["pacs", "--url", "http://127.0.0.1:9/dicom-web", "-m", "{t}/run", "--study", "1.2.3"],
             "medunet.net.dicomweb.DicomWebPacs"),
    # the one file that must exist (click checks it): the example config in the repository
    "serve": (["serve", "-c", str(Path(__file__).resolve().parents[1] / "configs" / "serve.example.yaml")],
              "medunet.serve.config.load_serve_config"),
}


def test_the_crash_test_covers_every_command() -> None:
    from medunet.cli import cli

    groups = {name: getattr(command, "commands", None) for name, command in cli.commands.items()}
    names = {f"{name} {sub}" if subs else name for name, subs in groups.items() for sub in (subs or [None])}
    assert names == set(COMMANDS)


def _break(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """Make ``target`` (a dotted path) raise RuntimeError("boom") when called."""
    module, name = target.rsplit(".", 1)

    def boom(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(f"{module}.{name}", boom)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unexpected_error_in_any_command_is_one_line_without_traceback(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args, target = COMMANDS[command]
    _break(monkeypatch, target)
    assert main([a.format(t=tmp_path) for a in args]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line == f"medunet: error: {command} failed: RuntimeError: boom (run with --debug for the traceback)"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_with_debug_an_unexpected_error_propagates(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args, target = COMMANDS[command]
    _break(monkeypatch, target)
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", *[a.format(t=tmp_path) for a in args]])


def _truncated_checkpoint(path: Path) -> Path:
    """A checkpoint cut short: torch raises its own RuntimeError (a zip archive without its directory) on loading it."""
    import torch

    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    return path


def test_a_bad_input_is_one_line_and_with_debug_a_traceback_down_to_the_original_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typed error keeps the library error it came from as its cause: the one line is unchanged, ``--debug`` shows both."""
    from medunet.errors import CheckpointError

    bad = _truncated_checkpoint(tmp_path / "model.pt")
    args = ["export", str(bad), "-o", str(tmp_path / "pkg")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "direct cause" not in err
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line.startswith(f"medunet: error: checkpoint {bad} is corrupt or truncated (RuntimeError: PytorchStreamReader")
    with pytest.raises(CheckpointError) as raised:
        main(["--debug", *args])
    assert isinstance(raised.value.__cause__, RuntimeError)
    # what a user sees: the interpreter prints the traceback of both, the original first
    done = subprocess.run([sys.executable, "-m", "medunet", "--debug", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    original, _, ours = done.stderr.partition("The above exception was the direct cause of the following exception:")
    assert "Traceback" in original and "RuntimeError: PytorchStreamReader" in original and "torch" in original
    assert "medunet.errors.CheckpointError: checkpoint" in ours and "load_checkpoint" in ours


def test_an_unexpected_os_error_names_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    def unreadable(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "dataset.json"))

    monkeypatch.setattr("medunet.check.check_datalist", unreadable)
    assert main(["check", str(tmp_path / "dataset.json")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"medunet: error: check failed (file {tmp_path / 'dataset.json'}): PermissionError: [Errno 13] Permission denied: "
        f"'{tmp_path / 'dataset.json'}' (run with --debug for the traceback)")


def _error_lines(err: str) -> list[str]:
    """The error lines on stderr (after checking there is no traceback); warnings logged before them are not errors."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("medunet: error:")]


@pytest.fixture(scope="module")
def onnx_package(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medunet.export.writer import export_model

    return export_model(run_dir, tmp_path_factory.mktemp("robust_pkg") / "pkg", ["onnx"])


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_export_without_the_onnx_extra_names_it_in_one_line(missing: str, run_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # what `import onnx` meets when the package is not installed
    assert main(["export", str(run_dir), "-o", str(tmp_path / "pkg"), "--format", "onnx"]) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert f"needs {missing}, which is not installed: pip install 'medunet[onnx]'" in line
    assert not (tmp_path / "pkg").exists()


def test_onnxruntime_engine_without_the_onnx_extra_names_it_in_one_line(onnx_package: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    scan = _scan(tmp_path / "scan.nii.gz")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    args = ["infer", "-m", str(onnx_package), "-i", str(scan), "-o", str(tmp_path / "out")]
    for engine in ([], ["--engine", "onnxruntime"]):  # auto picks onnxruntime for an ONNX-only package
        assert main([*args, *engine]) == 1
        (line,) = _error_lines(capsys.readouterr().err)
        assert "the onnxruntime engine needs onnxruntime, which is not installed: pip install 'medunet[onnx]'" in line
    assert not (tmp_path / "out" / "scan.nii.gz").exists()


