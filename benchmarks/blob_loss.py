"""Blob loss speed, measured side by side in one process; prints one JSON line per measurement.

1. ``vs_loop``: vectorised blob term vs a per-blob Python loop (forward + backward), K = 1/10/100/500 blobs.
2. ``vs_dc_ce``: full blob loss (alpha * DC+CE + beta * blob) vs nnU-Net's DC+CE alone on the same prediction.
3. ``trainer_step``: nnUNetTrainerBlobLoss_Debug vs nnUNetTrainer_Debug, data loading (with the cc3d instance
   transform) + train_step, on tiny plans (40^3 phantoms, 32^3 patches, batch 2).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/blob_loss.py [--edge 64] [--repeats 5] [--no-trainer]``
(128^3 is impractically slow on a 2-core CPU; the edge is printed with every line).
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch.nn import functional as F


def place_blobs(k: int, edge: int, batch: int, seed: int = 0) -> torch.Tensor:
    """(B, 1, edge^3) instance map with k disjoint cubes of 2-4 voxels per image."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((batch, 1, edge, edge, edge), np.int64)
    for b in range(batch):
        placed, tries = 0, 0
        while placed < k:
            tries += 1
            if tries > 1000 * k:
                raise ValueError(f"cannot place {k} separate blobs in {edge}^3; use a larger --edge")
            s = int(rng.integers(2, 5))
            c = rng.integers(0, edge - s, size=3)
            view = inst[b, 0, c[0]:c[0] + s, c[1]:c[1] + s, c[2]:c[2] + s]
            # one-voxel gap so blobs stay separate
            lo, hi = np.maximum(c - 1, 0), np.minimum(c + s + 1, edge)
            if inst[b, 0, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].any():
                continue
            placed += 1
            view[...] = placed
    return torch.from_numpy(inst)


def loop_blob_loss(logits: torch.Tensor, inst: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Per-blob loop as in the public reference code (mask other blobs, score the masked probabilities)."""
    p = torch.softmax(logits.float(), 1)[:, 1]
    means = []
    for b in range(inst.shape[0]):
        ids = [int(i) for i in torch.unique(inst[b, 0]) if i != 0]
        terms = []
        for k in ids:
            y = (inst[b, 0] == k).float()
            pm = p[b] * ((inst[b, 0] == 0) | (inst[b, 0] == k))
            tp = (pm * y).sum()
            dice = (2 * tp + smooth) / (tp + (pm * (1 - y)).sum() + y.sum() + smooth)
            terms.append(F.binary_cross_entropy(pm, y) - dice)
        if terms:
            means.append(sum(terms) / len(terms))
    return sum(means) / len(means)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def loss_benchmarks(edge: int, repeats: int):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2_ohem.losses.blob import BlobLoss, blob_loss

    batch = 2
    torch.manual_seed(0)
    logits = torch.randn(batch, 2, edge, edge, edge, requires_grad=True)
    glob = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          dice_class=MemoryEfficientSoftDiceLoss)
    for k in (1, 10, 100, 500):
        inst = place_blobs(k, edge, batch)
        seg = (inst > 0).to(torch.int32)
        packed = torch.cat([seg, inst.to(torch.int32)], 1)
        full = BlobLoss(glob, 1, "softmax", alpha=2.0, beta=1.0)
        # the same loss without the fused two-class path (DC+CE and blob term in separate passes)
        unfused = BlobLoss(glob, 1, "softmax", alpha=2.0, beta=1.0)
        unfused._fused = False

        def run(f):
            def go():
                logits.grad = None
                f().backward()
            return go

        t_vec = timed(run(lambda: blob_loss(logits, inst)), repeats)
        t_loop = timed(run(lambda: loop_blob_loss(logits, inst)), 1 if k >= 100 else repeats)
        print(json.dumps({"bench": "blob_term_vs_loop", "edge": edge, "batch": batch, "K": k,
                          "vectorised_s": round(t_vec, 5), "loop_s": round(t_loop, 5),
                          "ratio": round(t_loop / t_vec, 2), "ratio_means": "loop / vectorised"}), flush=True)
        t_dcce = timed(run(lambda: glob(logits, seg)), repeats)
        t_full = timed(run(lambda: full(logits, packed)), repeats)
        t_unfused = timed(run(lambda: unfused(logits, packed)), repeats)
        print(json.dumps({"bench": "blob_loss_vs_dc_ce", "edge": edge, "batch": batch, "K": k,
                          "dc_ce_s": round(t_dcce, 5), "blob_loss_s": round(t_full, 5),
                          "ratio": round(t_full / t_dcce, 3), "ratio_means": "blob loss / DC+CE",
                          "unfused_blob_loss_s": round(t_unfused, 5),
                          "unfused_ratio": round(t_unfused / t_dcce, 3),
                          "goal": "<= 1.5 at K=100, flat in K"}), flush=True)


def use_temp_nnunet_folders() -> None:
    """nnU-Net reads its folders at import time: call before anything imports nnunetv2."""
    root = tempfile.mkdtemp(prefix="blob_bench_")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[k] = os.path.join(root, k)
        os.makedirs(os.environ[k])
    os.environ["nnUNet_n_proc_DA"] = "0"
    os.environ["nnUNet_compile"] = "f"


def trainer_benchmark(steps: int):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2_ohem.phantoms.simple import write_simple_lesion_dataset
    from nnunetv2_ohem.plans.tiny import plan_and_preprocess_tiny
    from nnunetv2_ohem.training.blob import nnUNetTrainerBlobLoss_Debug
    from nnunetv2_ohem.training.debug import nnUNetTrainer_Debug

    dataset_id = 910
    write_simple_lesion_dataset(os.environ["nnUNet_raw"], dataset_id, "BlobBench", seed=0)
    plans_id = plan_and_preprocess_tiny(dataset_id, num_processes=1, fast_fingerprint_if_missing=True)
    folder = os.path.join(os.environ["nnUNet_preprocessed"], f"Dataset{dataset_id}_BlobBench")

    def make(cls):
        plans = load_json(os.path.join(folder, plans_id + ".json"))
        plans["continue_training"] = False
        torch.manual_seed(0)
        trainer = cls(plans, "3d_fullres", 0, load_json(os.path.join(folder, "dataset.json")), torch.device("cpu"))
        trainer.initialize()
        dl_tr, _ = trainer.get_dataloaders()
        trainer.network.train()
        for _ in range(2):
            trainer.train_step(next(dl_tr))
        return trainer, dl_tr

    # interleaved so that load changes on a shared machine hit both alike
    runs = {"plain": make(nnUNetTrainer_Debug), "blob": make(nnUNetTrainerBlobLoss_Debug)}
    times = {k: [] for k in runs}
    for _ in range(steps):
        for k, (trainer, dl) in runs.items():
            t0 = time.perf_counter()
            trainer.train_step(next(dl))
            times[k].append(time.perf_counter() - t0)
    t_plain, t_blob = float(np.median(times["plain"])), float(np.median(times["blob"]))
    print(json.dumps({"bench": "trainer_step", "plans": "nnUNetTinyPlans 3d_fullres (32^3, batch 2)",
                      "steps": steps, "plain_s": round(t_plain, 4), "blob_s": round(t_blob, 4),
                      "ratio": round(t_blob / t_plain, 3), "ratio_means": "blob step / plain step (load+step)",
                      "goal": "<= 1.1"}), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edge", type=int, default=64, help="edge of the cubic prediction (default 64)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed trainer steps per trainer")
    parser.add_argument("--no-trainer", action="store_true", help="skip the trainer-step comparison")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    use_temp_nnunet_folders()
    loss_benchmarks(args.edge, args.repeats)
    if not args.no_trainer:
        trainer_benchmark(args.steps)


if __name__ == "__main__":
    sys.exit(main())
