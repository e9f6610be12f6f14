"""Mean train-step time (data loading included) of nnUNetTrainerOHEMEMA vs plain nnUNetTrainer, same B, one process.

Builds a phantom dataset with tiny plans in a temporary nnU-Net tree (or reuses ``--preprocessed``), then for
each trainer: ``on_train_start``, ``--warmup`` steps, then ``--steps`` timed iterations of
``train_step(next(dataloader_train))``. Prints one JSON line with the per-step means and ``"ratio"``
(OHEM-EMA / plain; the paper reports ~2x per iteration on a GPU). Also splits the OHEM step into loader,
mining (miner forward + errors) and the rest, measured in separate passes.

    OMP_NUM_THREADS=1 python benchmarks/ohem_step.py --steps 10

``--realistic``: nnU-Net's real sizes (``benchmarks/ohem_realistic.py``): plans from nnU-Net's
``ExperimentPlanner`` and ``nnUNetPlannerResEncM`` for an MSSEG-II-like fingerprint (2 FLAIR channels, 1 mm,
~180×220×180), synthetic preprocessed cases, nnU-Net's loader/augmentation with ``nnUNet_n_proc_DA`` = the
available cores. JSON lines: the plans; data-pipeline seconds per step (plain, OHEM-EMA with augmented
candidates, with candidate crops); miner scoring per scoring option; full steps with ``--full_steps N``.

    python benchmarks/ohem_step.py --realistic                       # CPU: loader + scoring of 1 candidate
    python benchmarks/ohem_step.py --realistic --device cuda --full_steps 3

``--tiny_options``: tiny plans, one row per scoring option: OHEM-EMA step / plain step (one process,
interleaved), scoring time / exact scoring, and the selection recall averaged over ``--recall_steps`` steps of a
real training run with ``ohem_measure_recall`` (each mining step also scores exactly).

All rows carry ``benchmark, plans, patch, B, B_bar, candidates, scoring, loader_ratio, scoring_ratio, ratio,
selection_recall, device`` (``null`` where not measured).
"""
import argparse
import gc
import json
import os
import sys
import tempfile
import time


def _trainer(cls, ds_folder, plans_id, configuration, device, k, miner_chunk=None, attrs=None):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    plans = load_json(os.path.join(ds_folder, plans_id + ".json"))
    plans["continue_training"] = False
    dj = load_json(os.path.join(ds_folder, "dataset.json"))
    if k is not None:
        from ohem_realistic import mining_attrs  # every step mines, all B trained patches the hardest
        cls = type(cls.__name__, (cls,), {**mining_attrs(cls), "candidate_factor": k, "miner_chunk_size": miner_chunk,
                                          **(attrs or {})})
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


def _tiny_setup(args):
    """Build (or reuse) the phantom dataset with tiny plans; returns (preprocessed folder, plans identifier)."""
    root = args.nnunet_root or tempfile.mkdtemp(prefix="ohem_bench_")
    for k in ("raw", "preprocessed", "results"):
        os.makedirs(os.path.join(root, k), exist_ok=True)
    os.environ.update(nnUNet_raw=os.path.join(root, "raw"), nnUNet_preprocessed=os.path.join(root, "preprocessed"),
                      nnUNet_results=os.path.join(root, "results"), nnUNet_compile="t" if args.compile else "f")
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    folder = os.path.join(os.environ["nnUNet_preprocessed"], f"Dataset{args.dataset_id:03d}_OhemBench")
    plans_id = f"nnUNetBench_f{'-'.join(map(str, args.features))}_p{args.patch}_b{args.batch}"
    if not os.path.isfile(os.path.join(folder, plans_id + ".json")):
        from nnunetv2_ohem.phantoms.simple import write_simple_lesion_dataset
        from nnunetv2_ohem.plans.tiny import plan_and_preprocess_tiny

        write_simple_lesion_dataset(os.environ["nnUNet_raw"], args.dataset_id, "OhemBench", n_train=args.cases, n_test=0,
                                    shape=(args.shape,) * 3, seed=0)
        plan_and_preprocess_tiny(args.dataset_id, configurations=(args.configuration,), plans_identifier=plans_id,
                                 num_processes=1, features_per_stage=args.features, patch_edge=args.patch,
                                 batch_size=args.batch, fast_fingerprint_if_missing=True)
    return folder, plans_id


REQUIRED_KEYS = ("benchmark", "plans", "patch", "B", "B_bar", "candidates", "scoring", "loader_ratio",
                 "scoring_ratio", "ratio", "selection_recall", "device")


def emit(row: dict) -> None:
    """Print one JSON line with every required key (None where not measured)."""
    out = {k: row.get(k) for k in REQUIRED_KEYS}
    out.update({k: v for k, v in row.items() if k not in out})
    print(json.dumps(out), flush=True)


def device_name(device: str) -> str:
    import torch
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _r(x, nd=4):
    return None if x is None else round(float(x), nd)


def _ratio(a, b):
    """a / b rounded, None when b was too small to measure (CPU time has 10 ms ticks)."""
    return round(a / b, 3) if b else None


def realistic(args) -> None:
    """Section: nnU-Net's planner plans for an MSSEG-II-like dataset, loader / scoring / step measurements."""
    root = args.nnunet_root or tempfile.mkdtemp(prefix="ohem_real_")
    for k in ("raw", "preprocessed", "results"):
        os.makedirs(os.path.join(root, k), exist_ok=True)
    os.environ.update(nnUNet_raw=os.path.join(root, "raw"), nnUNet_preprocessed=os.path.join(root, "preprocessed"),
                      nnUNet_results=os.path.join(root, "results"), nnUNet_compile="t" if args.compile else "f")
    os.environ.setdefault("nnUNet_n_proc_DA", str(len(os.sched_getaffinity(0))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    import ohem_realistic as R
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2_ohem.training.ohem import nnUNetTrainerOHEMEMA

    shape = tuple(args.case_shape)
    plans = R.msseg2_like_plans(root, shape=shape)
    dev = device_name(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for name, entry in plans.items():
        emit({**R.plans_summary(name, entry, args.configuration), "device": dev})
    names = args.plans_names or (list(plans) if args.device.startswith("cuda") else ["nnUNetPlans"])
    options = args.scoring or list(R.CUDA_OPTIONS if args.device.startswith("cuda") else R.CPU_OPTIONS)
    for pname in names:
        p = plans[pname]["plans"]
        conf = p["configurations"][args.configuration]
        R.write_preprocessed_cases(p, args.configuration, n_cases=args.real_cases)
        B, patch = conf["batch_size"], conf["patch_size"]
        common = {"plans": pname, "patch": patch, "B": B, "device": dev, "configuration": args.configuration,
                  "nnUNet_n_proc_DA": int(os.environ["nnUNet_n_proc_DA"]), "k": args.k,
                  "network": conf["architecture"]["network_class_name"].rsplit(".", 1)[-1],
                  "case_shape": [int(round(x)) for x in conf["median_image_size_in_voxels"]]}
        ohem_attrs = {"candidate_factor": args.k, "miner_chunk_size": args.miner_chunk}

        def start(mode, extra=None):
            if mode == "plain":
                return R.make_trainer(nnUNetTrainer, p, args.configuration, args.device)
            return R.make_trainer(nnUNetTrainerOHEMEMA, p, args.configuration, args.device,
                                  {**ohem_attrs, "ohem_candidates": mode, **(extra or {})})

        trainers = {}
        try:
            # (a) data pipeline per optimiser step; one trainer (and its loader workers) alive at a time, so
            # that three sets of 128³ prefetch queues never share the memory
            if not args.skip_loader and (args.loader_plans is None or pname in args.loader_plans):
                lo = {}
                n_da = int(os.environ["nnUNet_n_proc_DA"])
                drain = args.loader_warmup if args.loader_warmup is not None else 2 * max(6, n_da // 2) + n_da + 2
                for mode in ("plain", "augmented", "crops"):
                    tr = start(mode)
                    try:
                        lo.update(R.measure_loaders({mode: R.loader_step_fn(tr, mode)}, args.loader_steps,
                                                    drain, args.repeats))
                    finally:
                        R.finish(tr)
                        del tr
                        gc.collect()
                B_bar = args.k * B
                for mode in ("plain", "augmented", "crops"):
                    emit({**common, "benchmark": "ohem_realistic_loader", "B_bar": None if mode == "plain" else B_bar,
                          "candidates": None if mode == "plain" else mode,
                          "loader_ratio": _ratio(lo[mode]["cpu_s"], lo["plain"]["cpu_s"]),
                          "loader_wall_ratio": _ratio(lo[mode]["wall_s"], lo["plain"]["wall_s"]),
                          "loader_cpu_s": _r(lo[mode]["cpu_s"]), "loader_wall_s": _r(lo[mode]["wall_s"]),
                          "steps": args.loader_steps, "repeats": args.repeats, "drained": drain,
                          "note": "loaders measured one after the other (not interleaved)"})
            if args.skip_scoring:
                continue
            trainers["crops"] = start("crops")
            B_bar = trainers["crops"].num_candidates
            # (b) miner scoring per option, on real candidate crops of this plan
            tr = trainers["crops"]
            batch = next(tr.dataloader_train)
            n = min(args.score_candidates or B_bar, B_bar)
            data = batch["data"][:n].to(args.device)
            target = [t[:n].to(args.device) for t in batch["target"]] if isinstance(batch["target"], list) \
                else batch["target"][:n].to(args.device)
            tr.miner_chunk_size = args.miner_chunk or min(n, 2 * B)
            sc = R.time_scoring(tr, data, target, ["exact"] + [o for o in options if o != "exact"],
                                args.score_repeats, sync)
            for opt in options:
                emit({**common, "benchmark": "ohem_realistic_scoring", "B_bar": B_bar, "candidates": "crops",
                      "scoring": opt, "scoring_ratio": _r(sc[opt]["s"] / sc["exact"]["s"], 3),
                      "scoring_s_per_step": _r(sc[opt]["s"] * B_bar / n), "scored_candidates": n,
                      "miner_chunk": tr.miner_chunk_size, "selection_recall_same_candidates":
                          sc[opt]["recall_same_candidates"], "repeats": args.score_repeats})
            # (c) full steps: plain vs OHEM-EMA per candidate mode with the chosen scoring option
            if args.full_steps:
                best = args.best_scoring
                R.finish(trainers.pop("crops"))
                trainers["plain"] = start("plain")
                for mode in ("augmented", "crops"):
                    trainers[mode] = start(mode, R.class_attrs_for(best))
                times, mem = {m: [] for m in trainers}, {}
                for m, t in trainers.items():  # one trainer after the other: each loader reaches steady state
                    for i in range(args.full_warmup + args.full_steps):
                        if i == args.full_warmup and args.device.startswith("cuda"):
                            torch.cuda.reset_peak_memory_stats()
                        sync()
                        t0 = time.perf_counter()
                        t.train_step(next(t.dataloader_train))  # nnU-Net's loop: the loader wait counts
                        sync()
                        if i >= args.full_warmup:
                            times[m].append(time.perf_counter() - t0)
                    if args.device.startswith("cuda"):
                        mem[m] = torch.cuda.max_memory_allocated() / 2 ** 20
                plain_s = R.median(times["plain"])
                for mode in ("augmented", "crops"):
                    s = R.median(times[mode])
                    emit({**common, "benchmark": "ohem_realistic_step", "B_bar": B_bar, "candidates": mode,
                          "scoring": best, "ratio": _r(s / plain_s, 3), "plain_step_s": _r(plain_s),
                          "ohem_step_s": _r(s), "steps": args.full_steps,
                          "peak_mem_plain_mib": mem.get("plain") and round(mem["plain"]),
                          "peak_mem_ohem_mib": mem.get(mode) and round(mem[mode]),
                          "warmup": args.full_warmup,
                          "note": "step = train_step(next(loader)) as nnU-Net's loop: loader wait, scoring, "
                                  "winner augmentation, forward/backward"})
        finally:
            for t in trainers.values():
                R.finish(t)


def tiny_options(args) -> None:
    """Tiny plans, per scoring option: step ratio vs plain and scoring ratio vs exact (interleaved, one process),
    then the selection recall over ``--recall_steps`` steps of a real training run of that option."""
    folder, plans_id = _tiny_setup(args)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import statistics
    import numpy as np
    import torch
    import ohem_realistic as R
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2_ohem.training.ohem import nnUNetTrainerOHEMEMA

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    options = args.options or list(R.CUDA_OPTIONS if cuda else R.CPU_OPTIONS)
    dev = device_name(args.device)
    plain = _trainer(nnUNetTrainer, folder, plans_id, args.configuration, args.device, None)
    # one trainer per scoring option (crops candidates), plus the augmented-candidates mode with exact scoring
    runs = [("crops", o) for o in options] + [("augmented", "exact")]
    trainers = {r: _trainer(nnUNetTrainerOHEMEMA, folder, plans_id, args.configuration, args.device, args.k,
                            args.miner_chunk, {**R.class_attrs_for(r[1]), "ohem_candidates": r[0]}) for r in runs}
    first = trainers[runs[0]]
    common = {"plans": plans_id, "patch": plain.configuration_manager.patch_size, "B": plain.batch_size,
              "B_bar": first.num_candidates, "device": dev, "k": args.k, "configuration": args.configuration,
              "nnUNet_n_proc_DA": os.environ["nnUNet_n_proc_DA"], "torch_threads": torch.get_num_threads()}
    times = {k: [] for k in ["plain", *runs]}
    try:
        for i in range(args.warmup + args.steps):  # interleaved: load changes hit every trainer alike
            for k, tr in [("plain", plain), *trainers.items()]:
                b = next(tr.dataloader_train)
                sync()
                t0 = time.perf_counter()
                tr.train_step(b)
                sync()
                if i >= args.warmup:
                    times[k].append(time.perf_counter() - t0)
        ref = trainers[("crops", "exact")] if ("crops", "exact") in trainers else first
        b = next(ref.dataloader_train)
        tgt = [t.to(args.device) for t in b["target"]] if isinstance(b["target"], list) else b["target"].to(args.device)
        sc = R.time_scoring(ref, b["data"].to(args.device), tgt, ["exact"] + [o for o in options if o != "exact"],
                            max(3, args.steps), sync)
    finally:
        for tr in [plain, *trainers.values()]:
            R.finish(tr)
    plain_s = statistics.median(times["plain"])
    for mode, o in runs:
        recall, per_epoch = None, None
        if args.recall_steps and o != "exact" and mode == "crops":
            attrs = {**R.class_attrs_for(o), "ohem_measure_recall": True, "ohem_candidates": mode}
            tr = _trainer(nnUNetTrainerOHEMEMA, folder, plans_id, args.configuration, args.device, args.k,
                          args.miner_chunk, attrs)
            try:
                per_epoch, epoch_len = [], min(50, args.recall_steps)
                for e in range(-(-args.recall_steps // epoch_len)):
                    if e:
                        tr.current_epoch += 1
                        tr.on_train_epoch_start()
                    outs = [tr.train_step(next(tr.dataloader_train)) for _ in range(epoch_len)]
                    tr.on_train_epoch_end(outs)  # the trainer's own per-epoch diagnostics
                    per_epoch.append(tr.logger.get_value("ohem_selection_recall", step=-1))
                recall = float(np.mean(per_epoch))
            finally:
                R.finish(tr)
        elif o == "exact":
            recall = 1.0
        emit({**common, "benchmark": "ohem_tiny_scoring", "scoring": o, "candidates": mode,
              "ratio": round(statistics.median(times[(mode, o)]) / plain_s, 3),
              "scoring_ratio": round(sc[o]["s"] / sc["exact"]["s"], 3),
              "selection_recall": None if recall is None else round(recall, 4),
              "selection_recall_per_epoch": per_epoch and [round(float(x), 4) for x in per_epoch],
              "recall_steps": 0 if o == "exact" else args.recall_steps,
              "plain_step_s": round(plain_s, 4), "ohem_step_s": round(statistics.median(times[(mode, o)]), 4),
              "scoring_s": round(sc[o]["s"], 4), "exact_scoring_s": round(sc["exact"]["s"], 4),
              "steps": args.steps})


def main():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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
    p.add_argument("--realistic", action="store_true", help="nnU-Net's real sizes (see the module docstring)")
    p.add_argument("--tiny_options", action="store_true", help="tiny plans: one row per scoring option, recall")
    g = p.add_argument_group("--realistic")
    g.add_argument("--case_shape", type=int, nargs=3, default=[180, 220, 180],
                   help="fingerprint centre and synthetic case shape (default MSSEG-II-like 180 220 180)")
    g.add_argument("--real_cases", type=int, default=3, help="synthetic preprocessed cases")
    g.add_argument("--plans_names", nargs="+", default=None,
                   help="plans to measure (default: both on CUDA, nnUNetPlans on CPU; ResEncM has the same patch)")
    g.add_argument("--scoring", nargs="+", default=None, help="scoring options (names in ohem_realistic.py)")
    g.add_argument("--loader_steps", type=int, default=4)
    g.add_argument("--loader_warmup", type=int, default=None,
                   help="steps drained before measuring (default: all that nnU-Net's augmenter can hold prefetched: "
                        "2 queues of max(6, n/2) batches + one per worker + 2)")
    g.add_argument("--repeats", type=int, default=2)
    g.add_argument("--score_candidates", type=int, default=None,
                   help="candidates scored per option (default B̄; per-step time is scaled to B̄)")
    g.add_argument("--score_repeats", type=int, default=1)
    g.add_argument("--full_steps", type=int, default=0, help="timed full train steps per trainer (0: skip)")
    g.add_argument("--full_warmup", type=int, default=7, help="untimed steps first (drains the prefetch queue)")
    g.add_argument("--best_scoring", default="bf16", help="scoring option of the OHEM trainers in the full step")
    g.add_argument("--skip_loader", action="store_true")
    g.add_argument("--skip_scoring", action="store_true", help="loader rows only (no scoring, no full steps)")
    g.add_argument("--loader_plans", nargs="+", default=None,
                   help="measure the loaders only for these plans (same patch and transforms = same loader cost)")
    g = p.add_argument_group("--tiny_options")
    g.add_argument("--recall_steps", type=int, default=200)
    g.add_argument("--options", nargs="+", default=None, help="scoring options (default: the CPU/CUDA list)")
    args = p.parse_args()
    if args.realistic:
        return realistic(args)
    if args.tiny_options:
        return tiny_options(args)

    folder, plans_id = _tiny_setup(args)
    if args.prepare_only:
        return
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2_ohem.training.ohem import nnUNetTrainerOHEMEMA
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
        "candidates": getattr(ohem, "ohem_candidates", "augmented"),
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
