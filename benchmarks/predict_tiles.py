"""CPU cost of one sliding-window tile: nnU-Net's batch of one vs the demo predictor's pair of copies.

nnU-Net's predictor runs one tile per forward pass. On CPUs, PyTorch's oneDNN 3-d convolutions can be much
slower per sample for a batch of one than for two, which is why the in-process predictor of the demo and of
compare on a CPU (``nnunetv2_ohem.runtime.paired_tile_predictor_class``) sends each tile as two identical copies.
Prints one JSON line per network and tile size: milliseconds per forward pass (median of ``--repeats``) at
batch 1 and batch 2, their ratio, and the largest logit difference between the single tile and the first
copy of the pair.

    .venv/bin/python benchmarks/predict_tiles.py                 # demo U-Net at 32³, nnU-Net's default U-Net
    .venv/bin/python benchmarks/predict_tiles.py --networks demo --edges 32 48

Networks: ``demo`` = the demo's plans (``nnunetv2_ohem_plan tiny``: features 8/16/32, 3 stages);
``nnunet`` = nnU-Net's default 3d_fullres PlainConvUNet for a 128³ patch (6 stages, features 32-320), the
network its planner builds for brain MRI.
"""
import argparse
import json
import platform
import statistics
import sys
import time

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet


def network(kind: str) -> torch.nn.Module:
    if kind == "demo":
        features, stages = [8, 16, 32], 3
    elif kind == "nnunet":
        features, stages = [32, 64, 128, 256, 320, 320], 6
    else:
        raise ValueError(kind)
    return PlainConvUNet(input_channels=2, n_stages=stages, features_per_stage=features, conv_op=torch.nn.Conv3d,
                         kernel_sizes=[[3, 3, 3]] * stages, strides=[[1, 1, 1]] + [[2, 2, 2]] * (stages - 1),
                         n_conv_per_stage=[2] * stages, num_classes=2, n_conv_per_stage_decoder=[2] * (stages - 1),
                         conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=False).eval()


def ms_per_call(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernels on the first call
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--networks", nargs="+", default=["demo", "nnunet"], choices=("demo", "nnunet"))
    p.add_argument("--edges", nargs="+", type=int, default=None,
                   help="tile edges (default: 32 for demo, 64 and 128 for nnunet)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    for kind in args.networks:
        net = network(kind)
        for edge in args.edges or ([32] if kind == "demo" else [64, 128]):
            x = torch.randn(1, 2, edge, edge, edge)
            with torch.inference_mode():
                single, pair = net(x), net(torch.cat([x, x]))[:1]
                b1 = ms_per_call(lambda: net(x), args.repeats)
                b2 = ms_per_call(lambda: net(torch.cat([x, x])), args.repeats)
            print(json.dumps({"bench": "predict_tile", "network": kind, "edge": edge, "batch1_ms": round(b1, 1),
                              "batch2_ms": round(b2, 1), "batch1_over_batch2": round(b1 / b2, 2),
                              "max_logit_diff": float((single - pair).abs().max()),
                              "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
                              "date": time.strftime("%Y-%m-%d")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
