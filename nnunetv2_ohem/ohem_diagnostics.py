"""The OHEM trainers' per-epoch diagnostics: one contract for the writer (the trainer) and the readers (the
demo's report and study).

``fold_X/ohem_diagnostics.json`` holds one list per key of :data:`LOG_KEYS` (one value per epoch, ``None``
where the value was not finite, e.g. epochs without mining), ``"epoch"`` and the trainer's settings;
``fold_X/ohem_progress.png`` plots it next to nnU-Net's ``progress.png``. Torch-free (numpy, matplotlib).
"""
import json
import os
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from nnunetv2_ohem.atomic import atomic_path, write_text_atomic

DIAGNOSTICS_FILE = "ohem_diagnostics.json"
PROGRESS_PLOT = "ohem_progress.png"

#: mean ranking error of all B̄ candidates / of the B selected ones
ERROR_CANDIDATES = "ohem_error_candidates"
ERROR_SELECTED = "ohem_error_selected"
#: share of patches with foreground among the candidates / the selected ones
FG_FRACTION_CANDIDATES = "ohem_fg_fraction_candidates"
FG_FRACTION_SELECTED = "ohem_fg_fraction_selected"
#: mean |p_miner - p_online| (0 for OHEM with mu = 0)
MINER_ONLINE_DISAGREEMENT = "ohem_miner_online_disagreement"
#: share of the epoch's steps that mined / recall of the reduced-cost selection against exact scoring
MINING_FRACTION = "ohem_mining_fraction"
SELECTION_RECALL = "ohem_selection_recall"

#: per-epoch diagnostics, registered in nnU-Net's logger (one value per epoch each); the first four are the
#: selection statistics a training step computes together
LOG_KEYS = (ERROR_CANDIDATES, ERROR_SELECTED, FG_FRACTION_CANDIDATES, FG_FRACTION_SELECTED,
            MINER_ONLINE_DISAGREEMENT, MINING_FRACTION, SELECTION_RECALL)


def diagnostics_from_log(logged: Mapping[str, Sequence[float]], **extra) -> dict:
    """The file's content from nnU-Net's logger lists: the epochs every key has, non-finite values as None,
    ``"epoch"`` and ``extra`` (trainer name and settings)."""
    n = min(len(logged[k]) for k in LOG_KEYS)
    diag = {k: [None if not np.isfinite(v) else float(v) for v in logged[k][:n]] for k in LOG_KEYS}
    diag.update({"epoch": list(range(n)), **extra})
    return diag


def write_diagnostics(folder: str, diag: dict) -> None:
    """:data:`DIAGNOSTICS_FILE` and :data:`PROGRESS_PLOT` in ``folder``, each written to a temp name and renamed."""
    write_text_atomic(os.path.join(folder, DIAGNOSTICS_FILE), json.dumps(diag, indent=1))
    plot_ohem_diagnostics(diag, os.path.join(folder, PROGRESS_PLOT))


def read_diagnostics(folder: str) -> Optional[Dict]:
    """The diagnostics a training output folder (``fold_X``) holds, None if it has none."""
    path = os.path.join(folder, DIAGNOSTICS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def as_array(diag: Mapping, key: str) -> np.ndarray:
    """One key's values as floats, None as NaN (an absent key gives an empty array)."""
    return np.array([np.nan if v is None else v for v in diag.get(key, [])], dtype=float)


def plot_ohem_diagnostics(diag: dict, path: str) -> None:
    """Two panels: mean ranking error of selected vs all candidates, and foreground fraction of selected vs
    candidates (with miner–online disagreement on a twin axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.asarray(diag["epoch"])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    ax1.plot(epochs, as_array(diag, ERROR_CANDIDATES), "b-", label="all candidates")
    ax1.plot(epochs, as_array(diag, ERROR_SELECTED), "r-", label="selected (top-B)")
    ax1.set_ylabel(f"ranking error ({diag.get('ranking_error', '')})")
    ax1.legend(loc="upper right")
    ax2.plot(epochs, as_array(diag, FG_FRACTION_CANDIDATES), "b--", label="fg fraction, candidates")
    ax2.plot(epochs, as_array(diag, FG_FRACTION_SELECTED), "r--", label="fg fraction, selected")
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_ylabel("fraction of patches with foreground")
    ax2.set_xlabel("epoch")
    ax3 = ax2.twinx()
    ax3.plot(epochs, as_array(diag, MINER_ONLINE_DISAGREEMENT), "g-", label="miner-online disagreement")
    ax3.set_ylabel("mean |p_miner - p_online|")
    lines = ax2.get_legend_handles_labels(), ax3.get_legend_handles_labels()
    ax2.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], loc="upper right")
    fig.suptitle(f"{diag.get('trainer', 'OHEM')}: k={diag.get('candidate_factor')}, "
                 f"mu={diag.get('ema_momentum')}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
