"""The study as a user of compare: the comparison it hands to compare, its summary against a hand computation
(intervals, seed SD, paired differences and which are significant), and (slow) the whole study on the tiniest
setting: finite metrics, the summary's paired differences from the CSV, a rerun that trains nothing."""
import json
import math
import os
import random
import re
import time

import numpy as np
import pandas as pd
import pytest

from nnunetv2_ohem.demo import study
from nnunetv2_ohem.demo.study import StudyConfig

T975_DF1, T975_DF2 = 12.7062, 4.3027  # t_{0.975, 1} and t_{0.975, 2} from a printed Student-t table
PLAIN, OHEM = "plain nnU-Net", study.METHOD_LABELS["nnUNetTrainerOHEMEMA"]


def _compare_rows(f1, fp, budget="iterations", epochs=40):
    rows = []
    for m in f1:
        for s, v in enumerate(f1[m]):
            rows.append({"budget": budget, "trainer": m + "_Demo", "fold": 0, "seed": s, "epochs": epochs,
                         "train_seconds": 100.0 + s, "lesion_f1": v, "dice": v / 2,
                         "fp_lesions_lesion_free": fp[m][s], "reused_from": "", "run_dir": f"runs/{m}/{s}"})
    return pd.DataFrame(rows)


def _fixed_results() -> pd.DataFrame:
    f1 = {"nnUNetTrainer": [0.5, 0.6, 0.7], "nnUNetTrainerOHEMEMA": [0.1, 0.0, 0.2]}
    fp = {"nnUNetTrainer": [0, 1, 2], "nnUNetTrainerOHEMEMA": [1, 2, 3.5]}
    return study.study_table(_compare_rows(f1, fp))


def _cells(md: str, first: str, second: str, third: str = None):
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first and cells[1] == second and (third is None or cells[2] == third):
            return cells
    raise AssertionError(f"no row {first} | {second} | {third} in\n{md}")


def _numbers(cell: str):
    return [float(v) for v in re.findall(r"[-+]?\d+\.\d+", cell)]


def test_summary_states_intervals_seed_sd_and_significance_by_hand():
    cfg = StudyConfig(methods=("nnUNetTrainer", "nnUNetTrainerOHEMEMA"), seeds=(0, 1, 2), command="study (test)")
    res = _fixed_results()
    assert list(res.columns[:4]) == ["budget", "trainer", "method", "label"]
    md = study.summary_markdown(cfg, res, 120.0, "cpu", "2026-12-01", {}, "nnunetv2_ohem_compare -d X")
    # plain F1 0.5 0.6 0.7: mean 0.6, SD 0.1, half = 4.3027 * 0.1 / sqrt(3) = 0.24842
    row = _cells(md, "iterations", PLAIN)
    assert _numbers(row[5]) == pytest.approx([0.6, 0.6 - 0.24842, 0.6 + 0.24842], abs=6e-4)
    assert row[6] == "0.100"
    assert _cells(md, "iterations", OHEM)[6] == "0.100"
    # seed-paired F1 difference OHEM-EMA - plain: -0.4, -0.6, -0.5 -> mean -0.5, SD 0.1: significant, worse
    d = _cells(md, "iterations", OHEM, "lesion F1")
    assert _numbers(d[4]) == pytest.approx([-0.5, -0.5 - 0.24842, -0.5 + 0.24842], abs=6e-4)
    assert d[5] == "yes, worse"
    # FP lesions: differences 1, 1, 1.5 -> mean 1.1667, SD 0.2887, half 0.7172: the interval excludes 0 and
    # more FPs are worse
    d = _cells(md, "iterations", OHEM, "FP lesions (lesion-free)")
    half = T975_DF2 * 0.288675 / math.sqrt(3)
    assert _numbers(d[4]) == pytest.approx([1.16667, 1.16667 - half, 1.16667 + half], abs=6e-4)
    assert d[5] == "yes, worse"
    assert "- lesion F1, significant at 95 % (CI excludes 0): OHEM-EMA (DC+CE ranking) (equal iterations" in md
    assert "- lesion F1, not significant at 95 %: none." in md
    assert "stable by the pilot criterion (SD ≤ 0.1, F1 clearly above 0)" in md and "NOT" not in md
    assert "study (test)" in md and "nnunetv2_ohem_compare -d X" in md and "Date 2026-12-01" in md


def test_summary_says_not_significant_and_unstable_baseline():
    # plain F1 0.2 0.9 0.3 (SD 0.38): an unstable baseline; OHEM-EMA differences +0.1, -0.2, +0.05 span 0
    res = study.study_table(_compare_rows({"nnUNetTrainer": [0.2, 0.9, 0.3], "nnUNetTrainerOHEMEMA": [0.3, 0.7, 0.35]},
                                          {"nnUNetTrainer": [0, 0, 0], "nnUNetTrainerOHEMEMA": [0, 0, 0]}))
    cfg = StudyConfig(methods=("nnUNetTrainer", "nnUNetTrainerOHEMEMA"), seeds=(0, 1, 2))
    md = study.summary_markdown(cfg, res, 60.0, "cpu", "2026-12-01", {}, "x")
    assert _cells(md, "iterations", PLAIN)[6] == f"{np.std([0.2, 0.9, 0.3], ddof=1):.3f}"
    assert _cells(md, "iterations", OHEM, "lesion F1")[5] == "no"
    assert "NOT stable by the pilot criterion" in md
    # a baseline that finds nothing is stable but useless: F1 0, 0, 0.05 has an interval reaching 0
    res = study.study_table(_compare_rows({"nnUNetTrainer": [0.0, 0.0, 0.05], "nnUNetTrainerOHEMEMA": [0, 0, 0]},
                                          {"nnUNetTrainer": [0, 0, 0], "nnUNetTrainerOHEMEMA": [0, 0, 0]}))
    md0 = study.summary_markdown(cfg, res, 60.0, "cpu", "2026-12-01", {}, "x")
    assert "seed SD 0.029 — NOT usable by the pilot criterion: lesion F1 is not clearly above 0" in md0
    assert "- lesion F1, significant at 95 % (CI excludes 0): none." in md
    assert "- lesion F1, not significant at 95 %: OHEM-EMA (DC+CE ranking) (equal iterations" in md
    # identical FP counts: a zero difference with a zero-width interval is not significant
    assert _cells(md, "iterations", OHEM, "FP lesions (lesion-free)")[5] == "no"


def _fake_study(tmp_path, monkeypatch, methods, seeds=(0, 1, 2)):
    """run_study with the data preparation and compare replaced: the fake records the CompareConfig and
    returns what compare returns (rows with the _Demo trainers' names)."""
    seen = {}

    def fake_compare(ccfg):
        seen["cfg"] = ccfg
        r = np.random.RandomState(7)
        f1 = {m: [round(r.uniform(), 4) for _ in seeds] for m in methods}
        fp = {m: [int(r.randint(0, 5)) for _ in seeds] for m in methods}
        rows = pd.concat([_compare_rows(f1, fp, "iterations", 30),
                          _compare_rows(f1, fp, "time", 20).assign(reused_from="iterations")])
        seen["calls"] = seen.get("calls", 0) + 1
        trained = len(rows) // 2 if seen["calls"] == 1 else 0
        return {"results": rows.reset_index(drop=True), "counts": {"trained": trained, "evaluated": 0,
                                                                   "reused": len(rows) // 2 - trained},
                "epochs_equal_time": {m + "_Demo": 30 - 10 * i for i, m in enumerate(methods)}}

    class FakePaths:
        def __init__(self, out, cfg):
            self.test_images, self.test_labels = os.path.join(out, "imagesTs"), os.path.join(out, "labelsTs")

    monkeypatch.setattr(study, "run_demo", lambda cfg: None)
    monkeypatch.setattr(study, "Paths", FakePaths)
    monkeypatch.setattr(study, "resolve_device", lambda d: "cpu")
    monkeypatch.setattr("nnunetv2_ohem.compare.engine.run_compare", fake_compare)
    cfg = StudyConfig(out=str(tmp_path / "out"), docs=str(tmp_path / "docs"), methods=methods, seeds=seeds,
                      epochs=30, iterations=3, val_iterations=1, jobs=2, progress=False,
                      command="nnunetv2_ohem_demo --study (test)")
    return cfg, study.run_study(cfg), seen


def test_run_study_hands_the_comparison_to_compare_and_documents_its_rows(tmp_path, monkeypatch):
    methods = ("nnUNetTrainer", "nnUNetTrainerOHEMEMA", "nnUNetTrainerOHEMEMA_CE")
    cfg, out, seen = _fake_study(tmp_path, monkeypatch, methods)
    c = seen["cfg"]
    assert c.trainers == ("nnUNetTrainer_Demo", "nnUNetTrainerOHEMEMA_Demo", "nnUNetTrainerOHEMEMA_CE_Demo")
    assert (c.dataset, c.configuration, c.plans) == ("Dataset942_MSSEG2Phantom", "3d_fullres", "nnUNetDemoPlans")
    assert (c.folds, c.seeds, c.budget, c.epochs, c.iterations, c.val_iterations) == ((0,), (0, 1, 2), "both", 30, 3, 1)
    assert (c.metric, c.disable_tta, c.step_size, c.device, c.jobs) == ("msseg2", True, 0.75, "cpu", 2)
    assert c.test.endswith("imagesTs") and c.test_labels.endswith("labelsTs")
    assert c.out == os.path.join(os.path.abspath(cfg.out), "compare")

    csv = pd.read_csv(os.path.join(cfg.docs, "results.csv"))
    assert len(csv) == 2 * 3 * 3  # budgets x methods x seeds
    assert set(csv["method"]) == set(methods) and set(csv["label"]) == {study.METHOD_LABELS[m] for m in methods}
    md = open(os.path.join(cfg.docs, "summary.md")).read()
    assert "nnunetv2_ohem_demo --study (test)" in md and "nnunetv2_ohem_compare -d Dataset942_MSSEG2Phantom" in md
    assert f"Date {time.strftime('%Y-%m-%d')} · machine: {os.cpu_count()}-core" in md
    assert "plain nnU-Net 30, OHEM-EMA (DC+CE ranking) 20, OHEM-EMA (CE ranking) 10 epochs" in md
    assert os.path.getsize(os.path.join(cfg.docs, "study.png")) > 1000
    # every mean [CI] cell of the summary equals a hand computation from the csv as written
    checked = 0
    for budget in ("iterations", "time"):
        for m in methods:
            row = _cells(md, budget, study.METHOD_LABELS[m])
            g = csv[(csv["budget"] == budget) & (csv["method"] == m)]
            for cell, col in ((row[5], "lesion_f1"), (row[7], "dice"), (row[8], "fp_lesions_lesion_free")):
                x = g[col].to_numpy(float)
                half = T975_DF2 * x.std(ddof=1) / math.sqrt(len(x))
                assert _numbers(cell) == pytest.approx([x.mean(), x.mean() - half, x.mean() + half], abs=6e-4)
                checked += 1
            assert row[6] == f"{g['lesion_f1'].std(ddof=1):.3f}"
    assert checked == 2 * 3 * 3


def test_timing_file_counts_computed_runs_and_keeps_the_run_date(tmp_path, monkeypatch):
    cfg, out, seen = _fake_study(tmp_path, monkeypatch, ("nnUNetTrainer", "nnUNetTrainerOHEMEMA"))
    timing_path = os.path.join(cfg.out, "timing.json")
    with open(timing_path) as f:
        timing = json.load(f)
    assert [(i["runs_computed"], i["finished"]) for i in timing["invocations"]] == [(6, True)]
    # a later rerun that only reuses the finished runs (e.g. to add notes) keeps the date the runs were made;
    # the single record that earlier versions wrote is read too
    with open(timing_path, "w") as f:
        json.dump({"seconds": 3600.0, "runs_computed": 6, "date": "2001-02-03"}, f)
    study.run_study(cfg)
    assert seen["calls"] == 2
    md = open(os.path.join(cfg.docs, "summary.md")).read()
    assert "Date 2001-02-03 ·" in md and "wall time 60.0 min ·" in md


def test_an_interrupted_invocation_counts_towards_the_wall_time(tmp_path, monkeypatch):
    from dataclasses import replace

    from nnunetv2_ohem.compare import engine
    cfg, _, seen = _fake_study(tmp_path, monkeypatch, ("nnUNetTrainer", "nnUNetTrainerOHEMEMA"))
    timing_path = os.path.join(cfg.out, "timing.json")
    first = study.study_time(timing_path)[0]
    fake = engine.run_compare

    def interrupted(ccfg):
        time.sleep(0.2)
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "run_compare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(cfg)
    with open(timing_path) as f:
        invocations = json.load(f)["invocations"]
    assert [i["finished"] for i in invocations] == [True, False] and invocations[1]["seconds"] >= 0.2
    assert invocations[0]["runs_computed"] == 6 and invocations[1]["runs_computed"] is None
    # the resumed invocation reuses every run: the summary reports both invocations' time
    monkeypatch.setattr(engine, "run_compare", fake)
    study.run_study(cfg)
    seconds, _, n = study.study_time(timing_path)
    assert n == 2 and seconds == pytest.approx(first + invocations[1]["seconds"])
    md = open(os.path.join(cfg.docs, "summary.md")).read()
    assert f"wall time {seconds / 60:.1f} min over 2 invocations" in md
    # a bad setting that stops the study before its folder exists leaves nothing behind
    monkeypatch.setattr(study, "run_demo", lambda c: (_ for _ in ()).throw(ValueError("bad")))
    with pytest.raises(ValueError):
        study.run_study(replace(cfg, out=str(tmp_path / "never")))
    assert not os.path.exists(tmp_path / "never")


def test_config_and_cli_validation(capsys):
    with pytest.raises(ValueError, match="budget"):
        StudyConfig(budget="epochs")
    with pytest.raises(ValueError, match="unknown method"):
        StudyConfig(methods=("nnUNetTrainerFoo",))
    assert StudyConfig(methods=("nnUNetTrainerOHEMEMA", "nnUNetTrainer")).reference == "nnUNetTrainerOHEMEMA"
    d = StudyConfig()
    assert d.methods == ("nnUNetTrainer", "nnUNetTrainerEMA", "nnUNetTrainer_probabilisticOversampling",
                         "nnUNetTrainerDiceTopK10Loss", "nnUNetTrainerOHEM", "nnUNetTrainerOHEMEMA",
                         "nnUNetTrainerOHEMEMA_CE")
    assert d.seeds == (0, 1, 2, 3, 4) and d.budgets == ("iterations", "time")
    from nnunetv2_ohem.demo import cli
    with pytest.raises(SystemExit):
        cli.main(["--study", "--methods", "nnUNetTrainerFoo"])
    assert "nnunetv2_ohem_demo --study" in capsys.readouterr().err
    assert cli.main(["--study", "--jobs", "0"]) == 2  # usage (docs/cli.md)
    assert "jobs must be >= 1" in capsys.readouterr().err


def test_training_seed_is_reproducible():
    import torch
    from nnunetv2_ohem.runtime import seed_everything
    seed_everything(5)
    a = (np.random.randint(0, 10 ** 6), torch.rand(3), random.random())
    seed_everything(5)
    b = (np.random.randint(0, 10 ** 6), torch.rand(3), random.random())
    seed_everything(6)
    c = np.random.randint(0, 10 ** 6)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2] and c != a[0]


def test_selection_plot_reads_ohem_diagnostics_of_the_compare_runs(tmp_path):
    from nnunetv2_ohem.compare.engine import seed_dir
    cfg = StudyConfig(out=str(tmp_path), methods=("nnUNetTrainer", "nnUNetTrainerOHEMEMA_DiceMining"), seeds=(0, 1))
    assert not study.plot_selection(cfg, str(tmp_path / "none.png")) and not (tmp_path / "none.png").exists()
    d = os.path.join(seed_dir(cfg.compare_out, "iterations", "nnUNetTrainerOHEMEMA_DiceMining_Demo", 1),
                     "nnUNet_results", "Dataset942_X", "T__P__3d_fullres", "fold_0")
    os.makedirs(d)
    with open(os.path.join(d, "ohem_diagnostics.json"), "w") as f:
        json.dump({"ohem_fg_fraction_selected": [0.0, 0.5, 1.0], "ohem_fg_fraction_candidates": [0.3, 0.3, 0.3]}, f)
    assert study.plot_selection(cfg, str(tmp_path / "sel.png"))
    assert os.path.getsize(tmp_path / "sel.png") > 1000
    # a run whose mining starts later has no value (None) in its first epochs
    d0 = d.replace("seed_1", "seed_0")
    os.makedirs(d0)
    with open(os.path.join(d0, "ohem_diagnostics.json"), "w") as f:
        json.dump({"ohem_fg_fraction_selected": [None, None, 0.5, 1.0],
                   "ohem_fg_fraction_candidates": [None, None, 0.5, 0.2]}, f)
    assert study.plot_selection(cfg, str(tmp_path / "sel2.png"))
    assert os.path.getsize(tmp_path / "sel2.png") > 1000


def test_mean_over_runs_ignores_epochs_without_mining():
    nan = np.nan
    runs = [np.array([nan, nan, 0.5, 0.2, 0.9]), np.array([0.3, nan, 0.1, 0.4])]
    got = study.mean_over_runs(runs)
    want = [0.3, nan, 0.3, 0.3]  # the common epochs; a NaN is left out of its epoch's mean
    assert got.shape == (4,) and np.allclose(got, want, equal_nan=True)
    r = np.random.RandomState(0).uniform(size=(3, 6))
    assert np.allclose(study.mean_over_runs(list(r)), r.mean(axis=0))


# ---------------------------------------------------------------------------------------- real, end to end

TINY = ["--cases", "3", "--test_cases", "2", "--voxel_size", "4", "-d", "944", "--features", "4", "8", "16",
        "--epochs", "1", "--iterations", "2", "--val_iterations", "1", "-tr", "nnUNetTrainer", "nnUNetTrainerOHEMEMA",
        "--seeds", "0", "1", "--budget", "both", "--device", "cpu", "--jobs", "2", "--no_progress"]


def _checkpoints(root):
    found = {}
    for r, _, files in os.walk(root):
        for name in files:
            if name.endswith(".pth"):
                found[os.path.join(r, name)] = os.stat(os.path.join(r, name)).st_mtime_ns
    return found


@pytest.mark.slow
def test_study_end_to_end_through_compare(cli, tmp_path):
    out, docs = tmp_path / "study", tmp_path / "docs"
    argv = ["nnunetv2_ohem_demo", "--study", "--out", str(out), "--docs", str(docs), *TINY]
    first = cli(argv, timeout=900)
    assert "(4 run(s) trained, 0 re-evaluated, 0 reused)" in first.stdout, first.stdout
    csv = pd.read_csv(docs / "results.csv")
    assert len(csv) == 2 * 2 * 2  # budgets x methods x seeds
    assert set(csv["method"]) == {"nnUNetTrainer", "nnUNetTrainerOHEMEMA"}
    assert set(csv["trainer"]) == {"nnUNetTrainer_Demo", "nnUNetTrainerOHEMEMA_Demo"}
    assert (csv["evaluated_on"] == "test").all() and (csv["n_cases"] == 2).all()
    assert (csv["epochs"] == 1).all() and (csv["iterations_per_epoch"] == 2).all()
    # one epoch costs at most twice the reference's: equal time keeps one epoch and reuses the runs
    assert (csv.loc[csv["budget"] == "time", "reused_from"] == "iterations").all()
    with_lesions, lesion_free = csv["n_cases_with_lesions"] > 0, csv["n_lesion_free"] > 0
    assert with_lesions.all() and lesion_free.all()
    for col in ("lesion_f1", "dice", "lesion_f1_pooled", "lesion_sensitivity", "fp_lesions_lesion_free",
                "n_pred_lesions", "train_seconds"):
        assert np.isfinite(csv[col]).all(), col
    # the in-process predictor logged the equivalent nnUNetv2_predict line
    log = (out / "compare" / "runs" / "iterations" / "nnUNetTrainer_Demo" / "seed_0" / "fold_0" /
           "predict.log").read_text()
    assert "nnUNetv2_predict" in log and "--disable_tta" in log and "-step_size 0.75" in log

    md = (docs / "summary.md").read_text()
    for budget in ("iterations", "time"):
        for col, name in study.SUMMARY_METRICS:
            a = csv[(csv["budget"] == budget) & (csv["method"] == "nnUNetTrainer")].set_index("seed")[col]
            b = csv[(csv["budget"] == budget) & (csv["method"] == "nnUNetTrainerOHEMEMA")].set_index("seed")[col]
            d = (b - a).to_numpy(float)
            half = T975_DF1 * d.std(ddof=1) / math.sqrt(2)
            cells = _cells(md, budget, OHEM, name)
            assert cells[3] == "2"
            # printed with 3 decimals; t-quantile and rounding differ by a few 1e-4, relatively for large CIs
            assert _numbers(cells[4]) == pytest.approx([d.mean(), d.mean() - half, d.mean() + half], rel=1e-5,
                                                       abs=6e-4), cells
            lo, hi = d.mean() - half, d.mean() + half
            assert cells[5].startswith("yes") == (lo > 0 or hi < 0), cells
    assert "seed SD" in md and "significant at 95 % (CI excludes 0)" in md

    before, csv_before = _checkpoints(out / "compare"), (docs / "results.csv").read_text()
    assert sum(p.endswith("checkpoint_final.pth") for p in before) == 4  # every method x seed
    second = cli(argv, timeout=600)
    assert "0 run(s) trained, 0 re-evaluated, 4 reused" in second.stdout, second.stdout
    assert _checkpoints(out / "compare") == before
    assert (docs / "results.csv").read_text() == csv_before
