"""The demo pipeline: phantoms -> MSSEG-II conversion -> plans -> stock nnU-Net training per method ->
stock nnU-Net prediction on held-out phantoms -> MSSEG-II metrics -> HTML report.

Everything lives under one output folder. Each step writes ``steps/<step>.json`` (its settings and run time)
when it finishes; a rerun reuses a finished step whose settings are unchanged and whose upstream steps were
reused too, so an interrupted demo resumes where it stopped. ``runs.jsonl`` records per run which steps ran
and which were reused. nnU-Net runs as the user would run it (``nnUNetv2_train`` / ``nnUNetv2_predict``
subprocesses) with ``nnUNet_raw/preprocessed/results`` pointed into the output folder, so a user's own
nnU-Net folders are never touched.
"""
import functools
import itertools
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

from nnunetv2_ohem import envvars, runtime
from nnunetv2_ohem.atomic import write_text_atomic
from nnunetv2_ohem.demo.methods import DEMO_EPOCHS, DEMO_ITERATIONS, DEMO_VAL_ITERATIONS, NAMES, trainer_for
# shared with the compare engine, which must not import the demo; importable from here as before
from nnunetv2_ohem.runtime import (TILE_STEP_SIZE, Finished, HeldOutPredictor, console_script,  # noqa: F401
                                   machine_description, paired_tile_predictor_class)

KNOWN_METHODS = NAMES
STAMP = ".nnunetv2_ohem_demo"
OUTPUT_ENTRIES = ("phantoms", "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "predictions", "metrics",
                  "report", "steps", "logs", "runs.jsonl")
STEP_ORDER = ("phantoms", "convert", "plan", "train", "predict", "evaluate", "report")


class DemoError(RuntimeError):
    """A step failed; the message names the step and its log file."""


@dataclass
class DemoConfig:
    """Settings of one demo run (the defaults are what ``make demo`` runs)."""

    out: str = "./demo_output"
    n_train: int = 10
    n_test: int = 4
    voxel_size: float = 2.0
    #: new-lesion volumes (mm³) of the demo phantoms: larger than MSSEG-II's typical 1-50 mm³ so that a network
    #: trained for minutes on a CPU finds them; (1, 50) gives the realistic, much harder setting
    lesion_volume: Tuple[float, float] = (200.0, 2000.0)
    #: new lesions per lesion-bearing phantom (MSSEG-II cases have 0 to ~15, the generator's default is 1-8):
    #: more lesions per held-out case make its lesion F1 less noisy (docs/demo.md, sweep)
    new_lesions: Tuple[int, int] = (6, 12)
    #: new-lesion FLAIR intensity as a multiple of white matter (the generator's default: 1.6-2.1). With the
    #: generator's fainter, smaller lesions plain nnU-Net ended with empty predictions in 2 of 8 runs at this
    #: budget (lesion probabilities below 0.5 everywhere, even on training cases); with these every seed tried
    #: learned in its second epoch and kept it (docs/demo.md, second sweep)
    lesion_contrast: Tuple[float, float] = (2.2, 2.8)
    #: phantom seed: same seed -> byte-identical phantoms
    seed: int = 0
    #: training seed (Python, NumPy and torch generators of nnU-Net's training: network initialisation, patch
    #: sampling, augmentation); None = nnU-Net's usual unseeded training
    train_seed: Optional[int] = 0
    #: further :class:`~nnunetv2_ohem.phantoms.mni.MSSEG2PhantomConfig` settings (e.g. ``n_new_lesions``)
    phantom_options: Dict[str, Any] = field(default_factory=dict)
    dataset_id: int = 942
    #: OHEM-EMA with CE ranking: with the DC+CE ranking (nnUNetTrainerOHEMEMA) mining turned the learned
    #: segmentation back into "all background" for good in 1 of the 2 runs at these settings (for 9 epochs in
    #: the other), as lesion-free patches with a few false-positive voxels rank hardest under a per-patch Dice
    #: (docs/demo.md)
    methods: Tuple[str, ...] = ("nnUNetTrainerOHEMEMA_CE", "nnUNetTrainer")
    epochs: int = DEMO_EPOCHS
    iterations: int = DEMO_ITERATIONS
    val_iterations: int = DEMO_VAL_ITERATIONS
    #: U-Net features per stage. 8/16/32 learned in only 2 of 4 training seeds within 400 iterations (the net
    #: stays at "all background" for some initialisations); 16/32/64 learned in every seed tried, for ~1.3x the
    #: cost of an iteration (docs/demo.md, sweep)
    features: Tuple[int, ...] = (16, 32, 64)
    patch: int = 32
    batch: int = 2
    device: str = "auto"
    fresh: bool = False
    until: Optional[str] = None
    progress: bool = True

    def __post_init__(self):
        self.methods = tuple(self.methods)
        self.features = tuple(self.features)
        self.lesion_volume = tuple(float(v) for v in self.lesion_volume)
        self.new_lesions = tuple(int(v) for v in self.new_lesions)
        self.lesion_contrast = tuple(float(v) for v in self.lesion_contrast)
        if len(self.lesion_volume) != 2 or not 0 < self.lesion_volume[0] <= self.lesion_volume[1]:
            raise ValueError(f"lesion_volume must be two numbers 0 < lo <= hi, got {self.lesion_volume}")
        if len(self.lesion_contrast) != 2 or not 0 < self.lesion_contrast[0] <= self.lesion_contrast[1]:
            raise ValueError(f"lesion_contrast must be two numbers 0 < lo <= hi, got {self.lesion_contrast}")
        unknown = [m for m in self.methods if m not in KNOWN_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown or '(none given)'}; choose from {list(KNOWN_METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods listed twice: {list(self.methods)}")
        for name in ("n_train", "n_test", "epochs", "iterations", "val_iterations", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_train < 2:
            raise ValueError("n_train must be >= 2 (nnU-Net keeps one case for validation)")
        if self.until is not None and self.until not in STEP_ORDER:
            raise ValueError(f"until must be one of {STEP_ORDER}, got {self.until!r}")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"device must be auto, cpu, cuda or mps, got {self.device!r}")
        if self.train_seed is not None and self.train_seed < 0:
            raise ValueError(f"train_seed must be >= 0, got {self.train_seed}")
        self.phantom_options = dict(self.phantom_options)
        _phantom_config(self)  # an invalid phantom setting fails here, before anything is written

    @property
    def dataset_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_MSSEG2Phantom"

    @property
    def plans_identifier(self) -> str:
        return "nnUNetDemoPlans"


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


class Paths:
    def __init__(self, out: str, cfg: DemoConfig):
        self.out = os.path.abspath(out)
        j = lambda *p: os.path.join(self.out, *p)  # noqa: E731
        self.phantoms = j("phantoms", "MSSEG2")
        self.raw = j("nnUNet_raw")
        self.preprocessed = j("nnUNet_preprocessed")
        self.results = j("nnUNet_results")
        self.dataset_raw = j("nnUNet_raw", cfg.dataset_name)
        self.test_images = j("nnUNet_raw", cfg.dataset_name, "imagesTs")
        self.test_labels = j("nnUNet_raw", cfg.dataset_name, "labelsTs")
        self.predictions = j("predictions")
        self.metrics = j("metrics")
        self.report = j("report")
        self.steps = j("steps")
        self.logs = j("logs")
        self.runs = j("runs.jsonl")

    def training_output(self, cfg: DemoConfig, method: str) -> str:
        return os.path.join(self.results, cfg.dataset_name,
                            f"{trainer_for(method)}__{cfg.plans_identifier}__3d_fullres", "fold_0")


def prepare_output(cfg: DemoConfig) -> Paths:
    """Create (or, with ``fresh``, empty) the output folder. A non-empty folder that is not a demo output is
    refused, so ``--out`` pointing at a user's data never gets written into or deleted."""
    out = os.path.abspath(cfg.out)
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, STAMP)):
        raise DemoError(f"{out}: exists, is not empty and is not a demo output folder (no {STAMP}); "
                        f"choose another --out")
    if cfg.fresh and os.path.isdir(out):
        for entry in OUTPUT_ENTRIES:
            p = os.path.join(out, entry)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, STAMP), "w") as f:
        f.write("output folder of nnunetv2_ohem_demo; --fresh deletes its contents\n")
    paths = Paths(out, cfg)
    for d in (paths.steps, paths.logs):
        os.makedirs(d, exist_ok=True)
    return paths


def nnunet_env(paths: Paths, device: str) -> Dict[str, str]:
    """Environment for nnU-Net subprocesses: our three folders; on CPU no torch.compile, in-process
    augmentation, passive OpenMP waiting (start-ups, worker processes and spinning threads cost more than
    they save on small data and a small CPU) and :data:`CPU_TRAIN_THREADS` torch threads per training. A
    user's own settings of these variables win."""
    env = dict(os.environ)
    env.update({"nnUNet_raw": paths.raw, "nnUNet_preprocessed": paths.preprocessed,
                "nnUNet_results": paths.results, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"})
    if device == "cpu":
        # spinning OpenMP threads waste a shared CPU's cycles (measured by a teammate: 96 s -> 5 s for one
        # validation case on a busy 2-core machine)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.setdefault("nnUNet_compile", "f")
        env.setdefault("nnUNet_n_proc_DA", "0")
        env.setdefault("nnUNet_def_n_proc", "1")
        env.setdefault(envvars.CPU_THREADS, str(CPU_TRAIN_THREADS))
    return env


#: torch threads of one demo training on a CPU. The methods train side by side, one core each (a 16/32/64
#: U-Net at batch 2 and 32³ gains only ~1.8x from a second thread, and a training is only partly torch), and
#: one fixed count makes a seeded run's float reductions, and so its metrics, independent of the core count
CPU_TRAIN_THREADS = 1


def train_jobs(cfg: "DemoConfig", device: str) -> int:
    """How many methods train at the same time: one per usable core on a CPU, one on a GPU."""
    if device != "cpu":
        return 1
    return max(1, min(len(cfg.methods), runtime.usable_cores() // CPU_TRAIN_THREADS))


def run_logged(cmd: List[str], env: Dict[str, str], log_path: str, step: str,
               on_line: Optional[Callable[[str], None]] = None) -> Finished:
    """Run ``cmd`` (:func:`nnunetv2_ohem.runtime.run_logged`); :class:`DemoError` with the log's tail when it
    fails."""
    finished = runtime.run_logged(cmd, env, log_path, on_line)
    if finished.code != 0:
        tail = "\n".join(runtime.last_lines(log_path, 15))
        raise DemoError(f"step '{step}' failed (exit code {finished.code}); full log: {log_path}\n{tail}")
    return finished


def write_single_split(labels_tr: str, path: str, val_fraction: float = 0.2) -> Dict[str, List[str]]:
    """nnU-Net ``splits_final.json`` with one fold: the last ``max(1, round(val_fraction * n))`` cases (sorted)
    validate, the others train. Held-out evaluation uses the test phantoms, so one small validation set for
    nnU-Net's per-epoch pseudo Dice is enough, and it works with fewer than 5 training cases."""
    cases = sorted(f[:-len(".nii.gz")] for f in os.listdir(labels_tr) if f.endswith(".nii.gz"))
    if len(cases) < 2:
        raise DemoError(f"{labels_tr}: need at least 2 training cases for a train/validation split, found "
                        f"{len(cases)}")
    n_val = max(1, int(round(val_fraction * len(cases))))
    split = {"train": cases[:-n_val], "val": cases[-n_val:]}
    write_text_atomic(path, json.dumps([split], indent=1))
    return split


_EPOCH_RE = re.compile(r"^.*Epoch (\d+)\s*$")


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children: unlike wall time it hardly
    depends on how busy a shared machine is, so step costs stay comparable between runs."""
    import resource
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class StepRunner:
    """Runs or reuses steps and records what happened."""

    def __init__(self, paths: Paths, progress: bool):
        self.paths = paths
        self.progress = progress
        self.record: Dict[str, Dict] = {}
        self.ran: set = set()

    def _marker(self, name: str) -> str:
        return os.path.join(self.paths.steps, name.replace("/", "__") + ".json")

    def run(self, name: str, settings: Dict, upstream: Sequence[str], fn: Callable[[], Any]) -> bool:
        """Run ``fn`` unless a finished marker with equal ``settings`` exists and no upstream step ran in this
        run. Returns True when it ran. Steps without common upstream may run in parallel threads; one that
        runs a subprocess returns its :class:`~nnunetv2_ohem.runtime.Finished`, whose CPU seconds are then
        recorded instead of this process's (which would include the other steps')."""
        marker = self._marker(name)
        settings = json.loads(json.dumps(settings))
        if os.path.exists(marker) and not (set(upstream) & self.ran):
            with open(marker) as f:
                done = json.load(f)
            if done.get("settings") == settings:
                self.record[name] = {"status": "reused", "seconds": 0.0}
                tqdm.write(f"[demo] {name}: reused (finished {done.get('finished')})") if self.progress else None
                return False
        if os.path.exists(marker):
            os.remove(marker)
        tqdm.write(f"[demo] {name}: running") if self.progress else None
        start, cpu_start = time.time(), _cpu_seconds()
        result = fn()
        seconds, cpu = time.time() - start, _cpu_seconds() - cpu_start
        if isinstance(result, Finished):  # a subprocess's own CPU time: steps may run side by side
            cpu = result.cpu_seconds
        write_text_atomic(marker, json.dumps({"settings": settings, "seconds": seconds, "cpu_seconds": cpu,
                                              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
        self.ran.add(name)
        self.record[name] = {"status": "ran", "seconds": seconds, "cpu_seconds": cpu}
        return True


def step_seconds(paths: Paths, name: str) -> Optional[float]:
    """Run time recorded in a finished step's marker (None if the step has not finished)."""
    marker = os.path.join(paths.steps, name.replace("/", "__") + ".json")
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        return float(json.load(f)["seconds"])


def _phantom_config(cfg: DemoConfig):
    from nnunetv2_ohem.phantoms.mni import MSSEG2PhantomConfig
    try:
        return MSSEG2PhantomConfig.with_lesion_volume(cfg.lesion_volume, voxel_size=cfg.voxel_size,
                                                      **{"n_new_lesions": cfg.new_lesions,
                                                         "lesion_contrast": cfg.lesion_contrast, **cfg.phantom_options})
    except TypeError as e:  # an unknown setting name
        raise ValueError(f"phantom_options: {e}") from None
    except ValueError as e:
        raise ValueError(f"phantom settings: {e}") from None


def train_environment(cfg: DemoConfig, paths: Paths, device: str, epochs: Optional[int] = None,
                      train_seed: Optional[int] = None) -> Dict[str, str]:
    """Environment of a demo trainer's ``nnUNetv2_train``: :func:`nnunet_env` plus the schedule and the
    training seed (``epochs`` / ``train_seed`` override the config's; a seed of None leaves training unseeded)."""
    from nnunetv2_ohem.training import demo as demo_trainers
    env = nnunet_env(paths, device)
    for name, value in ((demo_trainers.ENV_EPOCHS, cfg.epochs if epochs is None else epochs),
                        (demo_trainers.ENV_ITERATIONS, cfg.iterations),
                        (demo_trainers.ENV_VAL_ITERATIONS, cfg.val_iterations)):
        envvars.set_value(name, value, env)
    seed = cfg.train_seed if train_seed is None else train_seed
    if seed is None:
        envvars.unset(demo_trainers.ENV_SEED, env)
    else:
        envvars.set_value(demo_trainers.ENV_SEED, seed, env)
    return env


def train_command(cfg: DemoConfig, method: str, device: str) -> List[str]:
    """The stock ``nnUNetv2_train`` command line of ``method``'s demo trainer (fold 0 of the one-fold split)."""
    return [console_script("nnUNetv2_train"), str(cfg.dataset_id), "3d_fullres", "0", "-tr", trainer_for(method),
            "-p", cfg.plans_identifier, "-device", device]


def train_method(cfg: DemoConfig, paths: Paths, env: Dict[str, str], method: str, device: str, log_path: str,
                 epochs: int, progress: bool, position: int = 1) -> Finished:
    """Train ``method`` from scratch (its model folder under ``env['nnUNet_results']`` is replaced), with an
    epoch progress bar (tqdm line ``position``) fed by nnU-Net's log lines."""
    results = env["nnUNet_results"]
    model_dir = os.path.join(results, cfg.dataset_name, f"{trainer_for(method)}__{cfg.plans_identifier}__3d_fullres")
    shutil.rmtree(model_dir, ignore_errors=True)
    epoch_bar = tqdm(total=epochs, desc=f"train {method}", unit="epoch", leave=False, disable=not progress,
                     position=position)

    def on_line(line):
        m = _EPOCH_RE.match(line.strip())
        if m:
            epoch_bar.n = int(m.group(1))
            epoch_bar.refresh()
    try:
        return run_logged(train_command(cfg, method, device), env, log_path, f"train/{method}", on_line)
    finally:
        epoch_bar.close()


def evaluate_method(paths: Paths, method: str) -> Dict:
    """MSSEG-II metrics of ``method``'s held-out predictions, written to ``metrics/``; returns the aggregate."""
    from nnunetv2_ohem.evaluation.api import evaluate_folders
    df, agg = evaluate_folders("msseg2", paths.test_labels, os.path.join(paths.predictions, method))
    os.makedirs(paths.metrics, exist_ok=True)
    agg = dict(agg, method=method, trainer=trainer_for(method), train_seconds=step_seconds(paths, f"train/{method}"))
    write_text_atomic(os.path.join(paths.metrics, f"{method}_cases.csv"), df.to_csv(index=False))
    write_text_atomic(os.path.join(paths.metrics, f"{method}.json"), json.dumps(agg, indent=1))
    return agg


@dataclass
class Step:
    """One row of the demo's step table: ``stage`` is its entry in :data:`STEP_ORDER` (for ``--until``)."""
    name: str
    stage: str
    settings: Dict
    upstream: Tuple[str, ...]
    run: Callable[[], Any]


def demo_steps(cfg: DemoConfig, paths: Paths, device: str) -> List[Step]:
    """The demo as a table of steps, in order."""
    env = nnunet_env(paths, device)
    phantom_cfg = _phantom_config(cfg)

    def make_phantoms():
        from nnunetv2_ohem.phantoms.mni import write_msseg2_phantoms
        write_msseg2_phantoms(paths.phantoms, n_subjects=cfg.n_train, seed=cfg.seed, config=phantom_cfg,
                              overwrite=True, progress=cfg.progress, n_test=cfg.n_test)

    def convert():
        from nnunetv2_ohem.dataset_conversion.msseg2 import convert_msseg2
        convert_msseg2(paths.phantoms, cfg.dataset_id, name="MSSEG2Phantom", raw_dir=paths.raw, overwrite=True,
                       num_processes=2)

    def plan():
        shutil.rmtree(os.path.join(paths.preprocessed, cfg.dataset_name), ignore_errors=True)
        cmd = [console_script("nnunetv2_ohem_plan"), "tiny", "-d", str(cfg.dataset_id), "-c", "3d_fullres",
               "-p", cfg.plans_identifier, "--features", *map(str, cfg.features), "--patch", str(cfg.patch),
               "--batch", str(cfg.batch), "-np", "2", "--fast_fingerprint"]  # the demo owns this folder
        run_logged(cmd, env, os.path.join(paths.logs, "plan.log"), "plan")
        write_single_split(os.path.join(paths.dataset_raw, "labelsTr"),
                           os.path.join(paths.preprocessed, cfg.dataset_name, "splits_final.json"))

    train_env = train_environment(cfg, paths, device)
    schedule = {"epochs": cfg.epochs, "iterations": cfg.iterations, "val_iterations": cfg.val_iterations,
                "device": device, "train_seed": cfg.train_seed,
                "cpu_threads": envvars.get_int(envvars.CPU_THREADS, environ=train_env)}
    predictor = HeldOutPredictor(device)
    jobs = train_jobs(cfg, device)

    def train(method):
        return train_method(cfg, paths, train_env, method, device, os.path.join(paths.logs, f"train_{method}.log"),
                            cfg.epochs, cfg.progress, position=1 + cfg.methods.index(method) % jobs)

    def predict(method):
        predictor.predict(os.path.dirname(paths.training_output(cfg, method)), paths.test_images,
                          os.path.join(paths.predictions, method), os.path.join(paths.logs, f"predict_{method}.log"),
                          progress=f"predict {method}" if cfg.progress else None)

    def report():
        from nnunetv2_ohem.demo.report import build_report
        seconds = sum(step_seconds(paths, s.name) or 0.0 for s in steps if s.stage != "report")
        build_report(paths.out, list(cfg.methods), {m: paths.training_output(cfg, m) for m in cfg.methods},
                     paths.test_images, paths.test_labels, paths.predictions, paths.metrics, paths.report,
                     run_info={"device": device, "machine": machine_description(device), **schedule,
                               "n_train": cfg.n_train, "n_test": cfg.n_test, "voxel_size_mm": cfg.voxel_size,
                               "new lesion volume mm³": list(cfg.lesion_volume),
                               "new lesions per case": list(cfg.new_lesions),
                               "new lesion contrast (× white matter)": list(cfg.lesion_contrast),
                               "phantom seed": cfg.seed,
                               **({"phantom options": cfg.phantom_options} if cfg.phantom_options else {}),
                               "U-Net features": list(cfg.features), "patch": cfg.patch, "batch": cfg.batch,
                               "wall seconds of the steps above (when they ran)": round(seconds, 1)})

    steps = [Step("phantoms", "phantoms", {"n_train": cfg.n_train, "n_test": cfg.n_test, "seed": cfg.seed,
                                           "config": asdict(phantom_cfg)}, (), make_phantoms),
             Step("convert", "convert", {"dataset_id": cfg.dataset_id}, ("phantoms",), convert),
             Step("plan", "plan", {"features": list(cfg.features), "patch": cfg.patch, "batch": cfg.batch},
                  ("convert",), plan)]
    steps += [Step(f"train/{m}", "train", schedule, ("plan",), functools.partial(train, m)) for m in cfg.methods]
    steps += [Step(f"predict/{m}", "predict", {"device": device, "tile_step_size": TILE_STEP_SIZE},
                   (f"train/{m}",), functools.partial(predict, m)) for m in cfg.methods]
    steps += [Step(f"evaluate/{m}", "evaluate", {}, (f"predict/{m}",), functools.partial(evaluate_method, paths, m))
              for m in cfg.methods]
    steps.append(Step("report", "report", {"methods": list(cfg.methods)},
                      tuple(f"evaluate/{m}" for m in cfg.methods), report))
    return steps


def run_steps(runner: StepRunner, steps: List[Step], jobs: int, bar) -> None:
    """Run independent ``steps`` (one stage of the table), ``jobs`` at a time. A failed step lets the others
    finish (they are reused by the next run) and is raised after them; Ctrl-C / SIGTERM stop them all."""
    if jobs <= 1:
        for s in steps:
            runner.run(s.name, s.settings, s.upstream, s.run)
            bar.update(1)
        return
    failures: List[BaseException] = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(runner.run, s.name, s.settings, s.upstream, s.run) for s in steps]
        try:
            for fut in as_completed(futures):
                try:
                    fut.result()
                except DemoError as err:
                    failures.append(err)
                bar.update(1)
        except BaseException:
            for f in futures:
                f.cancel()
            while not all(f.done() for f in futures):  # also a subprocess a thread started just now
                runtime.terminate_live_processes()
                time.sleep(0.1)
            raise
    if failures:
        raise failures[0]


def run_demo(cfg: DemoConfig) -> Dict:
    """Run (or resume) the whole demo (up to ``cfg.until``); returns ``{"out", "report", "steps", "seconds"}``."""
    t0 = time.time()
    paths = prepare_output(cfg)
    device = resolve_device(cfg.device)
    # nnunetv2 reads its folders at import time: set them before anything below imports it
    os.environ.update({k: v for k, v in nnunet_env(paths, device).items()
                       if k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    runner = StepRunner(paths, cfg.progress)
    last = STEP_ORDER.index(cfg.until) if cfg.until else len(STEP_ORDER) - 1
    steps = [s for s in demo_steps(cfg, paths, device) if STEP_ORDER.index(s.stage) <= last]
    jobs = train_jobs(cfg, device)
    with tqdm(total=len(steps), desc="demo", unit="step", disable=not cfg.progress, position=0) as bar:
        for stage, group in itertools.groupby(steps, key=lambda s: s.stage):
            run_steps(runner, list(group), jobs if stage == "train" else 1, bar)
    seconds = time.time() - t0
    entry = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)), "seconds": seconds,
             "config": asdict(cfg), "device": device, "machine": machine_description(device),
             "steps": runner.record}
    with open(paths.runs, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return {"out": paths.out, "report": os.path.join(paths.report, "report.html"), "steps": runner.record,
            "seconds": seconds}


__all__ = ["DemoConfig", "DemoError", "run_demo", "demo_steps", "KNOWN_METHODS", "trainer_for", "Paths",
           "train_command", "train_environment", "HeldOutPredictor"]
