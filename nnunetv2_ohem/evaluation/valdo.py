"""VALDO 2021 task 3 (lacunes) evaluation: DSC, absolute volume difference, detection F1 by centre of mass.

Metric set from the challenge's evaluation page (https://valdo.grand-challenge.org/Evaluation/, task 3:
DSC, absolute volume difference, detection F1; Sudre et al. 2022, arXiv:2208.07167). Detection rule, as
implemented here (see docs/evaluation.md for what is our reading):
  * lesions are connected components (default 26-connectivity) of the binary masks;
  * a predicted lesion is a true positive if its centre of mass (rounded to the nearest voxel) lies on a
    reference lesion, which is then "found"; a predicted lesion whose centre lies on background is a FP;
  * recall = #found reference lesions / #reference lesions, precision = #TP predicted / #predicted lesions,
    F1 = 2PR/(P+R). Precision (recall) is NaN without predicted (reference) lesions; F1 is NaN when both
    are empty (nothing to detect) and 0 when exactly one side has lesions.
AVD = |V_pred − V_ref| in mm³, and relative AVD = 100·|V_pred − V_ref| / V_ref (NaN when V_ref = 0).
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import pandas as pd

from nnunetv2_ohem.evaluation.distances import dice
from nnunetv2_ohem.evaluation.lesions import (centres_of_mass, check_same_shape, f1_from_counts, label_at_points,
                                              label_lesions, voxel_volume)

DEFAULTS = dict(connectivity=26)


def evaluate_valdo_arrays(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float],
                          connectivity: int = 26) -> Dict[str, float]:
    """One case's VALDO task-3 row from binary masks and the voxel spacing (mm)."""
    check_same_shape(ref, pred)
    vv = voxel_volume(spacing)
    ref_lab, n_ref = label_lesions(ref, connectivity)
    pred_lab, n_pred = label_lesions(pred, connectivity)
    hit = label_at_points(ref_lab, centres_of_mass(pred_lab, n_pred))  # reference label under each centre
    tp_pred = int(np.count_nonzero(hit))
    found = int(len(np.unique(hit[hit > 0])))
    precision = tp_pred / n_pred if n_pred else float("nan")
    recall = found / n_ref if n_ref else float("nan")
    if n_ref == 0 and n_pred == 0:
        f1 = float("nan")
    elif n_ref == 0 or n_pred == 0:
        f1 = 0.0
    else:
        f1 = f1_from_counts(precision, recall)
    v_ref, v_pred = np.count_nonzero(ref) * vv, np.count_nonzero(pred) * vv
    return {
        "dice": dice(ref, pred),
        "avd_mm3": float(abs(v_pred - v_ref)),
        "avd_percent": float(100.0 * abs(v_pred - v_ref) / v_ref) if v_ref > 0 else float("nan"),
        "ref_volume_mm3": float(v_ref),
        "pred_volume_mm3": float(v_pred),
        "n_ref_lesions": int(n_ref),
        "n_pred_lesions": int(n_pred),
        "abs_count_difference": int(abs(n_pred - n_ref)),
        "tp_lesions": tp_pred,
        "found_ref_lesions": found,
        "fp_lesions": int(n_pred - tp_pred),
        "fn_lesions": int(n_ref - found),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }


def aggregate_valdo(df: pd.DataFrame) -> Dict[str, object]:
    """Challenge-style summary: means over cases plus F1 from the lesion counts pooled over all cases."""
    tp, found = int(df["tp_lesions"].sum()), int(df["found_ref_lesions"].sum())
    n_pred, n_ref = int(df["n_pred_lesions"].sum()), int(df["n_ref_lesions"].sum())
    p = tp / n_pred if n_pred else float("nan")
    r = found / n_ref if n_ref else float("nan")
    return {"pooled_precision": p, "pooled_recall": r, "pooled_f1": f1_from_counts(p, r),
            "n_ref_lesions": n_ref, "n_pred_lesions": n_pred}
