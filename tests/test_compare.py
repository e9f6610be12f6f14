"""nnunetv2_ohem_compare: statistics against a hand computation, model selection on a fixed table (with a
lesion-free fold), one-line errors, the submitit launcher path and (slow) a real comparison on the tiny
dataset: rows, reuse, a changed setting refused, an evaluation-only change, the launcher through submitit."""
import glob
import io
import json
import math
import os
import random
import statistics

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from nnunetv2_ohem.compare import engine, select
from nnunetv2_ohem.evaluation import run_metrics as metrics
from nnunetv2_ohem.compare.cli import main
from nnunetv2_ohem.compare.report import summary_markdown
from nnunetv2_ohem.compare.budget import equal_time_epochs, parse_epoch_times
from nnunetv2_ohem.compare.stats import mean_ci, paired_differences, summarize_runs

# two trainers x three folds (seed 0) + one trainer with a single run, in a second budget
FIXED_CSV = """budget,trainer,fold,seed,epochs,train_seconds,lesion_f1_pooled,dice
iterations,A,0,0,10,100,0.50,0.60
iterations,A,1,0,10,110,0.40,0.55
iterations,A,2,0,10,105,0.70,0.65
iterations,B,0,0,10,200,0.60,0.62
iterations,B,1,0,10,190,0.55,0.50
iterations,B,2,0,10,210,0.90,0.70
time,A,0,0,10,100,0.50,0.60
time,B,0,0,5,100,0.45,0.58
"""


def _fixed() -> pd.DataFrame:
    return pd.read_csv(io.StringIO(FIXED_CSV))


def _hand_ci(x):
    x = np.asarray(x, float)
    m, s, n = x.mean(), x.std(ddof=1), len(x)
    half = stats.t.ppf(0.975, n - 1) * s / math.sqrt(n)
    return m, m - half, m + half


def test_summary_and_paired_differences_match_hand_computation():
    df = _fixed()
    summ = summarize_runs(df, ["lesion_f1_pooled", "dice"]).set_index(["budget", "trainer"])
    for trainer, values in (("A", [0.50, 0.40, 0.70]), ("B", [0.60, 0.55, 0.90])):
        m, lo, hi = _hand_ci(values)
        row = summ.loc[("iterations", trainer)]
        assert row["n_runs"] == 3
        assert row["lesion_f1_pooled_mean"] == pytest.approx(m)
        assert row["lesion_f1_pooled_lo"] == pytest.approx(lo)
        assert row["lesion_f1_pooled_hi"] == pytest.approx(hi)
    assert math.isnan(summ.loc[("time", "B"), "lesion_f1_pooled_lo"])  # one run: no interval

    diffs = paired_differences(df, "A", ["lesion_f1_pooled", "dice"])
    d = np.array([0.60 - 0.50, 0.55 - 0.40, 0.90 - 0.70])  # paired by fold
    m, lo, hi = _hand_ci(d)
    t_stat = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    p = 2 * stats.t.sf(abs(t_stat), 2)
    got = diffs[(diffs["budget"] == "iterations") & (diffs["metric"] == "lesion_f1_pooled")].iloc[0]
    assert got["trainer"] == "B" and got["n"] == 3
    assert (got["mean"], got["lo"], got["hi"], got["p"]) == pytest.approx((m, lo, hi, p))
    one = diffs[(diffs["budget"] == "time") & (diffs["metric"] == "dice")].iloc[0]
    assert one["n"] == 1 and math.isnan(one["p"])

    info = {"config": {"dataset_name": "Dataset001_X", "configuration": "3d_fullres", "plans": "P",
                       "trainers": ["A", "B"], "folds": [0, 1, 2], "seeds": [0], "budgets": ["iterations", "time"],
                       "metric": "msseg2", "launcher": "local", "device": "cpu", "command": "nnunetv2_ohem_compare x"},
            "date": "2026-12-01", "runs": {}}
    md = summary_markdown(df, info, ["lesion_f1_pooled", "dice"])
    assert f"{m:.3f} [{lo:.3f}, {hi:.3f}]" in md
    assert "no CI, n = 1" in md and "too few pairs for a test" in md
    assert "Too few runs for a confidence interval" in md  # the time budget has one run per trainer
    assert "nan" not in md.lower()
    assert "nnunetv2_ohem_compare x" in md


# t_{0.975, 3} from a printed Student-t table
T975_DF3 = 3.1824


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


# ----------------------------------------------------------------------------------------------- selection

def _selection_table() -> pd.DataFrame:
    """msseg2 rows: fold 2 validated only lesion-free cases. A finds more lesions but floods the lesion-free
    fold with false positives; B is more precise."""
    rows = []
    #            trainer fold tp_pred n_pred tp_ref n_ref lesion_f1 (per-case mean, NaN without lesions)
    for tr, fold, tpp, npred, tpr, nref, f1 in (("A", 0, 4, 5, 4, 5, 0.80), ("A", 1, 3, 4, 3, 4, 0.75),
                                                 ("A", 2, 0, 9, 0, 0, math.nan),
                                                 ("B", 0, 3, 3, 3, 5, 0.75), ("B", 1, 3, 3, 3, 4, 0.75),
                                                 ("B", 2, 0, 0, 0, 0, math.nan)):
        rows.append({"budget": "iterations", "trainer": tr, "fold": fold, "seed": 0, "epochs": 2,
                     "train_seconds": 1.0, "tp_pred_lesions": tpp, "n_pred_lesions": npred, "tp_ref_lesions": tpr,
                     "n_ref_lesions": nref, "fp_lesions": npred - tpp, "fn_lesions": nref - tpr, "lesion_f1": f1,
                     "lesion_f1_pooled": metrics.f1_from_counts(tpp, npred, tpr, nref), "evaluated_on": "validation",
                     "run_dir": f"runs/iterations/{tr}/seed_0/fold_{fold}",
                     "predictions": f"runs/iterations/{tr}/seed_0/fold_{fold}/none"})
    return pd.DataFrame(rows)


def _hand_f1(tpp, npred, tpr, nref):
    p, r = tpp / npred, tpr / nref
    return 2 * p * r / (p + r)


def test_selection_with_a_lesion_free_fold_picks_the_pooled_winner(tmp_path, capsys):
    df = _selection_table()
    ranked = select.rank_trainers(df, "msseg2", "lesion_f1_pooled", "iterations", ["A", "B"])
    assert ranked["trainer"].tolist() == ["B", "A"]
    assert ranked.set_index("trainer").loc["A", "score"] == pytest.approx(_hand_f1(7, 18, 7, 9))
    assert ranked.set_index("trainer").loc["B", "score"] == pytest.approx(_hand_f1(6, 6, 6, 9))
    assert (ranked["runs_without_reference_lesions"] == 1).all()
    # by the per-case lesion F1 (NaN on the lesion-free fold, left out) A would win: the FPs are invisible
    by_mean = select.rank_trainers(df, "msseg2", "lesion_f1", "iterations", ["A", "B"])
    assert by_mean.iloc[0]["trainer"] == "A" and by_mean.iloc[0]["runs_without_value"] == 1
    # lower is better for FP counts
    assert select.rank_trainers(df, "msseg2", "fp_lesions", "iterations").iloc[0]["trainer"] == "B"

    out = tmp_path / "cmp"
    out.mkdir()
    df.to_csv(out / "results.csv", index=False)
    (out / "compare.json").write_text(json.dumps({"config": {
        "dataset_name": "Dataset991_Phantom", "dataset_id": 991, "configuration": "3d_fullres", "plans": "P",
        "trainers": ["A", "B"], "metric": "msseg2", "test_labels": None}}))
    assert main(["select", "-o", str(out), "--no_postprocessing_check"]) == 0
    text = capsys.readouterr().out
    assert "Winner: **B**" in text
    assert "-tr B_Compare -f 0 1 2" in text and "nnUNetv2_predict" in text
    assert "deletes all but one lesion" in text
    assert (out / "selection.md").read_text().strip() == text.strip()
    assert main(["select", "-o", str(out), "--by", "no_such_metric"]) == 2
    assert "no such column" in capsys.readouterr().err


def test_keep_largest_component_and_nnunet_dice():
    m = np.zeros((1, 8, 8), np.uint8)
    m[0, 0:3, 0:3] = 1   # 9 voxels
    m[0, 6:8, 6:8] = 1   # 4 voxels
    m[0, 4, 4] = 1       # touches neither (diagonal gaps of two)
    kept = select.keep_largest_component(m)
    assert kept.sum() == 9 and kept[0, 0:3, 0:3].all()
    assert math.isnan(select.nnunet_dice(np.zeros(4), np.zeros(4)))
    assert select.nnunet_dice(m, kept) == pytest.approx(2 * 9 / (9 + 14))


# ------------------------------------------------------------------------------------------ errors, inputs

def _fake_preprocessed(root, name="Dataset997_Fake", data=True, n_cases=6):
    folder = root / name
    (folder / "gt_segmentations").mkdir(parents=True)
    for i in range(n_cases):
        (folder / "gt_segmentations" / f"case{i}.nii.gz").write_bytes(b"")
    (folder / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    (folder / "P.json").write_text(json.dumps({"configurations": {"3d_fullres": {"data_identifier": "P_3d"}}}))
    if data:
        (folder / "P_3d").mkdir()
        (folder / "P_3d" / "case0.b2nd").write_bytes(b"")
    return folder


def _one_line_error(capsys, argv, code):
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("nnunetv2_ohem_compare: error: ")
    return err


def test_one_line_errors_for_unpreprocessed_data_and_unknown_trainer(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    base = ["-c", "3d_fullres", "-p", "P", "-o", str(tmp_path / "out"), "--device", "cpu", "--no_progress"]
    err = _one_line_error(capsys, ["-d", "998", *base], 1)
    assert "dataset 998 is not preprocessed" in err
    _fake_preprocessed(tmp_path, data=False)
    err = _one_line_error(capsys, ["-d", "997", *base], 1)
    assert "not preprocessed for 3d_fullres" in err and "nnUNetv2_preprocess -d 997" in err
    folder = _fake_preprocessed(tmp_path, "Dataset996_Fake")
    err = _one_line_error(capsys, ["-d", "996", "-c", "2d", "-p", "P", "-o", str(tmp_path / "out")], 2)
    assert "not a configuration" in err
    err = _one_line_error(capsys, ["-d", "996", *base, "-f", "7"], 2)
    assert "fold(s) [7] do not exist" in err
    # nnU-Net's own 5-fold split was written (seed 12345), so parallel runs never race for it
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    with open(folder / "splits_final.json") as f:
        assert json.load(f) == generate_crossval_split([f"case{i}" for i in range(6)], seed=12345, n_splits=5)
    err = _one_line_error(capsys, ["-d", "996", *base, "-tr", "nnUNetTrainer", "nnUNetTrainerDoesNotExist"], 2)
    assert "unknown trainer(s) nnUNetTrainerDoesNotExist" in err
    assert not (tmp_path / "out").exists()  # nothing was written before the checks


def test_trainer_wrapper_resolves_any_trainer_name():
    from nnunetv2_ohem.compare import trainers
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    cls = trainers.make_compare_trainer("nnUNetTrainer_Debug_Compare")
    assert cls.__name__ == "nnUNetTrainer_Debug_Compare" and issubclass(cls, nnUNetTrainer)
    assert cls.__mro__[1].__name__ == "nnUNetTrainer_Debug"
    with pytest.raises(AttributeError):
        trainers.make_compare_trainer("nnUNetTrainerDoesNotExist_Compare")


def test_trainer_wrapper_reads_the_schedule_from_the_environment(tiny_dataset, monkeypatch):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2_ohem.compare import trainers
    cls = trainers.make_compare_trainer("nnUNetTrainer_Debug_Compare")
    plans = load_json(os.path.join(tiny_dataset.preprocessed_folder, tiny_dataset.plans_identifier + ".json"))
    plans["continue_training"] = False  # nnU-Net's run_training sets this key before instantiating
    dj = load_json(os.path.join(tiny_dataset.preprocessed_folder, "dataset.json"))
    make = lambda: cls(dict(plans), "3d_fullres", 0, dj, torch.device("cpu"))  # noqa: E731
    monkeypatch.setenv("nnUNet_ohem_compare_epochs", "3")
    monkeypatch.setenv("NNUNETV2_OHEM_COMPARE_ITERATIONS", "4")  # the name before the common prefix
    t = make()
    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch) == (3, 4, 2)
    monkeypatch.setenv("nnUNet_ohem_compare_val_iterations", "0")
    with pytest.raises(ValueError, match="nnUNet_ohem_compare_val_iterations='0'"):
        make()


def test_plan_run_reuses_reevaluates_refuses_or_reruns(tmp_path):
    spec = {"run_dir": str(tmp_path / "run"), "train": {"trainer": "T", "fold": 0, "epochs": 2},
            "eval": {"metric": "msseg2", "on": "validation"}, "mode": "train"}
    assert engine.plan_run(spec, rerun=False)["mode"] == "train"  # nothing there yet
    os.makedirs(spec["run_dir"])
    with open(os.path.join(spec["run_dir"], engine.RECORD), "w") as f:
        json.dump({"train": spec["train"], "eval": spec["eval"], "row": {}}, f)
    assert engine.plan_run(spec, rerun=False) is None
    assert engine.plan_run(dict(spec, eval={"metric": "valdo", "on": "validation"}), False)["mode"] == "evaluate"
    changed = dict(spec, train={"trainer": "T", "fold": 0, "epochs": 3})
    with pytest.raises(engine.CompareError, match="epochs 2 -> 3"):
        engine.plan_run(changed, rerun=False)
    assert engine.plan_run(changed, rerun=True)["mode"] == "train"


# ------------------------------------------------------------------------------------------------ launcher

def test_submitit_launcher_collects_the_same_rows_as_local(tmp_path):
    specs = [{"run_dir": str(tmp_path / f"run{i}"), "train": {"trainer": "T", "fold": i, "seed": 0},
              "tag": f"run {i}", "value": i * i} for i in range(3)]
    # dict(spec) is a picklable stand-in for execute_run: the rows must come back complete and in spec order
    local = engine.launch_local(specs, 2, "local", False, fn=dict)
    via_submitit = engine.launch_submitit(specs, "submitit_local", engine.SlurmOptions(time_min=5), "submitit",
                                          False, fn=dict)
    assert via_submitit == local == specs
    assert all((tmp_path / f"run{i}" / "submitit").is_dir() for i in range(3))  # logs per run


def test_a_failed_run_lets_the_others_finish_and_is_reported_in_one_line(tmp_path):
    done = []

    def fn(spec):
        if spec["value"] == 1:
            raise engine.CompareError(f"training {spec['tag']} failed (exit code 1): boom")
        done.append(spec["value"])
        return dict(spec)

    specs = [{"run_dir": str(tmp_path / f"run{i}"), "train": {"trainer": "T", "fold": i, "seed": 0},
              "tag": f"run {i}", "value": i} for i in range(3)]
    with pytest.raises(engine.CompareError, match="run 1 failed"):
        engine.launch_local(specs, 1, "local", False, fn=fn)
    assert sorted(done) == [0, 2]
    # through submitit: the job's exception becomes one line naming the run and its log
    with pytest.raises(engine.CompareError, match=r"\(run 0\) failed: .*TypeError.*logs: "):
        engine.launch_submitit(specs[:1], "submitit_local", engine.SlurmOptions(time_min=5), "s", False, fn=int)


def test_equal_time_budget_scales_epochs_and_reuses_the_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    _fake_preprocessed(tmp_path / "pre", "Dataset995_Fake")
    launched = []

    def fake_run(spec):  # B costs 2x per epoch: at equal time it gets half the epochs
        t = spec["train"]
        epochs = 10 if t["epochs"] == "trainer default" else t["epochs"]
        cost = 2.0 if t["trainer"] == "nnUNetTrainer_Debug" else 1.0
        launched.append((t["budget"], t["trainer"], t["fold"], epochs))
        row = {"budget": t["budget"], "trainer": t["trainer"], "fold": t["fold"], "seed": t["seed"],
               "epochs": epochs, "train_seconds": cost * epochs, "lesion_f1_pooled": 0.5, "lesion_f1": 0.5,
               "dice": 0.5, "fp_lesions_lesion_free": 0.0, "run_dir": os.path.relpath(spec["run_dir"], spec["out"])}
        os.makedirs(spec["run_dir"], exist_ok=True)
        with open(os.path.join(spec["run_dir"], engine.RECORD), "w") as f:
            json.dump({"train": t, "eval": spec["eval"], "row": row, "epoch_times": [cost] * epochs}, f)
        return row

    monkeypatch.setattr(engine, "execute_run", fake_run)
    monkeypatch.setattr("nnunetv2_ohem.compare.report.plot_png", lambda *a, **k: b"png")
    cfg = engine.CompareConfig(dataset="995", configuration="3d_fullres", plans="P", out=str(tmp_path / "out"),
                               trainers=("nnUNetTrainer", "nnUNetTrainer_Debug"), folds=(0, 1), budget="both",
                               device="cpu", progress=False)
    res = engine.run_compare(cfg)
    assert sorted(launched) == sorted([("iterations", t, f, 10) for t in cfg.trainers for f in (0, 1)]
                                      + [("time", "nnUNetTrainer_Debug", f, 5) for f in (0, 1)])
    table = res["results"].set_index(["budget", "trainer", "fold"])
    assert table.loc[("time", "nnUNetTrainer", 0), "reused_from"] == "iterations"
    assert table.loc[("time", "nnUNetTrainer_Debug", 1), "epochs"] == 5
    assert res["epochs_equal_time"] == {"nnUNetTrainer": 10, "nnUNetTrainer_Debug": 5}
    launched.clear()
    engine.run_compare(cfg)  # everything finished: nothing launched again
    assert launched == []


# ---------------------------------------------------------------------------------------- real, end to end

def _records(out):
    found = {}
    for root, _, files in os.walk(out):
        for name in files:
            if name in ("run.json", "train.log"):
                p = os.path.join(root, name)
                found[p] = os.stat(p).st_mtime_ns
    return found


@pytest.mark.slow
def test_compare_end_to_end_on_the_tiny_dataset(tiny_dataset, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    argv = ["-d", str(tiny_dataset.dataset_id), "-c", "3d_fullres", "-p", tiny_dataset.plans_identifier,
            "-tr", "nnUNetTrainer_Debug", "nnUNetTrainer_probabilisticOversampling_Debug", "-f", "0", "1",
            "--device", "cpu", "--jobs", "2", "-o", out, "--no_progress"]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    res = pd.read_csv(os.path.join(out, "results.csv"))
    assert len(res) == 4
    trainers = ("nnUNetTrainer_Debug", "nnUNetTrainer_probabilisticOversampling_Debug")
    assert set(zip(res["trainer"], res["fold"])) == {(t, f) for t in trainers for f in (0, 1)}
    assert (res["epochs"] == 2).all() and (res["iterations_per_epoch"] == 5).all()
    assert (res["train_seconds"] > 0).all()
    # two runs side by side share the cores: nnU-Net's -device cpu would give each all of them
    from nnunetv2_ohem.runtime import usable_cores
    logs = glob.glob(os.path.join(out, "**", "train.log"), recursive=True)
    assert len(logs) == 4
    for log in logs:
        assert f", {max(1, usable_cores() // 2)} torch thread(s) on the CPU" in open(log).read(), log
    for col in ("n_cases", "n_ref_lesions", "n_pred_lesions", "fp_lesions", "fn_lesions", "tp_ref_lesions"):
        assert np.isfinite(res[col]).all(), col
    # metrics over cases with lesions exist where the fold has lesions, FP counts where it has lesion-free cases
    with_lesions, lesion_free = res["n_cases_with_lesions"] > 0, res["n_lesion_free"] > 0
    assert with_lesions.any() and lesion_free.any()
    for col in ("dice", "lesion_f1", "lesion_f1_pooled", "lesion_sensitivity"):
        assert np.isfinite(res.loc[with_lesions, col]).all(), col
    assert np.isfinite(res.loc[lesion_free, "fp_lesions_lesion_free"]).all()
    md = open(os.path.join(out, "summary.md")).read()
    assert trainers[1] in md and "paired by (fold, seed)" in md and " ".join(argv[:4]) in md
    assert "data:image/png;base64," in open(os.path.join(out, "report.html")).read()

    before = _records(out)
    csv_before = open(os.path.join(out, "results.csv")).read()
    assert main(argv) == 0  # a rerun reuses every run: no record or log touched
    assert "0 run(s) trained, 0 re-evaluated, 4 reused" in capsys.readouterr().out
    assert _records(out) == before
    assert open(os.path.join(out, "results.csv")).read() == csv_before

    err = _one_line_error(capsys, argv + ["--epochs", "3"], 1)  # a changed setting is refused, not mixed
    assert "already trained with other settings" in err and "--rerun" in err
    assert _records(out) == before and open(os.path.join(out, "results.csv")).read() == csv_before

    assert main(argv + ["--metric", "valdo"]) == 0  # evaluation-only change: re-scored, not re-trained
    assert "0 run(s) trained, 4 re-evaluated" in capsys.readouterr().out
    after = _records(out)
    assert {p: t for p, t in after.items() if p.endswith("train.log")} == \
           {p: t for p, t in before.items() if p.endswith("train.log")}
    assert "f1" in pd.read_csv(os.path.join(out, "results.csv")).columns

    assert main(["select", "-o", out]) == 0
    text = capsys.readouterr().out
    assert "Winner:" in text and "nnUNetv2_predict" in text and "keep the largest connected component" in text

    # the SLURM code path (submitit, its local executor) trains the same run to the same row
    out2 = str(tmp_path / "cmp_submitit")
    argv2 = ["-d", str(tiny_dataset.dataset_id), "-c", "3d_fullres", "-p", tiny_dataset.plans_identifier,
             "-tr", "nnUNetTrainer_Debug", "-f", "0", "--device", "cpu", "-o", out2, "--no_progress"]
    assert main(argv2 + ["--launcher", "submitit_local"]) == 0, capsys.readouterr().err
    via = pd.read_csv(os.path.join(out2, "results.csv"))
    assert os.path.isdir(os.path.join(out2, "runs", "iterations", "nnUNetTrainer_Debug", "seed_0", "fold_0",
                                      "submitit"))
    local = pd.read_csv(io.StringIO(csv_before))
    local = local[(local["trainer"] == "nnUNetTrainer_Debug") & (local["fold"] == 0)]
    timing = {"train_seconds", "train_wall_seconds", "mean_epoch_seconds"}
    cols = [c for c in local.columns if c not in timing]
    pd.testing.assert_frame_equal(via[cols].reset_index(drop=True), local[cols].reset_index(drop=True),
                                  check_dtype=False)  # a one-row csv reads 0 as int, with NaN rows as float


def test_postprocessing_check_shows_the_lesions_nnunet_postprocessing_deletes(tmp_path):
    import SimpleITK as sitk
    out = tmp_path / "cmp"
    run_dir = out / "runs" / "iterations" / "A" / "seed_0" / "fold_0"
    (run_dir / "validation_reference").mkdir(parents=True)
    (out / "pred").mkdir()
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[2:5, 2:5, 2:5] = 1       # lesion of 27 voxels
    ref[12:14, 12:14, 12:14] = 1  # lesion of 8 voxels, far away
    for folder in (run_dir / "validation_reference", out / "pred"):
        sitk.WriteImage(sitk.GetImageFromArray(ref), str(folder / "case0.nii.gz"))  # a perfect prediction
    runs = pd.DataFrame([{"trainer": "A", "fold": 0, "seed": 0, "evaluated_on": "validation",
                          "run_dir": os.path.relpath(run_dir, out), "predictions": "pred"}])
    lines = select.postprocessing_check(str(out), {"config": {"metric": "msseg2"}}, runs, "lesion_f1_pooled")
    text = "\n".join(lines)
    # keeping the 27-voxel lesion only: Dice 2*27/(27+35), F1 from P = 1/1, R = 1/2
    assert f"mean foreground Dice 1.0000 -> {2 * 27 / 62:.4f}" in text and "would not choose it" in text
    assert f"lesion_f1_pooled 1.0000 -> {2 * 0.5 / 1.5:.4f}" in text
    assert "predicted lesions 2 -> 1, missed reference lesions 0 -> 1" in text


def test_in_process_paired_tile_prediction_equals_nnunets_unpaired_predictor(tiny_dataset, tmp_path, monkeypatch):
    """compare's CPU ``--test`` path (nnU-Net's predictor in this process, each tile sent as two copies) gives
    nnU-Net's own single-tile predictor's logits and segmentation, with mirroring TTA on."""
    import shutil

    import SimpleITK as sitk
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    from nnunetv2_ohem.compare import trainers as wrap
    from nnunetv2_ohem.runtime import paired_tile_predictor_class

    pre = tiny_dataset.preprocessed_folder
    plans = load_json(os.path.join(pre, tiny_dataset.plans_identifier + ".json"))
    dj = load_json(os.path.join(pre, "dataset.json"))
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    n_out = pm.get_label_manager(dj).num_segmentation_heads
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(pm, cm, determine_num_input_channels(pm, cm, dj), n_out,
                                                   enable_deep_supervision=False)
    model = tmp_path / "model"
    (model / "fold_0").mkdir(parents=True)
    shutil.copy(os.path.join(pre, "dataset.json"), model / "dataset.json")
    (model / "plans.json").write_text(json.dumps(plans))
    ckpt = {"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
            "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)}
    images = os.path.join(tiny_dataset.raw_folder, "imagesTs")
    files = create_lists_from_splitted_dataset_folder(images, dj["file_ending"])

    def predictor(cls):
        p = cls(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, perform_everything_on_device=False,
                device=torch.device("cpu"), verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        torch.save(ckpt, model / "fold_0" / "checkpoint_final.pth")
        p.initialize_from_trained_model_folder(str(model), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
        return p

    plain = predictor(nnUNetPredictor)
    plain.use_mirroring = False  # only to place the decision boundary: 8x cheaper
    data = torch.from_numpy(cm.preprocessor_class(verbose=False).run_case(files[0], None, pm, cm, dj)[0])
    logits = plain.predict_logits_from_preprocessed_data(data)
    # shift the foreground logit so that about half the voxels are foreground: a boundary everywhere, where
    # any real difference between the predictors would flip voxels
    bias = [k for k, v in ckpt["network_weights"].items() if k.endswith("bias") and v.shape == (n_out,)][-1]
    ckpt["network_weights"][bias][1] -= float(torch.median(logits[1] - logits[0]))
    plain = predictor(nnUNetPredictor)
    paired = predictor(paired_tile_predictor_class())
    batches = []
    paired.network.register_forward_hook(lambda mod, inp, out: batches.append(inp[0].shape[0]))
    # the network's float32 logits of every sliding-window tile, with TTA (the part the pairing changes)
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    padded = pad_nd_image(data, cm.patch_size, "constant", {"value": 0}, True, None)[0]
    slicers = plain._internal_get_sliding_window_slicers(padded.shape[1:])
    assert len(slicers) > 1
    with torch.inference_mode():
        for sl in slicers:
            tile = padded[sl][None].float()
            torch.testing.assert_close(paired._internal_maybe_mirror_and_predict(tile),
                                       plain._internal_maybe_mirror_and_predict(tile), atol=1e-4, rtol=0)
    assert batches and set(batches) == {2}  # every tile went through as a pair
    # the whole case: nnU-Net accumulates the tiles in float16, so the stitched logits agree to its rounding
    # (one float16 step is 2^-11 to 2^-10 for logits of magnitude 0.5-2); TTA off here, it was checked per tile
    paired.use_mirroring = plain.use_mirroring = False
    torch.testing.assert_close(paired.predict_logits_from_preprocessed_data(data),
                               plain.predict_logits_from_preprocessed_data(data), atol=2 ** -9, rtol=0)
    plain.use_mirroring = True  # the segmentations below: TTA on in both (compare's path reads disable_tta)

    spec = {"train": {"device": "cpu", "fold": 0, "trainer": "nnUNetTrainer", "configuration": "3d_fullres",
                      "plans": tiny_dataset.plans_identifier},
            "eval": {"test": images, "disable_tta": False, "step_size": 0.5},
            "env": {"nnUNet_extTrainer": wrap.EXT_FOLDER, "nnUNet_results": str(tmp_path)},
            "run_dir": str(tmp_path / "run"),
            "dataset_id": tiny_dataset.dataset_id, "num_processes": 1, "tag": "test run"}
    os.makedirs(spec["run_dir"])
    engine.predict_test(spec, str(model), str(tmp_path / "paired"))
    os.makedirs(tmp_path / "plain")
    plain.predict_from_files_sequential(images, str(tmp_path / "plain"), save_probabilities=False, overwrite=True)
    log = open(os.path.join(spec["run_dir"], "predict.log")).read()
    assert f"nnUNet_results={tmp_path} " in log and "nnUNetv2_predict -i" in log
    assert "-step_size 0.5" in log and "--disable_tta" not in log
    cases = sorted(f for f in os.listdir(tmp_path / "plain") if f.endswith(dj["file_ending"]))
    assert len(cases) == len(files) >= 1
    assert sorted(f for f in os.listdir(tmp_path / "paired") if f.endswith(dj["file_ending"])) == cases
    differ = total = foreground = 0
    for c in cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "paired" / c)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain" / c)))
        differ, total, foreground = differ + int((a != b).sum()), total + b.size, foreground + int((b > 0).sum())
    assert 0.05 < foreground / total < 0.95  # not a trivial all-background segmentation
    assert differ <= 0.001 * total
