"""Run nnU-Net trainers through their own DDP code path in a CPU gloo process group (test helper).

nnU-Net 2.8.1's ``-num_gpus`` path (``run_training`` → ``mp.spawn`` → ``init_process_group('nccl')``) needs one
CUDA device per rank. Everything the trainer does under DDP reads ``dist.is_initialized()``: per-rank batch
size and foreground oversampling (``_set_batch_size_and_oversample``), SyncBatchNorm conversion + the
``DistributedDataParallel`` wrapper, ``ddp=True`` in the Dice loss (all-gathered statistics), all-gathered
training losses and validation tp/fp/fn, rank-0-only checkpoints and logs, barriers. Only two lines hard-code
CUDA, and :func:`nnunet_ddp_on_cpu` patches exactly those (nothing else):

1. ``nnUNetTrainer.__init__`` sets ``self.device = cuda:<local_rank>`` whenever DDP is initialised (and then
   builds a CUDA GradScaler). The patch keeps the device the caller passed when it is the CPU
   (``self.device = cpu``, ``self.grad_scaler = None``, as nnU-Net sets them for a CPU run).
2. ``initialize`` wraps with ``DDP(network, device_ids=[local_rank])``; torch rejects ``device_ids`` for a
   CPU module, so the patch drops them for CPU modules.

:func:`run_ddp` starts ``world_size`` processes (fork by default: the test process has nnU-Net imported
already, and spawn would re-import it, ~10 s per rank on 2 cores), joins a gloo group through a file store,
seeds each rank's RNGs differently (as nnU-Net's spawned ranks start from fresh, different RNG states, so
each rank draws different patches and initialises different weights before DDP broadcasts rank 0's), runs
``worker(rank, world_size, *args)`` and returns each rank's (picklable) return value, rank order.
"""
import contextlib
import functools
import os
import random
import tempfile
import traceback
from typing import Any, Callable, List, Sequence

import numpy as np
import torch


@contextlib.contextmanager
def nnunet_ddp_on_cpu():
    """Patch the two CUDA-only lines of nnU-Net's DDP path (see the module docstring); undone on exit."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    cls = trainer_module.nnUNetTrainer
    original_init, original_ddp = cls.__init__, trainer_module.DDP

    @functools.wraps(original_init)  # keeps the signature nnU-Net inspects for my_init_kwargs
    def init(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        original_init(self, plans, configuration, fold, dataset_json, device)
        if torch.device(device).type == "cpu":
            self.device = torch.device("cpu")
            self.grad_scaler = None
            self.my_init_kwargs["device"] = self.device

    def ddp(module, device_ids=None, **kwargs):
        on_cpu = all(p.device.type == "cpu" for p in module.parameters())
        return original_ddp(module, device_ids=None if on_cpu else device_ids, **kwargs)

    cls.__init__, trainer_module.DDP = init, ddp
    try:
        yield
    finally:
        cls.__init__, trainer_module.DDP = original_init, original_ddp


def _entry(rank: int, world_size: int, init_file: str, out_dir: str, worker: Callable, args: Sequence,
           seed: int) -> None:
    import torch.distributed as dist
    # first of all: a forked child must not enter the parent's OpenMP pool (libgomp is not fork-safe); one
    # thread per rank also keeps world_size ranks from oversubscribing the cores
    torch.set_num_threads(1)
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        with nnunet_ddp_on_cpu():
            result = {"ok": True, "value": worker(rank, world_size, *args)}
    except BaseException:  # reported by the parent with the traceback
        result = {"ok": False, "error": traceback.format_exc()}
        torch.save(result, path)
        raise
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    torch.save(result, path)


def run_ddp(worker: Callable[..., Any], world_size: int = 2, args: Sequence = (), start_method: str = "fork",
            seed: int = 1234) -> List[Any]:
    """Run ``worker(rank, world_size, *args)`` in a ``world_size``-process gloo group; return the per-rank
    results. A failing rank raises ``AssertionError`` with that rank's traceback."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory(prefix="ddp_") as tmp:
        init_file = os.path.join(tmp, "init")
        try:
            mp.start_processes(_entry, args=(world_size, init_file, tmp, worker, tuple(args), seed),
                               nprocs=world_size, join=True, start_method=start_method)
        except Exception as exc:  # ProcessRaisedException / ProcessExitedException
            errors = []
            for r in range(world_size):
                p = os.path.join(tmp, f"rank{r}.pt")
                if os.path.exists(p):
                    res = torch.load(p, weights_only=False)
                    if not res["ok"]:
                        errors.append(f"--- rank {r} ---\n{res['error']}")
            raise AssertionError("DDP worker failed:\n" + ("\n".join(errors) or str(exc))) from exc
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)["value"]
                for r in range(world_size)]


def flat_state(module: torch.nn.Module) -> torch.Tensor:
    """All parameters and floating buffers of a module (DDP/compile wrappers removed) as one float64 vector."""
    from nnunetv2_ohem.mining import unwrap_model
    sd = unwrap_model(module).state_dict()
    return torch.cat([v.detach().double().flatten().cpu() for k, v in sorted(sd.items())
                      if v.is_floating_point()])
