"""Dice and surface distances (HD95) in physical units, with the same surface definition as MedPy.

MedPy (``medpy.metric.binary.hd95``) defines the surface of a mask as the mask minus its binary erosion
with the face-connected structure (``border_value=0``, so voxels on the image edge are surface), measures
each surface voxel's Euclidean distance (in mm, ``voxelspacing``) to the nearest surface voxel of the other
mask, and takes the 95th percentile (numpy's linear interpolation) of both directed distance sets pooled.
We compute the very same numbers, but erode only inside each mask's bounding box (padded by one voxel)
and find nearest surface voxels with a k-d tree (``scipy.spatial.cKDTree``) instead of two full-volume
distance transforms, which is what makes it fast for small lesions in large images.

``surface_hd95`` is the other HD95 in use: DeepMind's ``surface-distance`` package
(``compute_robust_hausdorff(compute_surface_distances(...), 95)``), which the BraTS 2023 metrics script uses.
It measures between area-weighted surface elements on the voxel corners and takes the larger of the two
directed percentiles, so the two HD95s differ (see ``surface_hd95``).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence, Tuple

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


def _spacing_for(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (mask.ndim,):
        raise EvaluationError(f"spacing {tuple(sp)} does not match a {mask.ndim}D image")
    return sp


# Bit of each voxel of a 2x2x2 cell in the neighbour code: offset (a, b, c) -> 128 >> (4a + 2b + c), the
# encoding of ``surface-distance`` (offset 0 = the voxel before the corner along that axis).
_CELL_BITS = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]], dtype=np.int64)


@lru_cache(maxsize=None)
def _cell_area_vectors(code: int) -> np.ndarray:
    """Area vectors (voxel units, one row per triangle) of the marching-cubes surface of one 2x2x2 cell.

    Lorensen & Cline's marching cubes (``skimage.measure.marching_cubes(method="lorensen")``, iso-level 0.5,
    vertices at edge midpoints); a cell with more than four foreground corners is triangulated as its
    complement, so every code and its complement have the same surface, as in ``surface-distance``'s table.
    """
    from skimage.measure import marching_cubes

    if code in (0, 255):
        return np.zeros((0, 3))
    minority = code if bin(code).count("1") <= 4 else 255 - code
    cell = ((minority & _CELL_BITS) != 0).astype(np.float64)
    verts, faces, _, _ = marching_cubes(cell, level=0.5, method="lorensen")
    tri = verts.astype(np.float64)[faces]
    return 0.5 * np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])


@lru_cache(maxsize=64)
def surfel_area_table(spacing: Tuple[float, float, float]) -> np.ndarray:
    """Area in mm² of the surface element of each of the 256 neighbour codes at this voxel spacing.

    A triangle with area vector n (voxel units) has area |(n0·s1·s2, n1·s0·s2, n2·s0·s1)| once the axes are
    scaled by the spacing s; a cell's area is the sum over its triangles.
    """
    s = np.asarray(spacing, dtype=np.float64)
    scale = np.array([s[1] * s[2], s[0] * s[2], s[0] * s[1]])
    table = np.zeros(256)
    for code in range(1, 255):
        table[code] = float(np.linalg.norm(_cell_area_vectors(code) * scale, axis=1).sum())
    return table


def surface_elements(mask: np.ndarray, spacing: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Surface elements of a binary 3D mask as ``surface-distance`` defines them: (points in mm, areas in mm²).

    The elements sit on the voxel corners: a corner is on the surface when the 2x2x2 voxels around it are
    neither all foreground nor all background (voxels outside the image count as background). Its area is
    ``surfel_area_table`` of its neighbour code. Points are (corner index) × spacing in numpy axis order; the
    common half-voxel shift of the corner grid is left out (only differences between points are used).
    """
    mask = np.asarray(mask) != 0
    if mask.ndim != 3:
        raise EvaluationError(f"the surface-distance HD95 needs 3D masks, got {mask.ndim}D")
    sp = _spacing_for(mask, spacing)
    if not mask.any():
        return np.zeros((0, 3)), np.zeros(0)
    nz = np.nonzero(mask)
    lo = [int(a.min()) for a in nz]
    hi = [int(a.max()) + 1 for a in nz]
    padded = np.pad(mask[tuple(slice(a, b) for a, b in zip(lo, hi))], 1).astype(np.int64)
    n = [b - a + 1 for a, b in zip(lo, hi)]  # corners of the cropped box along each axis
    code = np.zeros(n, dtype=np.int64)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                code |= padded[a:a + n[0], b:b + n[1], c:c + n[2]] * int(_CELL_BITS[a, b, c])
    border = (code != 0) & (code != 255)
    idx = np.argwhere(border)
    areas = surfel_area_table(tuple(float(v) for v in sp))[code[border]]
    return (idx + np.asarray(lo)) * sp, areas


def _directed_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """Smallest distance whose area-weighted cumulative share reaches ``percent`` (surface-distance's rule)."""
    order = np.lexsort((areas, distances))  # by distance, ties by area, as surface-distance sorts them
    cum = np.cumsum(areas[order]) / np.sum(areas)
    i = int(np.searchsorted(cum, percent / 100.0))
    return float(distances[order][min(i, len(distances) - 1)])


def surface_hd95(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], percent: float = 95.0) -> float:
    """Robust Hausdorff distance in mm of DeepMind's ``surface-distance`` (used by the BraTS 2023 script).

    With surface elements (points x, areas w) from ``surface_elements`` for R and P and
    d(x, ∂Q) = Euclidean distance in mm to the nearest surface element of Q:

        HD_p = max( P_p^w {d(x, ∂P) : x ∈ ∂R},  P_p^w {d(y, ∂R) : y ∈ ∂P} )

    where P_p^w of a set is its area-weighted percentile: sort the distances, accumulate the areas, take the
    first distance whose cumulative share is >= p/100 (``compute_robust_hausdorff``). Unlike MedPy's ``hd95``
    (one percentile of both sets pooled, every surface voxel weighted 1) a false positive worth more than
    5 % of the prediction's surface shows up in full. Both masks must be non-empty (``surface-distance``
    returns inf when one is empty; each BraTS definition replaces that by its own penalty).
    """
    check_same_shape(ref, pred)
    pr, ar = surface_elements(ref, spacing)
    pp, ap = surface_elements(pred, spacing)
    if len(pr) == 0 or len(pp) == 0:
        raise EvaluationError("HD95 is undefined when the reference or the prediction is empty")
    d_rp = cKDTree(pp).query(pr, k=1)[0]
    d_pr = cKDTree(pr).query(pp, k=1)[0]
    return max(_directed_percentile(d_rp, ar, percent), _directed_percentile(d_pr, ap, percent))
