"""The study: the OHEM-EMA paper's comparison on MSSEG-II-like phantoms.

Schmidt-Mengin et al. (MSSEG-II 2021) compare, at equal training time, plain training, "uniform p"
oversampling, OHEM (μ = 0) and OHEM-EMA (μ > 0), and find OHEM-EMA no better than oversampling, suspecting the
Dice loss used to rank candidates. Here every method × training seed × budget is trained with stock
``nnUNetv2_train`` (the ``<method>_Demo`` trainers), held-out phantoms are predicted with stock
``nnUNetv2_predict`` and scored with ``evaluate_folders("msseg2", ...)``.

Design:

* ONE phantom dataset (phantom seed ``phantom_seed``), converted and planned once by the demo pipeline
  (``run_demo(..., until="plan")``); repetitions differ by the TRAINING seed
  (``NNUNETV2_OHEM_DEMO_SEED``: network initialisation, case/patch sampling, augmentation).
* budget ``iterations``: every method runs ``epochs × iterations`` optimiser steps of the same batch size.
* budget ``time``: every method gets the training wall time of the reference method, by scaling its number of
  epochs with its per-epoch cost relative to the reference, measured on the ``iterations`` runs (median over
  epochs and seeds, :func:`equal_time_epochs`; nnU-Net's poly learning-rate schedule then still runs to its
  end). A method
  whose scaled epoch count equals the ``iterations`` budget reuses that run (the reference always does).
* each run has its own ``nnUNet_results`` folder, so seeds of the same trainer never collide; a finished run
  (``result.json`` with the same settings) is reused on a rerun.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_ohem import ohem_diagnostics as diagnostics
from nnunetv2_ohem.atomic import atomic_path, write_text_atomic
from nnunetv2_ohem.demo.methods import METHODS
from nnunetv2_ohem.demo.pipeline import (KNOWN_METHODS, DemoConfig, DemoError, HeldOutPredictor, Paths,
                                         machine_description, resolve_device, run_demo, train_environment,
                                         train_method)

#: display names (the paper's terms; the ranking error in brackets), from the demo's method registry
METHOD_LABELS = {name: m.label for name, m in METHODS.items()}
DEFAULT_METHODS = ("nnUNetTrainer", "nnUNetTrainerEMA", "nnUNetTrainer_probabilisticOversampling",
                   "nnUNetTrainerOHEM", "nnUNetTrainerOHEMEMA", "nnUNetTrainerOHEMEMA_DiceMining",
                   "nnUNetTrainerOHEMEMA_CE")
BUDGETS = ("iterations", "time")
#: results.csv column -> path into the msseg2 aggregate (means over cases with lesions / lesion-free cases)
METRICS = {
    "lesion_f1": ("cases_with_lesions", "lesion_f1"),
    "dice": ("cases_with_lesions", "dice"),
    "lesion_sensitivity": ("cases_with_lesions", "lesion_sensitivity"),
    "lesion_ppv": ("cases_with_lesions", "lesion_ppv"),
    "fp_lesions_lesion_free": ("lesion_free_cases", "fp_lesions"),
    "fp_volume_mm3_lesion_free": ("lesion_free_cases", "fp_volume_mm3"),
}
SUMMARY_METRICS = (("lesion_f1", "lesion F1"), ("dice", "Dice"), ("fp_lesions_lesion_free", "FP lesions (lesion-free)"))
_EPOCH_TIME_RE = re.compile(r"Epoch time: ([0-9.eE+-]+) s")


@dataclass
class StudyConfig:
    out: str = "./study_output"
    docs: str = "docs/study"
    methods: Tuple[str, ...] = DEFAULT_METHODS
    seeds: Tuple[int, ...] = (0, 1, 2)
    budgets: Tuple[str, ...] = BUDGETS
    reference: str = "nnUNetTrainer"
    epochs: int = 100
    # data, plans and schedule defaults are the demo's, so both describe the same phantoms and network
    iterations: int = DemoConfig.iterations
    val_iterations: int = DemoConfig.val_iterations
    n_train: int = DemoConfig.n_train
    n_test: int = 6
    voxel_size: float = DemoConfig.voxel_size
    lesion_volume: Tuple[float, float] = DemoConfig.lesion_volume
    phantom_seed: int = DemoConfig.seed
    dataset_id: int = DemoConfig.dataset_id
    features: Tuple[int, ...] = DemoConfig.features
    patch: int = DemoConfig.patch
    batch: int = DemoConfig.batch
    device: str = DemoConfig.device
    jobs: int = 1
    command: str = ""
    notes: Optional[str] = None
    progress: bool = True

    def __post_init__(self):
        self.methods, self.seeds, self.budgets = tuple(self.methods), tuple(int(s) for s in self.seeds), tuple(self.budgets)
        unknown = [m for m in self.methods if m not in KNOWN_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown or '(none given)'}; choose from {list(KNOWN_METHODS)}")
        if len(set(self.methods)) != len(self.methods) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("methods and seeds must not repeat")
        if not self.seeds:
            raise ValueError("give at least one seed")
        bad = [b for b in self.budgets if b not in BUDGETS]
        if bad or not self.budgets:
            raise ValueError(f"unknown budget(s) {bad or '(none given)'}; choose from {list(BUDGETS)}")
        if "time" in self.budgets and self.reference not in self.methods:
            raise ValueError(f"the equal-time budget needs the reference method {self.reference} in --methods")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")

    def demo_config(self) -> DemoConfig:
        return DemoConfig(out=os.path.join(self.out, "data"), n_train=self.n_train, n_test=self.n_test,
                          voxel_size=self.voxel_size, lesion_volume=self.lesion_volume, seed=self.phantom_seed,
                          dataset_id=self.dataset_id, methods=(self.reference if self.reference in KNOWN_METHODS
                                                               else self.methods[0],),
                          epochs=self.epochs, iterations=self.iterations, val_iterations=self.val_iterations,
                          features=self.features, patch=self.patch, batch=self.batch, device=self.device,
                          until="plan", progress=self.progress)


# ----------------------------------------------------------------------------------------------- pure functions

def mean_ci(values: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    """Mean and Student-t confidence interval: ``x̄ ± t_{(1+level)/2, n-1} · s / √n`` (s: sample standard
    deviation, ddof = 1). NaN values are dropped; with one value the interval is (NaN, NaN)."""
    from scipy import stats
    x = np.asarray([v for v in values if v is not None and not math.isnan(float(v))], dtype=float)
    if x.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {x.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def equal_time_epochs(reference_runs: Sequence[Sequence[float]], method_runs: Sequence[Sequence[float]]) -> int:
    """Epochs that give a method the reference method's training wall time, from their equal-iteration runs.

    Per seed s (paired runs of the same iterations per epoch) the method's relative cost is
    ``r_s = median(method epoch times) / median(reference epoch times)``; the method gets
    ``round(E_ref / median_s r_s)`` epochs (at least 1), ``E_ref`` = the reference runs' epoch count, i.e. the
    reference's wall time ``E_ref · c_ref`` divided by the method's cost per epoch ``c_m = r · c_ref``.
    Medians, within a run and over seeds, keep the estimate stable when other work on the machine slows
    some epochs or one seed's pair of runs unevenly (same epochs for every seed of a method).
    """
    if len(reference_runs) == 0 or len(reference_runs) != len(method_runs):
        raise ValueError("need one reference run per method run (paired by seed), at least one pair")
    ratios, epochs = [], []
    for ref, own in zip(reference_runs, method_runs):
        ref, own = np.asarray(ref, float), np.asarray(own, float)
        if ref.ndim != 1 or own.ndim != 1 or len(ref) == 0 or len(own) == 0:
            raise ValueError("epoch times must be non-empty 1-d sequences")
        if (ref <= 0).any() or (own <= 0).any() or not np.isfinite(ref).all() or not np.isfinite(own).all():
            raise ValueError("epoch times must be positive and finite")
        ratios.append(float(np.median(own)) / float(np.median(ref)))
        epochs.append(len(ref))
    return max(1, int(round(float(np.median(epochs)) / float(np.median(ratios)))))


def parse_epoch_times(log_text: str) -> List[float]:
    """Per-epoch training+validation seconds from nnU-Net's training log ("Epoch time: 2.81 s" lines)."""
    return [float(m.group(1)) for m in _EPOCH_TIME_RE.finditer(log_text)]


def summarize(results: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """One row per budget × method: seeds, epochs, mean training seconds and, per summary metric, the mean with
    its t-interval over seeds (:func:`mean_ci`)."""
    import pandas as pd  # lazily: nnunetv2_ohem_demo --study --help stays fast

    need = {"budget", "method", "seed", "epochs", "train_seconds", *[m for m, _ in SUMMARY_METRICS]}
    missing = need - set(results.columns)
    if missing:
        raise ValueError(f"results table lacks column(s) {sorted(missing)}")
    rows = []
    for (budget, method), g in results.groupby(["budget", "method"], sort=False):
        row = {"budget": budget, "method": method, "label": METHOD_LABELS.get(method, method),
               "n_seeds": int(g["seed"].nunique()), "epochs": float(g["epochs"].mean()),
               "train_seconds": float(g["train_seconds"].mean())}
        for col, _ in SUMMARY_METRICS:
            row[f"{col}_mean"], row[f"{col}_lo"], row[f"{col}_hi"] = mean_ci(g[col].tolist(), level)
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(mean: float, lo: float, hi: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(lo):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def summary_table_md(summary: pd.DataFrame) -> str:
    """Markdown table of :func:`summarize`'s output (mean [95 % CI])."""
    head = ["budget", "method", "seeds", "epochs", "train s"] + [name for _, name in SUMMARY_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in summary.iterrows():
        cells = [r["budget"], r["label"], str(r["n_seeds"]), f"{r['epochs']:.0f}", f"{r['train_seconds']:.0f}"]
        cells += [_fmt(r[f"{c}_mean"], r[f"{c}_lo"], r[f"{c}_hi"]) for c, _ in SUMMARY_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(results: pd.DataFrame, reference: str, metric: str = "lesion_f1",
                       level: float = 0.95) -> pd.DataFrame:
    """Per budget and method, the seed-paired difference ``metric(method, seed) − metric(reference, seed)``
    with its t-interval (seeds share data, so pairing removes the seed's own effect)."""
    import pandas as pd  # lazily: nnunetv2_ohem_demo --study --help stays fast

    rows = []
    for budget, g in results.groupby("budget", sort=False):
        ref = g[g["method"] == reference].set_index("seed")[metric]
        for method, gm in g.groupby("method", sort=False):
            if method == reference:
                continue
            d = (gm.set_index("seed")[metric] - ref).dropna()
            m, lo, hi = mean_ci(d.tolist(), level)
            rows.append({"budget": budget, "method": method, "n": int(len(d)), "mean": m, "lo": lo, "hi": hi})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------- running

def _run_dir(cfg: StudyConfig, budget: str, method: str, seed: int) -> str:
    return os.path.abspath(os.path.join(cfg.out, "runs", budget, method, f"seed{seed}"))


def _get(agg: Dict, path: Tuple[str, str]) -> float:
    v = agg["challenge"][path[0]].get(path[1], {})
    v = v.get("mean") if isinstance(v, dict) else v
    return math.nan if v is None else float(v)


def train_predict_evaluate(cfg: StudyConfig, paths: Paths, device: str, budget: str, method: str, seed: int,
                           epochs: int, predictor: Optional[HeldOutPredictor] = None) -> Dict:
    """One study run: the demo's training command and predictor, MSSEG-II metrics; returns (and stores as
    ``result.json``) its results row. Reused when a finished ``result.json`` with the same settings exists."""
    from nnunetv2_ohem.evaluation.api import evaluate_folders
    run_dir = _run_dir(cfg, budget, method, seed)
    demo_cfg = cfg.demo_config()
    settings = {"method": method, "seed": seed, "epochs": epochs, "iterations": cfg.iterations,
                "val_iterations": cfg.val_iterations, "device": device, "data": asdict(demo_cfg)}
    settings = json.loads(json.dumps(settings))
    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            done = json.load(f)
        if done.get("settings") == settings:
            return done["row"]
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    env = train_environment(demo_cfg, paths, device, epochs=epochs, train_seed=seed)
    env["nnUNet_results"] = os.path.join(run_dir, "nnUNet_results")
    if cfg.jobs > 1 and device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")  # parallel runs share the cores instead of fighting for them
    t0 = time.time()
    train_method(demo_cfg, paths, env, method, device, os.path.join(run_dir, "train.log"), epochs, False)
    train_wall = time.time() - t0
    with open(os.path.join(run_dir, "train.log")) as f:
        epoch_times = parse_epoch_times(f.read())
    pred_dir = os.path.join(run_dir, "predictions")
    model_dir = os.path.join(env["nnUNet_results"], demo_cfg.dataset_name,
                             os.path.basename(os.path.dirname(paths.training_output(demo_cfg, method))))
    (predictor or HeldOutPredictor(device)).predict(model_dir, paths.test_images, pred_dir,
                                                    os.path.join(run_dir, "predict.log"))
    df, agg = evaluate_folders("msseg2", paths.test_labels, pred_dir)
    df.to_csv(os.path.join(run_dir, "cases.csv"), index=False)
    row = {"budget": budget, "method": method, "label": METHOD_LABELS.get(method, method), "seed": seed,
           "epochs": epochs, "iterations_per_epoch": cfg.iterations, "total_iterations": epochs * cfg.iterations,
           "train_seconds": float(sum(epoch_times)), "train_wall_seconds": train_wall,
           "mean_epoch_seconds": float(np.mean(epoch_times)) if epoch_times else math.nan,
           "n_cases_with_lesions": agg["challenge"]["cases_with_lesions"]["n_cases"],
           "n_lesion_free": agg["challenge"]["lesion_free_cases"]["n_cases"], "reused_from": "",
           **{k: _get(agg, p) for k, p in METRICS.items()}}
    write_text_atomic(os.path.join(run_dir, "epoch_times.json"), json.dumps(epoch_times))
    write_text_atomic(result_path, json.dumps({"settings": settings, "row": row}, indent=1))
    return row


def _epoch_times(cfg: StudyConfig, budget: str, method: str, seed: int) -> List[float]:
    with open(os.path.join(_run_dir(cfg, budget, method, seed), "epoch_times.json")) as f:
        return json.load(f)


def run_study(cfg: StudyConfig) -> Dict:
    """Run (or resume) the study and write ``results.csv``, ``summary.md`` and plots into ``cfg.docs``."""
    import pandas as pd  # lazily: nnunetv2_ohem_demo --study --help stays fast

    from tqdm import tqdm
    t0 = time.time()
    demo_cfg = cfg.demo_config()
    run_demo(demo_cfg)  # phantoms -> conversion -> plans (reused when finished)
    paths = Paths(demo_cfg.out, demo_cfg)
    device = resolve_device(cfg.device)
    rows: List[Dict] = []
    n_ran = [0]

    def run_all(jobs: List[Tuple[str, str, int, int]], desc: str) -> None:
        bar = tqdm(total=len(jobs), desc=desc, unit="run", disable=not cfg.progress)

        def one(job):
            before = os.path.exists(os.path.join(_run_dir(cfg, *job[:3]), "result.json"))
            row = train_predict_evaluate(cfg, paths, device, *job)
            after_mtime = os.path.getmtime(os.path.join(_run_dir(cfg, *job[:3]), "result.json"))
            if not before or after_mtime >= t0:
                n_ran[0] += 1
            bar.update(1)
            return row
        with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
            rows.extend(pool.map(one, jobs))
        bar.close()

    # interleave seeds so the costliest methods do not all run at the same time
    iteration_jobs = [("iterations", m, s, cfg.epochs) for s in cfg.seeds for m in cfg.methods]
    run_all(iteration_jobs, "study: equal iterations")
    if "time" in cfg.budgets:
        time_jobs = []
        ref_runs = [_epoch_times(cfg, "iterations", cfg.reference, s) for s in cfg.seeds]
        epochs = {m: equal_time_epochs(ref_runs, [_epoch_times(cfg, "iterations", m, s) for s in cfg.seeds])
                  for m in cfg.methods}
        for s in cfg.seeds:
            for m in cfg.methods:
                e = epochs[m]
                if e == cfg.epochs:
                    base = next(r for r in rows if r["budget"] == "iterations" and r["method"] == m and r["seed"] == s)
                    rows.append(dict(base, budget="time", reused_from="iterations"))
                else:
                    time_jobs.append(("time", m, s, e))
        run_all(time_jobs, "study: equal wall time")
    if "iterations" not in cfg.budgets:
        rows = [r for r in rows if r["budget"] != "iterations"]
    order = {m: i for i, m in enumerate(cfg.methods)}  # tables list the methods in the order given
    results = pd.DataFrame(rows)
    results = results.assign(_o=results["method"].map(order)).sort_values(["budget", "_o", "seed"],
                                                                           kind="stable").drop(columns="_o")
    seconds = time.time() - t0
    # a rerun that only reuses finished runs (e.g. to add --notes) keeps the wall time of the run that computed
    timing_path = os.path.join(cfg.out, "timing.json")
    date = time.strftime("%Y-%m-%d")
    if n_ran[0] > 0 or not os.path.exists(timing_path):
        write_text_atomic(timing_path, json.dumps({"seconds": seconds, "runs_computed": n_ran[0], "date": date}))
    else:
        with open(timing_path) as f:
            timing = json.load(f)
        seconds, date = float(timing["seconds"]), timing.get("date", date)
    write_docs(cfg, results, seconds, device, date)
    return {"results": results, "seconds": seconds, "docs": os.path.abspath(cfg.docs)}


# ----------------------------------------------------------------------------------------------------- output

def plot_results(results: pd.DataFrame, path: str, methods: Sequence[str]) -> None:
    """Per budget (rows) and metric (columns): every seed as a dot, mean ± 95 % CI as a bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    budgets = [b for b in BUDGETS if b in set(results["budget"])]
    fig, axes = plt.subplots(len(budgets), len(SUMMARY_METRICS), figsize=(4.2 * len(SUMMARY_METRICS),
                                                                         0.6 + 2.6 * len(budgets)), squeeze=False)
    for i, budget in enumerate(budgets):
        g = results[results["budget"] == budget]
        for j, (col, name) in enumerate(SUMMARY_METRICS):
            ax = axes[i, j]
            for k, m in enumerate(methods):
                v = g[g["method"] == m][col].to_numpy(float)
                if len(v) == 0:
                    continue
                ax.plot(np.full(len(v), k) + np.linspace(-0.12, 0.12, len(v)), v, "o", ms=4, alpha=0.6, color="C0")
                mean, lo, hi = mean_ci(v.tolist())
                if not math.isnan(lo):
                    ax.errorbar(k, mean, yerr=[[mean - lo], [hi - mean]], fmt="s", color="C3", capsize=4, ms=5)
                else:
                    ax.plot(k, mean, "s", color="C3", ms=5)
            ax.set_xticks(range(len(methods)))
            ax.set_xticklabels([METHOD_LABELS.get(m, m).replace(" (", "\n(") for m in methods], fontsize=6.5,
                               rotation=30, ha="right")
            ax.set_title(f"{name} — equal {budget}", fontsize=9)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def plot_selection(cfg: StudyConfig, path: str) -> bool:
    """Mining diagnostics of the equal-iteration OHEM runs: foreground share of the selected patches per epoch
    (one line per seed, one colour per ranking error) against that of all candidates. False when no OHEM run
    left diagnostics."""
    import glob
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    found, candidates = False, []
    for k, method in enumerate(cfg.methods):
        for seed in cfg.seeds:
            files = glob.glob(os.path.join(_run_dir(cfg, "iterations", method, seed), "nnUNet_results", "*", "*",
                                           "fold_0", diagnostics.DIAGNOSTICS_FILE))
            if not files:
                continue
            d = diagnostics.read_diagnostics(os.path.dirname(files[0]))
            ax.plot(d[diagnostics.FG_FRACTION_SELECTED], color=f"C{k}", alpha=0.75, lw=1.2,
                    label=METHOD_LABELS.get(method, method) if not found or seed == cfg.seeds[0] else None)
            candidates.append(d[diagnostics.FG_FRACTION_CANDIDATES])
            found = True
    if found:
        n = min(len(c) for c in candidates)
        ax.plot(np.mean([c[:n] for c in candidates], axis=0), "k--", lw=1.5, label="all candidates (mean)")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="best")
        ax.set_xlabel("epoch")
        ax.set_ylabel("share of patches with lesion voxels")
        ax.set_title("OHEM-EMA: patches selected for training, per ranking error (one line per seed)", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return found


def write_docs(cfg: StudyConfig, results: pd.DataFrame, seconds: float, device: str,
               date: Optional[str] = None) -> None:
    import pandas as pd  # lazily: nnunetv2_ohem_demo --study --help stays fast

    os.makedirs(cfg.docs, exist_ok=True)
    write_text_atomic(os.path.join(cfg.docs, "results.csv"), results.to_csv(index=False, float_format="%.4g"))
    # the summary is computed from the csv as written, so the table matches it exactly
    written = pd.read_csv(os.path.join(cfg.docs, "results.csv"))
    summary = summarize(written)
    diffs = paired_differences(written, cfg.reference)
    methods = [m for m in cfg.methods if m in set(written["method"])]
    plot_results(written, os.path.join(cfg.docs, "study.png"), methods)
    has_selection = plot_selection(cfg, os.path.join(cfg.docs, "selection.png"))
    lines = [
        "# Study: OHEM-EMA vs plain training and oversampling on MSSEG-II-like phantoms", "",
        f"Date {date or time.strftime('%Y-%m-%d')} · machine: {machine_description(device)} · "
        f"wall time {seconds / 60:.1f} min · device {device}", "",
        "Command:", "", "```", cfg.command or "(API call)", "```", "",
        f"Data: {cfg.n_train} training + {cfg.n_test} held-out phantoms (phantom seed {cfg.phantom_seed}, "
        f"{cfg.voxel_size} mm voxels, new lesions {cfg.lesion_volume[0]:g}-{cfg.lesion_volume[1]:g} mm³), one "
        f"dataset for all runs; seeds {list(cfg.seeds)} are TRAINING seeds (network initialisation, patch "
        f"sampling, augmentation). U-Net {list(cfg.features)}, patch {cfg.patch}³, batch {cfg.batch}; "
        f"{cfg.epochs} epochs × {cfg.iterations} iterations at equal iterations. Equal wall time (if run): each "
        f"method's epochs scaled so that its training takes the {METHOD_LABELS.get(cfg.reference)} run's time "
        f"(its per-epoch cost relative to that method on the equal-iteration runs, median over epochs and "
        f"seeds), the same number of epochs for every seed.", "",
        "Metrics on the held-out phantoms (MSSEG-II challenge definitions): lesion-wise F1 and Dice are means "
        "over cases with new lesions; FP lesions are the mean number of false-positive lesions per lesion-free "
        "case. Table: mean over seeds [95 % Student-t confidence interval]; `train s` = summed nnU-Net epoch "
        "times.", "",
        summary_table_md(summary), "",
        f"Seed-paired difference in lesion F1 against {METHOD_LABELS.get(cfg.reference)} (mean [95 % CI]):", "",
        "| budget | method | seeds | ΔF1 |", "|---|---|---|---|",
        *[f"| {r['budget']} | {METHOD_LABELS.get(r['method'], r['method'])} | {r['n']} | "
          f"{_fmt(r['mean'], r['lo'], r['hi'])} |" for _, r in diffs.iterrows()], "",
        "![study](study.png)", "",
        *(["![patches selected by OHEM-EMA](selection.png)", ""] if has_selection else []),
        "Per-run rows (with sensitivity, PPV, FP volume, epoch counts and times): [results.csv](results.csv).", "",
    ]
    if cfg.notes:
        with open(cfg.notes) as f:
            lines += ["## Findings", "", f.read().strip(), ""]
    write_text_atomic(os.path.join(cfg.docs, "summary.md"), "\n".join(lines))


__all__ = ["StudyConfig", "run_study", "mean_ci", "equal_time_epochs", "parse_epoch_times", "summarize",
           "summary_table_md", "paired_differences", "DEFAULT_METHODS", "METHOD_LABELS"]


# -------------------------------------------------------------------------------------------------------- CLI

def build_parser():
    import argparse

    from nnunetv2_ohem.cli_common import HelpFormatter, add_deprecated_alias

    d = StudyConfig()
    p = argparse.ArgumentParser(prog="nnunetv2_ohem_demo --study", formatter_class=HelpFormatter,
                                description="The OHEM-EMA paper's comparison on MSSEG-II-like phantoms: every "
                                            "method x training seed x budget (equal iterations, equal wall time) "
                                            "trained with stock nnUNetv2_train, predicted and scored; results, "
                                            "summary and plots written to --docs.")
    p.add_argument("--out", default=d.out, help="working folder (nnU-Net data, runs); not for committing")
    p.add_argument("--docs", default=d.docs, help="where results.csv, summary.md and study.png are written")
    p.add_argument("-tr", "--methods", nargs="+", default=list(d.methods), choices=KNOWN_METHODS,
                   metavar="TRAINER", help="methods compared: %(choices)s")
    p.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds), help="training seeds")
    p.add_argument("--budgets", nargs="+", default=list(d.budgets), choices=BUDGETS,
                   help="equal iterations and/or equal wall time")
    p.add_argument("--reference", default=d.reference, choices=KNOWN_METHODS, metavar="TRAINER",
                   help="method whose training time the equal-time budget gives every method")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs of the equal-iterations budget")
    p.add_argument("--iterations", type=int, default=d.iterations, help="training iterations per epoch")
    p.add_argument("--val_iterations", type=int, default=d.val_iterations, help="validation iterations per epoch")
    p.add_argument("--cases", type=int, default=d.n_train, help="training phantoms")
    p.add_argument("--test_cases", type=int, default=d.n_test, help="held-out phantoms (predicted and scored)")
    p.add_argument("--voxel_size", type=float, default=d.voxel_size, help="isotropic phantom voxel size in mm")
    p.add_argument("--lesion_volume", type=float, nargs=2, default=list(d.lesion_volume), metavar=("LO", "HI"),
                   help="new-lesion volumes in mm³")
    p.add_argument("--phantom_seed", type=int, default=d.phantom_seed, help="seed of the one phantom dataset")
    p.add_argument("-d", "--dataset_id", type=int, default=d.dataset_id, help="nnU-Net dataset id of the phantoms")
    p.add_argument("--features", type=int, nargs="+", default=list(d.features), help="U-Net features per stage")
    p.add_argument("--patch", type=int, default=d.patch, help="patch edge (voxels)")
    p.add_argument("--batch", type=int, default=d.batch, help="batch size")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda", "mps"),
                   help="auto = cuda when available")
    p.add_argument("--jobs", type=int, default=d.jobs,
                   help="runs in parallel (on CPU each gets OMP_NUM_THREADS=1 unless set)")
    p.add_argument("--notes", default=None, help="text file inserted as the summary's 'Findings' section")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    for old, new in {"--val-iterations": "--val_iterations", "--test-cases": "--test_cases",
                     "--voxel-size": "--voxel_size", "--lesion-volume": "--lesion_volume",
                     "--phantom-seed": "--phantom_seed", "--dataset-id": "-d", "--no-progress": "--no_progress"}.items():
        add_deprecated_alias(p, old, new)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    import shlex
    import sys

    from nnunetv2_ohem.cli_common import EXIT_BAD_DATA, EXIT_USAGE, show_progress
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        cfg = StudyConfig(out=args.out, docs=args.docs, methods=tuple(args.methods), seeds=tuple(args.seeds),
                          budgets=tuple(args.budgets), reference=args.reference, epochs=args.epochs,
                          iterations=args.iterations, val_iterations=args.val_iterations, n_train=args.cases,
                          n_test=args.test_cases, voxel_size=args.voxel_size,
                          lesion_volume=tuple(args.lesion_volume), phantom_seed=args.phantom_seed,
                          dataset_id=args.dataset_id, features=tuple(args.features), patch=args.patch,
                          batch=args.batch, device=args.device, jobs=args.jobs, notes=args.notes,
                          progress=show_progress(args.no_progress),
                          command="nnunetv2_ohem_demo --study " + " ".join(shlex.quote(a) for a in argv))
    except ValueError as e:  # an option value out of range: a usage error
        print(f"nnunetv2_ohem_demo --study: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = run_study(cfg)
    except (ValueError, DemoError, FileNotFoundError) as e:
        print(f"nnunetv2_ohem_demo --study: error: {e}", file=sys.stderr)
        return EXIT_BAD_DATA
    print(f"Study finished in {result['seconds'] / 60:.1f} min; results in {result['docs']}")
    return 0
