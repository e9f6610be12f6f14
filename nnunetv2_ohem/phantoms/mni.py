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
import json
import os
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Dict, List, Sequence, Tuple

import numpy as np
from scipy import ndimage

from nnunetv2_ohem.phantoms.anatomy import (INTENSITY_SCALE, TISSUE_CONTRAST, PhantomConfigBase,
                                            atomic_output_dir, bias_field, check_ranges, check_unit_interval,
                                            draw_volume, lesion_free_indices, place_blobs, rician_noise,
                                            save_nifti)

FLAIR_CONTRAST = TISSUE_CONTRAST["flair"]


@dataclass(frozen=True)
class MSSEG2PhantomConfig(PhantomConfigBase):
    """Every knob of the generator; stored in the manifest so a phantom set can be regenerated exactly."""

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
    n_experts: int = 4

    def __post_init__(self):
        super().__post_init__()
        check_ranges(self, ("n_new_lesions", "n_old_lesions", "lesion_volume_mm3", "large_lesion_volume_mm3",
                            "lesion_contrast"))
        check_unit_interval(self, ("large_lesion_fraction", "wm_fraction", "lesion_free_fraction"))
        if self.lesion_volume_mm3[0] <= 0:
            raise ValueError("lesion_volume_mm3 must start above 0 mm³")

    @classmethod
    def with_lesion_volume(cls, lesion_volume_mm3: Tuple[float, float], **settings) -> "MSSEG2PhantomConfig":
        """A config whose regular new lesions are ``lesion_volume_mm3`` and whose few large ones keep the
        default proportion to them: ``large = (hi, hi · L_hi / l_hi)`` with the defaults' ``l_hi = 50``,
        ``L_hi = 300`` mm³ (so the defaults map onto themselves)."""
        lo, hi = (float(v) for v in lesion_volume_mm3)
        ratio = cls.large_lesion_volume_mm3[1] / cls.lesion_volume_mm3[1]
        settings.setdefault("large_lesion_volume_mm3", (hi, hi * ratio))
        return cls(lesion_volume_mm3=(lo, hi), **settings)


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
    gm, wm, brain, affine = cfg.anatomy(rng)
    brain_mask = brain > 0.5
    wm_mask = (wm > 0.5) & brain_mask
    csf = np.clip(brain - gm - wm, 0, 1)
    base = FLAIR_CONTRAST["gm"] * gm + FLAIR_CONTRAST["wm"] * wm + FLAIR_CONTRAST["csf"] * csf

    occupied = np.zeros(base.shape, bool)
    old_instance = np.zeros(base.shape, np.int32)
    new_instance = np.zeros(base.shape, np.int32)
    volume = partial(draw_volume, volume_mm3=cfg.lesion_volume_mm3, large_fraction=cfg.large_lesion_fraction,
                     large_volume_mm3=cfg.large_lesion_volume_mm3)
    place = partial(place_blobs, voxel_size=cfg.voxel_size, volume=volume, wm_fraction=cfg.wm_fraction,
                    wm_mask=wm_mask, brain_mask=brain_mask, occupied=occupied, first_id=1)
    n_old = int(rng.integers(cfg.n_old_lesions[0], cfg.n_old_lesions[1] + 1))
    old = place(rng, n_old, instance=old_instance)
    n_new = 0 if lesion_free else int(rng.integers(max(1, cfg.n_new_lesions[0]), cfg.n_new_lesions[1] + 1))
    new = place(rng, n_new, instance=new_instance)

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
        img = img * bias_field(rng, img.shape, cfg.bias_amplitude) * gain
        img = rician_noise(rng, img, cfg.noise_sigma)
        images.append((img * INTENSITY_SCALE).astype(np.float32))
    experts = [_perturb_expert(rng, new_instance, old_instance, brain_mask) for _ in range(cfg.n_experts)]
    for les in new:
        les["in_wm_fraction"] = float(wm_mask[new_instance == les["id"]].mean())
    return PhantomSubject(images[0], images[1], (new_instance > 0).astype(np.uint8), experts, brain_mask, wm_mask,
                          (old_instance > 0).astype(np.uint8), affine, new)


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
    with atomic_output_dir(out_dir, overwrite) as tmp:
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
            save_nifti(sub.flair_time01, sub.affine, os.path.join(folder, "flair_time01_on_middle_space.nii.gz"))
            save_nifti(sub.flair_time02, sub.affine, os.path.join(folder, "flair_time02_on_middle_space.nii.gz"))
            save_nifti(sub.ground_truth, sub.affine, os.path.join(folder, "ground_truth.nii.gz"))
            for k, expert in enumerate(sub.experts, start=1):
                save_nifti(expert, sub.affine, os.path.join(folder, f"ground_truth_expert{k}.nii.gz"))
            manifest["subjects"][sid] = {"index": i, "split": split, "lesion_free": i in free,
                                         "shape": list(sub.ground_truth.shape), "new_lesions": sub.lesions}
        with open(os.path.join(tmp, "phantom_manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
    return os.path.abspath(out_dir)


phantom_config_from_dict = MSSEG2PhantomConfig.from_dict


__all__: Sequence[str] = ("MSSEG2PhantomConfig", "PhantomSubject", "make_msseg2_subject", "write_msseg2_phantoms",
                          "lesion_free_indices", "phantom_config_from_dict")
