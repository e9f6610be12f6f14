"""Per-run metric columns of ``results.csv`` from ``nnunetv2_ohem.evaluation``'s per-case table.

Every family keeps its challenge's own aggregation and adds the lesion counts summed over the run's cases,
so that runs can be pooled later. ``lesion_f1_pooled`` is the detection F1 from those counts over ALL cases
of the run: lesion-free cases add their false-positive lesions to the precision's denominator instead of
producing a NaN F1, so a validation fold that holds only lesion-free cases still counts (it can only lower
precision). Pooling the counts of several runs (model selection) uses :func:`pooled_lesion_f1`.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Tuple

import numpy as np
import pandas as pd

FAMILIES = ("msseg2", "valdo", "brats", "segmentation")
#: summary columns (table, plot, paired differences), the first is the family's primary metric
SUMMARY_METRICS: Dict[str, Tuple[str, ...]] = {
    "msseg2": ("lesion_f1_pooled", "lesion_f1", "dice", "fp_lesions_lesion_free"),
    "valdo": ("lesion_f1_pooled", "f1", "dice", "avd_mm3"),
    "brats": ("mean_region_dice", "dice_WT", "dice_TC", "dice_ET"),
    "segmentation": ("mean_dice_fg", "mean_iou", "pixel_accuracy"),
}
#: columns where smaller is better (everything else: larger is better)
LOWER_IS_BETTER = {"fp_lesions_lesion_free", "fp_volume_mm3_lesion_free", "fp_lesions", "fn_lesions", "avd_mm3",
                   "avd_percent", "hd95_WT", "hd95_TC", "hd95_ET", "abs_count_difference"}
#: (true-positive predictions, predicted lesions, found reference lesions, reference lesions) per family
COUNT_COLUMNS = {"msseg2": ("tp_pred_lesions", "n_pred_lesions", "tp_ref_lesions", "n_ref_lesions"),
                 "valdo": ("tp_lesions", "n_pred_lesions", "found_ref_lesions", "n_ref_lesions")}


def _mean(s: pd.Series) -> float:
    x = pd.to_numeric(s, errors="coerce").to_numpy(float)
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else math.nan


def f1_from_counts(tp_pred: float, n_pred: float, tp_ref: float, n_ref: float) -> float:
    """Detection F1 = 2PR/(P+R), P = tp_pred/n_pred, R = tp_ref/n_ref. No reference lesion: NaN (nothing to
    detect, the false positives are reported separately); reference lesions but no prediction: 0."""
    if n_ref <= 0:
        return math.nan
    r = tp_ref / n_ref
    p = tp_pred / n_pred if n_pred > 0 else 0.0
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def pooled_lesion_f1(rows: pd.DataFrame, family: str) -> float:
    """:func:`f1_from_counts` of the count columns summed over ``rows`` (runs or cases)."""
    cols = COUNT_COLUMNS[family]
    return f1_from_counts(*(float(pd.to_numeric(rows[c]).sum()) for c in cols))


def run_metrics(family: str, cases: pd.DataFrame, agg: Mapping) -> Dict[str, float]:
    """The metric columns of one run from ``evaluate_folders(family, ...)``'s ``(df, agg)``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown metric family {family!r}; choose from {FAMILIES}")
    out: Dict[str, float] = {"n_cases": int(len(cases))}
    if family == "msseg2":
        free = cases["lesion_free"].astype(bool)
        les, lf = cases[~free], cases[free]
        out.update(n_cases_with_lesions=int(len(les)), n_lesion_free=int(len(lf)))
        for c in ("lesion_f1", "dice", "lesion_sensitivity", "lesion_ppv"):
            out[c] = _mean(les[c])
        out["fp_lesions_lesion_free"] = _mean(lf["fp_lesions"])
        out["fp_volume_mm3_lesion_free"] = _mean(lf["fp_volume_mm3"])
        out["dice_all_cases"] = _mean(cases["dice"])
    elif family == "valdo":
        out.update(n_cases_with_lesions=int((cases["n_ref_lesions"] > 0).sum()),
                   n_lesion_free=int((cases["n_ref_lesions"] == 0).sum()))
        for c in ("f1", "precision", "recall", "dice", "avd_mm3", "avd_percent"):
            out[c] = _mean(cases[c])
        out["fp_lesions_lesion_free"] = _mean(cases.loc[cases["n_ref_lesions"] == 0, "fp_lesions"])
    elif family == "brats":
        regions = ("WT", "TC", "ET")
        for r in regions:
            out[f"dice_{r}"] = _mean(cases[f"dice_{r}"])
            out[f"hd95_{r}"] = _mean(cases[f"hd95_{r}"])
        out["mean_region_dice"] = _mean(pd.Series([out[f"dice_{r}"] for r in regions]))
        for c in [c for c in cases.columns if c.startswith("lw_dice_")]:
            out[c] = _mean(cases[c])
    else:
        pooled = agg["challenge"]["pooled"]
        dice = [math.nan if v is None else float(v) for v in pooled["dice"]]
        iou = [math.nan if v is None else float(v) for v in pooled["iou"]]
        out["mean_dice_fg"] = _mean(pd.Series(dice[1:]))
        out["mean_iou_fg"] = _mean(pd.Series(iou[1:]))
        for c in ("pixel_accuracy", "mean_pixel_accuracy", "mean_iou", "fw_iou"):
            out[c] = math.nan if pooled[c] is None else float(pooled[c])
    if family in COUNT_COLUMNS:
        for c in set(COUNT_COLUMNS[family]) | {"fp_lesions", "fn_lesions"}:
            out[c] = int(pd.to_numeric(cases[c]).sum())
        out["lesion_f1_pooled"] = pooled_lesion_f1(cases, family)
    return out


def default_selection_metric(family: str) -> str:
    """Lesion F1 (pooled counts) for msseg2/valdo, mean region Dice for brats, foreground Dice otherwise."""
    return {"msseg2": "lesion_f1_pooled", "valdo": "lesion_f1_pooled", "brats": "mean_region_dice",
            "segmentation": "mean_dice_fg"}[family]
