"""BraTS-like glioma phantoms on the MNI152 brain template, written in the BraTS 2020 / 2021 / 2023 layouts.

Each subject is four co-registered, skull-stripped channels (T1, T1ce, T2, FLAIR) of one random similarity
transform of the MNI152 anatomy (see :func:`~nnunetv2_ohem.phantoms.anatomy.subject_anatomy`) with one (or
``n_tumours``) glioma of nested sub-regions, grown voxel by voxel as irregular blobs:

* whole tumour (WT): a blob of drawn volume (log-uniform in ``whole_tumour_volume_cm3``) in brain tissue,
  seeded in deep white matter; everything of it outside the core is peritumoral edema (ED);
* tumour core (TC): a blob inside the WT eroded by ``edema_margin_mm``, so edema surrounds it everywhere;
* necrosis (NCR): a blob inside the core eroded by ``enhancing_rim_mm``; the rest of the core is the
  enhancing tumour (ET), a shell around the necrotic centre as in glioblastoma. A share
  ``no_enhancing_fraction`` of subjects has no ET: their core is non-enhancing tumour (label 1 too, as BraTS
  labels NCR/NET), like low-grade gliomas.

Intensities per channel are tissue contrasts (``TISSUE_CONTRAST``) with each sub-region blended in at its own
contrast (``TUMOUR_CONTRAST``: edema bright on T2/FLAIR, enhancing rim very bright on T1ce, necrosis dark on
T1/T1ce and bright on T2), a smooth texture inside the tumour, partial-volume edges, and per channel its own
gain, bias field and Rician noise; voxels outside the brain mask are 0 (skull-stripped like BraTS).

Labels use the BraTS source convention of the written year (2020/2021: 1 NCR, 2 ED, 4 ET; 2023: 1 NCR,
2 ED, 3 ET), so the folder goes through ``nnunetv2_ohem_convert brats`` unchanged. Same seed and config give
the same bytes; subject ``i`` depends only on ``(seed, i)`` (the no-ET subjects too, see
:func:`has_enhancing`), so adding subjects leaves earlier ones unchanged.
"""
import json
import os
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple

import cc3d
import numpy as np
from scipy import ndimage

from nnunetv2_ohem.dataset_conversion.brats import LABEL_MAPS, MODALITY_SUFFIXES, SEG_SUFFIX, YEARS
from nnunetv2_ohem.phantoms.anatomy import (INTENSITY_SCALE, TISSUE_CONTRAST, PhantomConfigBase,
                                            atomic_output_dir, bias_field, check_ranges, check_unit_interval,
                                            grow_blob, rician_noise, save_nifti)

CHANNELS: Tuple[str, ...] = ("t1", "t1ce", "t2", "flair")  # nnU-Net channel order 0000..0003
#: BraTS 2021 source labels, the convention of :attr:`BraTSSubject.label`
NCR, ED, ET = 1, 2, 4
#: intensity of each tumour sub-region per channel on the ``TISSUE_CONTRAST`` scale (normal WM: 1 on T1, T1ce
#: and FLAIR, 0.55 on T2). Edema: water, bright on T2/FLAIR, mildly dark on T1. Enhancing rim: gadolinium
#: leaks through the broken blood-brain barrier, very bright on T1ce only. Necrosis: fluid-like, dark on T1/T1ce,
#: bright on T2, partly suppressed on FLAIR. Non-enhancing core (no-ET subjects): dark on T1, bright on T2/FLAIR.
TUMOUR_CONTRAST: Dict[str, Dict[str, float]] = {
    "t1": {"edema": 0.8, "necrosis": 0.35, "enhancing": 0.8, "non_enhancing": 0.6},
    "t1ce": {"edema": 0.8, "necrosis": 0.35, "enhancing": 1.9, "non_enhancing": 0.65},
    "t2": {"edema": 1.25, "necrosis": 1.5, "enhancing": 0.95, "non_enhancing": 1.15},
    "flair": {"edema": 2.0, "necrosis": 0.9, "enhancing": 1.5, "non_enhancing": 1.7},
}
#: first case number per year, as in the public releases (BraTS20_Training_001, BraTS2021_00000, ...)
DEFAULT_FIRST_ID = {2020: 1, 2021: 0, 2023: 0}
ID_DIGITS = {2020: 3, 2021: 5, 2023: 5}
#: BraTS 2020 ships uncompressed NIfTI, later releases gzip
FILE_ENDING = {2020: ".nii", 2021: ".nii.gz", 2023: ".nii.gz"}
#: 26-neighbourhood structuring element, so "not touching" also holds diagonally
_CUBE = np.ones((3, 3, 3), bool)


@dataclass(frozen=True)
class BraTSPhantomConfig(PhantomConfigBase):
    """Every knob of the generator; stored in the manifest so a phantom set can be regenerated exactly.

    Volumes are physical (cm³), margins in mm; both are converted to voxels for the given ``voxel_size``.
    """

    n_tumours: Tuple[int, int] = (1, 1)
    whole_tumour_volume_cm3: Tuple[float, float] = (10.0, 120.0)
    core_fraction: Tuple[float, float] = (0.25, 0.6)  # TC / WT
    necrosis_fraction: Tuple[float, float] = (0.2, 0.6)  # NCR / TC, subjects with ET
    edema_margin_mm: float = 3.0  # least edema between the core and normal tissue (and always >= 1 voxel)
    enhancing_rim_mm: float = 3.0  # least thickness of the enhancing shell around necrosis (>= 1 voxel)
    no_enhancing_fraction: float = 0.15
    contrast_jitter: float = 0.1  # per subject, region and channel: contrast * U(1 - j, 1 + j)
    texture_amplitude: float = 0.08  # relative std of the smooth intensity texture inside the tumour
    noise_sigma: float = 0.03
    bias_amplitude: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        check_ranges(self, ("n_tumours", "whole_tumour_volume_cm3", "core_fraction", "necrosis_fraction"))
        if self.n_tumours[0] < 1:
            raise ValueError(f"n_tumours must be at least 1 per subject (every BraTS case has a tumour), "
                             f"got {self.n_tumours}")
        for name in ("core_fraction", "necrosis_fraction"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi < 1:
                raise ValueError(f"{name} must lie strictly between 0 and 1 (a part of the region outside it "
                                 f"must remain), got {(lo, hi)}")
        min_voxels = self.whole_tumour_volume_cm3[0] * 1000.0 / self.voxel_size ** 3
        if min_voxels < 27:
            raise ValueError(f"whole_tumour_volume_cm3 {self.whole_tumour_volume_cm3} at voxel_size "
                             f"{self.voxel_size} mm gives {min_voxels:.1f} voxels; nested sub-regions need at "
                             f"least 27 (use a larger volume or smaller voxels)")
        for name in ("edema_margin_mm", "enhancing_rim_mm", "noise_sigma", "bias_amplitude", "texture_amplitude"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_unit_interval(self, ("no_enhancing_fraction", "contrast_jitter"))


@dataclass
class BraTSSubject:
    """One generated subject; arrays are indexed (x, y, z) in RAS voxel order like the written NIfTI files.

    ``label`` uses the BraTS 2021 source convention (0, 1 NCR / non-enhancing core, 2 ED, 4 ET);
    :meth:`seg` gives any year's convention and :meth:`nnunet_label` nnU-Net's (1 ED, 2 NCR, 3 ET).
    """

    images: Dict[str, np.ndarray]  # CHANNELS order
    label: np.ndarray
    brain_mask: np.ndarray
    wm_mask: np.ndarray
    affine: np.ndarray
    facts: Dict = field(default_factory=dict)

    @property
    def voxel_volume(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def seg(self, year: int) -> np.ndarray:
        """Label in BraTS ``year``'s source convention (2023 marks ET with 3 instead of 4)."""
        return _remap(_remap(self.label, LABEL_MAPS[2021]), {v: k for k, v in LABEL_MAPS[_check_year(year)].items()})

    def nnunet_label(self) -> np.ndarray:
        """Label as our converter writes it (nnU-Net's Dataset137: 1 edema, 2 necrosis, 3 enhancing)."""
        return _remap(self.label, LABEL_MAPS[2021])


def _remap(label: np.ndarray, mapping: Dict[int, int]) -> np.ndarray:
    lut = np.zeros(max(mapping) + 1, np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut[label]


def _check_year(year: int) -> int:
    if year not in YEARS:
        raise ValueError(f"year must be one of {YEARS} (BraTS releases our converter reads), got {year!r}")
    return int(year)


# ------------------------------------------------------------------------------------------- no-ET subjects

def no_enhancing_count(n_subjects: int, fraction: float) -> int:
    """Subjects without ET among the first ``n_subjects``: ``floor(n f + 1/2)`` (round half up), computed in
    exact rational arithmetic so e.g. 10 x 0.15 is not lost to floating-point error."""
    f = Fraction(fraction).limit_denominator(10 ** 6)
    return int(n_subjects * f + Fraction(1, 2))


def has_enhancing(index: int, fraction: float) -> bool:
    """Whether subject ``index`` has enhancing tumour: it has none where the no-ET count grows, so every set of
    subjects ``0..n-1`` holds exactly :func:`no_enhancing_count` (n) of them, whatever its size."""
    return no_enhancing_count(index + 1, fraction) == no_enhancing_count(index, fraction)


# ------------------------------------------------------------------------------------------- tumour geometry

def _inner(mask: np.ndarray, margin_mm: float, voxel_size: float) -> np.ndarray:
    """Voxels of ``mask`` at least ``margin_mm`` (Euclidean, so shapes stay round) from its outside and never
    26-adjacent to it (one erosion by the 3x3x3 cube), so a region grown in them cannot touch the outside, not
    even diagonally. Border voxels of the array count as touching the outside."""
    eroded = ndimage.binary_erosion(mask, _CUBE)
    return eroded & (ndimage.distance_transform_edt(mask, sampling=voxel_size) >= margin_mm)


def _blob_in(rng: np.random.Generator, allowed: np.ndarray, n_target: int, voxel_size: float) -> Optional[np.ndarray]:
    """A :func:`grow_blob` of ``min(n_target, seed component size)`` voxels inside ``allowed``, seeded at a random
    voxel at least half as deep as the deepest one (off-centre but not at the border); None if ``allowed`` is
    empty. Capping by the 6-connected component makes growth always succeed."""
    if not allowed.any():
        return None
    depth = ndimage.distance_transform_edt(allowed)
    deep = np.argwhere(depth >= 0.5 * depth.max())
    seed = tuple(int(i) for i in deep[rng.integers(len(deep))])
    components = cc3d.connected_components(allowed, connectivity=6)
    size = int((components == components[seed]).sum())
    return grow_blob(rng, allowed, seed, min(int(n_target), size), voxel_size)


def _to_mask(indices: Optional[np.ndarray], shape: Tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    if indices is not None and len(indices):
        mask[tuple(indices.T)] = True
    return mask


def _box(indices: np.ndarray, shape: Tuple[int, ...], pad: int) -> Tuple[slice, ...]:
    lo = np.maximum(indices.min(0) - pad, 0)
    hi = np.minimum(indices.max(0) + pad + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def grow_nested_tumour(rng: np.random.Generator, tissue: np.ndarray, centre: Tuple[int, int, int], n_whole: int,
                       core_fraction: float, necrosis_fraction: float, margin_mm: float, rim_mm: float,
                       voxel_size: float, with_enhancing: bool) -> Optional[Tuple[np.ndarray, Dict[str, int]]]:
    """Source-convention label (0, 1, 2, 4) of one glioma grown from ``centre`` inside ``tissue``, and its voxel
    counts; None when the whole tumour does not fit or leaves no room for a core.

    WT: ``n_whole`` voxels. TC: ``round(core_fraction * n_whole)`` voxels (fewer if the room runs out) at least
    ``margin_mm`` inside WT (:func:`_inner`), so edema wraps it. Subjects with ET: necrosis of
    ``round(necrosis_fraction * |TC|)`` voxels at least ``rim_mm`` inside TC, so the enhancing shell
    separates necrosis from edema everywhere (possibly empty for a thin core: a solidly enhancing tumour).
    """
    whole_idx = grow_blob(rng, tissue, centre, n_whole, voxel_size)
    if whole_idx is None:
        return None
    # all the remaining work happens in the tumour's bounding box, padded so erosion sees the outside
    box = _box(whole_idx, tissue.shape, pad=1)
    offset = np.array([s.start for s in box])
    whole = _to_mask(whole_idx - offset, tuple(s.stop - s.start for s in box))
    n_core = max(1, round(core_fraction * n_whole))
    core = _to_mask(_blob_in(rng, _inner(whole, margin_mm, voxel_size), n_core, voxel_size), whole.shape)
    if not core.any():
        return None
    necrosis = np.zeros_like(core)
    if with_enhancing:
        n_nec = max(1, round(necrosis_fraction * int(core.sum())))
        necrosis = _to_mask(_blob_in(rng, _inner(core, rim_mm, voxel_size), n_nec, voxel_size), core.shape)
    label = np.zeros(tissue.shape, np.uint8)
    sub = np.zeros(whole.shape, np.uint8)
    sub[whole] = ED
    sub[core] = ET if with_enhancing else NCR
    sub[necrosis] = NCR
    label[box] = sub
    counts = {"whole": int(whole.sum()), "core": int(core.sum()), "necrosis": int(necrosis.sum()),
              "enhancing": int(core.sum() - necrosis.sum()) if with_enhancing else 0,
              "edema": int(whole.sum() - core.sum())}
    return label, counts


def place_tumours(rng: np.random.Generator, cfg: BraTSPhantomConfig, tissue: np.ndarray, wm_mask: np.ndarray,
                  brain_depth_mm: np.ndarray, with_enhancing: bool, max_tries: int = 30
                  ) -> Tuple[np.ndarray, List[Dict]]:
    """Source-convention label of ``n_tumours`` gliomas that do not touch each other, and their facts.

    Gliomas arise in white matter: each is seeded at a WM voxel at least half its equivalent-sphere radius
    ``(3V / 4 pi)^(1/3)`` deep in the brain (any tissue voxel if none is that deep), then grown in ``tissue``.
    """
    v = float(cfg.voxel_size)
    label = np.zeros(tissue.shape, np.uint8)
    free = tissue.copy()
    facts: List[Dict] = []
    n = int(rng.integers(cfg.n_tumours[0], cfg.n_tumours[1] + 1))
    for k in range(n):
        lo, hi = cfg.whole_tumour_volume_cm3
        target_mm3 = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) * 1000.0
        n_whole = max(27, int(round(target_mm3 / v ** 3)))
        radius = (3 * target_mm3 / (4 * np.pi)) ** (1 / 3)
        candidates = np.argwhere(wm_mask & free & (brain_depth_mm >= 0.5 * radius))
        if not len(candidates):
            candidates = np.argwhere(free)
        grown = None
        for _ in range(max_tries):
            centre = tuple(int(i) for i in candidates[rng.integers(len(candidates))])
            grown = grow_nested_tumour(rng, free, centre, n_whole, rng.uniform(*cfg.core_fraction),
                                       rng.uniform(*cfg.necrosis_fraction), cfg.edema_margin_mm,
                                       cfg.enhancing_rim_mm, v, with_enhancing)
            if grown is not None:
                break
        if grown is None:
            raise RuntimeError(f"could not place tumour {k + 1} of {n_whole} voxels in {max_tries} tries; lower "
                               f"whole_tumour_volume_cm3 or n_tumours")
        one, counts = grown
        label[one > 0] = one[one > 0]
        # keep a 26-neighbourhood gap so several tumours stay separate
        free &= ~ndimage.binary_dilation(one > 0, _CUBE)
        facts.append({"centre_voxel": list(centre), "target_whole_volume_mm3": target_mm3,
                      "n_voxels": counts, "volume_mm3": {k2: c * v ** 3 for k2, c in counts.items()}})
    return label, facts


# ------------------------------------------------------------------------------------------- intensities

def region_names(with_enhancing: bool) -> Dict[int, str]:
    """Source label -> ``TUMOUR_CONTRAST`` key (label 1 is necrosis with ET, non-enhancing core without)."""
    return {ED: "edema", NCR: "necrosis" if with_enhancing else "non_enhancing", ET: "enhancing"}


def tumour_images(rng: np.random.Generator, cfg: BraTSPhantomConfig, gm: np.ndarray, wm: np.ndarray,
                  brain: np.ndarray, brain_mask: np.ndarray, label: np.ndarray,
                  with_enhancing: bool) -> Dict[str, np.ndarray]:
    """The four channels: ``I = (1 - sum_k w_k) I_tissue + sum_k w_k c_k (1 + a T)``, with ``I_tissue`` the
    tissue mixture ``c_GM p_GM + c_WM p_WM + c_CSF p_CSF``, ``w_k`` the sub-region masks blurred by half a voxel
    (partial volume; they sum to <= 1), ``c_k`` the jittered sub-region contrast and ``T`` a smooth unit-std
    texture shared by all channels (tumour heterogeneity is a tissue property). Then per channel a gain, bias
    field and Rician noise, and 0 outside the brain mask."""
    csf = np.clip(brain - gm - wm, 0, 1)
    names = region_names(with_enhancing)
    box = _box(np.argwhere(label > 0), label.shape, pad=3)
    weights = {code: ndimage.gaussian_filter((label[box] == code).astype(np.float32), 0.5) for code in names}
    texture = ndimage.gaussian_filter(rng.standard_normal(label[box].shape).astype(np.float32),
                                      max(0.7, 3.0 / cfg.voxel_size))
    texture /= max(float(texture.std()), 1e-6)
    images = {}
    for ch in CHANNELS:
        tissue = TISSUE_CONTRAST[ch]
        img = (tissue["gm"] * gm + tissue["wm"] * wm + tissue["csf"] * csf).astype(np.float32)
        tumour = np.zeros(texture.shape, np.float32)
        for code, name in names.items():
            c = TUMOUR_CONTRAST[ch][name] * rng.uniform(1 - cfg.contrast_jitter, 1 + cfg.contrast_jitter)
            tumour += weights[code] * c
        tumour *= 1 + cfg.texture_amplitude * texture
        img[box] = img[box] * (1 - sum(weights.values())) + tumour
        img = img * bias_field(rng, img.shape, cfg.bias_amplitude) * rng.uniform(0.95, 1.05)
        img = rician_noise(rng, img, cfg.noise_sigma)
        images[ch] = np.where(brain_mask, img * INTENSITY_SCALE, 0).astype(np.float32)
    return images


def make_brats_subject(seed: int, index: int, config: BraTSPhantomConfig = BraTSPhantomConfig(),
                       with_enhancing: bool = True) -> BraTSSubject:
    """Generate subject ``index`` of the set with ``seed`` (RNG seeded by ``(seed, index)``).

    :func:`write_brats_phantoms` passes ``with_enhancing=has_enhancing(index, config.no_enhancing_fraction)``.
    """
    cfg = config
    rng = np.random.default_rng([int(seed), int(index)])
    gm, wm, brain, affine = cfg.anatomy(rng)
    brain_mask = brain > 0.5
    wm_mask = (wm > 0.5) & brain_mask
    # gliomas grow in parenchyma and displace rather than fill the ventricles/sulci
    tissue = brain_mask & (gm + wm >= 0.5)
    depth_mm = ndimage.distance_transform_edt(brain_mask) * cfg.voxel_size
    label, tumours = place_tumours(rng, cfg, tissue, wm_mask, depth_mm, with_enhancing)
    images = tumour_images(rng, cfg, gm, wm, brain, brain_mask, label, with_enhancing)
    counts = {name: int((label == code).sum()) for code, name in ((NCR, "ncr"), (ED, "ed"), (ET, "et"))}
    facts = {"with_enhancing": bool(with_enhancing), "shape": list(label.shape), "tumours": tumours,
             "label_voxels": counts}
    return BraTSSubject(images, label, brain_mask, wm_mask, affine, facts)


# ------------------------------------------------------------------------------------------- writing

def brats_case_name(year: int, number: int, validation: bool = False) -> str:
    """Case folder name of BraTS ``year``: ``BraTS20_Training_001`` / ``BraTS20_Validation_001``,
    ``BraTS2021_00000``, ``BraTS-GLI-00000-000`` (2021 and 2023 name validation cases like training ones)."""
    year = _check_year(year)
    if year == 2020:
        return f"BraTS20_{'Validation' if validation else 'Training'}_{number:03d}"
    if year == 2021:
        return f"BraTS2021_{number:05d}"
    return f"BraTS-GLI-{number:05d}-000"


def write_brats_phantoms(out_dir: str, n_subjects: int = 10, seed: int = 0,
                         config: BraTSPhantomConfig = BraTSPhantomConfig(), year: int = 2021,
                         first_id: Optional[int] = None, overwrite: bool = False, progress: bool = False,
                         n_validation: int = 0) -> str:
    """Write ``n_subjects`` BraTS ``year`` training cases (four channels + seg) and ``n_validation`` more cases
    without seg (our converter sends those to ``imagesTs``) into ``out_dir/<case>/``, plus
    ``out_dir/phantom_manifest.json``; returns the absolute ``out_dir``.

    Case numbers start at ``first_id`` (default: 1 for 2020, 0 otherwise, like the releases); validation cases
    continue the numbering and are subjects ``n_subjects, ...`` of the seed. File names follow
    ``MODALITY_SUFFIXES`` / ``SEG_SUFFIX`` of the converter, ``.nii`` for 2020 and ``.nii.gz`` later. The tree is
    built in a temporary sibling folder and renamed into place, so ``out_dir`` is either complete or absent.
    """
    year = _check_year(year)
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
    if n_validation < 0:
        raise ValueError(f"n_validation must be >= 0, got {n_validation}")
    first = DEFAULT_FIRST_ID[year] if first_id is None else int(first_id)
    last = first + n_subjects + n_validation - 1
    if first < 0 or last >= 10 ** ID_DIGITS[year]:
        raise ValueError(f"case numbers {first}..{last} do not fit the {ID_DIGITS[year]} digits of BraTS {year}")
    ending = FILE_ENDING[year]
    with atomic_output_dir(out_dir, overwrite) as tmp:
        manifest = {"generator": "nnunetv2_ohem.phantoms.brats.write_brats_phantoms", "seed": seed, "year": year,
                    "config": asdict(config), "subjects": {}}
        iterator = range(n_subjects + n_validation)
        if progress:
            from tqdm import tqdm
            iterator = tqdm(iterator, desc="BraTS phantoms", unit="subject")
        for i in iterator:
            validation = i >= n_subjects
            case = brats_case_name(year, first + i, validation)
            sub = make_brats_subject(seed, i, config, has_enhancing(i, config.no_enhancing_fraction))
            folder = os.path.join(tmp, case)
            os.makedirs(folder)
            for ch, suffix in zip(CHANNELS, MODALITY_SUFFIXES[year]):
                save_nifti(sub.images[ch], sub.affine, os.path.join(folder, case + suffix + ending))
            if not validation:
                save_nifti(sub.seg(year), sub.affine, os.path.join(folder, case + SEG_SUFFIX[year] + ending))
            manifest["subjects"][case] = {"index": i, "split": "validation" if validation else "training",
                                          **sub.facts}
        with open(os.path.join(tmp, "phantom_manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
    return os.path.abspath(out_dir)


brats_config_from_dict = BraTSPhantomConfig.from_dict


__all__: Sequence[str] = ("BraTSPhantomConfig", "BraTSSubject", "CHANNELS", "TUMOUR_CONTRAST", "make_brats_subject",
                          "write_brats_phantoms", "brats_case_name", "has_enhancing", "no_enhancing_count",
                          "grow_nested_tumour", "brats_config_from_dict")
