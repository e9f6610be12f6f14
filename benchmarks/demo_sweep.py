"""Sweep of the demo's settings: does each method learn, in how many epochs, at what cost?

Runs ``nnunetv2_ohem.demo.pipeline.run_demo`` for every (variant, training seed) and prints one JSON line per
run (held-out lesion F1 / Dice / FP lesions per method, the epoch at which nnU-Net's pseudo Dice first
exceeded 0.1, wall and CPU seconds per step), appended to ``<root>/sweep.jsonl``. Finished runs are reused,
so an interrupted sweep resumes. Variants that share phantoms and plans share one prepared data folder
(phantoms, conversion, plans are built once and copied).

    .venv/bin/python benchmarks/demo_sweep.py --root /tmp/demo_sweep --variants default more_lesions \\
        --train_seeds 0 1 2
    .venv/bin/python benchmarks/demo_sweep.py --root /tmp/demo_sweep --table   # markdown table of sweep.jsonl

Timings are only comparable between runs made one at a time on an idle machine; run two sweeps side by side
(``OMP_NUM_THREADS=1`` each) only to learn which settings learn.
"""
import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import asdict

from nnunetv2_ohem.demo.pipeline import DemoConfig, run_demo

#: variant name -> DemoConfig overrides (the rest are the demo's defaults)
_DATA = {
    "": {},
    "more_lesions": {"phantom_options": {"n_new_lesions": (4, 10)}},
    "brighter": {"phantom_options": {"lesion_contrast": (2.2, 2.8)}},
    "more_brighter": {"phantom_options": {"n_new_lesions": (4, 10), "lesion_contrast": (2.2, 2.8)}},
    "larger": {"lesion_volume": (200.0, 2000.0)},
    "more_larger": {"lesion_volume": (200.0, 2000.0), "phantom_options": {"n_new_lesions": (4, 10)}},
    "more_lesions_f16": {"features": (16, 32, 64), "phantom_options": {"n_new_lesions": (4, 10)}},
    "more_lesions_f4s": {"features": (8, 16, 32, 64), "phantom_options": {"n_new_lesions": (4, 10)}},
    "more_lesions_f32": {"features": (32, 64, 128), "phantom_options": {"n_new_lesions": (4, 10)}},
    "f16": {"features": (16, 32, 64)},
    "f32": {"features": (32, 64, 128)},
    "very_easy": {"lesion_volume": (300.0, 3000.0),
                  "phantom_options": {"n_new_lesions": (6, 12), "lesion_contrast": (3.0, 4.0)}},
    "more_brighter_larger": {"lesion_volume": (200.0, 2000.0),
                             "phantom_options": {"n_new_lesions": (4, 10), "lesion_contrast": (2.2, 2.8)}},
    "msseg2_sized": {"lesion_volume": (1.0, 50.0)},
}
_BUDGETS = {"": {}, "e60x10": {"epochs": 60, "iterations": 10}, "e40x10": {"epochs": 40, "iterations": 10},
            "e30x10": {"epochs": 30, "iterations": 10}, "e50x10": {"epochs": 50, "iterations": 10},
            "e20x20": {"epochs": 20, "iterations": 20},
            "e30x10b4": {"epochs": 30, "iterations": 10, "batch": 4}}
#: variant name ("<data>_<budget>", either part may be empty) -> DemoConfig overrides (the rest: demo defaults)
VARIANTS = {"_".join(p for p in (d, b) if p) or "default": {**dv, **bv}
            for d, dv in _DATA.items() for b, bv in _BUDGETS.items()}
DATA_FIELDS = ("n_train", "n_test", "voxel_size", "lesion_volume", "seed", "phantom_options", "dataset_id",
               "features", "patch", "batch")
_DICE_RE = re.compile(r"Pseudo dice \[(?:np\.float32\()?([0-9.eE+-]+|nan)")


def onset_epoch(log_text: str, threshold: float = 0.1):
    """First epoch whose pseudo Dice exceeds ``threshold`` (None if none did)."""
    for epoch, m in enumerate(_DICE_RE.finditer(log_text)):
        if m.group(1) != "nan" and float(m.group(1)) > threshold:
            return epoch
    return None


def data_key(cfg: DemoConfig) -> str:
    values = json.dumps({k: asdict(cfg)[k] for k in DATA_FIELDS}, sort_keys=True)
    return hashlib.sha1(values.encode()).hexdigest()[:12]


def prepared(cfg: DemoConfig, root: str) -> str:
    """Folder with this config's phantoms, conversion and plans (built once per data key)."""
    import fcntl
    folder = os.path.join(root, "_data", data_key(cfg))
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # sweeps running side by side build each data folder once
        if not os.path.exists(os.path.join(folder, "steps", "plan.json")):
            run_demo(DemoConfig(**{**asdict(cfg), "out": folder, "until": "plan", "progress": False}))
    return folder


def run_one(root: str, variant: str, train_seed: int, methods=None, fresh: bool = False) -> dict:
    """One demo run; ``fresh``: end to end in a new folder (phantoms, conversion and plans included in the
    time), as a new user's ``make demo --train_seed S``."""
    tag = variant + ("" if methods is None else "-" + "-".join(methods)) + ("-fresh" if fresh else "")
    cfg = DemoConfig(**{**VARIANTS[variant], "train_seed": train_seed, "progress": False,
                        "out": os.path.join(root, tag, f"seed{train_seed}"),
                        **({} if methods is None else {"methods": tuple(methods)})})
    if fresh:
        shutil.rmtree(cfg.out, ignore_errors=True)
    elif not os.path.exists(os.path.join(cfg.out, "steps", "plan.json")):
        shutil.rmtree(cfg.out, ignore_errors=True)
        shutil.copytree(prepared(cfg, root), cfg.out, symlinks=True)
    result = run_demo(cfg)
    row = {"variant": variant, "train_seed": train_seed, "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": f"{os.cpu_count()}-core {platform.machine()}", "omp_threads": os.environ.get("OMP_NUM_THREADS"),
           "total_seconds": sum(v["seconds"] for v in result["steps"].values()), "fresh": fresh,
           "wall_seconds": result["seconds"], "load_average": os.getloadavg(),
           "steps": {k: {"s": round(v["seconds"], 1), "cpu_s": round(v.get("cpu_seconds", 0.0), 1)}
                     for k, v in result["steps"].items()},
           "settings": {k: asdict(cfg)[k] for k in ("epochs", "iterations", "batch", "lesion_volume",
                                                    "new_lesions", "features", "phantom_options", "val_iterations",
                                                    "methods")}}
    for method in cfg.methods:
        with open(os.path.join(cfg.out, "metrics", f"{method}.json")) as f:
            agg = json.load(f)["challenge"]
        with open(os.path.join(cfg.out, "logs", f"train_{method}.log")) as f:
            onset = onset_epoch(f.read())
        row[method] = {"lesion_f1": agg["cases_with_lesions"]["lesion_f1"]["mean"],
                       "dice": agg["cases_with_lesions"]["dice"]["mean"],
                       "fp_lesions_lesion_free": agg["lesion_free_cases"]["fp_lesions"]["mean"],
                       "onset_epoch": onset}
    return row


def table(rows) -> str:
    """Markdown table: per run the settings, per method lesion F1 / Dice / FP lesions on the lesion-free case /
    onset epoch (pseudo Dice > 0.1), training CPU seconds, and the run's wall seconds."""
    methods = [m for m in ("nnUNetTrainer", "nnUNetTrainerOHEMEMA", "nnUNetTrainerOHEMEMA_CE")
               if any(m in r for r in rows)]
    short = {"nnUNetTrainer": "plain", "nnUNetTrainerOHEMEMA": "OHEM-EMA (DC+CE ranking)",
             "nnUNetTrainerOHEMEMA_CE": "OHEM-EMA (CE ranking)"}
    head = ["variant", "train seed", "epochs × it.", "features", "new lesions", "threads"]
    head += [f"{short[m]}: F1 / Dice / FP / onset / train CPU-s" for m in methods] + ["wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["settings"]
        # rows written before features / new_lesions were recorded ran the then-defaults 8/16/32 and 1-8
        features = s.get("features") or VARIANTS.get(r["variant"], {}).get("features") or (8, 16, 32)
        lesions = s.get("phantom_options", {}).get("n_new_lesions") or s.get("new_lesions") or (1, 8)
        cells = [r["variant"] + (" (fresh)" if r.get("fresh") else ""), str(r["train_seed"]),
                 f"{s['epochs']} × {s['iterations']}" + (f" (val {s['val_iterations']})" if "val_iterations" in s else ""), "/".join(map(str, features)), "-".join(map(str, lesions)),
                 str(r.get("omp_threads") or "all")]
        for m in methods:
            v = r.get(m)
            cpu = r["steps"].get(f"train/{m}", {}).get("cpu_s")
            cells.append("–" if v is None else f"{v['lesion_f1']:.2f} / {v['dice']:.2f} / "
                                               f"{v['fp_lesions_lesion_free']:g} / {v['onset_epoch']} / {cpu:.0f}")
        cells.append(f"{r.get('wall_seconds', r['total_seconds']):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="./demo_sweep_output", help="working folder (not for committing)")
    p.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    p.add_argument("--train_seeds", nargs="+", type=int, default=[0])
    p.add_argument("--methods", nargs="+", default=None, help="default: the demo's")
    p.add_argument("--fresh", action="store_true",
                   help="end-to-end runs in new folders (no shared phantoms/plans): the timing of make demo")
    p.add_argument("--table", action="store_true", help="print sweep.jsonl as a markdown table and exit")
    args = p.parse_args()
    os.makedirs(args.root, exist_ok=True)
    log = os.path.join(args.root, "sweep.jsonl")
    done = []
    if os.path.exists(log):
        with open(log) as f:
            done = [json.loads(line) for line in f if line.strip()]
    if args.table:
        print(table(done))
        return 0
    for variant in args.variants:
        for seed in args.train_seeds:
            if any(r["variant"] == variant and r["train_seed"] == seed and r.get("methods") == args.methods
                   and r.get("fresh", False) == args.fresh and r["settings"].get("methods", DemoConfig().methods)
                   == list(DemoConfig(**VARIANTS[variant]).methods if args.methods is None else args.methods)
                   for r in done):
                continue
            row = dict(run_one(args.root, variant, seed, args.methods, args.fresh), methods=args.methods)
            print(json.dumps(row), flush=True)
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
