"""Semantic segmentation metrics from one confusion matrix (2D or 3D label maps).

Formulas as on the slides ``deeplab-heart-mri-slides.txt`` ("Quantitative evaluation of Segmentation",
eqs. 1-6, after Long et al. / Garcia-Garcia et al.), with k+1 classes and p_ij = number of voxels of
class i (reference) predicted as class j:

    PA    = Σ_i p_ii / Σ_i Σ_j p_ij                                        (1)
    MPA   = 1/(k+1) Σ_i p_ii / Σ_j p_ij                                    (2)
    IoU_i = p_ii / (Σ_j p_ij + Σ_j p_ji − p_ii)                            (3)
    MIoU  = 1/(k+1) Σ_i IoU_i                                              (4)
    FWIoU = 1/Σ_ij p_ij · Σ_i (Σ_j p_ij) · IoU_i                           (5)
    Dice_i = 2 p_ii / (Σ_j p_ij + Σ_j p_ji) = 2TP / (2TP + FP + FN)        (6)

A class absent from both reference and prediction has IoU and Dice 0/0 = NaN, and a class absent from the
reference has no pixel accuracy: such classes are left out of the means (nan-mean), which is the only
reading of (2) and (4) that does not reward or punish a class that is not there. FWIoU weights them by 0.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from nnunetv2_ohem.evaluation.lesions import EvaluationError, check_same_shape


def confusion_matrix(ref: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 matrix C[i, j] = #voxels with reference i and prediction j (one bincount)."""
    check_same_shape(ref, pred)
    r = np.asarray(ref).ravel().astype(np.int64)
    p = np.asarray(pred).ravel().astype(np.int64)
    for name, a in (("reference", r), ("prediction", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise EvaluationError(f"{name} has labels outside 0..{num_classes - 1} "
                                  f"(found {int(a.min())}..{int(a.max())})")
    return np.bincount(r * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: np.ndarray) -> Dict[str, object]:
    """PA, MPA, per-class IoU, MIoU, FWIoU and per-class Dice (eqs. 1-6 above) from a confusion matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise EvaluationError(f"confusion matrix must be square, got shape {cm.shape}")
    total = cm.sum()
    tp = np.diag(cm)
    ref_count = cm.sum(axis=1)
    pred_count = cm.sum(axis=0)
    union = ref_count + pred_count - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        class_acc = np.where(ref_count > 0, tp / ref_count, np.nan)
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(ref_count + pred_count > 0, 2 * tp / (ref_count + pred_count), np.nan)
        pa = tp.sum() / total if total > 0 else np.nan
        freq = ref_count / total if total > 0 else np.full_like(ref_count, np.nan)
    fwiou = float(np.nansum(freq * np.nan_to_num(iou))) if total > 0 else float("nan")
    return {
        "pixel_accuracy": float(pa),
        "mean_pixel_accuracy": _nanmean(class_acc),
        "iou": iou.tolist(),
        "mean_iou": _nanmean(iou),
        "fw_iou": fwiou,
        "dice": dice.tolist(),
        "class_accuracy": class_acc.tolist(),
    }


def _nanmean(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmean(a)) if np.any(~np.isnan(a)) else float("nan")


def evaluate_segmentation_arrays(ref: np.ndarray, pred: np.ndarray, num_classes: Optional[int] = None) -> Dict:
    """Per-case row: scalar metrics plus ``iou_<c>`` / ``dice_<c>`` per class and the confusion matrix."""
    if num_classes is None:
        num_classes = int(max(np.max(ref), np.max(pred))) + 1
    cm = confusion_matrix(ref, pred, num_classes)
    m = metrics_from_confusion(cm)
    row = {k: m[k] for k in ("pixel_accuracy", "mean_pixel_accuracy", "mean_iou", "fw_iou")}
    for c in range(num_classes):
        row[f"iou_{c}"] = m["iou"][c]
        row[f"dice_{c}"] = m["dice"][c]
    row["confusion_matrix"] = cm.tolist()
    return row
