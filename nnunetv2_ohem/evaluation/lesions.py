"""Lesions as connected components, and lesion-to-lesion matching rules, vectorised over lesions.

Everything here works on label maps from ``cc3d`` and on the *sparse* table of overlapping label pairs
(one ``np.unique`` over the voxels where either map is non-zero), so the cost is O(foreground voxels),
independent of the number of lesions, with no Python loop over lesions or voxels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import cc3d
import numpy as np

_CONNECTIVITIES = {2: (4, 8), 3: (6, 18, 26)}


class EvaluationError(ValueError):
    """Bad input for the evaluation tool (message names the file and the reason)."""


def check_same_shape(a: np.ndarray, b: np.ndarray, what: str = "reference and prediction") -> None:
    if a.shape != b.shape:
        raise EvaluationError(f"{what} have different shapes: {a.shape} vs {b.shape}")


def voxel_volume(spacing: Sequence[float]) -> float:
    """Volume of one voxel in mm³: the product of the (at most 3) spatial spacings."""
    return float(np.prod(np.asarray(spacing, dtype=np.float64)[:3]))


def min_lesion_voxels(min_volume_mm3: float, voxel_vol: float) -> int:
    """Smallest kept lesion size in voxels, as animaSegPerfAnalyzer computes it.

    ``floor(min_volume / voxel_volume) + 1`` (animaSegPerfCAnalyzer.cxx, ``getOverlapTab``): a lesion is kept
    only if its volume is *strictly* larger than ``min_volume_mm3`` (3 mm³ in MSSEG). 0 keeps everything.
    """
    if min_volume_mm3 < 0:
        raise EvaluationError(f"minimum lesion volume must be >= 0 mm³, got {min_volume_mm3}")
    if min_volume_mm3 == 0:
        return 1
    return int(math.floor(min_volume_mm3 / voxel_vol)) + 1


def label_lesions(mask: np.ndarray, connectivity: int = 6, min_voxels: int = 1) -> Tuple[np.ndarray, int]:
    """Connected components of a binary mask, components smaller than ``min_voxels`` removed.

    Returns ``(labels, n)`` with labels 1..n consecutive in ``cc3d`` scan order and removed components set to 0
    (they become background for every later count, as in animaSegPerfAnalyzer's RelabelComponentImageFilter).
    ``connectivity``: 6/18/26 in 3D, 4/8 in 2D (6 = faces = ITK's default ``FullyConnected=false``).
    """
    mask = np.asarray(mask)
    if mask.ndim not in _CONNECTIVITIES:
        raise EvaluationError(f"lesion labelling needs a 2D or 3D mask, got {mask.ndim}D")
    if connectivity not in _CONNECTIVITIES[mask.ndim]:
        raise EvaluationError(f"connectivity {connectivity} invalid for {mask.ndim}D "
                              f"(use one of {_CONNECTIVITIES[mask.ndim]})")
    labels, n = cc3d.connected_components(np.ascontiguousarray(mask != 0), connectivity=connectivity,
                                          return_N=True, out_dtype=np.uint32)
    if n == 0 or min_voxels <= 1:
        return labels, int(n)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    remap = np.cumsum(keep).astype(np.uint32) * keep
    return remap[labels], int(keep.sum())


def lesion_sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """Voxel count of each label 0..n (index 0 = background)."""
    return np.bincount(labels.ravel(), minlength=n + 1)[: n + 1]


@dataclass
class OverlapPairs:
    """Sparse overlap table between two label maps ``a`` (rows) and ``b`` (columns).

    ``i[k], j[k], count[k]``: ``count`` voxels carry label ``i`` in ``a`` and ``j`` in ``b``; pairs with
    ``i == 0`` or ``j == 0`` are the voxels of one map on the other's background; (0, 0) is left out.
    This is animaSegPerfAnalyzer's dense ``OverlapTab`` without its zero cells.
    """
    i: np.ndarray
    j: np.ndarray
    count: np.ndarray
    n_a: int
    n_b: int

    def transposed(self) -> "OverlapPairs":
        return OverlapPairs(self.j, self.i, self.count, self.n_b, self.n_a)

    def dense(self) -> np.ndarray:
        """Dense (n_a+1, n_b+1) table (cell [0, 0] = 0); for tests and small maps only."""
        t = np.zeros((self.n_a + 1, self.n_b + 1), dtype=np.int64)
        t[self.i, self.j] = self.count
        return t


def overlap_pairs(a_labels: np.ndarray, n_a: int, b_labels: np.ndarray, n_b: int) -> OverlapPairs:
    """All overlapping label pairs of two label maps in one pass (``np.unique`` of paired codes)."""
    check_same_shape(a_labels, b_labels, "label maps")
    fg = np.flatnonzero((a_labels.ravel() != 0) | (b_labels.ravel() != 0))
    codes = a_labels.ravel()[fg].astype(np.int64) * (n_b + 1) + b_labels.ravel()[fg]
    uniq, counts = np.unique(codes, return_counts=True)
    return OverlapPairs(uniq // (n_b + 1), uniq % (n_b + 1), counts.astype(np.int64), n_a, n_b)


def anima_detected(pairs: OverlapPairs, alpha: float = 0.10, beta: float = 0.70, gamma: float = 0.65,
                   anima_loop_bound: bool = False) -> np.ndarray:
    """Which lesions of map ``a`` are detected by map ``b`` under the MSSEG rule (boolean array, length n_a).

    Rule of Commowick et al. 2018 (Sci. Rep. 8:13650, section "Evaluation metrics", detection) as coded in
    animaSegPerfAnalyzer (``SegPerfCAnalyzer::getTruePositiveLesions`` + ``falsePositiveRatioTester``):
    lesion i of ``a`` with size s_i is detected iff

    1. sensitivity  TP_i / s_i > alpha, with TP_i = Σ_{j>0} O[i, j] (voxels of i covered by any lesion of b);
    2. taking the lesions j of b in decreasing overlap O[i, j] (ties: smaller label first) and stopping as soon
       as the cumulated overlap Σ O[i, j] / TP_i reaches gamma, none of the visited j lies outside ``a``'s
       lesions by more than beta:  O[0, j] / |j| <= beta.

    ``anima_loop_bound=True`` reproduces a quirk of the C++ loop (``k < nbLabelsRef``): at most n_a + 1 lesions
    of b are visited, so a lesion split into more pieces than that is accepted without checking the rest.
    Default False implements the documented rule.
    """
    for name, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if not 0 < v <= 1:
            raise EvaluationError(f"{name} must be in (0, 1], got {v}")
    n_a, n_b = pairs.n_a, pairs.n_b
    detected = np.zeros(n_a + 1, dtype=bool)
    if n_a == 0 or n_b == 0:
        return detected[1:]
    i, j, c = pairs.i, pairs.j, pairs.count
    size_a = np.bincount(i, weights=c, minlength=n_a + 1)  # a-lesion sizes (voxels, all of them appear in pairs)
    size_b = np.bincount(j, weights=c, minlength=n_b + 1)
    inside = (i > 0) & (j > 0)
    tp = np.bincount(i[inside], weights=c[inside], minlength=n_a + 1)
    outside_b = np.zeros(n_b + 1)
    on_bg = (i == 0) & (j > 0)
    outside_b[j[on_bg]] = c[on_bg]
    with np.errstate(invalid="ignore", divide="ignore"):
        outside_ratio = outside_b / size_b
        sens = tp / size_a
    ii, jj, cc = i[inside], j[inside], c[inside]
    order = np.lexsort((jj, -cc, ii))
    ii, jj, cc = ii[order], jj[order], cc[order]
    cum = np.cumsum(cc)
    group_start = np.r_[True, ii[1:] != ii[:-1]]
    start_idx = np.flatnonzero(group_start)
    offsets = np.repeat(np.r_[0, cum[start_idx[1:] - 1]] if len(start_idx) else np.zeros(0, np.int64),
                        np.diff(np.r_[start_idx, len(ii)]))
    before = cum - cc - offsets  # overlap of the previously visited b-lesions of the same a-lesion
    visited = before < gamma * tp[ii]
    if anima_loop_bound:
        rank = np.arange(len(ii)) - np.repeat(start_idx, np.diff(np.r_[start_idx, len(ii)]))
        visited &= rank < n_a + 1
    bad = visited & (outside_ratio[jj] > beta)
    failed = np.zeros(n_a + 1, dtype=bool)
    failed[ii[bad]] = True
    detected = (sens > alpha) & ~failed
    detected[0] = False
    return detected[1:]


def centres_of_mass(labels: np.ndarray, n: int) -> np.ndarray:
    """Centre of mass (voxel coordinates, float) of each label 1..n, shape (n, ndim), one bincount per axis."""
    flat = np.flatnonzero(labels.ravel())
    lab = labels.ravel()[flat]
    counts = np.bincount(lab, minlength=n + 1)[1: n + 1].astype(np.float64)
    coords = np.unravel_index(flat, labels.shape)
    out = np.empty((n, labels.ndim), dtype=np.float64)
    for axis, co in enumerate(coords):  # loop over the 2-3 axes only
        out[:, axis] = np.bincount(lab, weights=co, minlength=n + 1)[1: n + 1] / counts
    return out


def label_at_points(labels: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Label found at the voxel nearest to each (float) point; 0 for points outside the image."""
    if len(points) == 0:
        return np.zeros(0, dtype=labels.dtype)
    idx = np.rint(points).astype(np.int64)
    shape = np.asarray(labels.shape)
    inside = np.all((idx >= 0) & (idx < shape), axis=1)
    out = np.zeros(len(points), dtype=labels.dtype)
    out[inside] = labels[tuple(idx[inside].T)]
    return out


def f1_from_counts(precision: float, recall: float) -> float:
    """F1 = 2·P·R / (P + R); 0 when P + R == 0, NaN propagates."""
    if np.isnan(precision) or np.isnan(recall):
        return float("nan")
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))
