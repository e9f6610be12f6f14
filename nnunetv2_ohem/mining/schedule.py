"""When to mine: a warm-up of plain batches, an optional end of mining (pure step arithmetic).

Composer's selective backprop (MosaicML, after Jiang et al., "Accelerating deep learning by focusing on the
biggest losers", arXiv 2019) selects only between 50 % and 90 % of training; Katharopoulos & Fleuret,
"Not all samples are created equal" (ICML 2018) switch importance sampling on only once it pays. With a
net that predicts nothing every patch scores about the same, so mining a cold net buys nothing.
"""
from typing import Tuple


def mining_window(total_steps: int, warmup_fraction: float, end_fraction: float) -> Tuple[int, int]:
    """Optimiser steps ``[start, end)`` (0-based) that mine: ``start = round(warmup·T)``,
    ``end = round(end·T)`` for ``T = total_steps``. Steps outside are plain nnU-Net steps."""
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    if not 0.0 <= warmup_fraction <= end_fraction <= 1.0:
        raise ValueError(f"need 0 <= warmup_fraction ({warmup_fraction}) <= end_fraction ({end_fraction}) <= 1")
    return int(round(warmup_fraction * total_steps)), int(round(end_fraction * total_steps))


def is_mining_step(step: int, window: Tuple[int, int]) -> bool:
    """Does 0-based optimiser step ``step`` mine? ``start <= step < end``."""
    return window[0] <= step < window[1]
