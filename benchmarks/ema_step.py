"""Cost of the weight-EMA update: nnUNetTrainerEMA's train step vs nnU-Net's plain train step, one process.

Builds a phantom dataset with tiny plans in a temporary nnU-Net tree (or reuses ``--nnunet_root``), then one
``nnUNetTrainerEMA`` runs, interleaved on the *same* network and the *same* pre-loaded batches, nnU-Net's plain
``train_step`` and the EMA trainer's ``train_step`` (= the plain step + ``ema_update``), ``--repeats`` pairs
after ``--warmup`` pairs, alternating which goes first. Data loading is excluded (identical for both), so the
ratio is the update's share of the optimiser step alone, the strictest view. Prints one JSON line per
configuration with medians: ``plain_s``, ``ema_s``, ``update_s`` (the update alone, timed separately),
``ratio`` (median of the per-pair ratios ema/plain) and ``ratio_update`` (1 + update_s/plain_s).

    OMP_NUM_THREADS=1 python benchmarks/ema_step.py --repeats 30
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Tuple


def _setup(root: str, dataset_id: int) -> Tuple[str, str]:
    for k in ("raw", "preprocessed", "results"):
        os.makedirs(os.path.join(root, k), exist_ok=True)
    os.environ.update(nnUNet_raw=os.path.join(root, "raw"), nnUNet_preprocessed=os.path.join(root, "preprocessed"),
                      nnUNet_results=os.path.join(root, "results"), nnUNet_compile="f")
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    from nnunetv2_ohem.phantoms.simple import write_simple_lesion_dataset
    from nnunetv2_ohem.plans.tiny import plan_and_preprocess_tiny

    folder = os.path.join(os.environ["nnUNet_preprocessed"], f"Dataset{dataset_id:03d}_EmaBench")
    if not os.path.isdir(folder):
        write_simple_lesion_dataset(os.environ["nnUNet_raw"], dataset_id, "EmaBench", seed=0)
    plans_id = plan_and_preprocess_tiny(dataset_id, configurations=("3d_fullres", "2d"), num_processes=1)
    return folder, plans_id


def _measure(folder: str, plans_id: str, configuration: str, warmup: int, repeats: int) -> dict:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_ohem.training.ema import nnUNetTrainerEMA

    plans = load_json(os.path.join(folder, plans_id + ".json"))
    plans["continue_training"] = False
    dj = load_json(os.path.join(folder, "dataset.json"))
    tr = nnUNetTrainerEMA(plans, configuration, "all", dj, torch.device("cpu"))
    tr.on_train_start()
    tr.on_train_epoch_start()
    batches = [next(tr.dataloader_train) for _ in range(8)]

    def timed(fn, batch):
        t0 = time.perf_counter()
        fn(batch)
        return time.perf_counter() - t0

    def plain(batch):
        nnUNetTrainer.train_step(tr, batch)

    plain_s, ema_s, update_s, ratios = [], [], [], []
    for i in range(warmup + repeats):
        b = batches[i % len(batches)]
        first_plain = i % 2 == 0
        a = timed(plain, b) if first_plain else None
        e = timed(tr.train_step, b)
        if a is None:
            a = timed(plain, b)
        t0 = time.perf_counter()
        tr.ema_update()
        u = time.perf_counter() - t0
        if i >= warmup:
            plain_s.append(a)
            ema_s.append(e)
            update_s.append(u)
            ratios.append(e / a)
    n_params = sum(p.numel() for p in tr.ema_model.parameters())
    med = statistics.median
    return {"benchmark": "ema_step", "configuration": configuration, "plans": plans_id,
            "patch": list(tr.configuration_manager.patch_size), "batch": tr.batch_size, "parameters": n_params,
            "repeats": repeats, "plain_s": med(plain_s), "ema_s": med(ema_s), "update_s": med(update_s),
            "ratio": med(ratios), "ratio_update": 1 + med(update_s) / med(plain_s),
            "threads": torch.get_num_threads(), "device": "cpu"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--configurations", nargs="+", default=["3d_fullres", "2d"])
    p.add_argument("--nnunet_root", default=None, help="reuse this nnU-Net tree (default: a temp dir)")
    p.add_argument("--dataset_id", type=int, default=993)
    args = p.parse_args(argv)
    root = args.nnunet_root or tempfile.mkdtemp(prefix="ema_bench_")
    folder, plans_id = _setup(root, args.dataset_id)
    for c in args.configurations:
        print(json.dumps(_measure(folder, plans_id, c, args.warmup, args.repeats)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
