"""The study: confidence intervals, the equal-wall-time budget, summary vs results.csv.
No training here: the runs are replaced by a fake that writes what a finished run writes."""
import json
import math
import time
import os
import random
import re
import statistics

import numpy as np
import pandas as pd
import pytest

from nnunetv2_ohem.demo import study
from nnunetv2_ohem.demo.study import (StudyConfig, equal_time_epochs, mean_ci, paired_differences,
                                      parse_epoch_times, summarize, summary_table_md)

# t_{0.975, 2} and t_{0.975, 3} from a printed Student-t table
T975_DF2, T975_DF3 = 4.3027, 3.1824


def test_mean_ci_hand_computed():
    # mean 0.4, s = 0.2, s/sqrt(3) = 0.11547, half width = 4.3027 * 0.11547 = 0.49684
    m, lo, hi = mean_ci([0.2, 0.4, 0.6])
    assert m == pytest.approx(0.4)
    assert lo == pytest.approx(0.4 - 0.49684, abs=2e-4) and hi == pytest.approx(0.4 + 0.49684, abs=2e-4)
    # NaN (e.g. no lesion-free case) is dropped, not propagated
    m, lo, hi = mean_ci([1.0, float("nan"), 3.0, 2.0, 6.0])
    half = T975_DF3 * statistics.stdev([1, 3, 2, 6]) / 2
    assert (m, lo, hi) == pytest.approx((3.0, 3.0 - half, 3.0 + half), abs=1e-3)


def test_mean_ci_matches_loop_reference_on_random_inputs():
    from scipy import stats
    rng = random.Random(3)
    for _ in range(20):
        n = rng.randint(2, 9)
        x = [rng.uniform(-2, 5) for _ in range(n)]
        mean = sum(x) / n
        var = sum((v - mean) ** 2 for v in x) / (n - 1)
        half = stats.t.ppf(0.975, n - 1) * math.sqrt(var / n)
        assert mean_ci(x) == pytest.approx((mean, mean - half, mean + half), rel=1e-9, abs=1e-12)


def test_mean_ci_degenerate_inputs():
    assert mean_ci([0.7])[0] == 0.7 and all(math.isnan(v) for v in mean_ci([0.7])[1:])
    assert all(math.isnan(v) for v in mean_ci([]))
    with pytest.raises(ValueError, match="level"):
        mean_ci([1, 2], level=1.5)


def test_equal_time_epochs():
    # reference: 4 epochs of 3 s = 12 s; a method at 6 s per epoch gets 2 epochs
    assert equal_time_epochs([[3, 3, 3, 3]], [[6, 6, 6, 6]]) == 2
    # 10 s / 3 s = 3.33 -> 3; 10 s / 1.9 s = 5.26 -> 5; the reference against itself keeps its epochs
    assert equal_time_epochs([[5, 5]], [[3, 3]]) == 3
    assert equal_time_epochs([[4, 6]], [[1.9]]) == 5
    assert equal_time_epochs([[2.1, 1.9, 2.0]], [[2.1, 1.9, 2.0]]) == 3
    assert equal_time_epochs([[1.0]], [[50.0]]) == 1  # never zero epochs
    for bad in ([], [0.0], [-1.0], [float("inf")]):
        with pytest.raises(ValueError):
            equal_time_epochs([[1.0]], [bad])
    with pytest.raises(ValueError, match="paired by seed"):
        equal_time_epochs([[1.0], [1.0]], [[2.0]])


def test_equal_time_epochs_resists_load_on_some_epochs_and_one_seed():
    # one slow epoch (other work on the machine) does not shift the median cost: 2x -> 50 of 100 epochs
    ref = [2.0] * 99 + [20.0]
    assert equal_time_epochs([ref], [[4.0] * 100]) == 50
    # one seed's method run slowed 3x by load: the median over seeds keeps 2x, for every seed alike
    refs = [[2.0] * 100] * 3
    runs = [[4.0] * 100, [4.1] * 100, [12.0] * 100]
    assert equal_time_epochs(refs, runs) == 49  # median ratio 2.05
    assert equal_time_epochs(refs[:1], runs[2:]) == 17  # that seed alone would have given 100 / 6


def test_parse_epoch_times():
    log = ("2026-11-27 23:20:31.9: Epoch 0\n2026-11-27 23:20:31.9: Epoch time: 2.28 s\n"
           "2026-11-27 23:20:33.8: Pseudo dice [0.0]\n2026-11-27 23:20:33.9: Epoch time: 1.37 s\n")
    assert parse_epoch_times(log) == [2.28, 1.37]


def _fixed_results() -> pd.DataFrame:
    rows = []
    f1 = {"nnUNetTrainer": [0.5, 0.6, 0.7], "nnUNetTrainerOHEMEMA": [0.1, 0.0, 0.2]}
    fp = {"nnUNetTrainer": [0, 1, 2], "nnUNetTrainerOHEMEMA": [4, 4, 4]}
    for m in f1:
        for s in range(3):
            rows.append({"budget": "iterations", "method": m, "seed": s, "epochs": 40, "train_seconds": 100 + s,
                         "lesion_f1": f1[m][s], "dice": f1[m][s] / 2, "fp_lesions_lesion_free": fp[m][s]})
    return pd.DataFrame(rows)


def test_summarize_fixed_table():
    s = summarize(_fixed_results()).set_index("method")
    plain, ohem = s.loc["nnUNetTrainer"], s.loc["nnUNetTrainerOHEMEMA"]
    # plain F1: mean 0.6, s = 0.1, half = 4.3027 * 0.1 / sqrt(3) = 0.24842
    assert plain["lesion_f1_mean"] == pytest.approx(0.6)
    assert plain["lesion_f1_hi"] - plain["lesion_f1_mean"] == pytest.approx(0.24842, abs=1e-4)
    # OHEM-EMA FP lesions identical over seeds: zero-width interval
    assert (ohem["fp_lesions_lesion_free_lo"], ohem["fp_lesions_lesion_free_hi"]) == pytest.approx((4, 4))
    assert plain["n_seeds"] == 3 and plain["train_seconds"] == pytest.approx(101)
    # seed-paired F1 difference OHEM-EMA - plain: [-0.4, -0.6, -0.5] -> mean -0.5, s 0.1
    d = paired_differences(_fixed_results(), "nnUNetTrainer").iloc[0]
    assert d["mean"] == pytest.approx(-0.5) and d["hi"] - d["mean"] == pytest.approx(0.24842, abs=1e-4)
    table = summary_table_md(s.reset_index())
    assert "0.60 [0.35, 0.85]" in table and "4.00 [4.00, 4.00]" in table
    with pytest.raises(ValueError, match="lesion_f1"):
        summarize(_fixed_results().drop(columns=["lesion_f1"]))


def _fake_study(tmp_path, monkeypatch, methods, budgets=("iterations", "time")):
    """run_study with the data preparation and every run replaced by fakes: each method has a fixed cost per
    epoch (plain 2 s, OHEM-EMA 3 s) and metrics that depend on method, seed and epochs."""
    cost = {"nnUNetTrainer": 2.0, "nnUNetTrainer_probabilisticOversampling": 2.0, "nnUNetTrainerOHEMEMA": 3.0,
            "nnUNetTrainerOHEMEMA_DiceMining": 3.0}
    calls = []

    def fake_run(cfg, paths, device, budget, method, seed, epochs):
        d = study._run_dir(cfg, budget, method, seed)
        if os.path.exists(os.path.join(d, "result.json")):  # like the real run: a finished run is reused
            with open(os.path.join(d, "result.json")) as f:
                return json.load(f)
        calls.append((budget, method, seed, epochs))
        os.makedirs(d, exist_ok=True)
        times = [cost[method]] * epochs
        with open(os.path.join(d, "epoch_times.json"), "w") as f:
            json.dump(times, f)
        r = np.random.RandomState(hash((method, seed, epochs)) % 2 ** 31)
        row = {"budget": budget, "method": method, "label": study.METHOD_LABELS[method], "seed": seed,
               "epochs": epochs, "train_seconds": sum(times), "lesion_f1": round(r.uniform(), 4),
               "dice": round(r.uniform(), 4), "fp_lesions_lesion_free": int(r.randint(0, 5)), "reused_from": ""}
        with open(os.path.join(d, "result.json"), "w") as f:
            json.dump(row, f)
        return row

    monkeypatch.setattr(study, "run_demo", lambda cfg: None)
    monkeypatch.setattr(study, "Paths", lambda out, cfg: None)
    monkeypatch.setattr(study, "resolve_device", lambda d: "cpu")
    monkeypatch.setattr(study, "train_predict_evaluate", fake_run)
    cfg = StudyConfig(out=str(tmp_path / "out"), docs=str(tmp_path / "docs"), methods=methods, seeds=(0, 1, 2),
                      budgets=budgets, epochs=30, progress=False, command="nnunetv2_ohem_demo --study (test)")
    return cfg, study.run_study(cfg), calls


def test_equal_time_budget_in_run_study(tmp_path, monkeypatch):
    methods = ("nnUNetTrainer", "nnUNetTrainer_probabilisticOversampling", "nnUNetTrainerOHEMEMA")
    cfg, out, calls = _fake_study(tmp_path, monkeypatch, methods)
    # equal iterations: every method x seed at 30 epochs; equal time: only OHEM-EMA reruns, with
    # round(30 * 2 s / 3 s) = 20 epochs; methods as costly as the reference reuse their runs
    assert sorted(c for c in calls if c[0] == "iterations") == sorted(
        ("iterations", m, s, 30) for m in methods for s in (0, 1, 2))
    assert sorted(c for c in calls if c[0] == "time") == [("time", "nnUNetTrainerOHEMEMA", s, 20) for s in (0, 1, 2)]
    res = out["results"]
    t = res[res["budget"] == "time"].set_index(["method", "seed"])
    assert (t.loc["nnUNetTrainer", "reused_from"] == "iterations").all()
    assert (t.loc["nnUNetTrainerOHEMEMA", "train_seconds"] == 60).all()  # same 60 s as the reference
    assert (t.loc["nnUNetTrainer", "train_seconds"] == 60).all()


def test_summary_md_matches_results_csv(tmp_path, monkeypatch):
    methods = ("nnUNetTrainer", "nnUNetTrainerOHEMEMA", "nnUNetTrainerOHEMEMA_DiceMining")
    cfg, out, _ = _fake_study(tmp_path, monkeypatch, methods)
    csv = pd.read_csv(os.path.join(cfg.docs, "results.csv"))
    assert len(csv) == 2 * 3 * 3  # budgets x methods x seeds
    md = open(os.path.join(cfg.docs, "summary.md")).read()
    assert "nnunetv2_ohem_demo --study (test)" in md
    assert f"Date {time.strftime('%Y-%m-%d')} · machine: {os.cpu_count()}-core" in md
    assert os.path.getsize(os.path.join(cfg.docs, "study.png")) > 1000
    table = [ln for ln in md.splitlines() if ln.startswith("| iterations") or ln.startswith("| time")]
    label_to_method = {v: k for k, v in study.METHOD_LABELS.items()}
    checked = 0
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[1] not in label_to_method or len(cells) < 8:
            continue  # the paired-difference table
        budget, method = cells[0], label_to_method[cells[1]]
        g = csv[(csv["budget"] == budget) & (csv["method"] == method)]
        for cell, col in zip(cells[5:8], ("lesion_f1", "dice", "fp_lesions_lesion_free")):
            vals = list(g[col])
            mean = sum(vals) / len(vals)
            half = T975_DF2 * statistics.stdev(vals) / math.sqrt(len(vals))
            shown = [float(v) for v in re.findall(r"-?\d+\.\d+", cell)]
            assert shown == pytest.approx([mean, mean - half, mean + half], abs=0.006), (line, col)
            checked += 1
    assert checked == 2 * 3 * 3


def test_timing_file_counts_computed_runs_and_keeps_the_run_date(tmp_path, monkeypatch):
    cfg, out, _ = _fake_study(tmp_path, monkeypatch, ("nnUNetTrainer",), budgets=("iterations",))
    timing_path = os.path.join(cfg.out, "timing.json")
    with open(timing_path) as f:
        assert json.load(f)["runs_computed"] == 3
    # a later rerun that only reuses the finished runs (e.g. to add notes) keeps the date the runs were made
    with open(timing_path) as f:
        timing = json.load(f)
    with open(timing_path, "w") as f:
        json.dump(dict(timing, date="2001-02-03", seconds=3600.0), f)
    study.run_study(cfg)
    md = open(os.path.join(cfg.docs, "summary.md")).read()
    assert "Date 2001-02-03 ·" in md and "wall time 60.0 min" in md


def test_config_and_cli_validation(capsys):
    with pytest.raises(ValueError, match="reference"):
        StudyConfig(methods=("nnUNetTrainerOHEMEMA",), budgets=("time",))
    with pytest.raises(ValueError, match="budget"):
        StudyConfig(budgets=("epochs",))
    with pytest.raises(ValueError, match="unknown method"):
        StudyConfig(methods=("nnUNetTrainerFoo",))
    from nnunetv2_ohem.demo import cli
    with pytest.raises(SystemExit):
        cli.main(["--study", "--methods", "nnUNetTrainerFoo"])
    assert "nnunetv2_ohem_demo --study" in capsys.readouterr().err
    assert cli.main(["--study", "--jobs", "0"]) == 2  # usage (docs/cli.md)
    assert "jobs must be >= 1" in capsys.readouterr().err


def test_training_seed_is_reproducible():
    import torch
    from nnunetv2_ohem.training.demo import seed_everything
    seed_everything(5)
    a = (np.random.randint(0, 10 ** 6), torch.rand(3), random.random())
    seed_everything(5)
    b = (np.random.randint(0, 10 ** 6), torch.rand(3), random.random())
    seed_everything(6)
    c = np.random.randint(0, 10 ** 6)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2] and c != a[0]


def test_selection_plot_reads_ohem_diagnostics(tmp_path):
    cfg = StudyConfig(out=str(tmp_path), methods=("nnUNetTrainer", "nnUNetTrainerOHEMEMA_DiceMining"),
                      budgets=("iterations",), seeds=(0, 1))
    assert not study.plot_selection(cfg, str(tmp_path / "none.png")) and not (tmp_path / "none.png").exists()
    d = os.path.join(study._run_dir(cfg, "iterations", "nnUNetTrainerOHEMEMA_DiceMining", 1), "nnUNet_results",
                     "Dataset942_X", "T__P__3d_fullres", "fold_0")
    os.makedirs(d)
    with open(os.path.join(d, "ohem_diagnostics.json"), "w") as f:
        json.dump({"ohem_fg_fraction_selected": [0.0, 0.5, 1.0], "ohem_fg_fraction_candidates": [0.3, 0.3, 0.3]}, f)
    assert study.plot_selection(cfg, str(tmp_path / "sel.png"))
    assert os.path.getsize(tmp_path / "sel.png") > 1000
