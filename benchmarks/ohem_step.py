"""Mean train-step time (data loading included) of nnUNetTrainerOHEMEMA vs plain nnUNetTrainer, same B, one process.

Builds a phantom dataset with tiny plans in a temporary nnU-Net tree (or reuses ``--preprocessed``), then for
each trainer: ``on_train_start``, ``--warmup`` steps, then ``--steps`` timed iterations of
``train_step(next(dataloader_train))``. Prints one JSON line with the per-step means and ``"ratio"``
(OHEM-EMA / plain; the paper reports ~2x per iteration on a GPU). Also splits the OHEM step into loader,
mining (miner forward + errors) and the rest, measured in separate passes.

    OMP_NUM_THREADS=1 python benchmarks/ohem_step.py --steps 10
"""
import argparse
import json
import os
import tempfile
import time


def _trainer(cls, ds_folder, plans_id, configuration, device, k, miner_chunk=None):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    plans = load_json(os.path.join(ds_folder, plans_id + ".json"))
    plans["continue_training"] = False
    dj = load_json(os.path.join(ds_folder, "dataset.json"))
    if k is not None:
        cls = type(cls.__name__, (cls,), {"candidate_factor": k, "miner_chunk_size": miner_chunk})
    # fold 'all': the benchmark may use fewer than 5 cases
    tr = cls(plans, configuration, "all", dj, torch.device(device))
    tr.on_train_start()
    tr.on_train_epoch_start()
    return tr


def _time_steps(tr, warmup, steps, sync):
    """Mean seconds per step and peak GPU memory (MiB; None on CPU) over the timed steps."""
    import torch

    for _ in range(warmup):
        tr.train_step(next(tr.dataloader_train))
    sync()
    if tr.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.train_step(next(tr.dataloader_train))
    sync()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if tr.device.type == "cuda" else None
    return dt, peak


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("-k", type=int, default=4, help="candidate factor (B̄ = k·B)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", type=int, default=40, help="phantom edge length")
    p.add_argument("--batch", type=int, default=2, help="plan batch size B")
    p.add_argument("--features", type=int, nargs="+", default=[4, 8, 16], help="U-Net features per stage")
    p.add_argument("--patch", type=int, default=32, help="patch edge (voxels)")
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--miner_chunk", type=int, default=None, help="candidates per miner forward (default 2·B)")
    p.add_argument("--dataset_id", type=int, default=902, help="one id per --shape/--cases")
    p.add_argument("--nnunet_root", default=None,
                   help="reuse an nnU-Net tree (raw/preprocessed/results) that already holds the preprocessed "
                        "Dataset902_OhemBench with these settings (e.g. built here, run on a GPU machine)")
    p.add_argument("--prepare_only", action="store_true", help="build the dataset and plans, then exit")
    p.add_argument("--compile", action="store_true",
                   help="nnUNet_compile=t: torch.compile online net and miner (CUDA only; slow first steps)")
    args = p.parse_args()

    root = args.nnunet_root or tempfile.mkdtemp(prefix="ohem_bench_")
    for k in ("raw", "preprocessed", "results"):
        os.makedirs(os.path.join(root, k), exist_ok=True)
    os.environ.update(nnUNet_raw=os.path.join(root, "raw"), nnUNet_preprocessed=os.path.join(root, "preprocessed"),
                      nnUNet_results=os.path.join(root, "results"), nnUNet_compile="t" if args.compile else "f")
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_ohem.training.ohem import nnUNetTrainerOHEMEMA

    folder = os.path.join(os.environ["nnUNet_preprocessed"], f"Dataset{args.dataset_id:03d}_OhemBench")
    plans_id = f"nnUNetBench_f{'-'.join(map(str, args.features))}_p{args.patch}_b{args.batch}"
    if not os.path.isfile(os.path.join(folder, plans_id + ".json")):
        from nnunetv2_ohem.phantoms.simple import write_simple_lesion_dataset
        from nnunetv2_ohem.plans.tiny import plan_and_preprocess_tiny

        write_simple_lesion_dataset(os.environ["nnUNet_raw"], args.dataset_id, "OhemBench", n_train=args.cases, n_test=0,
                                    shape=(args.shape,) * 3, seed=0)
        plan_and_preprocess_tiny(args.dataset_id, configurations=(args.configuration,), plans_identifier=plans_id,
                                 num_processes=1, features_per_stage=args.features, patch_edge=args.patch,
                                 batch_size=args.batch)
    if args.prepare_only:
        return
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    plain = _trainer(nnUNetTrainer, folder, plans_id, args.configuration, args.device, None)
    t_plain, mem_plain = _time_steps(plain, args.warmup, args.steps, sync)
    ohem = _trainer(nnUNetTrainerOHEMEMA, folder, plans_id, args.configuration, args.device, args.k,
                    args.miner_chunk)
    t_ohem, mem_ohem = _time_steps(ohem, args.warmup, args.steps, sync)

    # breakdown of the OHEM step: loader (B̄ augmented candidates) and mining (miner forward + errors)
    t0 = time.perf_counter()
    batches = [next(ohem.dataloader_train) for _ in range(args.steps)]
    t_loader = (time.perf_counter() - t0) / args.steps
    t0 = time.perf_counter()
    for b in batches:
        tgt = [t.to(ohem.device) for t in b["target"]] if isinstance(b["target"], list) else b["target"].to(ohem.device)
        ohem.compute_candidate_errors(b["data"].to(ohem.device), tgt)
    sync()
    t_mining = (time.perf_counter() - t0) / args.steps
    t0 = time.perf_counter()
    for _ in range(args.steps):
        next(plain.dataloader_train)
    t_loader_plain = (time.perf_counter() - t0) / args.steps

    for tr in (plain, ohem):
        for dl in (tr.dataloader_train, tr.dataloader_val):
            if hasattr(dl, "_finish"):
                dl._finish()
    print(json.dumps({
        "benchmark": "ohem_train_step", "configuration": args.configuration, "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "plans": plans_id,
        "patch": plain.configuration_manager.patch_size,
        "B": plain.batch_size, "B_bar": ohem.num_candidates, "miner_chunk": ohem.miner_chunk_size or 2 * ohem.batch_size, "k": args.k, "steps": args.steps,
        "torch_threads": torch.get_num_threads(), "compile": args.compile, "nnUNet_n_proc_DA": os.environ["nnUNet_n_proc_DA"],
        "plain_step_s": round(t_plain, 4), "ohem_step_s": round(t_ohem, 4),
        "ohem_loader_s": round(t_loader, 4), "plain_loader_s": round(t_loader_plain, 4),
        "ohem_mining_s": round(t_mining, 4),
        "peak_mem_plain_mib": mem_plain and round(mem_plain), "peak_mem_ohem_mib": mem_ohem and round(mem_ohem), "ratio": round(t_ohem / t_plain, 3)}))


if __name__ == "__main__":
    main()
