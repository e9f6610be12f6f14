"""Training-step time and peak memory: fp32 vs fp16 vs bf16 x InstanceNorm / GroupNorm / BatchNorm.

One process, one fixed nnU-Net PlainConvUNet plan; each step is what our precision trainers do (network
forward under the trainer's autocast policy via ``set_network_precision``, fp32 region Dice loss with deep
supervision, backward, GradScaler for fp16, clip 12, SGD step). Prints one JSON line per (norm, precision)
with ``ratio`` = fp32 step time / this step time (speed-up, >1 is faster) and, on CUDA,
``mem_ratio`` = peak ``torch.cuda.max_memory_allocated`` / fp32's (CPU: time only). A final line summarises.

    python benchmarks/precision.py                  # CPU: small plan, fp16 forced (emulated) for reference
    python benchmarks/precision.py --device cuda    # GPU: nnU-Net-sized plan, 128^3 patch, batch 2
    python benchmarks/precision.py --device cuda --compile
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunetv2_ohem.losses.region_dice import deep_supervision_weights, region_dice_loss
from nnunetv2_ohem.networks.norms import GroupNorm
from nnunetv2_ohem.training.precision import CPU_FP16_ENV, device_policy, make_grad_scaler, set_network_precision

NORMS = {"instance": torch.nn.InstanceNorm3d, "group": GroupNorm, "batch": torch.nn.BatchNorm3d}


def build(features, norm: str, in_ch: int = 4, out_ch: int = 3) -> torch.nn.Module:
    n = len(features)
    return PlainConvUNet(in_ch, n, features, torch.nn.Conv3d, 3, [1] + [2] * (n - 1), [2] * n, out_ch,
                         [2] * (n - 1), conv_bias=True, norm_op=NORMS[norm],
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=True)


def make_step(features, norm, precision, device, patch, batch, compile_net):
    """Build network/optimiser/data for one configuration; return (policy, step function)."""
    torch.manual_seed(0)
    net = set_network_precision(build(features, norm).to(device), precision)
    policy = device_policy(precision, device.type)
    if compile_net:
        net = torch.compile(net)
    opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
    scaler = make_grad_scaler(device.type) if policy.grad_scaler else None
    x = torch.randn(batch, 4, *([patch] * 3), device=device)
    n_out = len(features) - 1
    ys = [(torch.rand(batch, 3, *([patch // 2 ** i] * 3), device=device) > 0.7).float() for i in range(n_out)]
    w = deep_supervision_weights(n_out)

    def step():
        opt.zero_grad(set_to_none=True)
        outs = net(x)
        loss = sum(wi * region_dice_loss(o, y) for o, y, wi in zip(outs, ys, w) if wi)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    return policy, step


def measure_norm(features, norm, precisions, device, patch, batch, steps, warmup, compile_net) -> list:
    """Time every precision for one norm. CUDA: one configuration after the other, so the peak memory is
    its own. CPU: steps interleaved round-robin, so load from other processes hits all precisions alike."""
    rows = []
    if device.type == "cuda":
        for prec in precisions:
            policy, step = make_step(features, norm, prec, device, patch, batch, compile_net)
            for _ in range(warmup):
                step()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                loss = step()
                times.append(time.perf_counter() - t0)
            rows.append({"norm": norm, "precision": prec, "effective": policy.effective,
                         "step_s": statistics.median(times), "peak_mem_mib": torch.cuda.max_memory_allocated() / 2 ** 20,
                         "loss_finite": bool(torch.isfinite(loss))})
            del step
            torch.cuda.empty_cache()
        return rows
    configs = {prec: make_step(features, norm, prec, device, patch, batch, compile_net) for prec in precisions}
    times = {prec: [] for prec in precisions}
    losses = {}
    for _ in range(warmup):
        for prec, (_, step) in configs.items():
            step()
    for _ in range(steps):
        for prec, (_, step) in configs.items():
            t0 = time.perf_counter()
            losses[prec] = step()
            times[prec].append(time.perf_counter() - t0)
    return [{"norm": norm, "precision": prec, "effective": configs[prec][0].effective,
             "step_s": statistics.median(times[prec]), "peak_mem_mib": None,
             "loss_finite": bool(torch.isfinite(losses[prec]))} for prec in precisions]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--patch", type=int, default=None, help="cube edge (default cuda 128, cpu 32)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--features", type=int, nargs="+", default=None,
                   help="features per stage (default cuda 32..320 in 6 stages, cpu 8..64 in 4)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--norms", nargs="+", default=list(NORMS))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    patch = a.patch or (128 if cuda else 32)
    features = a.features or ([32, 64, 128, 256, 320, 320] if cuda else [8, 16, 32, 64])
    steps = a.steps or (10 if cuda else 4)
    if not cuda:
        # measure what fp16 would cost on CPU (the trainers fall back to fp32 there by default)
        os.environ[CPU_FP16_ENV] = "fp16"
    name = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()} threads"
    rows = []
    precisions = ["fp32"] + [q for q in a.precisions if q != "fp32"]
    for norm in a.norms:
        measured = measure_norm(features, norm, precisions, device, patch, a.batch, steps, a.warmup, a.compile)
        base = measured[0]
        for r in measured:
            r.update({"bench": "precision", "device": name, "patch": patch, "batch": a.batch,
                      "features": features, "compile": a.compile, "torch": torch.__version__,
                      "ratio": round(base["step_s"] / r["step_s"], 3),
                      "mem_ratio": round(r["peak_mem_mib"] / base["peak_mem_mib"], 3) if cuda else None})
            rows.append(r)
            print(json.dumps(r), flush=True)
    best = {q: [r["ratio"] for r in rows if r["precision"] == q] for q in a.precisions}
    print(json.dumps({"bench": "precision", "summary": True, "device": name,
                      "speedup_vs_fp32_by_precision": {q: v for q, v in best.items()},
                      "mem_ratio_vs_fp32_by_precision": {q: [r["mem_ratio"] for r in rows if r["precision"] == q]
                                                         for q in a.precisions} if cuda else None}))


if __name__ == "__main__":
    sys.exit(main())
