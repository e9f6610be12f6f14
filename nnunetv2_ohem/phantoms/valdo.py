"""VALDO 2021 task 3 phantoms: lacunes of presumed vascular origin on T1, T2 and FLAIR, in the real VALDO layout.

Background anatomy is the MNI152 template (``subject_anatomy``: a random similarity transform per subject,
resampled onto an isotropic ``voxel_size`` grid). Each subject has three co-registered, skull-stripped
channels, like VALDO's ``desc-masked`` images: ``I_c = C_c,GM p_GM + C_c,WM p_WM + C_c,CSF p_CSF`` with
``C_c = TISSUE_CONTRAST[c]`` (c = t1, t2, flair), each with its own gain, smooth bias field and Rician noise,
set to exactly 0 outside the brain mask.

* **Lacunes** (labelled): round-to-ovoid CSF-filled cavities grown by ``place_blobs`` with a volume drawn
  log-uniform in ``lacune_volume_mm3`` (default 3..150 mm³, an equivalent-sphere diameter of ~1.8..6.6 mm), a
  share ``lacune_wm_fraction`` confined to white matter, the rest to deep grey matter (basal ganglia and
  thalami, see :func:`deep_grey_mask`); ``n_lacunes`` per subject, a share ``lacune_free_fraction`` of the
  subjects without any. A lacune voxel is a CSF fraction ``f`` (``lacune_fill``) of the cavity:
  ``I = (1 - f) I_tissue + f C_CSF``, so it is dark on T1 and FLAIR and bright on T2. The one-voxel
  (6-neighbour) shell around it gets partial volume (``f * partial_volume``) and, on FLAIR only, a gain
  ``flair_rim_gain`` (> 1): the hyperintense gliotic rim that tells a lacune from a perivascular space.
  The rim is not labelled.
* **Perivascular spaces** (hard negatives, not labelled): smaller CSF-like blobs (``pvs_volume_mm3``, default
  1..8 mm³) without a FLAIR rim, ``n_pvs`` per subject (lacune-free subjects have them too), in white matter
  (``pvs_wm_fraction``) or deep grey matter. A share ``pvs_linear_fraction`` are straight one-voxel-thick
  segments running roughly superior-inferior (within 25°), like the perforating arteries they surround;
  the others are small ovoids (a PVS cut across).
* **Raters**: ``Rater1`` is the exact lacune mask; raters 2..``n_raters`` are perturbed copies (a lacune missed
  with ``rater_miss_probability``, its border dilated or eroded by one voxel with ``rater_border_probability``
  each). VALDO task 3 has one rater for most subjects, hence ``n_raters = 1`` by default; with more than one
  mask per subject the converter needs ``rater=N`` (``--rater N``).

Blobs get ``max(1, round(V / voxel_size³))`` voxels (``place_blobs``), so at coarse grids the smallest ones
round up to one voxel: at 3 mm a voxel is 27 mm³ and every PVS and every lacune below ~40 mm³ becomes a
single voxel. Use 1..2 mm where sizes matter (or measure in voxels); 3 mm is for fast CPU tests.
The rim is one voxel thick, i.e. as thick as the grid allows.

Same seed and config give the same bytes; subject ``i`` depends only on ``(seed, i)`` and on whether it is
lacune-free (``lesion_free_indices``), so adding subjects leaves earlier ones unchanged unless that changes.
"""
import json
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from typing import Dict, List, Sequence, Tuple

import numpy as np
from scipy import ndimage

from nnunetv2_ohem.phantoms.anatomy import (INTENSITY_SCALE, TISSUE_CONTRAST, PhantomConfigBase,
                                            atomic_output_dir, bias_field, check_ranges, check_unit_interval,
                                            claim_neighbourhood, draw_volume, lesion_free_indices,
                                            place_blobs, rician_noise, save_nifti, template_1mm)

CHANNELS: Tuple[str, ...] = ("T1", "T2", "FLAIR")  # VALDO file suffixes, in the converter's channel order
#: MNI152 box (mm) holding the basal ganglia and thalami: |x| in [3, 30] (the 3rd ventricle lies at |x| < 3),
#: y in [-35, 25], z in [-8, 20]; combined with a GM probability threshold it excludes cortex and hippocampus
DEEP_GREY_BOX_MNI = ((3.0, 30.0), (-35.0, 25.0), (-8.0, 20.0))
_SIX_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class VALDOPhantomConfig(PhantomConfigBase):
    """Every knob of the generator; stored in the manifest so a phantom set can be regenerated exactly."""

    n_lacunes: Tuple[int, int] = (1, 12)
    lacune_volume_mm3: Tuple[float, float] = (3.0, 150.0)
    lacune_wm_fraction: float = 0.8
    lacune_free_fraction: float = 0.25
    lacune_fill: Tuple[float, float] = (0.85, 1.0)
    flair_rim_gain: Tuple[float, float] = (1.3, 1.6)
    n_pvs: Tuple[int, int] = (5, 25)
    pvs_volume_mm3: Tuple[float, float] = (1.0, 8.0)
    pvs_linear_fraction: float = 0.7
    pvs_wm_fraction: float = 0.5
    pvs_fill: Tuple[float, float] = (0.6, 0.95)
    partial_volume: float = 0.2
    noise_sigma: float = 0.03
    bias_amplitude: float = 0.15
    n_raters: int = 1
    rater_miss_probability: float = 0.1
    rater_border_probability: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        check_ranges(self, ("n_lacunes", "lacune_volume_mm3", "lacune_fill", "flair_rim_gain", "n_pvs",
                            "pvs_volume_mm3", "pvs_fill"))
        if self.n_lacunes[0] < 1:
            raise ValueError(f"n_lacunes must start at >= 1 (got {self.n_lacunes}); lacune-free subjects come "
                             f"from lacune_free_fraction")
        for name in ("lacune_volume_mm3", "pvs_volume_mm3"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"{name} must start above 0 mm³, got {getattr(self, name)}")
        for name in ("lacune_fill", "pvs_fill"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} is a CSF fraction and must lie in (0, 1], got {(lo, hi)}")
        if self.flair_rim_gain[0] < 1:
            raise ValueError(f"flair_rim_gain must be >= 1 (the rim is hyperintense), got {self.flair_rim_gain}")
        check_unit_interval(self, ("lacune_wm_fraction", "lacune_free_fraction", "pvs_linear_fraction",
                                   "pvs_wm_fraction", "partial_volume", "rater_miss_probability"))
        if not 0.0 <= self.rater_border_probability <= 0.5:
            raise ValueError(f"rater_border_probability must lie in [0, 0.5] (dilate and erode each get it), "
                             f"got {self.rater_border_probability}")
        if self.n_raters < 1:
            raise ValueError(f"n_raters must be >= 1, got {self.n_raters}")
        if self.noise_sigma < 0 or self.bias_amplitude < 0:
            raise ValueError(f"noise_sigma and bias_amplitude must be >= 0, got {self.noise_sigma}, "
                             f"{self.bias_amplitude}")


@dataclass
class VALDOSubject:
    """One generated subject; arrays are indexed (x, y, z) in RAS voxel order like the written NIfTI files.

    ``lacunes`` and ``pvs`` are instance maps (ids 1..K, 0 elsewhere) whose ids match ``lacune_facts`` /
    ``pvs_facts``; ``rim`` is the FLAIR-hyperintense shell around the lacunes; ``raters[0]`` is Rater1.
    """

    t1: np.ndarray
    t2: np.ndarray
    flair: np.ndarray
    raters: List[np.ndarray]
    lacunes: np.ndarray
    pvs: np.ndarray
    rim: np.ndarray
    brain_mask: np.ndarray
    wm_mask: np.ndarray
    deep_grey_mask: np.ndarray
    affine: np.ndarray
    lacune_facts: List[Dict] = field(default_factory=list)
    pvs_facts: List[Dict] = field(default_factory=list)

    @property
    def ground_truth(self) -> np.ndarray:
        """Binary lacune mask (uint8), identical to Rater1."""
        return (self.lacunes > 0).astype(np.uint8)

    @property
    def voxel_volume(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def images(self) -> Dict[str, np.ndarray]:
        """Channel name (VALDO suffix) -> image, in the converter's channel order."""
        return {"T1": self.t1, "T2": self.t2, "FLAIR": self.flair}


@lru_cache(maxsize=1)
def _template_brain_centre() -> np.ndarray:
    """World centre (mm) of the MNI brain mask's bounding box, the point ``subject_anatomy`` rotates about."""
    _, _, brain, affine = template_1mm()
    idx = np.argwhere(brain > 0.5)
    return ((affine @ np.r_[idx.min(0), 1])[:3] + (affine @ np.r_[idx.max(0), 1])[:3]) / 2


def deep_grey_mask(gm: np.ndarray, csf: np.ndarray, brain_mask: np.ndarray, affine: np.ndarray,
                   gm_threshold: float = 0.4, csf_threshold: float = 0.3) -> np.ndarray:
    """Basal ganglia and thalami of a subject: GM-dominated, CSF-free voxels inside ``DEEP_GREY_BOX_MNI``.

    The box is placed relative to the centre of the subject's brain bounding box (as it sits relative to the
    template's brain centre in MNI space); the subject transform is small (a few degrees and mm), so the box
    stays on the deep nuclei. ~45 cm³ at 1 mm, as basal ganglia plus thalami are in adults.
    """
    idx = np.argwhere(brain_mask)
    if len(idx) == 0:
        return np.zeros(brain_mask.shape, bool)
    centre = ((affine @ np.r_[idx.min(0), 1])[:3] + (affine @ np.r_[idx.max(0), 1])[:3]) / 2
    offset = centre - _template_brain_centre()  # subject world = MNI + offset near the centre
    axes = [affine[a, a] * np.arange(n) + affine[a, 3] - offset[a] for a, n in enumerate(brain_mask.shape)]
    (xlo, xhi), (ylo, yhi), (zlo, zhi) = DEEP_GREY_BOX_MNI
    in_x = (np.abs(axes[0]) >= xlo) & (np.abs(axes[0]) <= xhi)
    in_y = (axes[1] >= ylo) & (axes[1] <= yhi)
    in_z = (axes[2] >= zlo) & (axes[2] <= zhi)
    box = in_x[:, None, None] & in_y[None, :, None] & in_z[None, None, :]
    return box & brain_mask & (gm > gm_threshold) & (csf < csf_threshold)


def segment_voxels(centre: np.ndarray, n_voxels: int, direction: np.ndarray) -> np.ndarray:
    """``n_voxels`` distinct, 26-connected voxels (n, 3) of a straight line through ``centre``.

    ``direction`` is rescaled so its largest component is 1: consecutive points then differ by exactly one
    voxel along that axis and by at most one along the others, so the rounded points never repeat or gap.
    """
    d = np.asarray(direction, float)
    d = d / np.abs(d).max()
    # integer steps from the centre voxel: with half-integer steps np.rint's round-half-to-even would make
    # 54.5 -> 54 and 55.5 -> 56, a gap
    t = np.arange(n_voxels) - n_voxels // 2
    return np.rint(np.asarray(centre, float) + t[:, None] * d).astype(np.int64)


def place_linear_pvs(rng: np.random.Generator, n: int, voxel_size: float, volume_mm3: Tuple[float, float],
                     wm_fraction: float, wm_mask: np.ndarray, deep_mask: np.ndarray, occupied: np.ndarray,
                     instance: np.ndarray, first_id: int, max_tilt_deg: float = 25.0) -> List[Dict]:
    """Place ``n`` one-voxel-thick straight PVS of ``max(1, round(V / v³))`` voxels, V log-uniform in
    ``volume_mm3``, tilted at most ``max_tilt_deg`` from the z (superior-inferior) axis, a share
    ``wm_fraction`` inside ``wm_mask`` and the rest inside ``deep_mask``, none touching another blob."""
    v = float(voxel_size)
    pools = {True: np.argwhere(wm_mask), False: np.argwhere(deep_mask)}
    placed: List[Dict] = []
    tries = 0
    while len(placed) < n and tries < 50 * max(n, 1):
        tries += 1
        in_wm = bool(rng.random() < wm_fraction) or len(pools[False]) == 0
        region, pool = (wm_mask if in_wm else deep_mask), pools[in_wm]
        target = draw_volume(rng, volume_mm3)
        n_vox = max(1, int(round(target / v ** 3)))
        tilt, azimuth = np.deg2rad(rng.uniform(0, max_tilt_deg)), rng.uniform(0, 2 * np.pi)
        direction = np.array([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), np.cos(tilt)])
        centre = pool[rng.integers(len(pool))]
        vox = segment_voxels(centre, n_vox, direction)
        if (vox < 0).any() or (vox >= np.asarray(region.shape)).any():
            continue
        if not (region[tuple(vox.T)] & ~occupied[tuple(vox.T)]).all():
            continue
        pid = first_id + len(placed)
        instance[tuple(vox.T)] = pid
        claim_neighbourhood(occupied, vox)
        placed.append({"id": pid, "shape": "linear", "centre_voxel": [int(c) for c in centre],
                       "n_voxels": n_vox, "volume_mm3": float(n_vox * v ** 3), "target_volume_mm3": target,
                       "region": "wm" if in_wm else "deep_grey", "tilt_deg": float(np.rad2deg(tilt))})
    return placed


def _per_instance(instance: np.ndarray, values: Sequence[float]) -> np.ndarray:
    """Map instance ids 1..K to ``values[k-1]`` (0 on background)."""
    return np.asarray([0.0, *values], np.float32)[instance]


def csf_weight(instance: np.ndarray, fills: Sequence[float], partial_volume: float,
               brain_mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(weight, shell): CSF fraction per voxel, ``fill_k`` inside blob k and ``partial_volume * fill_k`` on its
    one-voxel 6-neighbour shell (the voxels the cavity partly covers), and that shell as a mask."""
    inside = _per_instance(instance, fills)
    # grey dilation with the 6-neighbour footprint carries each blob's fill onto its shell
    spread = ndimage.grey_dilation(inside, footprint=_SIX_NEIGHBOURS)
    shell = (spread > 0) & (instance == 0) & brain_mask
    return np.where(shell, partial_volume * spread, inside).astype(np.float32), shell


def _perturb_rater(rng: np.random.Generator, lacunes: np.ndarray, brain_mask: np.ndarray, miss_p: float,
                   border_p: float) -> np.ndarray:
    """Another rater's mask: each lacune missed with ``miss_p``, else its border dilated with ``border_p`` or
    eroded with ``border_p`` (erosion only where something is left)."""
    out = np.zeros(lacunes.shape, np.uint8)
    for lid in range(1, int(lacunes.max()) + 1):
        m = lacunes == lid
        u = rng.random()
        if u < miss_p:
            continue
        if u < miss_p + border_p:
            m = ndimage.binary_dilation(m) & brain_mask
        elif u < miss_p + 2 * border_p:
            eroded = ndimage.binary_erosion(m)
            m = eroded if eroded.any() else m
        out[m] = 1
    return out


def make_valdo_subject(seed: int, index: int, config: VALDOPhantomConfig = VALDOPhantomConfig(),
                       lacune_free: bool = False) -> VALDOSubject:
    """Generate subject ``index`` of the set with ``seed`` (RNG seeded by ``(seed, index)``)."""
    cfg = config
    v = float(cfg.voxel_size)
    rng = np.random.default_rng([int(seed), int(index)])
    gm, wm, brain, affine = cfg.anatomy(rng)
    brain_mask = brain > 0.5
    wm_mask = (wm > 0.5) & brain_mask
    csf = np.clip(brain - gm - wm, 0, 1)
    deep = deep_grey_mask(gm, csf, brain_mask, affine)
    # a grid so coarse that the deep nuclei vanish would make place_blobs draw from an empty pool
    deep_or_wm = deep if deep.any() else wm_mask

    occupied = np.zeros(brain_mask.shape, bool)
    lacunes = np.zeros(brain_mask.shape, np.int32)
    n_lac = 0 if lacune_free else int(rng.integers(cfg.n_lacunes[0], cfg.n_lacunes[1] + 1))
    lacune_facts = place_blobs(rng, n_lac, v, partial(draw_volume, volume_mm3=cfg.lacune_volume_mm3),
                               cfg.lacune_wm_fraction, wm_mask, deep_or_wm, occupied, lacunes, first_id=1)
    pvs = np.zeros(brain_mask.shape, np.int32)
    n_pvs = int(rng.integers(cfg.n_pvs[0], cfg.n_pvs[1] + 1))
    n_linear = int(rng.binomial(n_pvs, cfg.pvs_linear_fraction))
    pvs_facts = place_blobs(rng, n_pvs - n_linear, v, partial(draw_volume, volume_mm3=cfg.pvs_volume_mm3),
                            cfg.pvs_wm_fraction, wm_mask, deep_or_wm, occupied, pvs, first_id=1)
    for fact in pvs_facts:
        fact["shape"] = "ovoid"
    pvs_facts += place_linear_pvs(rng, n_linear, v, cfg.pvs_volume_mm3, cfg.pvs_wm_fraction, wm_mask,
                                  deep_or_wm, occupied, pvs, first_id=len(pvs_facts) + 1)
    for fact in lacune_facts + pvs_facts:
        if "in_wm_only" in fact:
            fact["region"] = "wm" if fact.pop("in_wm_only") else "deep_grey"

    lac_fill = [float(rng.uniform(*cfg.lacune_fill)) for _ in lacune_facts]
    rim_gain = [float(rng.uniform(*cfg.flair_rim_gain)) for _ in lacune_facts]
    pvs_fill = [float(rng.uniform(*cfg.pvs_fill)) for _ in pvs_facts]
    w_lac, rim = csf_weight(lacunes, lac_fill, cfg.partial_volume, brain_mask)
    w_pvs, _ = csf_weight(pvs, pvs_fill, cfg.partial_volume, brain_mask)
    # blobs keep a free 26-neighbourhood, so a lacune's shell never holds PVS voxels; shells may meet: max
    weight = np.maximum(w_lac, w_pvs)
    rim_map = np.where(rim, ndimage.grey_dilation(_per_instance(lacunes, rim_gain), footprint=_SIX_NEIGHBOURS),
                       1.0).astype(np.float32)

    images = {}
    for name in CHANNELS:
        c = TISSUE_CONTRAST[name.lower()]
        tissue = c["gm"] * gm + c["wm"] * wm + c["csf"] * csf
        img = (1 - weight) * tissue + weight * c["csf"] * brain
        if name == "FLAIR":
            img = img * rim_map
        img = img * bias_field(rng, img.shape, cfg.bias_amplitude) * rng.uniform(0.95, 1.05)
        img = rician_noise(rng, img, cfg.noise_sigma) * INTENSITY_SCALE
        images[name] = np.where(brain_mask, img, 0).astype(np.float32)  # skull-stripped: 0 outside the mask

    truth = (lacunes > 0).astype(np.uint8)
    raters = [truth] + [_perturb_rater(rng, lacunes, brain_mask, cfg.rater_miss_probability,
                                       cfg.rater_border_probability) for _ in range(cfg.n_raters - 1)]
    for fact, fill, gain in zip(lacune_facts, lac_fill, rim_gain):
        fact.update(fill=fill, flair_rim_gain=gain,
                    equivalent_diameter_mm=float((6 * fact["volume_mm3"] / np.pi) ** (1 / 3)))
    for fact, fill in zip(pvs_facts, pvs_fill):
        fact["fill"] = fill
    return VALDOSubject(images["T1"], images["T2"], images["FLAIR"], raters, lacunes, pvs, rim, brain_mask,
                        wm_mask, deep, affine, lacune_facts, pvs_facts)


def valdo_file_names(subject_id: str, n_raters: int) -> Tuple[List[str], List[str]]:
    """(image file names in channel order, rater mask file names) of ``sub-<subject_id>``."""
    sub = f"sub-{subject_id}"
    images = [f"{sub}_space-T1_desc-masked_{c}.nii.gz" for c in CHANNELS]
    raters = [f"{sub}_space-T1_desc-Rater{k}_Lacunes.nii.gz" for k in range(1, n_raters + 1)]
    return images, raters


def write_valdo_phantoms(out_dir: str, n_subjects: int = 10, seed: int = 0,
                         config: VALDOPhantomConfig = VALDOPhantomConfig(), first_id: int = 101,
                         overwrite: bool = False, progress: bool = False, n_unlabelled: int = 0) -> str:
    """Write ``out_dir/sub-<id>/`` VALDO task 3 subjects plus ``out_dir/phantom_manifest.json``; returns out_dir.

    Per subject: ``sub-<id>_space-T1_desc-masked_{T1,T2,FLAIR}.nii.gz`` and, for the ``n_subjects`` labelled
    ones, ``sub-<id>_space-T1_desc-Rater{1..n_raters}_Lacunes.nii.gz``. ``n_unlabelled`` more subjects (ids
    following) get images only, which the converter sends to ``imagesTs``; their lacunes are listed in the
    manifest only. The lacune-free share is applied to each group separately. The tree is built in a temporary
    sibling folder and renamed into place, so ``out_dir`` is either complete or absent.
    """
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
    if n_unlabelled < 0:
        raise ValueError(f"n_unlabelled must be >= 0, got {n_unlabelled}")
    if first_id < 1:
        raise ValueError(f"first_id must be >= 1, got {first_id}")
    with atomic_output_dir(out_dir, overwrite) as tmp:
        free = set(lesion_free_indices(n_subjects, seed, config.lacune_free_fraction))
        free |= {n_subjects + j for j in lesion_free_indices(n_unlabelled, seed, config.lacune_free_fraction,
                                                             split=1)}
        manifest = {"generator": "nnunetv2_ohem.phantoms.valdo.write_valdo_phantoms", "seed": seed,
                    "first_id": first_id, "config": asdict(config), "subjects": {}}
        iterator = range(n_subjects + n_unlabelled)
        if progress:
            from tqdm import tqdm
            iterator = tqdm(iterator, desc="VALDO phantoms", unit="subject")
        for i in iterator:
            sid = f"{first_id + i:03d}"
            labelled = i < n_subjects
            sub = make_valdo_subject(seed, i, config, lacune_free=i in free)
            folder = os.path.join(tmp, f"sub-{sid}")
            os.makedirs(folder)
            image_names, rater_names = valdo_file_names(sid, config.n_raters if labelled else 0)
            for name, img in zip(image_names, sub.images().values()):
                save_nifti(img, sub.affine, os.path.join(folder, name))
            for name, mask in zip(rater_names, sub.raters):
                save_nifti(mask, sub.affine, os.path.join(folder, name))
            manifest["subjects"][sid] = {
                "index": i, "labelled": labelled, "lacune_free": i in free, "shape": list(sub.t1.shape),
                "raters": rater_names, "n_lacunes": len(sub.lacune_facts), "n_pvs": len(sub.pvs_facts),
                "lacunes": sub.lacune_facts, "pvs": sub.pvs_facts}
        with open(os.path.join(tmp, "phantom_manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
    return os.path.abspath(out_dir)


valdo_config_from_dict = VALDOPhantomConfig.from_dict


__all__: Sequence[str] = ("VALDOPhantomConfig", "VALDOSubject", "make_valdo_subject", "write_valdo_phantoms",
                          "valdo_config_from_dict", "valdo_file_names", "deep_grey_mask", "segment_voxels",
                          "place_linear_pvs", "csf_weight", "CHANNELS", "DEEP_GREY_BOX_MNI")
