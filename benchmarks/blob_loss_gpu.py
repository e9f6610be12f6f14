"""Blob loss vs nnU-Net's DC+CE on one device (default CUDA) at nnU-Net's patch size (128³), side by side.

The device-aware counterpart of ``benchmarks/blob_loss.py``'s ``blob_loss_vs_dc_ce`` lines (same losses, same
blob placement, same fused and unfused paths), forward + backward on a (batch, 2, edge³) prediction, median of
``--repeats`` after one warm-up, CUDA-synchronised. One JSON line per K with ``ratio`` = blob loss / DC+CE and
the peak memory of each (CUDA).

    python benchmarks/blob_loss_gpu.py                    # cuda, 128³, batch 2, K = 1 10 100 500
    python benchmarks/blob_loss_gpu.py --device cpu --edge 32 --ks 1 10 --repeats 1   # smoke run
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from blob_loss import place_blobs  # noqa: E402  (same blobs as the CPU benchmark)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--edge", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 10, 100, 500])
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args(argv)
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2_ohem.losses.blob import BlobLoss

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()} threads"
    torch.manual_seed(0)
    logits = torch.randn(a.batch, 2, a.edge, a.edge, a.edge, device=device, requires_grad=True)
    glob = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          dice_class=MemoryEfficientSoftDiceLoss)
    for k in a.ks:
        inst = place_blobs(k, a.edge, a.batch).to(device)
        seg = (inst > 0).to(torch.int32)
        packed = torch.cat([seg, inst.to(torch.int32)], 1)
        fused = BlobLoss(glob, 1, "softmax", alpha=2.0, beta=1.0)
        unfused = BlobLoss(glob, 1, "softmax", alpha=2.0, beta=1.0)
        unfused._fused = False
        fns = {"dc_ce": lambda: glob(logits, seg), "blob_fused": lambda: fused(logits, packed),
               "blob_unfused": lambda: unfused(logits, packed)}
        times, mem = {n: [] for n in fns}, {}
        for i in range(a.repeats + 1):
            for n, f in fns.items():  # interleaved
                logits.grad = None
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                sync()
                t0 = time.perf_counter()
                f().backward()
                sync()
                if i:
                    times[n].append(time.perf_counter() - t0)
                if cuda:
                    mem[n] = torch.cuda.max_memory_allocated() / 2 ** 20
        t = {n: statistics.median(v) for n, v in times.items()}
        print(json.dumps({"bench": "blob_loss_vs_dc_ce", "device": name, "edge": a.edge, "batch": a.batch, "K": k,
                          "dc_ce_s": round(t["dc_ce"], 5), "blob_loss_s": round(t["blob_fused"], 5),
                          "ratio": round(t["blob_fused"] / t["dc_ce"], 3), "ratio_means": "blob loss / DC+CE",
                          "unfused_blob_loss_s": round(t["blob_unfused"], 5),
                          "unfused_ratio": round(t["blob_unfused"] / t["dc_ce"], 3),
                          "peak_mem_mib": {n: round(v) for n, v in mem.items()} if cuda else None,
                          "repeats": a.repeats, "goal": "<= 1.5 at K=100, flat in K"}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
