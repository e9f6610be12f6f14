"""Process helpers shared by the demo and the compare engine: console scripts, logged nnU-Net subprocesses,
the machine's description, training seeds and CPU threads, and nnU-Net's predictor kept in the calling
process.

They live here, not in the demo, so that the compare engine does not import the demo (the demo's study is a
user of compare). Import-light: torch and nnU-Net are imported only inside the functions that need them.
"""
import contextlib
import functools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, TextIO


def console_script(name: str) -> str:
    """The console script ``name`` next to this interpreter (a virtual environment's ``bin``), else ``name``
    for a PATH lookup: a subprocess then runs the nnU-Net of the environment that runs us."""
    exe = os.path.join(os.path.dirname(sys.executable), name)
    return exe if os.path.exists(exe) else name


class Finished(NamedTuple):
    """How a subprocess ended: its exit code and the CPU seconds (user + system) it and its children used."""
    code: int
    cpu_seconds: float


_LIVE: set = set()
_LIVE_LOCK = threading.Lock()


def run_logged(cmd: Sequence[str], env: Dict[str, str], log_path: str,
               on_line: Optional[Callable[[str], None]] = None) -> Finished:
    """Run ``cmd`` with its output in ``log_path`` (first line: the command), calling ``on_line`` per output
    line (progress bars). Safe to call from several threads at once: the CPU seconds are this child's own
    (``os.wait4``), not the whole process's, and :func:`terminate_live_processes` stops every running one. If
    the caller is interrupted (Ctrl-C, SIGTERM turned into an exception), the child is stopped too."""
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", stdin=subprocess.DEVNULL, bufsize=1)
        with _LIVE_LOCK:
            _LIVE.add(proc)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()  # users tail the log while nnU-Net runs
                if on_line is not None:
                    on_line(line)
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except ChildProcessError:  # reaped elsewhere (a stray Popen.poll): the code is known, the CPU not
                proc.wait()
                return Finished(proc.returncode, float("nan"))
            proc.returncode = os.waitstatus_to_exitcode(status)
            return Finished(proc.returncode, usage.ru_utime + usage.ru_stime)
        finally:
            if proc.returncode is None and proc.poll() is None:  # interrupted: never leave nnU-Net running
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            with _LIVE_LOCK:
                _LIVE.discard(proc)


def terminate_live_processes(timeout: float = 30.0) -> None:
    """Terminate the subprocesses :func:`run_logged` is running for any thread (after Ctrl-C / SIGTERM) and
    wait until their threads have seen them end (killed after ``timeout`` s). The signal goes by ``os.kill``:
    ``Popen.terminate`` polls first, which could reap the child before its own thread reads its CPU time."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with _LIVE_LOCK:
                if not _LIVE.intersection(procs):
                    return
            time.sleep(0.05)


def last_lines(log_path: str, n: int) -> List[str]:
    """The last ``n`` non-empty lines of a log (error messages quote them)."""
    with open(log_path, errors="replace") as f:
        return [ln.rstrip() for ln in f.read().splitlines() if ln.strip()][-n:]


def usable_cores() -> int:
    """CPU cores this process may run on (a SLURM or cgroup CPU set, else all of them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def apply_cpu_threads(device) -> Optional[int]:
    """Give torch the thread count of ``nnUNet_ohem_cpu_threads`` when training on a CPU; returns it (None:
    unset, or not a CPU).

    nnU-Net's ``nnUNetv2_train -device cpu`` sets ``torch.set_num_threads(cpu_count())`` before it builds the
    trainer, which overrides ``OMP_NUM_THREADS``, so trainings started side by side would each use every core
    and fight for them. Called from a trainer's ``__init__``, after that. A fixed count also takes the core
    count out of what a seeded run's float reductions depend on (the CPU type still matters)."""
    from nnunetv2_ohem import envvars
    threads = envvars.get_int(envvars.CPU_THREADS, positive=True)
    if threads is None or str(device).split(":")[0] != "cpu":
        return None
    import torch
    torch.set_num_threads(threads)
    return threads


def machine_description(device: str) -> str:
    """What reports name as the machine: CPU cores and architecture, plus the GPU model on CUDA."""
    import platform
    cpu = f"{os.cpu_count()}-core {platform.machine()} CPU"
    if device == "cuda":
        import torch
        return f"{torch.cuda.get_device_name(0)} ({cpu})"
    return f"{cpu}, no GPU" if device == "cpu" else f"{device} ({cpu})"


def seed_everything(seed: int) -> None:
    """Seed the global generators nnU-Net's training draws from (network init, data loading, augmentation)."""
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------- stdout of one thread

class _PerThreadStdout:
    """``sys.stdout`` stand-in that sends each thread's writes to the file that thread chose, others to the
    stream it replaced. ``contextlib.redirect_stdout`` swaps the one process-wide stream, so two threads
    predicting at once (compare ``--jobs``) would write into each other's logs and restore a closed file."""

    def __init__(self, default: TextIO):
        self.default = default
        self.local = threading.local()

    def _target(self) -> TextIO:
        return getattr(self.local, "file", None) or self.default

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def __getattr__(self, name):
        return getattr(self._target(), name)


_STDOUT_LOCK = threading.Lock()
_STDOUT_USERS = [0]


@contextlib.contextmanager
def thread_stdout_to(file: TextIO) -> Iterator[None]:
    """Send what this thread prints to ``file`` while the block runs (other threads are not affected)."""
    with _STDOUT_LOCK:
        if not isinstance(sys.stdout, _PerThreadStdout):
            sys.stdout = _PerThreadStdout(sys.stdout)
        proxy = sys.stdout
        _STDOUT_USERS[0] += 1
    previous = getattr(proxy.local, "file", None)
    proxy.local.file = file
    try:
        yield
    finally:
        proxy.local.file = previous
        with _STDOUT_LOCK:
            _STDOUT_USERS[0] -= 1
            if _STDOUT_USERS[0] == 0 and sys.stdout is proxy:  # the last user puts the real stream back
                sys.stdout = proxy.default


# ------------------------------------------------------------------------------------------ prediction

#: sliding-window stride as a fraction of the patch used by the demo: 0.75 (stride 24 for patch 32) as in the
#: OHEM-EMA paper, 2-3x fewer tiles than nnU-Net's default 0.5
TILE_STEP_SIZE = 0.75


@functools.lru_cache(maxsize=1)
def paired_tile_predictor_class():
    """``nnUNetPredictor`` that runs each sliding-window tile as a batch of two identical copies on a CPU.

    nnU-Net predicts one tile at a time. On CPUs, PyTorch's oneDNN 3-d convolutions are pathologically slow
    for a batch of one: a U-Net 8/16/32 takes 67 ms for one 32³ tile but 21 ms for a batch of two (idle 2-core
    x86_64; 170-470 ms vs 19-28 ms on the same machine under load; ``benchmarks/predict_tiles.py``). Instance
    normalisation works per sample, so the first
    copy's logits equal the single tile's (up to float rounding)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class PairedTilePredictor(nnUNetPredictor):
        def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] == 1 and self.device.type == "cpu":
                return super()._internal_maybe_mirror_and_predict(torch.cat([x, x]))[:1]
            return super()._internal_maybe_mirror_and_predict(x)

    return PairedTilePredictor


class HeldOutPredictor:
    """nnU-Net's own predictor (``nnUNetPredictor``, the class ``nnUNetv2_predict`` runs) kept in this process:
    one torch/nnU-Net start-up instead of one per model, and no preprocessing/export worker processes (on a
    small CPU their start-up costs more than predicting a few small cases). Tiles are paired on a CPU
    (:func:`paired_tile_predictor_class`). The defaults are the demo's: ``nnUNetv2_predict --disable_tta
    -step_size 0.75 -chk checkpoint_final.pth -f 0``."""

    def __init__(self, device: str, tile_step_size: float = TILE_STEP_SIZE, use_mirroring: bool = False):
        self.device = device
        self.tile_step_size = tile_step_size
        self.use_mirroring = use_mirroring
        self._predictor = None

    def predict(self, model_dir: str, images: str, out_dir: str, log_path: str, fold: int = 0,
                checkpoint: str = "checkpoint_final.pth", command: Optional[str] = None,
                trainer_class: Optional[type] = None, progress: Optional[str] = None, position: int = 1) -> None:
        """Predict every case of ``images`` into ``out_dir`` (replaced) with fold ``fold`` of ``model_dir``;
        nnU-Net's messages go to ``log_path``, headed by ``command`` (the equivalent command line) or the
        API call. ``trainer_class``: the checkpoint's trainer, already found; without it nnU-Net looks it up
        by name, which is not thread-safe (it walks and cleans ``sys.modules``: two threads looking up at
        once fail with "dictionary changed size during iteration")."""
        import torch
        if self._predictor is None:
            self._predictor = paired_tile_predictor_class()(
                tile_step_size=self.tile_step_size, use_gaussian=True, use_mirroring=self.use_mirroring,
                perform_everything_on_device=self.device == "cuda", device=torch.device(self.device),
                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
        with open(log_path, "w") as log, thread_stdout_to(log):
            print(command or (
                f"nnUNetPredictor(tile_step_size={self.tile_step_size}, use_mirroring={self.use_mirroring}, "
                f"device={self.device}).initialize_from_trained_model_folder({model_dir!r}, use_folds=({fold},), "
                f"checkpoint_name={checkpoint!r}).predict_from_files_sequential({images!r}, {out_dir!r})"),
                flush=True)
            if trainer_class is None:
                self._predictor.initialize_from_trained_model_folder(model_dir, use_folds=(fold,),
                                                                     checkpoint_name=checkpoint)
            else:
                _initialize_with_trainer(self._predictor, model_dir, fold, checkpoint, trainer_class)
            if progress is None:
                self._predictor.predict_from_files_sequential(images, out_dir, save_probabilities=False,
                                                              overwrite=True)
                return
            from tqdm import tqdm  # one case at a time, so that a bar can show the remaining time
            cases = cases_of(images, self._predictor.dataset_json["file_ending"])
            for case, files in tqdm(cases.items(), desc=progress, unit="case", leave=False, position=position):
                self._predictor.predict_from_files_sequential([files], [os.path.join(out_dir, case)],
                                                              save_probabilities=False, overwrite=True)


def cases_of(folder: str, file_ending: str) -> Dict[str, List[str]]:
    """nnU-Net's raw image folder as ``{case: [its channel files, in channel order]}`` (``<case>_XXXX<ending>``),
    sorted by case; without the worker pool of nnU-Net's ``create_lists_from_splitted_dataset_folder``."""
    import re
    pattern = re.compile(r"^(.+)_\d{4}" + re.escape(file_ending) + "$")
    cases: Dict[str, List[str]] = {}
    for name in sorted(os.listdir(folder)):
        m = pattern.match(name)
        if m:
            cases.setdefault(m.group(1), []).append(os.path.join(folder, name))
    return dict(sorted(cases.items()))


def _initialize_with_trainer(predictor, model_dir: str, fold: int, checkpoint: str, trainer_class: type) -> None:
    """What ``nnUNetPredictor.initialize_from_trained_model_folder`` does for one fold, with the trainer class
    given instead of looked up by name."""
    import inspect

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    dataset_json = load_json(os.path.join(model_dir, "dataset.json"))
    plans = PlansManager(load_json(os.path.join(model_dir, "plans.json")))
    ckpt = torch.load(os.path.join(model_dir, f"fold_{fold}", checkpoint), map_location=torch.device("cpu"),
                      weights_only=False)
    cm = plans.get_configuration(ckpt["init_args"]["configuration"])
    n_in = determine_num_input_channels(plans, cm, dataset_json)
    n_out = plans.get_label_manager(dataset_json).num_segmentation_heads
    if "plans_manager" in inspect.signature(trainer_class.build_network_architecture).parameters:
        network = trainer_class.build_network_architecture(plans, cm, n_in, n_out, enable_deep_supervision=False)
    else:  # the signature of nnU-Net before 2.6, still accepted by its predictor
        network = trainer_class.build_network_architecture(
            cm.network_arch_class_name, cm.network_arch_init_kwargs, cm.network_arch_init_kwargs_req_import,
            n_in, n_out, enable_deep_supervision=False)
    network.load_state_dict(ckpt["network_weights"])
    predictor.manual_initialization(network, plans, cm, [ckpt["network_weights"]], dataset_json,
                                    ckpt["trainer_name"], ckpt.get("inference_allowed_mirroring_axes"))


__all__ = ["console_script", "machine_description", "seed_everything", "thread_stdout_to", "TILE_STEP_SIZE",
           "paired_tile_predictor_class", "HeldOutPredictor"]
