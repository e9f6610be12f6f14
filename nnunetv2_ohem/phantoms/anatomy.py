"""Building blocks shared by the MNI152-based phantoms (MSSEG-II, VALDO, BraTS): subject anatomy from nilearn's
packaged templates, blob growing and placement, bias field, Rician noise, deterministic NIfTI writing and
the atomic output folder.

All random draws go through the ``numpy.random.Generator`` passed in, in a fixed order, so a generator seeded
by ``(seed, subject index)`` makes every subject reproducible byte for byte.
"""
import contextlib
import heapq
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import nibabel as nib
import numpy as np
from scipy import ndimage

#: relative tissue intensities per MR contrast (WM ~ 1 in FLAIR/T1); CSF dark on T1/FLAIR, bright on T2
TISSUE_CONTRAST: Dict[str, Dict[str, float]] = {
    "flair": {"gm": 1.35, "wm": 1.0, "csf": 0.25},
    "t1": {"gm": 0.65, "wm": 1.0, "csf": 0.2},
    "t1ce": {"gm": 0.7, "wm": 1.0, "csf": 0.25},
    "t2": {"gm": 0.8, "wm": 0.55, "csf": 1.6},
}
INTENSITY_SCALE = 400.0  # gives scanner-like magnitudes; nnU-Net z-normalises anyway


def check_ranges(config: Any, names: Iterable[str]) -> None:
    """Each named field must be a range ``(lo, hi)`` with ``0 <= lo <= hi``."""
    for name in names:
        lo, hi = getattr(config, name)
        if not 0 <= lo <= hi:
            raise ValueError(f"{name} must be a range (lo, hi) with 0 <= lo <= hi, got {(lo, hi)}")


def check_unit_interval(config: Any, names: Iterable[str]) -> None:
    """Each named field (a share or probability) must lie in [0, 1]."""
    for name in names:
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {getattr(config, name)}")


@dataclass(frozen=True)
class PhantomConfigBase:
    """Grid and pose knobs every generator shares (see :func:`subject_anatomy`); the generators' configs
    add their lesion knobs and call ``super().__post_init__()``. Stored in each manifest via ``asdict``."""

    voxel_size: float = 1.0
    max_rotation_deg: float = 6.0
    max_scale: float = 0.05
    max_shift_mm: float = 4.0
    crop_margin_mm: Tuple[float, float] = (2.0, 12.0)

    def __post_init__(self):
        if self.voxel_size <= 0:
            raise ValueError(f"voxel_size must be > 0 mm, got {self.voxel_size}")
        check_ranges(self, ("crop_margin_mm",))

    def anatomy(self, rng: np.random.Generator):
        """This config's :func:`subject_anatomy` draw: (gm, wm, brain, affine)."""
        return subject_anatomy(rng, self.voxel_size, self.max_rotation_deg, self.max_scale, self.max_shift_mm,
                               self.crop_margin_mm)

    @classmethod
    def from_dict(cls, values: Dict):
        """Inverse of ``asdict`` (JSON turns tuples into lists), e.g. for a manifest's ``config``."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@lru_cache(maxsize=1)
def template_1mm() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(gm, wm, brain, affine) of nilearn's packaged MNI152 templates at 1 mm, float32."""
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32)
    gm = gm_img.get_fdata(dtype=np.float32)
    return np.clip(gm, 0, 1), np.clip(wm, 0, 1), np.clip(brain, 0, 1), np.asarray(gm_img.affine)


@lru_cache(maxsize=4)
def template_smoothed(voxel_size: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Templates low-pass filtered before resampling to ``voxel_size`` so downsampling does not alias."""
    gm, wm, brain, affine = template_1mm()
    if voxel_size <= 1.0:
        return gm, wm, brain, affine
    sigma = 0.42 * (voxel_size - 1.0) + 1e-3  # ~FWHM of a voxel_size box, minus the template's own 1 mm
    return (ndimage.gaussian_filter(gm, sigma), ndimage.gaussian_filter(wm, sigma),
            ndimage.gaussian_filter(brain, sigma), affine)


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def subject_anatomy(rng: np.random.Generator, voxel_size: float, max_rotation_deg: float = 6.0,
                    max_scale: float = 0.05, max_shift_mm: float = 4.0,
                    crop_margin_mm: Tuple[float, float] = (2.0, 12.0)):
    """(gm, wm, brain, affine): GM/WM/brain probabilities resampled through one random similarity transform
    (rotation up to ``max_rotation_deg`` per axis, isotropic scale ``1 +- max_scale``, shift up to
    ``max_shift_mm``) onto an isotropic ``voxel_size`` grid cropped to the brain plus a random margin.

    Output voxel o maps to world ``x = A_out o`` and to template voxel ``A_tpl^-1 (c + S R (x - c))`` with
    c the brain centre: the subject's brain is the template rotated by R^T and scaled by 1/S about c.
    """
    gm, wm, brain, tpl_affine = template_smoothed(float(voxel_size))
    v = float(voxel_size)
    idx = np.argwhere(brain > 0.5)
    lo_w = (tpl_affine @ np.r_[idx.min(0), 1])[:3]
    hi_w = (tpl_affine @ np.r_[idx.max(0), 1])[:3]
    centre = (lo_w + hi_w) / 2
    rot = _rotation(np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, 3)))
    scale = 1.0 + rng.uniform(-max_scale, max_scale)
    shift = rng.uniform(-max_shift_mm, max_shift_mm, 3)
    margin_lo = rng.uniform(*crop_margin_mm, 3)
    margin_hi = rng.uniform(*crop_margin_mm, 3)
    # the rotated/scaled brain fits into the box grown by its half-diagonal change; margins crop randomly
    half = (hi_w - lo_w) / 2 * (1 + max_scale) + np.abs(shift)
    start = centre - half - margin_lo
    shape = tuple(int(np.ceil(s)) for s in (2 * half + margin_lo + margin_hi) / v)
    out_affine = np.diag([v, v, v, 1.0])
    out_affine[:3, 3] = start
    # output voxel -> world -> template world -> template voxel, as one affine
    m_world = np.eye(4)
    m_world[:3, :3] = scale * rot
    m_world[:3, 3] = centre - scale * rot @ (centre + shift)
    full = np.linalg.inv(tpl_affine) @ m_world @ out_affine
    mats = [ndimage.affine_transform(a, full[:3, :3], full[:3, 3], output_shape=shape, order=1, mode="constant",
                                     cval=0.0, prefilter=False) for a in (gm, wm, brain)]
    gm_s, wm_s, brain_s = (np.clip(m, 0, 1).astype(np.float32) for m in mats)
    return gm_s, wm_s, brain_s, out_affine


def grow_blob(rng: np.random.Generator, allowed: np.ndarray, centre: Tuple[int, int, int], n_voxels: int,
               voxel_size: float) -> Optional[np.ndarray]:
    """Indices (n, 3) of a 6-connected blob of exactly ``n_voxels`` voxels grown from ``centre`` inside
    ``allowed``, ordered by a random anisotropic ellipsoidal distance (axis ratio up to 2, random
    orientation) plus jitter for an irregular border; None when ``allowed`` holds too few reachable voxels."""
    axes = rng.uniform(1.0, 2.0, 3)
    rot = _rotation(rng.uniform(0, np.pi, 3))
    metric = rot @ np.diag(1.0 / axes ** 2) @ rot.T
    c = np.asarray(centre)
    heap = [(0.0, tuple(c))]
    seen = {tuple(c)}
    out = []
    shape = allowed.shape
    steps = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
    while heap and len(out) < n_voxels:
        _, p = heapq.heappop(heap)
        out.append(p)
        for d in steps:
            q = (p[0] + d[0], p[1] + d[1], p[2] + d[2])
            if q in seen or not (0 <= q[0] < shape[0] and 0 <= q[1] < shape[1] and 0 <= q[2] < shape[2]):
                continue
            seen.add(q)
            if allowed[q]:
                diff = (np.asarray(q) - c) * voxel_size
                heapq.heappush(heap, (float(diff @ metric @ diff) * rng.uniform(0.8, 1.25), q))
    return np.asarray(out, dtype=np.int64) if len(out) == n_voxels else None


def draw_volume(rng: np.random.Generator, volume_mm3: Tuple[float, float], large_fraction: float = 0.0,
                large_volume_mm3: Tuple[float, float] = (1.0, 1.0)) -> float:
    """A lesion volume in mm³, log-uniform in ``volume_mm3`` or, with probability ``large_fraction``, in
    ``large_volume_mm3`` (small lesions dominate real lesion-size distributions)."""
    lo, hi = large_volume_mm3 if rng.random() < large_fraction else volume_mm3
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def claim_neighbourhood(occupied: np.ndarray, voxels: np.ndarray) -> None:
    """Mark ``voxels`` (n, 3) and their 26-neighbourhood occupied, so later blobs stay separate components."""
    for off in np.argwhere(np.ones((3, 3, 3), bool)) - 1:
        q = np.clip(voxels + off, 0, np.asarray(occupied.shape) - 1)
        occupied[tuple(q.T)] = True


def place_blobs(rng: np.random.Generator, n: int, voxel_size: float, volume: Callable[[np.random.Generator], float],
                wm_fraction: float, wm_mask: np.ndarray, brain_mask: np.ndarray, occupied: np.ndarray,
                instance: np.ndarray, first_id: int) -> List[Dict]:
    """Place ``n`` non-touching blobs (26-neighbourhood kept free), a share ``wm_fraction`` confined to
    ``wm_mask``, the rest to ``brain_mask``; volumes drawn by ``volume(rng)``. Writes ids ``first_id, ...`` into
    ``instance``, marks ``occupied`` and returns one dict per placed blob (fewer than ``n`` when space runs out)."""
    v = float(voxel_size)
    wm_idx = np.argwhere(wm_mask)
    brain_idx = np.argwhere(brain_mask)
    lesions: List[Dict] = []
    tries = 0
    while len(lesions) < n and tries < 50 * max(n, 1):
        tries += 1
        in_wm = bool(rng.random() < wm_fraction)
        region = wm_mask if in_wm else brain_mask
        pool = wm_idx if in_wm else brain_idx
        target = volume(rng)
        n_vox = max(1, int(round(target / v ** 3)))
        centre = tuple(int(i) for i in pool[rng.integers(len(pool))])
        blob = grow_blob(rng, region & ~occupied, centre, n_vox, v)
        if blob is None:
            continue
        lesion_id = first_id + len(lesions)
        instance[tuple(blob.T)] = lesion_id
        claim_neighbourhood(occupied, blob)
        lesions.append({"id": lesion_id, "centre_voxel": list(centre), "n_voxels": int(n_vox),
                        "volume_mm3": float(n_vox * v ** 3), "target_volume_mm3": target, "in_wm_only": in_wm})
    return lesions


def bias_field(rng: np.random.Generator, shape: Tuple[int, ...], amplitude: float) -> np.ndarray:
    """exp of a random sum of a few low-frequency cosines, scaled to +-``amplitude`` (multiplicative)."""
    grids = np.meshgrid(*[np.linspace(0, 1, s, dtype=np.float32) for s in shape], indexing="ij", sparse=True)
    log_field = np.zeros(shape, np.float32)
    for _ in range(4):
        freq = rng.uniform(0.3, 1.2, 3)
        phase = rng.uniform(0, 2 * np.pi, 3)
        term = 1.0
        for g, f, p in zip(grids, freq, phase):
            term = term * np.cos(np.pi * f * g + p)
        log_field += rng.normal() * term
    peak = np.abs(log_field).max()
    return np.exp(amplitude * log_field / max(peak, 1e-6)).astype(np.float32)


def rician_noise(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    n1 = rng.normal(0, sigma, img.shape).astype(np.float32)
    n2 = rng.normal(0, sigma, img.shape).astype(np.float32)
    return np.sqrt((img + n1) ** 2 + n2 ** 2).astype(np.float32)


def save_nifti(arr: np.ndarray, affine: np.ndarray, path: str) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    # nibabel writes gzip with mtime 0, so equal arrays give equal bytes
    nib.save(img, path)


def lesion_free_indices(n_subjects: int, seed: int, fraction: float, split: int = 0) -> List[int]:
    """``round(n_subjects * fraction)`` subject indices (at least one when ``fraction > 0`` and there are two or
    more subjects, so every split shows the false-positive case), drawn by ``(seed, split)``, that get no new
    lesion."""
    n_free = int(round(n_subjects * fraction))
    if fraction > 0 and n_subjects >= 2:
        n_free = max(1, n_free)
    order = np.random.default_rng([int(seed), 1_000_003, int(split)]).permutation(n_subjects)
    return sorted(int(i) for i in order[:n_free])




#: the file every phantom writer leaves in its output folder; ``overwrite`` replaces only folders that hold one
MANIFEST = "phantom_manifest.json"


def foreign_output(out_dir: str) -> Optional[str]:
    """Why ``out_dir`` is not a phantom set written by this package (so ``overwrite`` must not delete it),
    or ``None`` when its :data:`MANIFEST` names one of our generators."""
    import json

    try:
        with open(os.path.join(out_dir, MANIFEST)) as f:
            generator = str(json.load(f).get("generator", ""))
    except (OSError, ValueError, AttributeError):
        return f"it has no readable {MANIFEST}"
    return None if generator.startswith("nnunetv2_ohem.phantoms.") else f"its {MANIFEST} names no phantom generator"


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling folder of ``out_dir`` to fill; on success it replaces ``out_dir`` by rename,
    on any error (Ctrl-C and SIGTERM too) it is removed, so ``out_dir`` is either complete or untouched (see
    :class:`nnunetv2_ohem.atomic.AtomicFolder`). ``overwrite`` replaces only an earlier phantom set."""
    from nnunetv2_ohem.atomic import AtomicFolder, OutputExistsError

    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    if os.path.lexists(out_dir):
        why = foreign_output(out_dir)
        if why:
            raise OutputExistsError(f"{out_dir}: overwrite refused, {why}, so it is not a phantom set written by "
                                    f"nnunetv2_ohem; remove it yourself or choose another folder")
    with AtomicFolder(out_dir, overwrite) as tmp:
        yield tmp
