"""The equal-wall-time budget of ``nnunetv2_ohem_compare``: per-epoch costs from nnU-Net's training logs and
the epochs that give each trainer the reference trainer's training time (pure functions)."""
from __future__ import annotations

import re
from typing import List, Sequence

import numpy as np

_EPOCH_TIME_RE = re.compile(r"Epoch time: ([0-9.eE+-]+) s")


def parse_epoch_times(log_text: str) -> List[float]:
    """Per-epoch training+validation seconds from nnU-Net's training log ("Epoch time: 2.81 s" lines)."""
    return [float(m.group(1)) for m in _EPOCH_TIME_RE.finditer(log_text)]


def equal_time_epochs(reference_runs: Sequence[Sequence[float]], method_runs: Sequence[Sequence[float]]) -> int:
    """Epochs that give a trainer the reference trainer's training wall time, from their equal-iteration runs.

    Per pair p (runs of the same fold and seed, same iterations per epoch) the trainer's relative cost is
    ``r_p = median(its epoch times) / median(reference epoch times)``; it gets ``round(E_ref / median_p r_p)``
    epochs (at least 1), ``E_ref`` = the reference runs' epoch count, i.e. the reference's wall time
    ``E_ref · c_ref`` divided by the trainer's cost per epoch ``c = r · c_ref``. Medians, within a run and over
    pairs, keep the estimate stable when other work on the machine slows some epochs or one pair of runs
    unevenly (the same epochs for every pair of a trainer).
    """
    if len(reference_runs) == 0 or len(reference_runs) != len(method_runs):
        raise ValueError("need one reference run per method run (paired by seed), at least one pair")
    ratios, epochs = [], []
    for ref, own in zip(reference_runs, method_runs):
        ref, own = np.asarray(ref, float), np.asarray(own, float)
        if ref.ndim != 1 or own.ndim != 1 or len(ref) == 0 or len(own) == 0:
            raise ValueError("epoch times must be non-empty 1-d sequences")
        if (ref <= 0).any() or (own <= 0).any() or not np.isfinite(ref).all() or not np.isfinite(own).all():
            raise ValueError("epoch times must be positive and finite")
        ratios.append(float(np.median(own)) / float(np.median(ref)))
        epochs.append(len(ref))
    return max(1, int(round(float(np.median(epochs)) / float(np.median(ratios)))))


__all__ = ["parse_epoch_times", "equal_time_epochs"]
