"""BraTS 2023+ lesion-wise Dice and HD95 (the ranking metrics of BraTS 2023 GLI/SSA/MEN/PED/MET and later).

Definition (BraTS 2023 lesion-wise evaluation, Saluja et al., github.com/rachitsaluja/BraTS-2023-Metrics),
for one region mask R (reference) and P (prediction):

1. Reference lesions: 26-connected components of R, merged when they lie within ``d`` dilations of each other:
   R is dilated ``d`` times with the 18-neighbourhood, the dilated mask is split into 26-connected
   components, and every reference voxel takes the id of the dilated component it lies in.
2. Predicted lesions: 26-connected components of P.
3. Each reference lesion L_k is matched to every predicted component that touches L_k dilated ``d`` times
   (18-neighbourhood); its score is Dice(L_k, ∪ matched) and HD95(L_k, ∪ matched), HD95 = 374 mm when
   nothing matches.
4. False positives: predicted components matched to no reference lesion.
5. Reference lesions of volume <= ``min_volume_mm3`` are left out of the score (their matches still do not
   count as false positives).
6. Case score per region:  Dice_LW = Σ_k Dice_k / (K + FP),  HD95_LW = (Σ_k HD95_k + 374·FP) / (K + FP),
   K = kept reference lesions; no kept lesion and no false positive -> Dice 1, HD95 0.

Parameters per sub-challenge (``d``, ``min_volume_mm3``): GLI, SSA, PED (3, 50), MEN (1, 50), MET (1, 2).

The lesion HD95 is a parameter: the official script uses DeepMind's ``surface-distance``
(``evaluation.distances.surface_hd95``, definition ``brats2023``); ``hd95`` (MedPy's) is kept for the
``medpy`` definition. Dice, lesion matching and counts are the same for both.

``matched_lesion_scores`` is the other rule set, that of the current official package ``BraTS-evaluation``
(0.0.10, built on panoptica): one-to-one matching without dilation or merging (see its docstring).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import cc3d
import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from nnunetv2_ohem.evaluation.distances import hd95
from nnunetv2_ohem.evaluation.lesions import (EvaluationError, check_same_shape, lesion_sizes, overlap_pairs,
                                              voxel_volume)

HD95Function = Callable[[np.ndarray, np.ndarray, Sequence[float]], float]

#: sub-challenge -> (dilation iterations d, minimum reference lesion volume in mm³)
LESION_WISE_PARAMETERS: Dict[str, Tuple[int, float]] = {
    "GLI": (3, 50.0), "SSA": (3, 50.0), "PED": (3, 50.0), "MEN": (1, 50.0), "MET": (1, 2.0)}
LESION_WISE_PENALTY_MM = 374.0
_STRUCTURE_18 = ndimage.generate_binary_structure(3, 2)


@dataclass
class LesionWiseResult:
    dice: float
    hd95: float
    n_tp: int  # kept reference lesions with at least one matched prediction
    n_fn: int  # kept reference lesions without a match
    n_fp: int  # predicted components matched to no reference lesion
    lesions: List[Dict] = field(default_factory=list)  # one dict per reference lesion (kept or not)


def merged_reference_lesions(ref: np.ndarray, dilation_iterations: int) -> Tuple[np.ndarray, int]:
    """Reference lesion ids (step 1): components of R merged by ``dilation_iterations`` 18-dilations."""
    ref = np.asarray(ref) != 0
    if dilation_iterations > 0 and ref.any():
        grown = ndimage.binary_dilation(ref, structure=_STRUCTURE_18, iterations=dilation_iterations)
    else:
        grown = ref
    grown_ids, n = cc3d.connected_components(grown, connectivity=26, return_N=True)
    labels = np.where(ref, grown_ids, 0)
    # ids stay 1..n: every dilated component contains the reference voxels it grew from
    return labels, int(n)


def _box(slices: Sequence[slice], pad: int, shape: Sequence[int]) -> Tuple[slice, ...]:
    return tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(slices, shape))


def _union_box(boxes: Sequence[Sequence[slice]]) -> Tuple[slice, ...]:
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes)) for i in range(len(boxes[0])))


def lesion_wise_scores(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], dilation_iterations: int,
                       min_volume_mm3: float, penalty_mm: float = LESION_WISE_PENALTY_MM,
                       hd95_fn: HD95Function = hd95) -> LesionWiseResult:
    """Lesion-wise Dice/HD95 of one binary 3D region (see the module docstring for the definition).

    ``hd95_fn`` measures a lesion against its matched components (``surface_hd95`` for BraTS 2023). Each
    lesion is handled inside its bounding box padded by the dilation reach, so the cost grows with the
    lesions' size, not with the image's.
    """
    check_same_shape(ref, pred)
    if np.ndim(ref) != 3:
        raise EvaluationError(f"BraTS lesion-wise metrics need 3D masks, got {np.ndim(ref)}D")
    if dilation_iterations < 0:
        raise EvaluationError(f"dilation_iterations must be >= 0, got {dilation_iterations}")
    shape = np.shape(ref)
    ref_ids, n_ref = merged_reference_lesions(ref, dilation_iterations)
    pred_ids, n_pred = cc3d.connected_components(np.asarray(pred) != 0, connectivity=26, return_N=True)
    pred_sizes = np.bincount(pred_ids.ravel(), minlength=n_pred + 1)
    ref_boxes = ndimage.find_objects(ref_ids, max_label=n_ref)
    pred_boxes = ndimage.find_objects(pred_ids, max_label=n_pred)
    vox = voxel_volume(spacing)

    matched_any = np.zeros(n_pred + 1, bool)
    lesions: List[Dict] = []
    for k in range(1, n_ref + 1):
        reach = _box(ref_boxes[k - 1], dilation_iterations, shape)
        lesion = ref_ids[reach] == k
        zone = ndimage.binary_dilation(lesion, structure=_STRUCTURE_18, iterations=dilation_iterations) \
            if dilation_iterations > 0 else lesion
        matched = np.unique(pred_ids[reach][zone])
        matched = matched[matched != 0]
        matched_any[matched] = True
        n_voxels = int(lesion.sum())
        if len(matched) == 0:
            dice_k, hd_k = 0.0, float(penalty_mm)
        else:
            box = _box(_union_box([ref_boxes[k - 1]] + [pred_boxes[m - 1] for m in matched]), 1, shape)
            gt_k = ref_ids[box] == k
            pr_k = np.isin(pred_ids[box], matched)
            inter = int(np.count_nonzero(gt_k & pr_k))
            dice_k = 2.0 * inter / (n_voxels + int(pred_sizes[matched].sum()))
            hd_k = hd95_fn(gt_k, pr_k, spacing)
        lesions.append({"id": k, "volume_mm3": n_voxels * vox, "kept": n_voxels * vox > min_volume_mm3,
                        "matched": matched.tolist(), "dice": dice_k, "hd95": hd_k})
    n_fp = int(np.count_nonzero(~matched_any[1:]))
    kept = [les for les in lesions if les["kept"]]
    denom = len(kept) + n_fp
    if denom == 0:
        dice_lw, hd_lw = 1.0, 0.0
    else:
        dice_lw = sum(les["dice"] for les in kept) / denom
        hd_lw = (sum(les["hd95"] for les in kept) + penalty_mm * n_fp) / denom
    n_tp = sum(1 for les in kept if les["matched"])
    return LesionWiseResult(float(dice_lw), float(hd_lw), n_tp, len(kept) - n_tp, n_fp, lesions)


def lesion_wise_parameters(challenge: str) -> Tuple[int, float]:
    """(dilation iterations, minimum lesion volume mm³) of a BraTS 2023 sub-challenge name."""
    key = str(challenge).upper().replace("BRATS-", "")
    if key not in LESION_WISE_PARAMETERS:
        raise EvaluationError(f"unknown BraTS lesion-wise sub-challenge '{challenge}', use one of "
                              f"{sorted(LESION_WISE_PARAMETERS)}")
    return LESION_WISE_PARAMETERS[key]


#: BraTS-evaluation's penalty for an infinite HD95 ("diameter of the cube in SRI space")
PANOPTICA_PENALTY_MM = 373.0
#: panoptica's MaxBipartiteMatching threshold in BraTS-evaluation's configs: Dice >= 1e-6, i.e. any overlap
PANOPTICA_MIN_DICE = 1e-6
#: BraTS-evaluation's ``mets`` parser: reference lesions of at least this volume are scored (``vol_threshold``)
METS_MIN_VOLUME_MM3 = 20.0


def matched_lesion_scores(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], penalise: bool,
                          min_volume_mm3: float = METS_MIN_VOLUME_MM3, penalty_mm: float = PANOPTICA_PENALTY_MM,
                          hd95_fn: HD95Function = hd95) -> LesionWiseResult:
    """Lesion-wise Dice/HD95 of one binary 3D region under BraTS-evaluation's rules (panoptica matching).

    Definition (BraTS-evaluation 0.0.10: panoptica ``ConnectedComponentsInstanceApproximator`` +
    ``MaxBipartiteMatching(DSC, 1e-6)`` and its ``metrics_parser``):

    1. Lesions: 26-connected components of R and of P (no dilation, no merging, no size threshold).
    2. Matching: one-to-one, maximising Σ Dice over pairs with Dice(R_i, P_j) >= 1e-6 (any overlap), solved
       as panoptica does with ``scipy.optimize.linear_sum_assignment`` on cost 1 - Dice (1 + 1e-6 for other
       pairs; an assignment of cost >= 1 is no match).
    3. A matched pair scores Dice(R_i, P_j) and HD95(R_i, P_j) in mm (``hd95_fn``, MedPy's definition as in
       panoptica, with the spacing in the right axis order).
    4. ``penalise=False`` (``seg`` parser, GLI/PED/MEN/GoAT configs): Dice_LW and HD95_LW are the means over
       the matched pairs only, so misses and false positives do not lower them. No matched pair: both masks
       empty -> NaN; otherwise Dice 0 and HD95 ``penalty_mm`` (the package reports inf there).
    5. ``penalise=True`` (``mets`` parser): the mean over one entry per reference lesion of volume >=
       ``min_volume_mm3`` (its pair's scores, or 0 / ``penalty_mm`` when unmatched) plus 0 / ``penalty_mm``
       for every unmatched predicted component; NaN when R has no lesion of that volume (also if P has
       false positives: the package reports nothing for such a case).

    Counts: n_tp = matched pairs, n_fn = reference lesions without a match, n_fp = predicted components
    without a match (panoptica's tp / fn / fp, all sizes).
    """
    check_same_shape(ref, pred)
    if np.ndim(ref) != 3:
        raise EvaluationError(f"BraTS lesion-wise metrics need 3D masks, got {np.ndim(ref)}D")
    ref_ids, n_ref = cc3d.connected_components(np.asarray(ref) != 0, connectivity=26, return_N=True)
    pred_ids, n_pred = cc3d.connected_components(np.asarray(pred) != 0, connectivity=26, return_N=True)
    vox = voxel_volume(spacing)
    size_r, size_p = lesion_sizes(ref_ids, n_ref), lesion_sizes(pred_ids, n_pred)
    pairs = overlap_pairs(ref_ids, n_ref, pred_ids, n_pred)
    inside = (pairs.i > 0) & (pairs.j > 0)
    pi, pj, pc = pairs.i[inside], pairs.j[inside], pairs.count[inside]
    pair_dice = 2.0 * pc / (size_r[pi] + size_p[pj])
    match_of = np.zeros(n_ref + 1, dtype=np.int64)  # reference lesion -> matched component (0: none)
    ok = pair_dice >= PANOPTICA_MIN_DICE
    if ok.any():
        # Only lesions with a candidate pair can be matched; dropping the others from panoptica's full cost
        # matrix leaves the optimum unchanged (they could only take the 1 + 1e-6 "no match" cost).
        rows_l, r_inv = np.unique(pi[ok], return_inverse=True)
        cols_l, c_inv = np.unique(pj[ok], return_inverse=True)
        cost = np.full((len(rows_l), len(cols_l)), 1.0 + PANOPTICA_MIN_DICE)
        cost[r_inv, c_inv] = 1.0 - pair_dice[ok]
        rows, cols = linear_sum_assignment(cost)
        valid = cost[rows, cols] < 1.0
        match_of[rows_l[rows[valid]]] = cols_l[cols[valid]]
    dice_of = {(int(i), int(j)): float(d) for i, j, d in zip(pi, pj, pair_dice)}
    ref_boxes = ndimage.find_objects(ref_ids, max_label=n_ref)
    pred_boxes = ndimage.find_objects(pred_ids, max_label=n_pred)
    lesions: List[Dict] = []
    for k in range(1, n_ref + 1):
        m = int(match_of[k])
        if m:
            box = _box(_union_box([ref_boxes[k - 1], pred_boxes[m - 1]]), 1, ref_ids.shape)
            hd_k = float(hd95_fn(ref_ids[box] == k, pred_ids[box] == m, spacing))
            dice_k = dice_of[(k, m)]
        else:
            dice_k, hd_k = 0.0, float(penalty_mm)
        volume = float(size_r[k]) * vox
        lesions.append({"id": k, "volume_mm3": volume, "kept": (volume >= min_volume_mm3) if penalise else True,
                        "matched": [m] if m else [], "dice": dice_k, "hd95": hd_k})
    n_tp = int(np.count_nonzero(match_of))
    n_fp = int(n_pred - n_tp)
    matched = [les for les in lesions if les["matched"]]
    if not penalise:
        if matched:
            dice_lw = sum(les["dice"] for les in matched) / len(matched)
            hd_lw = sum(les["hd95"] for les in matched) / len(matched)
        elif n_ref == 0 and n_pred == 0:
            dice_lw, hd_lw = math.nan, math.nan
        else:
            dice_lw, hd_lw = 0.0, float(penalty_mm)
    else:
        kept = [les for les in lesions if les["kept"]]
        if not kept:
            dice_lw, hd_lw = math.nan, math.nan
        else:
            n = len(kept) + n_fp
            dice_lw = sum(les["dice"] for les in kept) / n
            hd_lw = (sum(les["hd95"] for les in kept) + penalty_mm * n_fp) / n
    return LesionWiseResult(float(dice_lw), float(hd_lw), n_tp, int(n_ref - n_tp), n_fp, lesions)
