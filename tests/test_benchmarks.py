"""benchmarks/gpu_check.sh --dry-run: every part of the GPU check runs on the CPU at tiny sizes and appends
parseable JSON lines (with the keys the project's benchmark rows promise) under a dated, device-named heading."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

pytestmark = pytest.mark.slow  # four benchmark processes (~40 s on 2 busy cores)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    results = tmp / "RESULTS.md"
    results.write_text("# existing results\n")
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp)}
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA"):
        env.pop(k, None)  # the benchmarks make their own nnU-Net trees
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", "--results",
                           str(results)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
                          stdin=subprocess.DEVNULL)
    text = results.read_text()
    rows = [json.loads(line.strip().strip("`")) for line in text.splitlines() if line.startswith("`{")]
    return proc, text, rows


def test_dry_run_succeeds_and_appends_under_a_device_heading(dry_run):
    proc, text, rows = dry_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert text.startswith("# existing results\n")  # appended, not overwritten
    heading = [line for line in text.splitlines() if line.startswith("## GPU check")]
    assert len(heading) == 1 and "--dry-run" in heading[0] and "cpu dry run" in heading[0]
    assert rows and all(r["device_name"].startswith("cpu dry run") and len(r["date"]) == 10 for r in rows)
    parts = {r["gpu_check_part"] for r in rows}
    assert parts == {"realistic", "tiny_options", "precision", "blob_loss"}


def test_ohem_rows_carry_the_required_keys(dry_run):
    from ohem_step import REQUIRED_KEYS
    _, _, rows = dry_run
    ohem = [r for r in rows if str(r.get("benchmark", "")).startswith("ohem_")]
    for r in ohem:
        missing = [k for k in REQUIRED_KEYS if k not in r]
        assert not missing, (r["benchmark"], missing)
    by = {}
    for r in ohem:
        by.setdefault(r["benchmark"], []).append(r)
    # plans from nnU-Net's two planners, with the patch and network they chose
    assert {r["plans"] for r in by["ohem_realistic_plans"]} == {"nnUNetPlans", "nnUNetResEncUNetMPlans"}
    assert {r["network"] for r in by["ohem_realistic_plans"]} == {"PlainConvUNet", "ResidualEncoderUNet"}
    # (a) loader rows for plain and both candidate modes, measured CPU seconds, ratio vs plain
    loader = {r["candidates"]: r for r in by["ohem_realistic_loader"]}
    assert set(loader) == {None, "augmented", "crops"}
    assert loader[None]["loader_ratio"] == 1.0
    assert all(r["loader_cpu_s"] > 0 and r["loader_ratio"] > 0 for r in loader.values())
    assert loader["augmented"]["B_bar"] == 4 * loader["augmented"]["B"]
    # (b) scoring per option, exact is the reference; (c) full step ratio per candidate mode
    scoring = by["ohem_realistic_scoring"]
    assert {r["scoring"] for r in scoring if r["plans"] == "nnUNetPlans"} == {"exact", "ds2"}
    assert all(r["scoring_ratio"] > 0 for r in scoring)
    assert [r["scoring_ratio"] for r in scoring if r["scoring"] == "exact"] == [1.0]
    steps = by["ohem_realistic_step"]
    assert {(r["plans"], r["candidates"]) for r in steps} == {("nnUNetPlans", m) for m in ("augmented", "crops")}
    assert all(r["ratio"] > 0 for r in steps)
    # tiny plans: a recall measured by the trainer over a real (short) run, and the step ratio
    tiny = {(r["candidates"], r["scoring"]): r for r in by["ohem_tiny_scoring"]}
    assert set(tiny) == {("crops", "exact"), ("crops", "ds2"), ("augmented", "exact")}
    assert 0.0 <= tiny[("crops", "ds2")]["selection_recall"] <= 1.0
    assert tiny[("crops", "exact")]["selection_recall"] == 1.0
    assert all(r["ratio"] > 0 for r in tiny.values())


def test_precision_and_blob_rows(dry_run):
    _, _, rows = dry_run
    prec = [r for r in rows if r.get("bench") == "precision" and not r.get("summary")]
    assert {r["precision"] for r in prec} == {"fp32", "bf16"} and all(r["loss_finite"] for r in prec)
    blob = [r for r in rows if r.get("bench") == "blob_loss_vs_dc_ce"]
    assert sorted(r["K"] for r in blob) == [1, 10] and all(r["ratio"] > 0 for r in blob)
