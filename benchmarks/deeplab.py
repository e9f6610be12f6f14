"""DeepLabv3 / DeepLabv2 vs nnU-Net's default U-Net on the same plans: parameters and forward+backward time.

Both networks are built exactly as training builds them (``nnUNetTrainer.build_network_architecture`` and our
trainers' static builders) from the same plans configuration, and timed side by side in one process
(interleaved repeats, median), one JSON line per (configuration, network) with ``"ratio"`` =
DeepLab time / U-Net time (and ``"param_ratio"``).

Default plans: nnU-Net's own ``ExperimentPlanner`` run on a synthetic ACDC-like fingerprint (100 cine-MRI
volumes, 10 × 1.5625 × 1.5625 mm, 9-10 × 256 × 216 voxels); ``--plans FILE`` uses a real plans file instead.
CPU defaults use batch size 2 (``--batch-size 0`` = the plans' batch size).

A last line times :func:`atrous_conv` (which skips the taps of large rates that only read zero padding) against
a plainly padded dilated 3D convolution (``--only-atrous`` runs just that).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/deeplab.py [--configurations 2d 3d_fullres] [--repeats 3]``
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch


def acdc_like_plans(workdir: str) -> str:
    """Write a one-image raw dataset + an ACDC-like fingerprint and let nnU-Net's planner make its plans."""
    import SimpleITK as sitk
    raw, pre = os.path.join(workdir, "raw"), os.path.join(workdir, "pre")
    os.environ["nnUNet_raw"], os.environ["nnUNet_preprocessed"] = raw, pre
    os.environ.setdefault("nnUNet_results", os.path.join(workdir, "res"))
    name = "Dataset939_ACDClike"
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(raw, name, sub), exist_ok=True)
    os.makedirs(os.path.join(pre, name), exist_ok=True)
    # the planner only opens one image to choose the reader; the geometry comes from the fingerprint
    img = sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32))
    sitk.WriteImage(img, os.path.join(raw, name, "imagesTr", "case_000_0000.nii.gz"))
    sitk.WriteImage(sitk.Cast(img, sitk.sitkUInt8), os.path.join(raw, name, "labelsTr", "case_000.nii.gz"))
    with open(os.path.join(raw, name, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "cineMRI"}, "labels": {"background": 0, "RV": 1, "MLV": 2, "LVC": 3},
                   "numTraining": 1, "file_ending": ".nii.gz"}, f)
    rng = np.random.default_rng(0)
    n = 100
    spacings = [[10.0, float(s), float(s)] for s in rng.uniform(1.37, 1.68, n).round(4)]
    shapes = [[int(z), int(y), int(x)] for z, y, x in zip(rng.integers(9, 11, n), rng.integers(230, 280, n),
                                                          rng.integers(190, 240, n))]
    with open(os.path.join(pre, name, "dataset_fingerprint.json"), "w") as f:
        json.dump({"spacings": spacings, "shapes_after_crop": shapes, "median_relative_size_after_cropping": 1.0,
                   "foreground_intensity_properties_per_channel": {"0": {
                       "max": 1000.0, "mean": 200.0, "median": 180.0, "min": 0.0, "percentile_00_5": 10.0,
                       "percentile_99_5": 800.0, "std": 100.0}}}, f)
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON lines
        ExperimentPlanner(name).plan_experiment()
    return os.path.join(pre, name, "nnUNetPlans.json")


def fwd_bwd(net: torch.nn.Module, x: torch.Tensor) -> float:
    t = time.perf_counter()
    out = net(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    out.float().square().mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def atrous_shortcut(device: torch.device, repeats: int) -> dict:
    """``atrous_conv`` (drops taps that only read padding) vs a plainly padded dilated conv, forward+backward,
    on the 3D ACDC-like encoder map at output stride 8 (2 × 320 × 5 × 32 × 28) with v3's rates 12/24/36."""
    import torch.nn.functional as F
    from nnunetv2_ohem.networks.deeplab import atrous_conv
    x = torch.randn(2, 320, 5, 32, 28, device=device, requires_grad=True)
    ws = [torch.randn(256, 320, 3, 3, 3, device=device, requires_grad=True) for _ in range(3)]
    rates = (12, 24, 36)

    def plain():
        return sum(F.conv3d(x, w, None, 1, r, r).square().mean() for w, r in zip(ws, rates))

    def ours():
        return sum(atrous_conv(x, w, None, (r, r, r)).square().mean() for w, r in zip(ws, rates))

    times = {"plain": [], "ours": []}
    for i in range(repeats + 1):
        for k, fn in (("plain", plain), ("ours", ours)):
            t = time.perf_counter()
            fn().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times[k].append(time.perf_counter() - t)
    a, b = statistics.median(times["ours"]), statistics.median(times["plain"])
    return {"benchmark": "deeplab_atrous_shortcut", "device": str(device), "threads": torch.get_num_threads(),
            "feature_map": [2, 320, 5, 32, 28], "rates": list(rates), "time_s": round(a, 4),
            "baseline_time_s": round(b, 4), "baseline": "F.conv3d with padding = rate", "ratio": round(a / b, 3)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plans", help="a real nnU-Net plans .json (default: ACDC-like plans made by nnU-Net)")
    p.add_argument("--configurations", nargs="+", default=["2d", "3d_fullres"])
    p.add_argument("--batch-size", type=int, default=2, help="0 = the plans' batch size")
    p.add_argument("--input-channels", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only-atrous", action="store_true", help="only the atrous_conv shortcut measurement")
    args = p.parse_args(argv)

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nnunetv2_ohem.training.deeplab import nnUNetTrainerDeepLabV2, nnUNetTrainerDeepLabV3

    device = torch.device(args.device)
    if args.only_atrous:
        print(json.dumps(atrous_shortcut(device, args.repeats)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        plans_file = args.plans or acdc_like_plans(tmp)
        pm = PlansManager(plans_file)
    torch.manual_seed(0)
    for conf in args.configurations:
        cm = pm.get_configuration(conf)
        bs = args.batch_size or cm.batch_size
        x = torch.randn(bs, args.input_channels, *cm.patch_size, device=device)
        nets = {name: trainer.build_network_architecture(pm, cm, args.input_channels, args.num_classes,
                                                         enable_deep_supervision=True).to(device).train()
                for name, trainer in (("unet", nnUNetTrainer), ("deeplabv3", nnUNetTrainerDeepLabV3),
                                      ("deeplabv2", nnUNetTrainerDeepLabV2))}
        times = {k: [] for k in nets}
        for k, net in nets.items():  # warm-up
            fwd_bwd(net, x)
            net.zero_grad(set_to_none=True)
        for _ in range(args.repeats):  # interleaved so load changes hit every network alike
            for k, net in nets.items():
                times[k].append(fwd_bwd(net, x))
                net.zero_grad(set_to_none=True)
        params = {k: sum(q.numel() for q in net.parameters()) for k, net in nets.items()}
        base = statistics.median(times["unet"])
        for k in ("deeplabv3", "deeplabv2"):
            t = statistics.median(times[k])
            print(json.dumps({
                "benchmark": "deeplab_fwd_bwd", "configuration": conf, "network": k, "baseline": "nnU-Net U-Net",
                "plans": os.path.basename(plans_file) if args.plans else "ACDC-like nnUNetPlans",
                "patch_size": list(cm.patch_size), "batch_size": bs, "device": str(device),
                "threads": torch.get_num_threads(), "repeats": args.repeats,
                "time_s": round(t, 4), "baseline_time_s": round(base, 4), "ratio": round(t / base, 3),
                "params": params[k], "baseline_params": params["unet"],
                "param_ratio": round(params[k] / params["unet"], 3),
                "features_per_stage": list(cm.network_arch_init_kwargs["features_per_stage"]),
                "encoder_output_stride": list(nets[k].encoder.output_stride),
                "atrous_rates": list(nets[k].atrous_rates)}), flush=True)
    print(json.dumps(atrous_shortcut(device, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
