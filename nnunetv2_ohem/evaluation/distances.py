"""Dice and surface distances (HD95) in physical units, with the same surface definition as MedPy.

MedPy (``medpy.metric.binary.hd95``) defines the surface of a mask as the mask minus its binary erosion
with the face-connected structure (``border_value=0``, so voxels on the image edge are surface), measures
each surface voxel's Euclidean distance (in mm, ``voxelspacing``) to the nearest surface voxel of the other
mask, and takes the 95th percentile (numpy's linear interpolation) of both directed distance sets pooled.
We compute the very same numbers, but erode only inside each mask's bounding box (padded by one voxel)
and find nearest surface voxels with a k-d tree (``scipy.spatial.cKDTree``) instead of two full-volume
distance transforms, which is what makes it fast for small lesions in large images.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from nnunetv2_ohem.evaluation.lesions import EvaluationError, check_same_shape


def dice(ref: np.ndarray, pred: np.ndarray, empty: float = float("nan")) -> float:
    """Dice = 2|R∩P| / (|R| + |P|) on binary masks; ``empty`` when both are empty."""
    check_same_shape(ref, pred)
    r, p = ref != 0, pred != 0
    denom = int(np.count_nonzero(r)) + int(np.count_nonzero(p))
    if denom == 0:
        return float(empty)
    return 2.0 * int(np.count_nonzero(r & p)) / denom


def surface_points(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Physical coordinates (mm, numpy axis order) of the surface voxels of a binary mask (MedPy's surface)."""
    mask = np.asarray(mask) != 0
    if not mask.any():
        return np.zeros((0, mask.ndim))
    nz = np.nonzero(mask)
    lo = [max(int(a.min()) - 1, 0) for a in nz]
    hi = [min(int(a.max()) + 2, s) for a, s in zip(nz, mask.shape)]
    crop = mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    border = crop & ~ndimage.binary_erosion(crop, structure=structure, iterations=1)
    pts = np.argwhere(border).astype(np.float64) + np.asarray(lo, dtype=np.float64)
    return pts * np.asarray(spacing, dtype=np.float64)


def hd95(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile Hausdorff distance in mm (MedPy's definition); both masks must be non-empty.

    HD95 = P95( {d(x, ∂R) : x ∈ ∂P} ∪ {d(y, ∂P) : y ∈ ∂R} ), ∂ = surface voxels, d = Euclidean in mm.
    """
    check_same_shape(ref, pred)
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (ref.ndim,):
        raise EvaluationError(f"spacing {tuple(spacing)} does not match a {ref.ndim}D image")
    sr, sp = surface_points(ref, spacing), surface_points(pred, spacing)
    if len(sr) == 0 or len(sp) == 0:
        raise EvaluationError("HD95 is undefined when the reference or the prediction is empty")
    d_pr = cKDTree(sr).query(sp, k=1)[0]
    d_rp = cKDTree(sp).query(sr, k=1)[0]
    return float(np.percentile(np.concatenate([d_pr, d_rp]), 95))
