"""The comparison engine: trainers × folds × training seeds × budgets through stock ``nnUNetv2_train``.

Flow per run (:func:`execute_run`, the unit a launcher runs, locally or as a SLURM job):
``nnUNetv2_train D C FOLD -tr <T>_Compare -p PLANS`` (schedule and seed through environment variables, see
:mod:`nnunetv2_ohem.compare.trainers`) → nnU-Net's own validation predictions of the fold (``validation/``,
scored against ``gt_segmentations`` of the preprocessed dataset) or a prediction of ``--test``
(``nnUNetv2_predict``; on a CPU nnU-Net's predictor in the run's own process instead, see :func:`predict_test`) →
``nnunetv2_ohem.evaluation.evaluate_folders`` → one results row, stored with the run's settings in
``run.json``.

Layout under ``OUT``::

    compare.json                         the settings of the last compare (used by ``select``)
    results.csv  summary.md  report.html
    runs/<budget>/<trainer>/seed_<s>/nnUNet_results/   nnU-Net's model folder (all folds of that seed)
    runs/<budget>/<trainer>/seed_<s>/fold_<f>/         train.log, run.json, cases.csv, predictions, logs

Reuse: a run whose ``run.json`` holds the same training settings is not trained again; if only the
evaluation settings changed (``--metric``, ``--test``) it is only evaluated again. Different training
settings for an existing run are refused (one line) unless ``--rerun`` is given, so a table never mixes runs
made under different settings.

Budgets: ``iterations`` — every trainer its schedule (``--epochs``/``--iterations`` or the trainer's own);
``time`` — each trainer's epochs scaled so that its training takes the first trainer's wall time, from the
per-epoch costs measured on the ``iterations`` runs (:func:`nnunetv2_ohem.compare.budget.equal_time_epochs`:
median over epochs and over the paired runs); a trainer whose scaled epochs equal its ``iterations`` epochs
reuses that run (the first trainer always does).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from nnunetv2_ohem import envvars
from nnunetv2_ohem.atomic import write_text_atomic
from nnunetv2_ohem.cli_common import UsageError, UserError
from nnunetv2_ohem.compare import trainers as wrap
from nnunetv2_ohem.compare.budget import equal_time_epochs, parse_epoch_times
from nnunetv2_ohem.compare.defaults import DEFAULT_TRAINERS, LAUNCHERS
from nnunetv2_ohem.evaluation.run_metrics import FAMILIES, run_metrics
from nnunetv2_ohem.runtime import (console_script, last_lines, machine_description, run_logged,
                                   terminate_live_processes, usable_cores)

BUDGET_CHOICES = {"iterations": ("iterations",), "time": ("time",), "both": ("iterations", "time")}
RECORD = "run.json"
#: nnU-Net's own sliding-window step (``nnUNetv2_predict -step_size``), the default of ``--step_size``
DEFAULT_STEP_SIZE = 0.5
_SCHEDULE_RE = re.compile(r"nnunetv2_ohem_compare: \S+ with (\d+) epochs x (\d+) iterations")


class CompareError(UserError):
    """A run failed or the inputs cannot be used (one line, exit code 1)."""


@dataclass
class SlurmOptions:
    partition: Optional[str] = None
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    time_min: int = 24 * 60
    poll_seconds: float = 30.0


@dataclass
class CompareConfig:
    dataset: str
    configuration: str
    out: str
    plans: str = "nnUNetPlans"
    trainers: Tuple[str, ...] = DEFAULT_TRAINERS
    folds: Tuple[int, ...] = (0,)
    seeds: Tuple[int, ...] = (0,)
    budget: str = "iterations"
    epochs: Optional[int] = None
    iterations: Optional[int] = None
    val_iterations: Optional[int] = None
    metric: str = "msseg2"
    test: Optional[str] = None
    test_labels: Optional[str] = None
    disable_tta: bool = False
    step_size: float = DEFAULT_STEP_SIZE
    num_processes: int = 3
    device: str = "cuda"
    jobs: int = 1
    launcher: str = "local"
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    rerun: bool = False
    progress: bool = True
    command: str = ""

    def __post_init__(self):
        self.trainers, self.folds, self.seeds = tuple(self.trainers), tuple(self.folds), tuple(self.seeds)
        if not self.trainers:
            raise UsageError("give at least one trainer (-tr)")
        for what, values in (("trainers", self.trainers), ("folds", self.folds), ("seeds", self.seeds)):
            if len(set(values)) != len(values):
                raise UsageError(f"{what} must not repeat: {list(values)}")
        if not self.folds or not self.seeds:
            raise UsageError("give at least one fold (-f) and one seed (--seeds)")
        if any(f < 0 for f in self.folds):
            raise UsageError(f"folds must be >= 0, got {list(self.folds)}")
        if self.budget not in BUDGET_CHOICES:
            raise UsageError(f"--budget must be one of {list(BUDGET_CHOICES)}, got {self.budget!r}")
        if self.metric not in FAMILIES:
            raise UsageError(f"--metric must be one of {list(FAMILIES)}, got {self.metric!r}")
        for name in ("epochs", "iterations", "val_iterations"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UsageError(f"--{name} must be >= 1, got {v}")
        if not 0 < self.step_size <= 1:
            raise UsageError(f"--step_size must be in (0, 1], got {self.step_size}")
        if self.jobs < 1 or self.num_processes < 1:
            raise UsageError("--jobs and --num_processes must be >= 1")
        if (self.test is None) != (self.test_labels is None):
            raise UsageError("--test and --test_labels go together (images to predict and their labels)")
        if self.launcher not in LAUNCHERS:
            raise UsageError(f"--launcher must be one of {list(LAUNCHERS)}, got {self.launcher!r}")
        if self.device not in ("cpu", "cuda", "mps"):
            raise UsageError(f"--device must be cpu, cuda or mps, got {self.device!r}")

    @property
    def budgets(self) -> Tuple[str, ...]:
        return BUDGET_CHOICES[self.budget]


# ------------------------------------------------------------------------------------------ dataset checks

@dataclass
class Dataset:
    dataset_id: int
    name: str
    preprocessed: str
    plans_file: str
    splits_file: str
    gt_folder: str
    file_ending: str
    num_folds: int


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_dataset(dataset: str, configuration: str, plans: str, folds: Sequence[int],
                    environ=os.environ) -> Dataset:
    """Check that ``dataset`` (ID or ``DatasetXXX_Name``) is planned with ``plans`` and preprocessed for
    ``configuration`` under ``$nnUNet_preprocessed``; one-line :class:`UserError` otherwise. Writes nnU-Net's
    own 5-fold ``splits_final.json`` (seed 12345, as ``nnUNetv2_train`` would on its first run) when there is
    none, so parallel runs never race to create it."""
    root = environ.get("nnUNet_preprocessed")
    if not root:
        raise CompareError("nnUNet_preprocessed is not set: point it at the folder nnUNetv2_plan_and_preprocess "
                           "wrote into")
    if not os.path.isdir(root):
        raise CompareError(f"nnUNet_preprocessed={root}: no such folder")
    if re.fullmatch(r"\d+", str(dataset)):
        dataset_id = int(dataset)
        prefix = f"Dataset{dataset_id:03d}_"
        names = sorted(n for n in os.listdir(root) if n.startswith(prefix) and os.path.isdir(os.path.join(root, n)))
        if not names:
            raise CompareError(f"dataset {dataset} is not preprocessed: no {prefix}* folder in {root} (run "
                               f"nnUNetv2_plan_and_preprocess -d {dataset} first)")
        if len(names) > 1:
            raise CompareError(f"dataset ID {dataset} is ambiguous in {root}: {', '.join(names)}")
        name = names[0]
    else:
        m = re.fullmatch(r"Dataset(\d{3,})_.+", str(dataset))
        if not m:
            raise UsageError(f"-d {dataset}: give a dataset ID (e.g. 991) or a name like Dataset991_Phantom")
        dataset_id, name = int(m.group(1)), str(dataset)
        if not os.path.isdir(os.path.join(root, name)):
            raise CompareError(f"dataset {name} is not preprocessed: no such folder in {root}")
    folder = os.path.join(root, name)
    plans_file = os.path.join(folder, f"{plans}.json")
    if not os.path.isfile(plans_file):
        have = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json") and "lans" in f)
        raise CompareError(f"dataset {name} has no plans {plans} ({plans_file} missing; plans found: "
                           f"{', '.join(have) or 'none'})")
    with open(plans_file) as f:
        plans_json = json.load(f)
    configs = plans_json.get("configurations", {})
    if configuration not in configs:
        raise UsageError(f"-c {configuration}: not a configuration of {plans} (has {', '.join(configs)})")
    data_id = configs[configuration].get("data_identifier")
    if data_id is None:  # inheriting configuration (e.g. 3d_cascade_fullres)
        parent = configs[configuration].get("inherits_from")
        data_id = configs.get(parent, {}).get("data_identifier", f"{plans}_{configuration}")
    data_folder = os.path.join(folder, data_id)
    if not os.path.isdir(data_folder) or not os.listdir(data_folder):
        raise CompareError(f"dataset {name} is not preprocessed for {configuration}: {data_folder} is missing or "
                           f"empty (run nnUNetv2_preprocess -d {dataset_id} -c {configuration} -plans_name {plans})")
    gt = os.path.join(folder, "gt_segmentations")
    with open(os.path.join(folder, "dataset.json")) as f:
        file_ending = json.load(f)["file_ending"]
    if not os.path.isdir(gt):
        raise CompareError(f"dataset {name} is not preprocessed: {gt} is missing")
    splits_file = os.path.join(folder, "splits_final.json")
    if not os.path.isfile(splits_file):
        from nnunetv2.utilities.crossval_split import generate_crossval_split
        cases = sorted(f[:-len(file_ending)] for f in os.listdir(gt) if f.endswith(file_ending))
        if len(cases) < 5:
            raise CompareError(f"{splits_file} is missing and {name} has {len(cases)} cases, too few for nnU-Net's "
                               f"5-fold split: write a splits_final.json")
        write_text_atomic(splits_file, json.dumps(generate_crossval_split(cases, seed=12345, n_splits=5),
                                                  indent=1))
    with open(splits_file) as f:
        splits = json.load(f)
    bad = [fo for fo in folds if fo >= len(splits)]
    if bad:
        raise UsageError(f"fold(s) {bad} do not exist: {splits_file} has {len(splits)} folds (0-{len(splits) - 1})")
    return Dataset(dataset_id, name, folder, plans_file, splits_file, gt, file_ending, len(splits))


def check_trainers(names: Sequence[str]) -> None:
    """One-line usage error naming every trainer nnU-Net's lookup (its own folder + ``nnUNet_extTrainer``)
    cannot find."""
    missing = [n for n in names if wrap.find_trainer_class(n) is None]
    if missing:
        raise UsageError(f"unknown trainer(s) {', '.join(missing)}: not found in nnunetv2.training.nnUNetTrainer "
                         f"nor in nnUNet_extTrainer={os.environ.get('nnUNet_extTrainer', '')}")


def check_test_folders(images: str, labels: str, file_ending: str) -> None:
    for what, p in (("--test", images), ("--test_labels", labels)):
        if not os.path.isdir(p):
            raise CompareError(f"{what} {p}: no such folder")
    if not any(f.endswith(file_ending) for f in os.listdir(images)):
        raise CompareError(f"--test {images}: no {file_ending} images")


# ----------------------------------------------------------------------------------------------- run specs

def seed_dir(out: str, budget: str, trainer: str, seed: int) -> str:
    return os.path.join(os.path.abspath(out), "runs", budget, trainer, f"seed_{seed}")


def run_dir_of(out: str, budget: str, trainer: str, fold: int, seed: int) -> str:
    return os.path.join(seed_dir(out, budget, trainer, seed), f"fold_{fold}")


def model_folder(results_root: str, dataset_name: str, trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's model folder of ``trainer`` (its ``_Compare`` wrapper) inside one seed's ``nnUNet_results``."""
    return os.path.join(results_root, dataset_name, f"{wrap.wrapped_name(trainer)}__{plans}__{configuration}")


def make_spec(cfg: CompareConfig, ds: Dataset, budget: str, trainer: str, fold: int, seed: int,
              epochs: Optional[int]) -> Dict:
    """Everything :func:`execute_run` needs, as plain JSON data (it travels to SLURM jobs by pickle)."""
    train = {"dataset": ds.name, "configuration": cfg.configuration, "plans": cfg.plans,
             "plans_sha256": _sha256(ds.plans_file), "splits_sha256": _sha256(ds.splits_file),
             "trainer": trainer, "fold": fold, "seed": seed, "budget": budget,
             "epochs": epochs if epochs is not None else "trainer default",
             "iterations": cfg.iterations if cfg.iterations is not None else "trainer default",
             "device": cfg.device}
    if cfg.val_iterations is not None:  # only when given: records of runs made without the option stay reusable
        train["val_iterations"] = cfg.val_iterations
    if cfg.test is None:
        evaluation = {"metric": cfg.metric, "on": "validation"}
    else:
        evaluation = {"metric": cfg.metric, "on": "test", "test": os.path.abspath(cfg.test),
                      "test_labels": os.path.abspath(cfg.test_labels), "disable_tta": cfg.disable_tta,
                      "step_size": cfg.step_size}
    env = {"nnUNet_preprocessed": os.path.abspath(os.environ["nnUNet_preprocessed"]),
           "nnUNet_results": os.path.join(seed_dir(cfg.out, budget, trainer, seed), "nnUNet_results")}
    if os.environ.get("nnUNet_raw"):
        env["nnUNet_raw"] = os.environ["nnUNet_raw"]
    ext = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    env["nnUNet_extTrainer"] = os.pathsep.join(ext + ([wrap.EXT_FOLDER] if wrap.EXT_FOLDER not in ext else []))
    if cfg.jobs > 1 and cfg.device == "cpu":  # parallel runs share the cores instead of fighting for them
        threads = str(max(1, usable_cores() // cfg.jobs))
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", threads)
        # nnU-Net's -device cpu ignores OMP_NUM_THREADS for torch; the _Compare wrapper applies this instead
        envvars.set_value(envvars.CPU_THREADS, envvars.get_str(envvars.CPU_THREADS, threads), env)
    return {"train": train, "eval": evaluation, "env": env, "dataset_id": ds.dataset_id,
            "gt_folder": ds.gt_folder, "file_ending": ds.file_ending, "num_processes": cfg.num_processes,
            "run_dir": run_dir_of(cfg.out, budget, trainer, fold, seed), "out": os.path.abspath(cfg.out),
            "mode": "train",
            "tag": f"{budget}/{trainer}/fold {fold}/seed {seed}"}


def read_record(run_dir: str) -> Optional[Dict]:
    path = os.path.join(run_dir, RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _differences(old: Dict, new: Dict) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def plan_run(spec: Dict, rerun: bool) -> Optional[Dict]:
    """Decide what a run needs: None when its finished record matches (reuse); else the spec to launch with
    ``mode`` ``train`` or ``evaluate`` (training settings unchanged, evaluation settings changed). A finished
    run trained with other settings raises :class:`CompareError` unless ``rerun``."""
    rec = read_record(spec["run_dir"])
    if rec is None:
        return dict(spec, mode="train")
    if rec["train"] != spec["train"]:
        if not rerun:
            raise CompareError(f"{spec['run_dir']}: already trained with other settings "
                               f"({_differences(rec['train'], spec['train'])}); pass --rerun to train it again "
                               f"or use another -o")
        return dict(spec, mode="train")
    if rec["eval"] != spec["eval"]:
        return dict(spec, mode="evaluate")
    return None


# ------------------------------------------------------------------------------------------ running a run

def run_command(cmd: List[str], env: Dict[str, str], log_path: str, what: str) -> None:
    """Run ``cmd`` with its output in ``log_path``; :class:`CompareError` naming the log when it fails."""
    code = run_logged(cmd, env, log_path).code
    if code != 0:
        last = last_lines(log_path, 1)
        raise CompareError(f"{what} failed (exit code {code}): {last[-1] if last else 'no output'} "
                           f"(full log: {log_path})")


def _subprocess_env(spec: Dict) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(spec["env"])
    env.setdefault("MPLBACKEND", "Agg")
    env["PYTHONUNBUFFERED"] = "1"
    if spec["train"]["device"] == "cpu":
        env.setdefault("nnUNet_compile", "f")
    return env


def _clear_for_training(spec: Dict) -> None:
    run_dir = spec["run_dir"]
    if os.path.isdir(run_dir):
        for entry in os.listdir(run_dir):
            if entry == "submitit":  # the job's own logs (the job that runs this may be writing them)
                continue
            p = os.path.join(run_dir, entry)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
    t = spec["train"]
    fold_dir = os.path.join(model_folder(spec["env"]["nnUNet_results"], t["dataset"], t["trainer"], t["plans"],
                                         t["configuration"]), f"fold_{t['fold']}")
    shutil.rmtree(fold_dir, ignore_errors=True)
    os.makedirs(run_dir, exist_ok=True)


def train(spec: Dict) -> Dict:
    """``nnUNetv2_train`` for one run; returns ``{"epoch_times", "epochs", "iterations", "wall_seconds"}``."""
    t, run_dir = spec["train"], spec["run_dir"]
    _clear_for_training(spec)
    env = _subprocess_env(spec)
    envvars.set_value(wrap.ENV_SEED, t["seed"], env)
    for key, var in (("epochs", wrap.ENV_EPOCHS), ("iterations", wrap.ENV_ITERATIONS),
                     ("val_iterations", wrap.ENV_VAL_ITERATIONS)):
        if isinstance(t.get(key), int):
            envvars.set_value(var, t[key], env)
        else:
            envvars.unset(var, env)
    cmd = [console_script("nnUNetv2_train"), str(spec["dataset_id"]), t["configuration"], str(t["fold"]), "-tr",
           wrap.wrapped_name(t["trainer"]), "-p", t["plans"], "-device", t["device"]]
    log_path = os.path.join(run_dir, "train.log")
    t0 = time.time()
    run_command(cmd, env, log_path, f"training {spec['tag']}")
    wall = time.time() - t0
    with open(log_path, errors="replace") as f:
        text = f.read()
    epoch_times = parse_epoch_times(text)
    m = _SCHEDULE_RE.search(text)
    import socket
    info = {"epoch_times": epoch_times, "epochs": len(epoch_times),
            "iterations": int(m.group(2)) if m else None, "wall_seconds": wall,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(),
            "machine": machine_description(t["device"])}
    write_text_atomic(os.path.join(run_dir, "train.json"), json.dumps(info, indent=1))
    return info


def _validation_reference(spec: Dict, pred_dir: str) -> str:
    """A folder of links to the ground truth of exactly the cases nnU-Net validated (the fold's ``val`` set)."""
    from nnunetv2_ohem.evaluation.lesions import EvaluationError
    from nnunetv2_ohem.evaluation.validation import link_references, validation_cases
    ref = os.path.join(spec["run_dir"], "validation_reference")
    shutil.rmtree(ref, ignore_errors=True)
    os.makedirs(ref)
    try:
        cases = validation_cases(pred_dir, spec["file_ending"])
        link_references(spec["gt_folder"], cases, spec["file_ending"], ref)
    except EvaluationError as err:
        raise CompareError(str(err)) from None
    return ref


def _step_size(evaluation: Dict) -> float:
    """The run's sliding-window step (records written before ``--step_size`` existed used nnU-Net's)."""
    return evaluation.get("step_size", DEFAULT_STEP_SIZE)


def predict_command(spec: Dict, pred_dir: str) -> List[str]:
    """The ``nnUNetv2_predict`` command line of a run's ``--test`` prediction."""
    t, e = spec["train"], spec["eval"]
    n = str(spec["num_processes"])
    cmd = [console_script("nnUNetv2_predict"), "-i", e["test"], "-o", pred_dir, "-d", str(spec["dataset_id"]),
           "-c", t["configuration"], "-p", t["plans"], "-tr", wrap.wrapped_name(t["trainer"]),
           "-f", str(t["fold"]), "-chk", "checkpoint_final.pth", "-step_size", f"{_step_size(e):g}",
           "-device", t["device"], "-npp", n, "-nps", n]
    if e.get("disable_tta"):
        cmd.append("--disable_tta")
    return cmd


def predict_test(spec: Dict, model_dir: str, pred_dir: str) -> None:
    """Predict ``--test`` with the run's model into ``pred_dir`` (log: ``predict.log``).

    On a CPU nnU-Net's own predictor runs in this process (the thread of a local launcher, or the SLURM job)
    instead of an ``nnUNetv2_predict`` subprocess: no second torch/nnU-Net start-up and no preprocessing and
    export worker processes, which on a small CPU cost more than predicting a few cases, and each tile goes
    through the network as a pair of identical copies (oneDNN's batch-1 3-d convolutions are 3-25x slower
    than a batch of two, :func:`nnunetv2_ohem.runtime.paired_tile_predictor_class`). The settings are the
    ones the logged ``nnUNetv2_predict`` line would use; elsewhere that command itself runs."""
    t, e, run_dir = spec["train"], spec["eval"], spec["run_dir"]
    log_path = os.path.join(run_dir, "predict.log")
    cmd = predict_command(spec, pred_dir)
    if t["device"] != "cpu":
        shutil.rmtree(pred_dir, ignore_errors=True)
        run_command(cmd, _subprocess_env(spec), log_path, f"prediction {spec['tag']}")
        return
    import traceback

    import torch

    from nnunetv2_ohem.runtime import HeldOutPredictor
    threads = envvars.get_int(envvars.CPU_THREADS, environ=spec["env"])
    if threads:  # parallel runs share the cores (as their trainings do); torch's setting is per thread
        torch.set_num_threads(int(threads))
    # the stock command that gives the same predictions, with the two folders it needs to find the model
    env = " ".join(f"{k}={shlex.quote(spec['env'][k])}" for k in ("nnUNet_results", "nnUNet_extTrainer"))
    line = ("$ " + env + " " + " ".join(shlex.quote(c) for c in cmd) + "\n# run in this process: nnUNetPredictor"
            f"(tile_step_size={_step_size(e):g}, use_mirroring={not e.get('disable_tta')}) with each "
            f"tile as a pair of copies, predict_from_files_sequential (no -npp/-nps workers)")
    try:
        # resolved by run_compare before the threads start (cached); a SLURM job resolves it here, alone
        trainer_class = wrap.make_compare_trainer(wrap.wrapped_name(t["trainer"]))
        HeldOutPredictor("cpu", tile_step_size=_step_size(e), use_mirroring=not e.get("disable_tta")
                         ).predict(model_dir, e["test"], pred_dir, log_path, fold=t["fold"], command=line,
                                   trainer_class=trainer_class)
    except Exception as err:  # noqa: BLE001 - one line for the user, the traceback in the log
        with open(log_path, "a") as log:
            traceback.print_exc(file=log)
        raise CompareError(f"prediction {spec['tag']} failed: {type(err).__name__}: {err} "
                           f"(full log: {log_path})") from None


def evaluate(spec: Dict) -> Tuple[Dict, str]:
    """Predictions of the run scored with ``--metric``; returns (metric columns, what was evaluated)."""
    from nnunetv2_ohem.evaluation.api import evaluate_folders
    from nnunetv2_ohem.evaluation.lesions import EvaluationError
    t, e, run_dir = spec["train"], spec["eval"], spec["run_dir"]
    mf = model_folder(spec["env"]["nnUNet_results"], t["dataset"], t["trainer"], t["plans"], t["configuration"])
    fold_dir = os.path.join(mf, f"fold_{t['fold']}")
    if e["on"] == "validation":
        pred_dir = os.path.join(fold_dir, "validation")
        if not os.path.isdir(pred_dir):
            raise CompareError(f"{pred_dir}: nnU-Net wrote no validation predictions (see "
                               f"{os.path.join(run_dir, 'train.log')})")
        ref_dir = _validation_reference(spec, pred_dir)
    else:
        pred_dir = os.path.join(run_dir, "test_predictions")
        predict_test(spec, mf, pred_dir)
        ref_dir = e["test_labels"]
    try:
        cases, agg = evaluate_folders(e["metric"], ref_dir, pred_dir)
    except EvaluationError as err:
        raise CompareError(f"evaluating {spec['tag']}: {err}") from None
    write_text_atomic(os.path.join(run_dir, "cases.csv"), cases.to_csv(index=False))
    return run_metrics(e["metric"], cases, agg), pred_dir


def execute_run(spec: Dict) -> Dict:
    """Train (``mode == "train"``) and/or evaluate one run and store ``run.json``; returns its results row.
    This is the function a launcher runs (a thread here, or a SLURM job through submitit)."""
    run_dir, t = spec["run_dir"], spec["train"]
    if spec["mode"] == "train":
        info = train(spec)
    else:
        with open(os.path.join(run_dir, "train.json")) as f:
            info = json.load(f)
    metrics, pred_dir = evaluate(spec)
    times = info["epoch_times"]
    row = {"budget": t["budget"], "trainer": t["trainer"], "fold": t["fold"], "seed": t["seed"],
           "epochs": info["epochs"], "iterations_per_epoch": info["iterations"],
           "train_seconds": float(sum(times)), "train_wall_seconds": float(info["wall_seconds"]),
           "mean_epoch_seconds": float(np.mean(times)) if times else math.nan,
           "evaluated_on": spec["eval"]["on"], "reused_from": "", **metrics,
           "run_dir": os.path.relpath(run_dir, spec["out"]), "predictions": os.path.relpath(pred_dir, spec["out"])}
    record = {"train": t, "eval": spec["eval"], "row": row, "epoch_times": times,
              "trained": info.get("finished"), "host": info.get("host"), "machine": info.get("machine"),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text_atomic(os.path.join(run_dir, RECORD), json.dumps(record, indent=1, default=_json_default))
    return row


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o))


# ---------------------------------------------------------------------------------------------- launchers

def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="run", disable=not progress)


def launch_local(specs: List[Dict], jobs: int, desc: str, progress: bool, fn=None) -> List[Dict]:
    """Run ``fn(spec)`` (default :func:`execute_run`) for every spec in ``jobs`` threads; rows in spec order."""
    fn = fn or execute_run
    rows: List[Optional[Dict]] = [None] * len(specs)
    bar = _bar(len(specs), desc, progress)
    pool = ThreadPoolExecutor(max_workers=jobs)
    futures: Dict = {}
    failures: List[str] = []
    try:
        futures = {pool.submit(fn, s): i for i, s in enumerate(specs)}
        for fut in as_completed(futures):
            try:
                rows[futures[fut]] = fut.result()
            except CompareError as err:  # a failed run: the others finish and are kept for a rerun
                failures.append(str(err))
            bar.update(1)
    except BaseException:
        for f in futures:
            f.cancel()
        terminate_live_processes()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    _raise_failures(failures, len(specs))
    return rows  # type: ignore[return-value]


def _raise_failures(failures: List[str], n: int) -> None:
    if failures:
        more = f" ({len(failures)} of {n} runs failed; the finished ones are kept)" if len(failures) > 1 else ""
        raise CompareError(failures[0] + more)


def _executor(spec: Dict, launcher: str, slurm: SlurmOptions):
    import submitit
    cluster = "slurm" if launcher == "slurm" else "local"
    ex = submitit.AutoExecutor(folder=os.path.join(spec["run_dir"], "submitit"), cluster=cluster)
    t = spec["train"]
    params = {"name": f"compare_{t['trainer']}_f{t['fold']}_s{t['seed']}", "timeout_min": int(slurm.time_min)}
    if cluster == "slurm":
        params.update(gpus_per_node=int(slurm.gpus_per_node), cpus_per_task=int(slurm.cpus_per_task))
        if slurm.partition:
            params["slurm_partition"] = slurm.partition
    ex.update_parameters(**params)
    return ex


def launch_submitit(specs: List[Dict], launcher: str, slurm: SlurmOptions, desc: str, progress: bool,
                    fn=None) -> List[Dict]:
    """Submit ``fn(spec)`` per spec as a submitit job (SLURM, or submitit's local executor for
    ``submitit_local``), logs in ``<run dir>/submitit/``; wait and collect the rows in spec order. On
    interruption the submitted jobs are cancelled."""
    import submitit
    fn = fn or execute_run
    for s in specs:
        os.makedirs(s["run_dir"], exist_ok=True)
    jobs = []
    try:
        for s in specs:
            jobs.append(_executor(s, launcher, slurm).submit(fn, s))
        index = {id(j): i for i, j in enumerate(jobs)}
        rows: List[Optional[Dict]] = [None] * len(specs)
        bar = _bar(len(specs), desc, progress)
        poll = 0.5 if launcher == "submitit_local" else slurm.poll_seconds
        failures: List[str] = []
        try:
            for job in submitit.helpers.as_completed(jobs, poll_frequency=poll):
                i = index[id(job)]
                try:
                    rows[i] = job.result()
                except Exception as err:  # noqa: BLE001 - the job's traceback is in its log
                    lines = [ln for ln in str(err).splitlines() if ln.strip()]
                    detail = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "")
                    failures.append(f"job {job.job_id} ({specs[i]['tag']}) failed: {detail.strip()} "
                                    f"(logs: {job.paths.stderr})")
                bar.update(1)
        finally:
            bar.close()
        _raise_failures(failures, len(specs))
        return rows  # type: ignore[return-value]
    except BaseException:
        for j in jobs:
            try:
                if not j.done():
                    j.cancel(check=False)
            except Exception:  # noqa: BLE001 - best effort while shutting down
                pass
        raise


def launch(cfg: CompareConfig, specs: List[Dict], desc: str, fn=None) -> List[Dict]:
    if not specs:
        return []
    if cfg.launcher == "local":
        return launch_local(specs, cfg.jobs, desc, cfg.progress, fn)
    return launch_submitit(specs, cfg.launcher, cfg.slurm, desc, cfg.progress, fn)


# --------------------------------------------------------------------------------------------- the compare

def _epoch_times(out: str, trainer: str, fold: int, seed: int) -> List[float]:
    rec = read_record(run_dir_of(out, "iterations", trainer, fold, seed))
    if rec is None:
        raise CompareError(f"no finished iterations run of {trainer} fold {fold} seed {seed} to measure its cost")
    return rec["epoch_times"]


def run_compare(cfg: CompareConfig) -> Dict:
    """Run (or resume) a comparison and write results.csv, summary.md, report.html and compare.json."""
    from nnunetv2_ohem.compare.report import write_outputs
    t0 = time.time()
    ds = resolve_dataset(cfg.dataset, cfg.configuration, cfg.plans, cfg.folds)
    if cfg.test is not None:
        check_test_folders(cfg.test, cfg.test_labels, ds.file_ending)
    check_trainers(cfg.trainers)
    if cfg.test is not None and cfg.device == "cpu":
        # the in-process predictors of parallel runs need their trainer classes; nnU-Net's by-name lookup is
        # not thread-safe, so it runs here, once, before any thread starts
        for tr in cfg.trainers:
            wrap.make_compare_trainer(wrap.wrapped_name(tr))
    os.makedirs(cfg.out, exist_ok=True)
    counts = {"trained": 0, "evaluated": 0, "reused": 0}
    keys = [(tr, f, s) for s in cfg.seeds for f in cfg.folds for tr in cfg.trainers]

    def resolve(budget: str, epochs_of: Dict[str, Optional[int]], keys: List[Tuple[str, int, int]]
                ) -> Tuple[List[Dict], List[Dict]]:
        specs = [make_spec(cfg, ds, budget, tr, f, s, epochs_of[tr]) for tr, f, s in keys]
        todo = [p for p in (plan_run(s, cfg.rerun) for s in specs) if p is not None]  # refuse before running
        return specs, todo

    def run_budget(specs: List[Dict], todo: List[Dict], desc: str) -> List[Dict]:
        counts["trained"] += sum(p["mode"] == "train" for p in todo)
        counts["evaluated"] += sum(p["mode"] == "evaluate" for p in todo)
        counts["reused"] += len(specs) - len(todo)
        launch(cfg, todo, desc)
        return [read_record(s["run_dir"])["row"] for s in specs]

    rows: List[Dict] = []
    it_specs, it_todo = resolve("iterations", {tr: cfg.epochs for tr in cfg.trainers}, keys)
    it_rows = run_budget(it_specs, it_todo, "compare: equal iterations")
    if "iterations" in cfg.budgets:
        rows += it_rows
    epochs_time: Dict[str, int] = {}
    if "time" in cfg.budgets:
        ref = cfg.trainers[0]
        pairs = [(f, s) for s in cfg.seeds for f in cfg.folds]
        ref_times = [_epoch_times(cfg.out, ref, f, s) for f, s in pairs]
        own_epochs = {}
        for tr in cfg.trainers:
            epochs_time[tr] = equal_time_epochs(ref_times, [_epoch_times(cfg.out, tr, f, s) for f, s in pairs])
            own_epochs[tr] = {r["epochs"] for r in it_rows if r["trainer"] == tr}
        scaled = [tr for tr in cfg.trainers if own_epochs[tr] != {epochs_time[tr]}]
        specs, todo = resolve("time", epochs_time, [k for k in keys if k[0] in scaled])
        time_rows = {(r["trainer"], r["fold"], r["seed"]): r for r in run_budget(specs, todo, "compare: equal time")}
        for r in it_rows:
            k = (r["trainer"], r["fold"], r["seed"])
            rows.append(time_rows[k] if k in time_rows else dict(r, budget="time", reused_from="iterations"))
    results = pd.DataFrame(rows)
    order = {tr: i for i, tr in enumerate(cfg.trainers)}
    results = results.assign(_o=results["trainer"].map(order)).sort_values(
        ["budget", "_o", "fold", "seed"], kind="stable").drop(columns="_o").reset_index(drop=True)
    info = {"config": {**asdict(cfg), "dataset_name": ds.name, "dataset_id": ds.dataset_id,
                       "budgets": list(cfg.budgets)},
            "epochs_equal_time": epochs_time, "counts": counts, "seconds": time.time() - t0,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_outputs(cfg, results, info)
    return {"results": results, **info}


__all__ = ["CompareConfig", "SlurmOptions", "CompareError", "run_compare", "execute_run", "predict_test",
           "resolve_dataset",
           "check_trainers", "plan_run", "make_spec", "launch", "launch_local", "launch_submitit",
           "DEFAULT_TRAINERS"]
