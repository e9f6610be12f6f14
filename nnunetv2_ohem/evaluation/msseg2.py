"""MSSEG-II (MICCAI 2021, new MS lesions) evaluation, as in animaSegPerfAnalyzer.

Per case (Commowick et al. 2018, Sci. Rep. 8:13650; Commowick et al. 2021, MSSEG-2 proceedings):
  * voxel Dice on the raw binary masks;
  * lesions = connected components (6-connectivity = ITK's default ``FullyConnected=false``) larger than
    3 mm³ (``floor(3 / voxel volume) + 1`` voxels); smaller components are background for the lesion metrics;
  * lesion sensitivity SensL = #detected reference lesions / #reference lesions and lesion precision
    PPVL = #detected predicted lesions / #predicted lesions, both with the alpha/beta/gamma rule of
    :func:`nnunetv2_ohem.evaluation.lesions.anima_detected` (reference vs. prediction, then transposed);
    F1 = 2·PPVL·SensL / (PPVL + SensL);
  * on lesion-free cases (no reference lesion after the size filter): the number of predicted lesions
    (all false positives) and their volume in mm³.
The challenge reports Dice/F1 over cases with lesions and FP count/volume over lesion-free cases
separately: :func:`aggregate_msseg2` does that.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import pandas as pd

from nnunetv2_ohem.evaluation.distances import dice
from nnunetv2_ohem.evaluation.lesions import (anima_detected, check_same_shape, f1_from_counts, label_lesions,
                                              lesion_sizes, min_lesion_voxels, overlap_pairs, voxel_volume)

DEFAULTS = dict(alpha=0.10, beta=0.70, gamma=0.65, min_volume_mm3=3.0, connectivity=6, anima_loop_bound=False)


def evaluate_msseg2_arrays(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], alpha: float = 0.10,
                           beta: float = 0.70, gamma: float = 0.65, min_volume_mm3: float = 3.0,
                           connectivity: int = 6, anima_loop_bound: bool = False) -> Dict[str, float]:
    """One case's MSSEG-II row from binary masks and the voxel spacing (mm)."""
    check_same_shape(ref, pred)
    vv = voxel_volume(spacing)
    min_vox = min_lesion_voxels(min_volume_mm3, vv)
    ref_lab, n_ref = label_lesions(ref, connectivity, min_vox)
    pred_lab, n_pred = label_lesions(pred, connectivity, min_vox)
    pairs = overlap_pairs(ref_lab, n_ref, pred_lab, n_pred)
    kw = dict(alpha=alpha, beta=beta, gamma=gamma, anima_loop_bound=anima_loop_bound)
    ref_detected = anima_detected(pairs, **kw)
    pred_detected = anima_detected(pairs.transposed(), **kw)
    tp_ref, tp_pred = int(ref_detected.sum()), int(pred_detected.sum())
    pred_sizes = lesion_sizes(pred_lab, n_pred)[1:]
    fp_volume = float(pred_sizes[~pred_detected].sum() * vv)
    if n_ref == 0:
        sens = ppv = f1 = float("nan")
    else:
        sens = tp_ref / n_ref
        # Anima divides 0/0 here (NaN); a case with lesions and no predicted lesion is a complete miss: 0.
        ppv = tp_pred / n_pred if n_pred > 0 else 0.0
        f1 = f1_from_counts(ppv, sens)
    return {
        "dice": dice(ref, pred),
        "lesion_free": bool(n_ref == 0),
        "n_ref_lesions": int(n_ref),
        "n_pred_lesions": int(n_pred),
        "tp_ref_lesions": tp_ref,
        "tp_pred_lesions": tp_pred,
        "fn_lesions": int(n_ref - tp_ref),
        "fp_lesions": int(n_pred - tp_pred),
        "lesion_sensitivity": sens,
        "lesion_ppv": ppv,
        "lesion_f1": f1,
        "fp_volume_mm3": fp_volume,
        "ref_volume_mm3": float(np.count_nonzero(ref) * vv),
        "pred_volume_mm3": float(np.count_nonzero(pred) * vv),
    }


def _stats(s: pd.Series) -> Dict[str, float]:
    s = pd.to_numeric(s, errors="coerce").dropna()
    if s.empty:
        return {"mean": None, "median": None, "std": None, "n": 0}
    return {"mean": float(s.mean()), "median": float(s.median()), "std": float(s.std(ddof=0)), "n": int(len(s))}


def aggregate_msseg2(df: pd.DataFrame) -> Dict[str, Dict]:
    """Challenge aggregation: Dice / lesion F1 over cases with lesions; FP lesions / volume over lesion-free."""
    with_l = df[~df["lesion_free"].astype(bool)]
    free = df[df["lesion_free"].astype(bool)]
    return {
        "cases_with_lesions": {
            "n_cases": int(len(with_l)),
            **{k: _stats(with_l[k]) for k in ("dice", "lesion_f1", "lesion_sensitivity", "lesion_ppv")},
        },
        "lesion_free_cases": {
            "n_cases": int(len(free)),
            "fp_lesions": {**_stats(free["fp_lesions"]), "total": int(free["fp_lesions"].sum())},
            "fp_volume_mm3": {**_stats(free["fp_volume_mm3"]), "total": float(free["fp_volume_mm3"].sum())},
        },
    }
