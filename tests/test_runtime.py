"""Process helpers shared by the demo and compare: logged subprocesses (per-child CPU time, stopping them from
another thread), CPU threads of a training, and the demo's side-by-side training steps."""
import os
import sys
import threading
import time

import pytest

from nnunetv2_ohem import envvars, runtime
from nnunetv2_ohem.demo import pipeline
from nnunetv2_ohem.demo.pipeline import DemoConfig, DemoError, Paths, Step, StepRunner, run_steps

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\nprint('done')"


def _python(code):
    return [sys.executable, "-c", code]


def test_run_logged_logs_streams_lines_and_returns_the_childs_cpu_time(tmp_path):
    log = tmp_path / "a.log"
    lines = []
    finished = runtime.run_logged(_python("print('one'); print('two')"), dict(os.environ), str(log), lines.append)
    assert finished.code == 0
    assert [ln.strip() for ln in lines] == ["one", "two"]
    text = log.read_text().splitlines()
    assert text[0].startswith("$ ") and sys.executable in text[0]
    assert text[1:] == ["one", "two"]
    assert runtime.run_logged(_python("import sys; print('bad'); sys.exit(3)"), dict(os.environ),
                              str(tmp_path / "b.log")).code == 3
    assert runtime.last_lines(str(tmp_path / "b.log"), 1) == ["bad"]


def test_cpu_seconds_are_each_childs_own_when_run_side_by_side(tmp_path):
    """A busy child and a sleeping child in two threads: the sleeper's CPU time must not include the other's
    (a process-wide rusage difference would)."""
    results = {}

    def go(name, code):
        results[name] = runtime.run_logged(_python(code), dict(os.environ), str(tmp_path / f"{name}.log"))

    threads = [threading.Thread(target=go, args=("busy", BUSY.format(s=0.6))),
               threading.Thread(target=go, args=("sleep", "import time; time.sleep(1.0)"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["busy"].code == results["sleep"].code == 0
    assert results["busy"].cpu_seconds >= 0.6
    assert results["sleep"].cpu_seconds < 0.5


def test_terminate_live_processes_stops_a_child_of_another_thread(tmp_path):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault(
        "f", runtime.run_logged(_python("print('up', flush=True); import time; time.sleep(60)"), dict(os.environ),
                                str(tmp_path / "s.log"), lambda line: out.setdefault("up", True))))
    t0 = time.time()
    t.start()
    while "up" not in out and time.time() - t0 < 30:
        time.sleep(0.05)
    runtime.terminate_live_processes()
    t.join(timeout=30)
    assert not t.is_alive()
    assert out["f"].code != 0 and time.time() - t0 < 30


@pytest.mark.parametrize("device, expected", [("cpu", 1), ("cuda", None)])
def test_apply_cpu_threads_sets_torchs_threads_on_cpu_only(monkeypatch, device, expected):
    import torch
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv(envvars.CPU_THREADS, "1")
        assert runtime.apply_cpu_threads(torch.device(device)) == expected
        assert torch.get_num_threads() == (1 if device == "cpu" else 2)
        monkeypatch.delenv(envvars.CPU_THREADS)
        torch.set_num_threads(2)
        assert runtime.apply_cpu_threads(torch.device("cpu")) is None and torch.get_num_threads() == 2
        monkeypatch.setenv(envvars.CPU_THREADS, "0")
        with pytest.raises(ValueError, match=envvars.CPU_THREADS):
            runtime.apply_cpu_threads(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cores, methods, device, jobs", [(2, 2, "cpu", 2), (1, 2, "cpu", 1), (2, 3, "cpu", 2),
                                                          (16, 2, "cpu", 2), (2, 1, "cpu", 1), (8, 2, "cuda", 1)])
def test_demo_trains_one_method_per_core_on_cpu(monkeypatch, cores, methods, device, jobs):
    monkeypatch.setattr(runtime, "usable_cores", lambda: cores)
    cfg = DemoConfig(methods=("nnUNetTrainerOHEMEMA_CE", "nnUNetTrainer", "nnUNetTrainerEMA")[:methods])
    assert pipeline.train_jobs(cfg, device) == jobs


def test_demo_training_environment_fixes_cpu_threads(tmp_path, monkeypatch):
    monkeypatch.delenv(envvars.CPU_THREADS, raising=False)
    paths = Paths(str(tmp_path), DemoConfig())
    assert pipeline.nnunet_env(paths, "cpu")[envvars.CPU_THREADS] == str(pipeline.CPU_TRAIN_THREADS)
    assert envvars.CPU_THREADS not in pipeline.nnunet_env(paths, "cuda")
    monkeypatch.setenv(envvars.CPU_THREADS, "2")  # the user's setting wins
    assert pipeline.nnunet_env(paths, "cpu")[envvars.CPU_THREADS] == "2"


class _Bar:
    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k


def _timed_steps(tmp_path, spans, fail=None):
    def make(name):
        def run():
            start = time.time()
            time.sleep(0.5)
            spans[name] = (start, time.time())
            if name == fail:
                raise DemoError(f"step 'train/{name}' failed")
        return run
    return [Step(f"train/{n}", "train", {"n": n}, (), make(n)) for n in ("a", "b")]


def test_run_steps_runs_a_stage_side_by_side_and_records_each_step(tmp_path):
    paths = Paths(str(tmp_path), DemoConfig())
    os.makedirs(paths.steps)
    spans, bar = {}, _Bar()
    runner = StepRunner(paths, progress=False)
    run_steps(runner, _timed_steps(tmp_path, spans), 2, bar)
    (a0, a1), (b0, b1) = spans["a"], spans["b"]
    assert b0 < a1 and a0 < b1, "the two steps did not overlap"
    assert bar.n == 2 and {runner.record[k]["status"] for k in ("train/a", "train/b")} == {"ran"}
    assert all(os.path.exists(os.path.join(paths.steps, f"train__{n}.json")) for n in "ab")

    spans.clear()
    run_steps(runner, _timed_steps(tmp_path, spans), 1, bar)  # reused, and one at a time when jobs=1
    assert spans == {} and {runner.record[k]["status"] for k in ("train/a", "train/b")} == {"reused"}


def test_run_steps_lets_the_others_finish_then_raises_the_failure(tmp_path):
    paths = Paths(str(tmp_path), DemoConfig())
    os.makedirs(paths.steps)
    spans = {}
    runner = StepRunner(paths, progress=False)
    with pytest.raises(DemoError, match="train/a"):
        run_steps(runner, _timed_steps(tmp_path, spans, fail="a"), 2, _Bar())
    assert set(spans) == {"a", "b"}
    assert os.path.exists(os.path.join(paths.steps, "train__b.json"))
    assert not os.path.exists(os.path.join(paths.steps, "train__a.json"))


def test_cases_of_groups_channel_files_like_nnunet(tmp_path):
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder
    names = ["b_0001.nii.gz", "b_0000.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz", "case_1_0000.nii.gz",
             "dataset.json", "c_000.nii.gz"]
    for n in names:
        (tmp_path / n).write_text("")
    cases = runtime.cases_of(str(tmp_path), ".nii.gz")
    assert list(cases) == ["a", "b", "case_1"]
    assert [os.path.basename(f) for f in cases["b"]] == ["b_0000.nii.gz", "b_0001.nii.gz"]
    # nnU-Net crops any *.nii.gz by 12 characters: "c_000.nii.gz" (no 4-digit channel) becomes ""
    nnunet = set(get_identifiers_from_splitted_dataset_folder(str(tmp_path), ".nii.gz")) - {""}
    assert set(cases) == nnunet
