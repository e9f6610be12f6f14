"""The study: the OHEM-EMA paper's comparison on MSSEG-II-like phantoms, run through ``nnunetv2_ohem_compare``.

Schmidt-Mengin et al. (MSSEG-II 2021) compare, at equal training time, plain training, "uniform p"
oversampling, OHEM (μ = 0) and OHEM-EMA (μ > 0), and find OHEM-EMA no better than oversampling, suspecting the
Dice loss used to rank candidates. The study is a thin user of the compare engine
(:mod:`nnunetv2_ohem.compare.engine`), so both report the same numbers from the same code:

1. phantoms → MSSEG-II conversion → tiny plans ``nnUNetDemoPlans`` with the demo pipeline
   (``run_demo(..., until="plan")``): ONE phantom dataset (phantom seed ``phantom_seed``) with the demo's
   one-fold split, and held-out phantoms in ``imagesTs``/``labelsTs``;
2. a :class:`~nnunetv2_ohem.compare.engine.CompareConfig` on that dataset: every method's ``<method>_Demo``
   trainer (no final validation: the held-out phantoms are what is scored), fold 0, the study's training seeds
   (network initialisation, case/patch sampling, augmentation), the study's schedule, budget ``both`` by
   default (equal iterations, and equal wall time from compare's per-epoch cost measurement against the first
   method), ``--test`` on the held-out phantoms without TTA, scored with the msseg2 metrics;
   ``run_compare`` trains, predicts, scores and reuses finished runs (its folder: ``<out>/compare``);
3. the study's own documents from compare's ``results.csv``: ``results.csv`` with the methods' names and
   labels, ``summary.md`` (means with 95 % intervals, the seed standard deviation of lesion F1, seed-paired
   differences against the first method with a plain statement of which are significant), plots.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_ohem import ohem_diagnostics as diagnostics
from nnunetv2_ohem.atomic import atomic_path, write_text_atomic
from nnunetv2_ohem.demo.methods import DEMO_SUFFIX, METHODS, trainer_for
from nnunetv2_ohem.demo.pipeline import (KNOWN_METHODS, TILE_STEP_SIZE, DemoConfig, DemoError, Paths,
                                         machine_description, resolve_device, run_demo)

if TYPE_CHECKING:  # pandas only at run time: nnunetv2_ohem_demo --study --help stays fast
    import pandas as pd

#: display names (the paper's terms; the ranking error in brackets), from the demo's method registry
METHOD_LABELS = {name: m.label for name, m in METHODS.items()}
DEFAULT_METHODS = ("nnUNetTrainer", "nnUNetTrainerEMA", "nnUNetTrainer_probabilisticOversampling",
                   "nnUNetTrainerDiceTopK10Loss", "nnUNetTrainerOHEM", "nnUNetTrainerOHEMEMA",
                   "nnUNetTrainerOHEMEMA_CE")
BUDGET_CHOICES = ("iterations", "time", "both")
BUDGETS = ("iterations", "time")
#: compare's msseg2 columns in the study's tables: lesion F1 and Dice are means over cases with new lesions,
#: FP lesions the mean count per lesion-free case
SUMMARY_METRICS = (("lesion_f1", "lesion F1"), ("dice", "Dice"), ("fp_lesions_lesion_free", "FP lesions (lesion-free)"))
#: the pilot's stability criterion: a study whose baseline varies more than this over training seeds (or whose
#: baseline F1 is not clearly above 0) cannot rank methods whose effects are smaller
BASELINE_SD_LIMIT = 0.1
CONFIGURATION = "3d_fullres"
FOLD = 0  # the demo's one-fold split


@dataclass
class StudyConfig:
    out: str = "./study_output"
    docs: str = "docs/study"
    #: the first method is the reference: paired differences and the equal-time budget are against it
    methods: Tuple[str, ...] = DEFAULT_METHODS
    seeds: Tuple[int, ...] = (0, 1, 2, 3, 4)
    budget: str = "both"
    epochs: int = 100
    # data, plans and schedule defaults are the demo's, so both describe the same phantoms and network
    iterations: int = DemoConfig.iterations
    val_iterations: int = DemoConfig.val_iterations
    n_train: int = DemoConfig.n_train
    n_test: int = 6
    voxel_size: float = DemoConfig.voxel_size
    lesion_volume: Tuple[float, float] = DemoConfig.lesion_volume
    new_lesions: Tuple[int, int] = DemoConfig.new_lesions
    lesion_contrast: Tuple[float, float] = DemoConfig.lesion_contrast
    phantom_seed: int = DemoConfig.seed
    dataset_id: int = DemoConfig.dataset_id
    features: Tuple[int, ...] = DemoConfig.features
    patch: int = DemoConfig.patch
    batch: int = DemoConfig.batch
    device: str = DemoConfig.device
    jobs: int = 1
    rerun: bool = False
    command: str = ""
    notes: Optional[str] = None
    progress: bool = True

    def __post_init__(self):
        self.methods, self.seeds = tuple(self.methods), tuple(int(s) for s in self.seeds)
        unknown = [m for m in self.methods if m not in KNOWN_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown or '(none given)'}; choose from {list(KNOWN_METHODS)}")
        if len(set(self.methods)) != len(self.methods) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("methods and seeds must not repeat")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if self.budget not in BUDGET_CHOICES:
            raise ValueError(f"unknown budget {self.budget!r}; choose from {list(BUDGET_CHOICES)}")
        for name in ("epochs", "iterations", "val_iterations", "jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def reference(self) -> str:
        return self.methods[0]

    @property
    def budgets(self) -> Tuple[str, ...]:
        return BUDGETS if self.budget == "both" else (self.budget,)

    @property
    def compare_out(self) -> str:
        return os.path.join(os.path.abspath(self.out), "compare")

    def demo_config(self) -> DemoConfig:
        return DemoConfig(out=os.path.join(self.out, "data"), n_train=self.n_train, n_test=self.n_test,
                          voxel_size=self.voxel_size, lesion_volume=self.lesion_volume,
                          new_lesions=self.new_lesions, lesion_contrast=self.lesion_contrast, seed=self.phantom_seed,
                          dataset_id=self.dataset_id, methods=(self.reference,), epochs=self.epochs,
                          iterations=self.iterations, val_iterations=self.val_iterations, features=self.features,
                          patch=self.patch, batch=self.batch, device=self.device, until="plan",
                          progress=self.progress)

    def compare_config(self, paths: Paths, device: str):
        """The comparison the study runs, on the dataset ``run_demo(until="plan")`` prepared."""
        from nnunetv2_ohem.compare.engine import CompareConfig
        demo = self.demo_config()
        return CompareConfig(dataset=demo.dataset_name, configuration=CONFIGURATION, out=self.compare_out,
                             plans=demo.plans_identifier, trainers=tuple(trainer_for(m) for m in self.methods),
                             folds=(FOLD,), seeds=self.seeds, budget=self.budget, epochs=self.epochs,
                             iterations=self.iterations, val_iterations=self.val_iterations, metric="msseg2",
                             test=paths.test_images, test_labels=paths.test_labels, disable_tta=True,
                             step_size=TILE_STEP_SIZE, num_processes=1, device=device, jobs=self.jobs,
                             rerun=self.rerun, progress=self.progress, command=self.command)


def compare_command(ccfg) -> str:
    """The ``nnunetv2_ohem_compare`` command line equal to the study's comparison (with
    ``nnUNet_preprocessed`` pointing at the study's data)."""
    args = ["nnunetv2_ohem_compare", "-d", ccfg.dataset, "-c", ccfg.configuration, "-p", ccfg.plans,
            "-tr", *ccfg.trainers, "-f", *map(str, ccfg.folds), "--seeds", *map(str, ccfg.seeds),
            "--budget", ccfg.budget, "--epochs", str(ccfg.epochs), "--iterations", str(ccfg.iterations),
            "--val_iterations", str(ccfg.val_iterations), "--metric", ccfg.metric, "--test", ccfg.test,
            "--test_labels", ccfg.test_labels, "--disable_tta", "--step_size", f"{ccfg.step_size:g}",
            "--device", ccfg.device, "--jobs", str(ccfg.jobs), "-o", ccfg.out]
    return " ".join(shlex.quote(a) for a in args)


def method_of(trainer: str) -> str:
    """The method whose demo trainer ``trainer`` is (``nnUNetTrainer_Demo`` -> ``nnUNetTrainer``)."""
    return trainer[:-len(DEMO_SUFFIX)] if trainer.endswith(DEMO_SUFFIX) else trainer


# ----------------------------------------------------------------------------------------------- pure functions

def study_table(compare_results: pd.DataFrame) -> pd.DataFrame:
    """compare's results with the study's ``method`` (the registry name) and ``label`` after ``trainer``."""
    df = compare_results.copy()
    at = list(df.columns).index("trainer") + 1
    df.insert(at, "method", df["trainer"].map(method_of))
    df.insert(at + 1, "label", df["method"].map(lambda m: METHOD_LABELS.get(m, m)))
    return df


def seed_sd(results: pd.DataFrame, metric: str = "lesion_f1") -> pd.DataFrame:
    """Per budget × method: the standard deviation (ddof = 1) of ``metric`` over training seeds."""
    import pandas as pd  # lazily: nnunetv2_ohem_demo --study --help stays fast
    rows = []
    for (budget, method), g in results.groupby(["budget", "method"], sort=False):
        x = pd.to_numeric(g[metric], errors="coerce").to_numpy(float)
        x = x[np.isfinite(x)]
        rows.append({"budget": budget, "method": method, "n": int(len(x)),
                     "sd": float(np.std(x, ddof=1)) if len(x) >= 2 else math.nan})
    return pd.DataFrame(rows, columns=["budget", "method", "n", "sd"])


def significance(lo: float, hi: float) -> Optional[bool]:
    """Whether a 95 % interval excludes 0 (None when there is no interval)."""
    if math.isnan(lo) or math.isnan(hi):
        return None
    return lo > 0 or hi < 0


def _fmt(mean: float, lo: float, hi: float, digits: int = 3, sign: str = "") -> str:
    """``mean [lo, hi]``; ``sign="+"`` prints signs (differences)."""
    if math.isnan(mean):
        return "n/a"
    f = f"{sign}.{digits}f"
    if math.isnan(lo):
        return f"{mean:{f}} (no CI)"
    return f"{mean:{f}} [{lo:{f}}, {hi:{f}}]"


def _signed(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    return _fmt(mean, lo, hi, digits, sign="+")


def summary_markdown(cfg: StudyConfig, results: pd.DataFrame, seconds: float, device: str, date: str,
                     equal_time_epochs: Dict[str, int], compare_cmd: str, invocations: int = 1) -> str:
    """The study's summary from its results table (pure: no files read)."""
    from nnunetv2_ohem.compare.stats import paired_differences, summarize_runs
    from nnunetv2_ohem.evaluation.run_metrics import LOWER_IS_BETTER
    label = lambda m: METHOD_LABELS.get(m, m)  # noqa: E731
    metrics = [c for c, _ in SUMMARY_METRICS]
    name = dict(SUMMARY_METRICS)
    by_method = results.assign(trainer=results["method"])  # compare's statistics group by "trainer"
    summ = summarize_runs(by_method, metrics)
    sds = seed_sd(results).set_index(["budget", "method"])
    diffs = paired_differences(by_method, cfg.reference, metrics)
    lines = [
        "# Study: OHEM-EMA vs plain training and oversampling on MSSEG-II-like phantoms", "",
        f"Date {date} · machine: {machine_description(device)} · wall time {seconds / 60:.1f} min"
        + (f" over {invocations} invocations (interrupted ones resumed, finished runs reused)" if invocations > 1
           else "") + f" · device {device}", "",
        "Command:", "", "```", cfg.command or "(API call)", "```", "",
        "The runs are made by the compare engine; the same comparison as a compare command (with "
        f"`nnUNet_preprocessed={os.path.join(os.path.abspath(cfg.demo_config().out), 'nnUNet_preprocessed')}`):",
        "", "```", compare_cmd, "```", "",
        f"Data: {cfg.n_train} training + {cfg.n_test} held-out phantoms (phantom seed {cfg.phantom_seed}, "
        f"{cfg.voxel_size:g} mm voxels, {cfg.new_lesions[0]}-{cfg.new_lesions[1]} new lesions per "
        f"lesion-bearing case of {cfg.lesion_volume[0]:g}-{cfg.lesion_volume[1]:g} mm³ at "
        f"{cfg.lesion_contrast[0]:g}-{cfg.lesion_contrast[1]:g}× white-matter intensity), one "
        f"dataset for all runs; seeds {list(cfg.seeds)} are TRAINING seeds (network initialisation, patch "
        f"sampling, augmentation). U-Net {list(cfg.features)}, patch {cfg.patch}³, batch {cfg.batch}; "
        f"{cfg.epochs} epochs × {cfg.iterations} iterations at equal iterations. Each method trains as its "
        f"`<method>{DEMO_SUFFIX}` trainer (no final validation); the held-out phantoms are predicted without "
        f"TTA (step {TILE_STEP_SIZE:g} of the patch).",
        ""]
    if equal_time_epochs:
        lines += ["Equal wall time: each method's epochs scaled so that its training takes the "
                  f"{label(cfg.reference)} run's time (its per-epoch cost relative to that method on the "
                  "equal-iteration runs, median over epochs and seeds), the same for every seed: "
                  + ", ".join(f"{label(method_of(t))} {e}" for t, e in equal_time_epochs.items()) + " epochs.", ""]
    lines += [
        "Metrics on the held-out phantoms (MSSEG-II challenge definitions): lesion-wise F1 and Dice are means "
        "over cases with new lesions; FP lesions are the mean number of false-positive lesions per lesion-free "
        "case. Table: mean over seeds [95 % Student-t confidence interval]; `SD` = standard deviation of lesion "
        "F1 over the training seeds; `train s` = summed nnU-Net epoch times.", "",
        "## Mean [95 % CI] over training seeds", ""]
    head = ["budget", "method", "seeds", "epochs", "train s", "lesion F1", "SD lesion F1"] + \
        [n for c, n in SUMMARY_METRICS if c != "lesion_f1"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in summ.iterrows():
        sd = sds.loc[(r["budget"], r["trainer"]), "sd"]
        cells = [r["budget"], label(r["trainer"]), str(r["n_runs"]), f"{r['epochs']:.0f}", f"{r['train_seconds']:.0f}",
                 _fmt(r["lesion_f1_mean"], r["lesion_f1_lo"], r["lesion_f1_hi"]),
                 "n/a" if math.isnan(sd) else f"{sd:.3f}"]
        cells += [_fmt(r[f"{c}_mean"], r[f"{c}_lo"], r[f"{c}_hi"]) for c, _ in SUMMARY_METRICS if c != "lesion_f1"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"## Seed-paired difference against {label(cfg.reference)}: mean [95 % CI]", "",
              "Method minus reference, paired by training seed (same data, same seed). Significant at 95 % "
              "means the interval excludes 0.", "",
              "| budget | method | metric | seeds | difference | significant at 95 % |", "|---|---|---|---|---|---|"]
    significant: Dict[str, List[str]] = {m: [] for m in metrics}
    not_significant: Dict[str, List[str]] = {m: [] for m in metrics}
    for _, d in diffs.iterrows():
        sig = significance(d["lo"], d["hi"])
        if sig is None:
            verdict = f"no interval (n = {d['n']})"
        elif sig:
            better = d["mean"] < 0 if d["metric"] in LOWER_IS_BETTER else d["mean"] > 0
            verdict = "yes, " + ("better" if better else "worse")
        else:
            verdict = "no"
        diff = _signed(d["mean"], d["lo"], d["hi"])
        lines.append(f"| {d['budget']} | {label(d['trainer'])} | {name[d['metric']]} | {d['n']} | {diff} | "
                     f"{verdict} |")
        entry = f"{label(d['trainer'])} (equal {d['budget']}, {diff})"
        (significant if sig else not_significant)[d["metric"]].append(entry if sig is not None else
                                                                       entry + " — no interval")
    lines += ["", "## Reading", ""]
    ref_rows = sds.loc[sds.index.get_level_values("method") == cfg.reference]
    for (budget, _), r in ref_rows.iterrows():
        s = summ[(summ["budget"] == budget) & (summ["trainer"] == cfg.reference)].iloc[0]
        if math.isnan(r["sd"]):
            verdict = "cannot be judged (fewer than two seeds)"
        elif r["sd"] > BASELINE_SD_LIMIT:
            verdict = f"NOT stable by the pilot criterion (SD ≤ {BASELINE_SD_LIMIT:g}): rankings below are noise"
        elif not s["lesion_f1_lo"] > 0:
            verdict = ("NOT usable by the pilot criterion: lesion F1 is not clearly above 0 (its interval reaches "
                       "0), so there is nothing for the methods to improve on")
        else:
            verdict = f"stable by the pilot criterion (SD ≤ {BASELINE_SD_LIMIT:g}, F1 clearly above 0)"
        sd = "n/a" if math.isnan(r["sd"]) else f"{r['sd']:.3f}"
        lines.append(f"- Baseline {label(cfg.reference)}, equal {budget}: lesion F1 "
                     f"{_fmt(s['lesion_f1_mean'], s['lesion_f1_lo'], s['lesion_f1_hi'])}, seed SD {sd} — {verdict}.")
    if len(cfg.methods) > 1:
        for m in metrics:
            lines.append(f"- {name[m]}, significant at 95 % (CI excludes 0): "
                         + ("; ".join(significant[m]) or "none") + ".")
            lines.append(f"- {name[m]}, not significant at 95 %: " + ("; ".join(not_significant[m]) or "none") + ".")
    lines += ["", "![study](study.png)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- running

def _cpu_friendly_environment(device: str) -> None:
    """nnU-Net settings for small data on a small CPU, as the demo's own subprocesses get them (a user's own
    values win): no torch.compile, in-process augmentation, passive OpenMP waiting."""
    if device == "cpu":
        for key, value in (("nnUNet_compile", "f"), ("nnUNet_n_proc_DA", "0"), ("OMP_WAIT_POLICY", "PASSIVE")):
            os.environ.setdefault(key, value)


def _invocations(timing_path: str) -> List[Dict]:
    if not os.path.exists(timing_path):
        return []
    with open(timing_path) as f:
        timing = json.load(f)
    return timing.get("invocations", [timing])  # a single record: the format before invocations were kept


def record_invocation(timing_path: str, seconds: float, runs_computed: Optional[int], finished: bool) -> None:
    """Append one invocation of the study (its wall time, runs computed, whether it ran to the end) to
    ``timing.json``."""
    invocations = _invocations(timing_path) + [{"seconds": seconds, "runs_computed": runs_computed,
                                                "finished": finished, "date": time.strftime("%Y-%m-%d")}]
    os.makedirs(os.path.dirname(timing_path), exist_ok=True)
    write_text_atomic(timing_path, json.dumps({"invocations": invocations}, indent=1))


def study_time(timing_path: str) -> Tuple[float, str, int]:
    """(summed wall seconds, date of the last invocation, number of invocations) from ``timing.json``."""
    invocations = _invocations(timing_path)
    return sum(float(i["seconds"]) for i in invocations), invocations[-1]["date"], len(invocations)


def run_study(cfg: StudyConfig) -> Dict:
    """Run (or resume) the study and write ``results.csv``, ``summary.md`` and plots into ``cfg.docs``."""
    import pandas as pd  # lazily: nnunetv2_ohem_demo --study --help stays fast

    from nnunetv2_ohem.compare.engine import run_compare
    t0 = time.time()
    timing_path = os.path.join(cfg.out, "timing.json")
    finished, computed = False, None
    try:
        demo_cfg = cfg.demo_config()
        run_demo(demo_cfg)  # phantoms -> conversion -> plans (reused when finished); sets the nnUNet_* folders
        paths = Paths(demo_cfg.out, demo_cfg)
        device = resolve_device(cfg.device)
        _cpu_friendly_environment(device)
        ccfg = cfg.compare_config(paths, device)
        result = run_compare(ccfg)
        computed = result["counts"]["trained"] + result["counts"]["evaluated"]
        finished = True
    finally:
        # every invocation that computed runs or was stopped counts, so a study resumed after an interruption
        # reports the time all its runs took; a rerun that only reuses finished runs (e.g. to add --notes)
        # keeps the recorded time and date
        # (nothing is written when the study stopped before making its folder: bad input leaves nothing behind)
        if (computed or not os.path.exists(timing_path)) if finished else os.path.isdir(cfg.out):
            record_invocation(timing_path, time.time() - t0, computed, finished)
    seconds, date, invocations = study_time(timing_path)
    results = study_table(pd.DataFrame(result["results"]))
    write_docs(cfg, results, seconds, device, date, result.get("epochs_equal_time") or {}, compare_command(ccfg),
               invocations=invocations)
    return {"results": results, "seconds": seconds, "docs": os.path.abspath(cfg.docs), "counts": result["counts"]}


# ----------------------------------------------------------------------------------------------------- output

def plot_results(results: pd.DataFrame, path: str, methods: Sequence[str]) -> None:
    """Per budget (rows) and metric (columns): every seed as a dot, mean ± 95 % CI as a bar."""
    import matplotlib
    import pandas as pd
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunetv2_ohem.compare.stats import mean_ci
    budgets = [b for b in BUDGETS if b in set(results["budget"])]
    fig, axes = plt.subplots(len(budgets), len(SUMMARY_METRICS), figsize=(4.2 * len(SUMMARY_METRICS),
                                                                         0.6 + 2.6 * len(budgets)), squeeze=False)
    for i, budget in enumerate(budgets):
        g = results[results["budget"] == budget]
        for j, (col, name) in enumerate(SUMMARY_METRICS):
            ax = axes[i, j]
            for k, m in enumerate(methods):
                v = pd.to_numeric(g[g["method"] == m][col], errors="coerce").to_numpy(float)
                v = v[np.isfinite(v)]
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


def mean_over_runs(curves: Sequence[np.ndarray]) -> np.ndarray:
    """Per-epoch mean of runs' curves over the epochs all runs have, ignoring NaN (an epoch without mining);
    NaN where no run has a value."""
    import warnings
    n = min(len(c) for c in curves)
    with warnings.catch_warnings():  # an epoch no run mined in is NaN, which is what the plot should show
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean([np.asarray(c[:n], dtype=float) for c in curves], axis=0)


def plot_selection(cfg: StudyConfig, path: str) -> bool:
    """Mining diagnostics of the equal-iteration OHEM runs: foreground share of the selected patches per epoch
    (one line per seed, one colour per ranking error) against that of all candidates. False when no OHEM run
    left diagnostics."""
    import glob
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunetv2_ohem.compare.engine import seed_dir
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    found, candidates = False, []
    for k, method in enumerate(cfg.methods):
        for seed in cfg.seeds:
            files = glob.glob(os.path.join(seed_dir(cfg.compare_out, "iterations", trainer_for(method), seed),
                                           "nnUNet_results", "*", "*", f"fold_{FOLD}", diagnostics.DIAGNOSTICS_FILE))
            if not files:
                continue
            d = diagnostics.read_diagnostics(os.path.dirname(files[0]))
            # epochs before the mining schedule starts have no value (None): gaps in the lines
            ax.plot(diagnostics.as_array(d, diagnostics.FG_FRACTION_SELECTED), color=f"C{k}", alpha=0.75, lw=1.2,
                    label=METHOD_LABELS.get(method, method) if not found or seed == cfg.seeds[0] else None)
            candidates.append(diagnostics.as_array(d, diagnostics.FG_FRACTION_CANDIDATES))
            found = True
    if found:
        ax.plot(mean_over_runs(candidates), "k--", lw=1.5, label="all candidates (mean)")
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


def write_docs(cfg: StudyConfig, results: pd.DataFrame, seconds: float, device: str, date: str,
               equal_time_epochs: Dict[str, int], compare_cmd: str, invocations: int = 1) -> None:
    import pandas as pd  # lazily: nnunetv2_ohem_demo --study --help stays fast

    os.makedirs(cfg.docs, exist_ok=True)
    write_text_atomic(os.path.join(cfg.docs, "results.csv"), results.to_csv(index=False, float_format="%.6g"))
    # the summary is computed from the csv as written, so the table matches it exactly
    written = pd.read_csv(os.path.join(cfg.docs, "results.csv"))
    methods = [m for m in cfg.methods if m in set(written["method"])]
    plot_results(written, os.path.join(cfg.docs, "study.png"), methods)
    has_selection = plot_selection(cfg, os.path.join(cfg.docs, "selection.png"))
    lines = [summary_markdown(cfg, written, seconds, device, date, equal_time_epochs, compare_cmd, invocations)]
    if has_selection:
        lines += ["![patches selected by OHEM-EMA](selection.png)", ""]
    lines += ["Per-run rows (every msseg2 metric, epochs, times, the compare run folders): "
              "[results.csv](results.csv).", ""]
    if cfg.notes:
        with open(cfg.notes) as f:
            lines += ["## Findings", "", f.read().strip(), ""]
    write_text_atomic(os.path.join(cfg.docs, "summary.md"), "\n".join(lines))


__all__ = ["StudyConfig", "run_study", "study_table", "seed_sd", "summary_markdown", "compare_command",
           "DEFAULT_METHODS", "METHOD_LABELS"]


# -------------------------------------------------------------------------------------------------------- CLI

def build_parser():
    import argparse

    from nnunetv2_ohem.cli_common import HelpFormatter, add_deprecated_alias
    from nnunetv2_ohem.demo.cli import add_data_options

    d = StudyConfig()
    p = argparse.ArgumentParser(prog="nnunetv2_ohem_demo --study", formatter_class=HelpFormatter,
                                description="The OHEM-EMA paper's comparison on MSSEG-II-like phantoms: phantoms, "
                                            "conversion and plans by the demo pipeline, then nnunetv2_ohem_compare "
                                            "trains every method x training seed x budget (equal iterations, "
                                            "equal wall time) with stock nnUNetv2_train and scores the held-out "
                                            "phantoms; results, summary and plots are written to --docs.")
    p.add_argument("--out", default=d.out, help="working folder (nnU-Net data, compare runs); not for committing")
    p.add_argument("--docs", default=d.docs, help="where results.csv, summary.md and study.png are written")
    p.add_argument("-tr", "--methods", nargs="+", default=list(d.methods), choices=KNOWN_METHODS,
                   metavar="TRAINER", help="methods compared, the first is the reference (paired differences, "
                                           "equal-time budget): %(choices)s")
    p.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds), help="training seeds")
    p.add_argument("--budget", default=d.budget, choices=BUDGET_CHOICES,
                   help="equal iterations, equal wall time (epochs scaled by the per-epoch cost measured against "
                        "the first method), or both")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs of the equal-iterations budget")
    p.add_argument("--iterations", type=int, default=d.iterations, help="training iterations per epoch")
    p.add_argument("--val_iterations", type=int, default=d.val_iterations, help="validation iterations per epoch")
    p.add_argument("--phantom_seed", type=int, default=d.phantom_seed, help="seed of the one phantom dataset")
    add_data_options(p, d)
    p.add_argument("--jobs", type=int, default=d.jobs,
                   help="runs in parallel (on CPU each gets OMP_NUM_THREADS=1 unless set)")
    p.add_argument("--rerun", action="store_true",
                   help="train again the runs that exist with other settings (default: refuse)")
    p.add_argument("--notes", default=None, help="text file inserted as the summary's 'Findings' section")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    for old, new in {"--val-iterations": "--val_iterations", "--test-cases": "--test_cases",
                     "--voxel-size": "--voxel_size", "--lesion-volume": "--lesion_volume",
                     "--phantom-seed": "--phantom_seed", "--dataset-id": "-d", "--no-progress": "--no_progress"}.items():
        add_deprecated_alias(p, old, new)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    import sys

    from nnunetv2_ohem.cli_common import EXIT_BAD_DATA, EXIT_USAGE, UserError, show_progress
    from nnunetv2_ohem.demo.cli import data_settings
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        cfg = StudyConfig(out=args.out, docs=args.docs, methods=tuple(args.methods), seeds=tuple(args.seeds),
                          budget=args.budget, epochs=args.epochs, iterations=args.iterations,
                          val_iterations=args.val_iterations, phantom_seed=args.phantom_seed, jobs=args.jobs,
                          rerun=args.rerun, notes=args.notes, progress=show_progress(args.no_progress),
                          command="nnunetv2_ohem_demo --study " + " ".join(shlex.quote(a) for a in argv),
                          **data_settings(args))
    except ValueError as e:  # an option value out of range: a usage error
        print(f"nnunetv2_ohem_demo --study: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = run_study(cfg)
    except UserError as e:  # compare's one-line errors (a run failed, settings changed without --rerun)
        print(f"nnunetv2_ohem_demo --study: error: {e}", file=sys.stderr)
        return e.exit_code
    except (ValueError, DemoError, FileNotFoundError) as e:
        print(f"nnunetv2_ohem_demo --study: error: {e}", file=sys.stderr)
        return EXIT_BAD_DATA
    c = result["counts"]
    print(f"Study finished in {result['seconds'] / 60:.1f} min ({c['trained']} run(s) trained, {c['evaluated']} "
          f"re-evaluated, {c['reused']} reused); results in {result['docs']}")
    return 0
