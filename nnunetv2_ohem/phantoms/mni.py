"""Realistic new-lesion phantoms on the MNI152 brain template, written in the real MSSEG-II folder layout.

Background anatomy comes from the MNI152 (2009a) grey-matter, white-matter and brain-mask templates that
``nilearn`` ships inside its package (no download). Each subject is:

* a random similarity transform of the template (rotation, isotropic scale, shift) resampled once onto an
  isotropic grid of ``voxel_size`` mm (``voxel_size > 1`` is the downsampling option for fast CPU training)
  and cropped to the brain's bounding box plus a random margin, so image sizes differ per subject;
* FLAIR-like contrast from the tissue probabilities: GM brighter than WM, CSF dark
  (``I = c_GM p_GM + c_WM p_WM + c_CSF p_CSF``);
* "old" lesions visible at both time points (not labelled: MSSEG-II asks for *new* lesions only) and
  *new* lesions present at time 2 only, bright on FLAIR, grown voxel by voxel as irregular ellipsoidal
  blobs of a drawn volume (log-uniform in ``lesion_volume_mm3``, a share ``large_lesion_fraction`` in
  ``large_lesion_volume_mm3``), most of them (``wm_fraction``) confined to white matter;
* per-time-point multiplicative smooth bias field, global gain and Rician noise
  (``|I + n_1 + i n_2|``, n ~ N(0, sigma²)).

``ground_truth.nii.gz`` is the consensus of new lesions; ``ground_truth_expert{1..4}.nii.gz`` are perturbed
copies (missed lesions, dilated/eroded borders, an old lesion mistaken for a new one) so multi-rater tools
have something to disagree on. Same seed and config give the same bytes; subject ``i`` depends only on
``(seed, i)``, so adding subjects leaves earlier ones unchanged.
"""
import heapq
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
from scipy import ndimage

# FLAIR-like tissue intensities (arbitrary units, WM = 1): GM brighter than WM, CSF suppressed.
FLAIR_CONTRAST = {"gm": 1.35, "wm": 1.0, "csf": 0.25}
INTENSITY_SCALE = 400.0  # gives scanner-like magnitudes; nnU-Net z-normalises anyway


@dataclass(frozen=True)
class MSSEG2PhantomConfig:
    """Every knob of the generator; stored in the manifest so a phantom set can be regenerated exactly."""

    voxel_size: float = 1.0
    n_new_lesions: Tuple[int, int] = (1, 8)
    n_old_lesions: Tuple[int, int] = (0, 6)
    lesion_volume_mm3: Tuple[float, float] = (1.0, 50.0)
    large_lesion_fraction: float = 0.15
    large_lesion_volume_mm3: Tuple[float, float] = (50.0, 300.0)
    wm_fraction: float = 0.9
    lesion_free_fraction: float = 0.3
    lesion_contrast: Tuple[float, float] = (1.6, 2.1)
    noise_sigma: float = 0.03
    bias_amplitude: float = 0.15
    max_rotation_deg: float = 6.0
    max_scale: float = 0.05
    max_shift_mm: float = 4.0
    crop_margin_mm: Tuple[float, float] = (2.0, 12.0)
    n_experts: int = 4

    def __post_init__(self):
        if self.voxel_size <= 0:
            raise ValueError(f"voxel_size must be > 0 mm, got {self.voxel_size}")
        for name in ("n_new_lesions", "n_old_lesions", "lesion_volume_mm3", "large_lesion_volume_mm3",
                     "lesion_contrast", "crop_margin_mm"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be a range (lo, hi) with 0 <= lo <= hi, got {(lo, hi)}")
        for name in ("large_lesion_fraction", "wm_fraction", "lesion_free_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.lesion_volume_mm3[0] <= 0:
            raise ValueError("lesion_volume_mm3 must start above 0 mm³")


@dataclass
class PhantomSubject:
    """One generated subject; arrays are indexed (x, y, z) in RAS voxel order like the written NIfTI files."""

    flair_time01: np.ndarray
    flair_time02: np.ndarray
    ground_truth: np.ndarray
    experts: List[np.ndarray]
    brain_mask: np.ndarray
    wm_mask: np.ndarray
    old_lesions: np.ndarray
    affine: np.ndarray
    lesions: List[Dict] = field(default_factory=list)

    @property
    def voxel_volume(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))


@lru_cache(maxsize=1)
def _template_1mm() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(gm, wm, brain, affine) of nilearn's packaged MNI152 templates at 1 mm, float32."""
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32)
    gm = gm_img.get_fdata(dtype=np.float32)
    return np.clip(gm, 0, 1), np.clip(wm, 0, 1), np.clip(brain, 0, 1), np.asarray(gm_img.affine)


@lru_cache(maxsize=4)
def _template_smoothed(voxel_size: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Templates low-pass filtered before resampling to ``voxel_size`` so downsampling does not alias."""
    gm, wm, brain, affine = _template_1mm()
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


def _subject_anatomy(rng: np.random.Generator, cfg: MSSEG2PhantomConfig):
    """Resample GM/WM/brain through one random similarity transform onto the subject's cropped grid.

    Output voxel o maps to world ``x = A_out o`` and to template voxel ``A_tpl^-1 (c + S R (x - c))`` with
    c the brain centre: the subject's brain is the template rotated by R^T and scaled by 1/S about c.
    """
    gm, wm, brain, tpl_affine = _template_smoothed(float(cfg.voxel_size))
    v = float(cfg.voxel_size)
    idx = np.argwhere(brain > 0.5)
    lo_w = (tpl_affine @ np.r_[idx.min(0), 1])[:3]
    hi_w = (tpl_affine @ np.r_[idx.max(0), 1])[:3]
    centre = (lo_w + hi_w) / 2
    rot = _rotation(np.deg2rad(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg, 3)))
    scale = 1.0 + rng.uniform(-cfg.max_scale, cfg.max_scale)
    shift = rng.uniform(-cfg.max_shift_mm, cfg.max_shift_mm, 3)
    margin_lo = rng.uniform(*cfg.crop_margin_mm, 3)
    margin_hi = rng.uniform(*cfg.crop_margin_mm, 3)
    # the rotated/scaled brain fits into the box grown by its half-diagonal change; margins crop randomly
    half = (hi_w - lo_w) / 2 * (1 + cfg.max_scale) + np.abs(shift)
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


def _grow_blob(rng: np.random.Generator, allowed: np.ndarray, centre: Tuple[int, int, int], n_voxels: int,
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


def _draw_volume(rng: np.random.Generator, cfg: MSSEG2PhantomConfig) -> float:
    lo, hi = cfg.large_lesion_volume_mm3 if rng.random() < cfg.large_lesion_fraction else cfg.lesion_volume_mm3
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _place_lesions(rng: np.random.Generator, cfg: MSSEG2PhantomConfig, n: int, wm_mask: np.ndarray,
                   brain_mask: np.ndarray, occupied: np.ndarray, instance: np.ndarray, first_id: int) -> List[Dict]:
    """Place ``n`` non-touching lesions (26-neighbourhood kept free) and write their ids into ``instance``."""
    v = float(cfg.voxel_size)
    wm_idx = np.argwhere(wm_mask)
    brain_idx = np.argwhere(brain_mask)
    lesions: List[Dict] = []
    tries = 0
    while len(lesions) < n and tries < 50 * max(n, 1):
        tries += 1
        in_wm = bool(rng.random() < cfg.wm_fraction)
        region = wm_mask if in_wm else brain_mask
        pool = wm_idx if in_wm else brain_idx
        volume = _draw_volume(rng, cfg)
        n_vox = max(1, int(round(volume / v ** 3)))
        centre = tuple(int(i) for i in pool[rng.integers(len(pool))])
        blob = _grow_blob(rng, region & ~occupied, centre, n_vox, v)
        if blob is None:
            continue
        lesion_id = first_id + len(lesions)
        instance[tuple(blob.T)] = lesion_id
        # keep the 26-neighbourhood free so lesions stay separate connected components
        for off in np.argwhere(np.ones((3, 3, 3), bool)) - 1:
            q = np.clip(blob + off, 0, np.asarray(occupied.shape) - 1)
            occupied[tuple(q.T)] = True
        lesions.append({"id": lesion_id, "centre_voxel": list(centre), "n_voxels": int(n_vox),
                        "volume_mm3": float(n_vox * v ** 3), "target_volume_mm3": volume, "in_wm_only": in_wm})
    return lesions


def _bias_field(rng: np.random.Generator, shape: Tuple[int, ...], amplitude: float) -> np.ndarray:
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


def _rician(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    n1 = rng.normal(0, sigma, img.shape).astype(np.float32)
    n2 = rng.normal(0, sigma, img.shape).astype(np.float32)
    return np.sqrt((img + n1) ** 2 + n2 ** 2).astype(np.float32)


def _perturb_expert(rng: np.random.Generator, new_instance: np.ndarray, old_instance: np.ndarray,
                    brain_mask: np.ndarray) -> np.ndarray:
    """A rater's mask: each new lesion missed with p=0.15, else its border dilated (p=0.25) or eroded
    (p=0.25, lesions > 4 voxels); each old lesion mistaken for new with p=0.05."""
    out = np.zeros(new_instance.shape, np.uint8)
    for lid in np.unique(new_instance[new_instance > 0]):
        m = new_instance == lid
        u = rng.random()
        if u < 0.15:
            continue
        if u < 0.40:
            m = ndimage.binary_dilation(m) & brain_mask
        elif u < 0.65 and m.sum() > 4:
            eroded = ndimage.binary_erosion(m)
            m = eroded if eroded.any() else m
        out[m] = 1
    for lid in np.unique(old_instance[old_instance > 0]):
        if rng.random() < 0.05:
            out[old_instance == lid] = 1
    return out


def make_msseg2_subject(seed: int, index: int, config: MSSEG2PhantomConfig = MSSEG2PhantomConfig(),
                        lesion_free: bool = False) -> PhantomSubject:
    """Generate subject ``index`` of the set with ``seed`` (RNG seeded by ``(seed, index)``)."""
    cfg = config
    rng = np.random.default_rng([int(seed), int(index)])
    gm, wm, brain, affine = _subject_anatomy(rng, cfg)
    brain_mask = brain > 0.5
    wm_mask = (wm > 0.5) & brain_mask
    csf = np.clip(brain - gm - wm, 0, 1)
    base = FLAIR_CONTRAST["gm"] * gm + FLAIR_CONTRAST["wm"] * wm + FLAIR_CONTRAST["csf"] * csf

    occupied = np.zeros(base.shape, bool)
    old_instance = np.zeros(base.shape, np.int32)
    new_instance = np.zeros(base.shape, np.int32)
    n_old = int(rng.integers(cfg.n_old_lesions[0], cfg.n_old_lesions[1] + 1))
    old = _place_lesions(rng, cfg, n_old, wm_mask, brain_mask, occupied, old_instance, 1)
    n_new = 0 if lesion_free else int(rng.integers(max(1, cfg.n_new_lesions[0]), cfg.n_new_lesions[1] + 1))
    new = _place_lesions(rng, cfg, n_new, wm_mask, brain_mask, occupied, new_instance, 1)

    def with_lesions(img, instance):
        # partial-volume edge: blend towards the lesion intensity with a slightly blurred occupancy
        weight = np.clip(ndimage.gaussian_filter((instance > 0).astype(np.float32), 0.5) * 1.6, 0, 1)
        contrast = np.ones(img.shape, np.float32)
        for lid in np.unique(instance[instance > 0]):
            contrast[instance == lid] = rng.uniform(*cfg.lesion_contrast)
        contrast = ndimage.grey_dilation(contrast, size=(3, 3, 3))
        return img * (1 - weight) + contrast * weight

    time1 = with_lesions(base, old_instance)
    time2 = with_lesions(time1, new_instance)
    images = []
    for img in (time1, time2):
        gain = rng.uniform(0.95, 1.05)
        img = img * _bias_field(rng, img.shape, cfg.bias_amplitude) * gain
        img = _rician(rng, img, cfg.noise_sigma)
        images.append((img * INTENSITY_SCALE).astype(np.float32))
    experts = [_perturb_expert(rng, new_instance, old_instance, brain_mask) for _ in range(cfg.n_experts)]
    for les in new:
        les["in_wm_fraction"] = float(wm_mask[new_instance == les["id"]].mean())
    return PhantomSubject(images[0], images[1], (new_instance > 0).astype(np.uint8), experts, brain_mask, wm_mask,
                          (old_instance > 0).astype(np.uint8), affine, new)


def lesion_free_indices(n_subjects: int, seed: int, fraction: float, split: int = 0) -> List[int]:
    """``round(n_subjects * fraction)`` subject indices (at least one when ``fraction > 0`` and there are two or
    more subjects, so every split shows the false-positive case), drawn by ``(seed, split)``, that get no new
    lesion."""
    n_free = int(round(n_subjects * fraction))
    if fraction > 0 and n_subjects >= 2:
        n_free = max(1, n_free)
    order = np.random.default_rng([int(seed), 1_000_003, int(split)]).permutation(n_subjects)
    return sorted(int(i) for i in order[:n_free])


def _save(arr: np.ndarray, affine: np.ndarray, path: str) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    # nibabel writes gzip with mtime 0, so equal arrays give equal bytes
    nib.save(img, path)


def write_msseg2_phantoms(out_dir: str, n_subjects: int = 10, seed: int = 0,
                          config: MSSEG2PhantomConfig = MSSEG2PhantomConfig(), first_id: int = 1,
                          overwrite: bool = False, progress: bool = False, n_test: int = 0) -> str:
    """Write ``out_dir/training/<3-digit id>/`` MSSEG-II subjects plus ``out_dir/phantom_manifest.json``.

    ``n_test`` more subjects (ids following the training ones) go to ``out_dir/testing/<id>/`` as held-out
    cases with their ground truth; the lesion-free share is applied to each split separately.

    Files per subject: ``flair_time01_on_middle_space.nii.gz``, ``flair_time02_on_middle_space.nii.gz``,
    ``ground_truth.nii.gz`` and ``ground_truth_expert{1..n_experts}.nii.gz``. The tree is built in a
    temporary sibling folder and renamed into place, so ``out_dir`` is either complete or absent.
    """
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
    if n_test < 0:
        raise ValueError(f"n_test must be >= 0, got {n_test}")
    last = first_id + n_subjects + n_test - 1
    if first_id < 0 or last > 999:
        raise ValueError(f"subject ids {first_id}..{last} do not fit in 3 digits")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".phantoms_tmp_", dir=parent)
    try:
        free = set(lesion_free_indices(n_subjects, seed, config.lesion_free_fraction))
        free |= {n_subjects + j for j in lesion_free_indices(n_test, seed, config.lesion_free_fraction, split=1)}
        manifest = {"generator": "nnunetv2_ohem.phantoms.mni.write_msseg2_phantoms", "seed": seed,
                    "config": asdict(config), "subjects": {}}
        iterator = range(n_subjects + n_test)
        if progress:
            from tqdm import tqdm
            iterator = tqdm(iterator, desc="phantoms", unit="subject")
        for i in iterator:
            sid = f"{first_id + i:03d}"
            sub = make_msseg2_subject(seed, i, config, lesion_free=i in free)
            split = "training" if i < n_subjects else "testing"
            folder = os.path.join(tmp, split, sid)
            os.makedirs(folder)
            _save(sub.flair_time01, sub.affine, os.path.join(folder, "flair_time01_on_middle_space.nii.gz"))
            _save(sub.flair_time02, sub.affine, os.path.join(folder, "flair_time02_on_middle_space.nii.gz"))
            _save(sub.ground_truth, sub.affine, os.path.join(folder, "ground_truth.nii.gz"))
            for k, expert in enumerate(sub.experts, start=1):
                _save(expert, sub.affine, os.path.join(folder, f"ground_truth_expert{k}.nii.gz"))
            manifest["subjects"][sid] = {"index": i, "split": split, "lesion_free": i in free,
                                         "shape": list(sub.ground_truth.shape), "new_lesions": sub.lesions}
        with open(os.path.join(tmp, "phantom_manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def phantom_config_from_dict(values: Dict) -> MSSEG2PhantomConfig:
    """Inverse of ``asdict`` (JSON turns tuples into lists)."""
    return MSSEG2PhantomConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


__all__: Sequence[str] = ("MSSEG2PhantomConfig", "PhantomSubject", "make_msseg2_subject", "write_msseg2_phantoms",
                          "lesion_free_indices", "phantom_config_from_dict")
