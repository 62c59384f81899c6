"""The nnU-Net v2 side of the benchmarks, run by the *nnU-Net* Python, never by medunet's.

nnU-Net is not a medunet dependency. The benchmark scripts (train_throughput.py --nnunet,
inference_vs_nnunet.py) call this file with the interpreter of a separate environment:

    python3 -m venv /tmp/nnunet-venv --system-site-packages   # shares the torch already installed
    /tmp/nnunet-venv/bin/pip install nnunetv2                  # 2.8.1 was measured
    export NNUNET_PYTHON=/tmp/nnunet-venv/bin/python           # or pass --nnunet-python

Sub-commands (each prints one JSON line last; nnU-Net's folders come from the environment
variables nnUNet_raw / nnUNet_preprocessed / nnUNet_results, which the caller sets):

* ``prepare``: copy a medunet (MSD-style) datalist into nnU-Net's raw format
  (imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz, dataset.json) and run
  ``nnUNetv2_plan_and_preprocess -c 3d_fullres``; prints the planned 3d_fullres configuration.
  The trainer uses fold "all" (every case for training), like the medunet side.
* ``train``: nnU-Net's own ``nnUNetTrainer`` (default augmentation, loss, SGD, deep supervision,
  its background augmentation processes) on the CPU; after ``on_train_start`` (not timed) it
  runs ``--warmup`` + ``--iterations`` calls of ``next(dataloader_train)`` + ``train_step`` and
  reports each one's data wait and total time. ``--save`` writes checkpoint_final.pth.
* ``import-weights``: turn a MONAI DynUNet state dict (medunet's network at nnU-Net's plan) into
  an nnU-Net model folder (plans.json, dataset.json, fold_all/checkpoint_final.pth) holding the
  *same function*: DynUNet's convolutions have no bias (each is followed by instance norm or is a
  transposed convolution), so PlainConvUNet's biases are set to 0 and its kernels take DynUNet's
  weights with the spatial axes reversed (x, y, z -> z, y, x). Both predictors then run one model.
* ``netspeed``: the network step alone: forward + backward of nnU-Net's planned PlainConvUNet and
  of the equivalent MONAI DynUNet (medunet's network) on the same random batch, alternating,
  ``--repeats`` times each; shows whether the two networks cost the same compute.
* ``predict``: ``nnUNetPredictor`` (step 0.5, Gaussian, mirroring on or off) on one file, end to
  end (read, preprocess, sliding window, resample, write) with ``predict_from_files_sequential``;
  one warm-up + ``--repeats`` timed runs; peak RSS (VmHWM) of this process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import peak_rss_mib  # scripts/bench/common.py

DATASET_ID = 501
DATASET_NAME = f"Dataset{DATASET_ID}_MedunetBench"




def prepare(args: argparse.Namespace) -> dict:
    """medunet datalist -> nnU-Net raw dataset -> fingerprint, plans and preprocessed data."""
    datalist_path = Path(args.datalist)
    datalist = json.loads(datalist_path.read_text())
    raw = Path(os.environ["nnUNet_raw"]) / DATASET_NAME
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    for entry in datalist["training"]:
        name = Path(entry["image"]).name.replace(".nii.gz", "")
        shutil.copyfile(datalist_path.parent / entry["image"], raw / "imagesTr" / f"{name}_0000.nii.gz")
        shutil.copyfile(datalist_path.parent / entry["label"], raw / "labelsTr" / f"{name}.nii.gz")
    modality = datalist.get("modality", {"0": "CT"})
    (raw / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": modality,
                "labels": {name: int(index) for index, name in datalist["labels"].items()},
                "numTraining": len(datalist["training"]),
                "file_ending": ".nii.gz",
            },
            indent=2,
        )
    )
    started = time.perf_counter()
    command = [
        str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"),
        "-d",
        str(DATASET_ID),
        "-c",
        "3d_fullres",
        "-np",
        str(args.processes),
        "--verify_dataset_integrity",
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    plans_path = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME / "nnUNetPlans.json"
    plans = json.loads(plans_path.read_text())
    config = plans["configurations"]["3d_fullres"]
    arch = config["architecture"]["arch_kwargs"]
    return {
        "plan_and_preprocess_s": time.perf_counter() - started,
        "plans": str(plans_path),
        "patch_size": config["patch_size"],
        "batch_size": config["batch_size"],
        "spacing": config["spacing"],
        "network": config["architecture"]["network_class_name"],
        "features_per_stage": arch["features_per_stage"],
        "kernel_sizes": arch["kernel_sizes"],
        "strides": arch["strides"],
        "n_conv_per_stage": arch["n_conv_per_stage"],
        "n_conv_per_stage_decoder": arch["n_conv_per_stage_decoder"],
        "normalization": config["normalization_schemes"],
        "intensity": plans["foreground_intensity_properties_per_channel"]["0"],
    }


def make_trainer():
    """nnU-Net's default trainer for the benchmark dataset, on the CPU, as nnUNetv2_train builds it."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    base = Path(nnUNet_preprocessed) / DATASET_NAME
    plans = load_json(str(base / "nnUNetPlans.json"))
    plans["continue_training"] = False
    dataset_json = load_json(str(base / "dataset.json"))
    return nnUNetTrainer(
        plans=plans, configuration="3d_fullres", fold="all", dataset_json=dataset_json, device=torch.device("cpu")
    )


def train(args: argparse.Namespace) -> dict:
    """Time nnU-Net's own data loader + train_step; start-up and warm-up iterations are not timed."""
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    trainer = make_trainer()
    trainer.on_train_start()  # network, loss, optimiser, background augmentation processes
    trainer.on_train_epoch_start()
    startup = time.perf_counter() - started
    waits, steps, losses = [], [], []
    for i in range(args.warmup + args.iterations):
        t0 = time.perf_counter()
        batch = next(trainer.dataloader_train)
        t1 = time.perf_counter()
        losses.append(float(trainer.train_step(batch)["loss"]))
        t2 = time.perf_counter()
        if i >= args.warmup:
            waits.append(t1 - t0)
            steps.append(t2 - t0)
    if args.save:
        trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        if hasattr(loader, "_finish"):
            loader._finish()
    return {
        "startup_s": startup,
        "batch_size": int(trainer.batch_size),
        "patch_size": list(trainer.configuration_manager.patch_size),
        "augmentation_processes": int(getattr(trainer.dataloader_train, "num_processes", 0)),
        "wait_s": waits,
        "step_s": steps,
        "loss": losses,
        "model_dir": str(Path(trainer.output_folder_base)),
    }


def import_weights(args: argparse.Namespace) -> dict:
    """A DynUNet state dict -> an nnU-Net model folder with the same network function (see the module docstring)."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    base = Path(nnUNet_preprocessed) / DATASET_NAME
    plans, dataset_json = load_json(str(base / "nnUNetPlans.json")), load_json(str(base / "dataset.json"))
    manager = PlansManager(plans)
    config = manager.get_configuration("3d_fullres")
    num_classes = manager.get_label_manager(dataset_json).num_segmentation_heads
    net = nnUNetTrainer.build_network_architecture(manager, config, 1, num_classes, enable_deep_supervision=False)
    state = torch.load(args.state, map_location="cpu", weights_only=True)

    def kernel(name: str) -> torch.Tensor:
        return state[name].permute(0, 1, 4, 3, 2)  # x, y, z -> z, y, x

    def block(convs, prefix: str) -> None:
        for c in (0, 1):
            convs[c].conv.weight.copy_(kernel(f"{prefix}.conv{c + 1}.conv.weight"))
            convs[c].conv.bias.zero_()
            convs[c].norm.weight.copy_(state[f"{prefix}.norm{c + 1}.weight"])
            convs[c].norm.bias.copy_(state[f"{prefix}.norm{c + 1}.bias"])

    stages = len(net.encoder.stages)
    with torch.no_grad():
        encoder = ["input_block"] + [f"downsamples.{i}" for i in range(stages - 2)] + ["bottleneck"]
        for s, prefix in enumerate(encoder):
            block(net.encoder.stages[s][0].convs, prefix)
        for i in range(stages - 1):
            net.decoder.transpconvs[i].weight.copy_(kernel(f"upsamples.{i}.transp_conv.conv.weight"))
            net.decoder.transpconvs[i].bias.zero_()
            block(net.decoder.stages[i].convs, f"upsamples.{i}.conv_block")
            net.decoder.seg_layers[i].weight.zero_()
            net.decoder.seg_layers[i].bias.zero_()
        net.decoder.seg_layers[-1].weight.copy_(kernel("output_block.conv.conv.weight"))
        net.decoder.seg_layers[-1].bias.copy_(state["output_block.conv.conv.bias"])
    model_dir = Path(nnUNet_results) / DATASET_NAME / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model_dir / "fold_all").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(base / "nnUNetPlans.json", model_dir / "plans.json")
    shutil.copyfile(base / "dataset.json", model_dir / "dataset.json")
    torch.save(
        {
            "network_weights": net.state_dict(),
            "init_args": {"configuration": "3d_fullres"},
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2),
        },
        model_dir / "fold_all" / "checkpoint_final.pth",
    )
    return {"model_dir": str(model_dir)}


def netspeed(args: argparse.Namespace) -> dict:
    """Forward + backward time of PlainConvUNet (nnU-Net's plan) and the matching DynUNet, alternating."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from monai.networks.nets import DynUNet
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    torch.set_num_threads(args.threads)
    manager = PlansManager(load_json(str(Path(nnUNet_preprocessed) / DATASET_NAME / "nnUNetPlans.json")))
    config = manager.get_configuration("3d_fullres")
    plain = nnUNetTrainer.build_network_architecture(manager, config, 1, 2, enable_deep_supervision=True)
    rev = [list(reversed(v)) for v in config.pool_op_kernel_sizes]
    kernels = config.network_arch_init_kwargs["kernel_sizes"]
    dyn = DynUNet(
        3,
        1,
        2,
        [list(reversed(k)) for k in kernels],
        rev,
        rev[1:],
        filters=list(config.network_arch_init_kwargs["features_per_stage"]),
        norm_name=("instance", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=True,
        deep_supr_num=2,
    )
    x = torch.randn(config.batch_size, 1, *config.patch_size)
    inputs = {"nnU-Net PlainConvUNet": (plain, x), "MONAI DynUNet (medunet)": (dyn, x.permute(0, 1, 4, 3, 2).contiguous())}
    times: dict[str, list[float]] = {name: [] for name in inputs}
    for _ in range(1 + args.repeats):
        for name, (net, batch) in inputs.items():
            started = time.perf_counter()
            out = net(batch)
            heads = out if isinstance(out, (list, tuple)) else list(torch.unbind(out, dim=1))
            sum(h.float().mean() for h in heads).backward()
            times[name].append(time.perf_counter() - started)
    return {name: t[1:] for name, t in times.items()}  # the first round is a warm-up


def predict(args: argparse.Namespace) -> dict:
    """End-to-end nnUNetPredictor runs on one file (one warm-up, then timed repeats)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(args.threads)
    predictor = nnUNetPredictor(
        tile_step_size=args.step,
        use_gaussian=True,
        use_mirroring=bool(args.mirroring),
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(args.model_dir, use_folds=("all",), checkpoint_name="checkpoint_final.pth")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = str(out / "nnunet")
    times = []
    for i in range(1 + args.repeats):
        started = time.perf_counter()
        predictor.predict_from_files_sequential([[args.image]], [target], save_probabilities=False, overwrite=True)
        if i:
            times.append(time.perf_counter() - started)
    peak = peak_rss_mib()
    return {
        "times": times,
        "peak_rss_mib": peak,
        "output": target + ".nii.gz",
        "mirror_axes": list(predictor.allowed_mirroring_axes or []) if args.mirroring else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="convert a medunet datalist and run nnUNetv2_plan_and_preprocess")
    p.add_argument("--datalist", required=True)
    p.add_argument("--processes", type=int, default=2)
    t = sub.add_parser("train", help="time nnUNetTrainer iterations on the CPU")
    t.add_argument("--iterations", type=int, default=8)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--save", action="store_true", help="write fold_all/checkpoint_final.pth for the predictor")
    w = sub.add_parser("import-weights", help="DynUNet state dict -> nnU-Net model folder with the same function")
    w.add_argument("--state", required=True, help="a torch.save'd DynUNet state_dict (medunet's model.net)")
    n = sub.add_parser("netspeed", help="forward+backward time of PlainConvUNet vs the matching DynUNet")
    n.add_argument("--repeats", type=int, default=5)
    n.add_argument("--threads", type=int, default=2)
    r = sub.add_parser("predict", help="time nnUNetPredictor end to end on one file")
    r.add_argument("--model-dir", required=True)
    r.add_argument("--image", required=True)
    r.add_argument("--out-dir", required=True)
    r.add_argument("--mirroring", type=int, choices=[0, 1], default=1)
    r.add_argument("--step", type=float, default=0.5)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = {"prepare": prepare, "train": train, "import-weights": import_weights, "netspeed": netspeed, "predict": predict}[
        args.command
    ](args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
