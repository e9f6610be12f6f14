"""Fake challenge trees with the real file names (tiny 8³ random volumes) for the converter tests.

Each ``make_*`` writes a tree under ``root`` and returns what the converter should produce:
``{output_case_id: Expected(images=[arrays in channel order], label=array or None, test=bool)}`` with the
label already in the *source* convention (tests apply the expected mapping themselves).
"""
import hashlib
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

SHAPE = (8, 8, 8)
SPACING = (0.9, 1.1, 1.3)
ORIGIN = (-10.5, 3.25, 7.0)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass
class Expected:
    images: List[np.ndarray]
    label: Optional[np.ndarray]
    test: bool = False
    paths: List[str] = field(default_factory=list)   # source image paths, channel order
    label_path: Optional[str] = None


def write(path: str, arr: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(map(float, spacing)))
    img.SetOrigin(tuple(map(float, origin)))
    img.SetDirection(tuple(map(float, direction)))
    sitk.WriteImage(img, path, useCompression=path.endswith(".gz"))
    return path


def read(path: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def tree_hash(root: str) -> Dict[str, str]:
    """relative path -> sha256 of every file (and '<dir>/' for folders): equal before/after = untouched."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = ""
        for f in filenames:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _image(rng) -> np.ndarray:
    return rng.normal(100, 20, SHAPE).astype(np.float32)


def _label(rng, values: Sequence[int], p_fg: float = 0.3, dtype=np.uint8) -> np.ndarray:
    fg = [v for v in values if v]
    lab = rng.choice(fg, size=SHAPE).astype(dtype)
    lab[rng.random(SHAPE) > p_fg] = 0
    # every foreground value present at least once, so a swapped mapping cannot go unnoticed
    for i, v in enumerate(fg):
        lab.flat[i] = v
    return lab


def _case(rng, folder: str, stems: Sequence[str], ext: str, label_stem: Optional[str], values, test=False,
          empty=False, label_dtype=np.uint8) -> Expected:
    images = [_image(rng) for _ in stems]
    paths = [write(os.path.join(folder, s + ext), a) for s, a in zip(stems, images)]
    label, label_path = None, None
    if label_stem is not None:
        label = np.zeros(SHAPE, label_dtype) if empty else _label(rng, values, dtype=label_dtype)
        label_path = write(os.path.join(folder, label_stem + ext), label)
    return Expected(images, label, test, paths, label_path)


def make_msseg2(root: str, seed: int = 0) -> Dict[str, Expected]:
    """training/013 (lesions, 4 experts), 015 (lesion-free), 021 (.nii, float32 mask); testing/030 (no GT)."""
    rng = np.random.default_rng(seed)
    stems = ("flair_time01_on_middle_space", "flair_time02_on_middle_space")
    exp = {}
    d = os.path.join(root, "training", "013")
    exp["MSSEG2_013"] = _case(rng, d, stems, ".nii.gz", "ground_truth", (0, 1))
    for k in range(1, 5):
        write(os.path.join(d, f"ground_truth_expert{k}.nii.gz"), _label(rng, (0, 1)))
    d = os.path.join(root, "training", "015")
    exp["MSSEG2_015"] = _case(rng, d, stems, ".nii.gz", "ground_truth", (0, 1), empty=True)
    write(os.path.join(d, "ground_truth_expert1.nii.gz"), np.zeros(SHAPE, np.uint8))
    d = os.path.join(root, "training", "021")
    exp["MSSEG2_021"] = _case(rng, d, stems, ".nii", "ground_truth", (0, 1), label_dtype=np.float32)
    d = os.path.join(root, "testing", "030")
    exp["MSSEG2_030"] = _case(rng, d, stems, ".nii.gz", None, (0, 1), test=True)
    with open(os.path.join(root, "README.txt"), "w") as f:
        f.write("fake MSSEG-II\n")
    return exp


def make_valdo(root: str, seed: int = 1) -> Dict[str, Expected]:
    """sub-101 (Rater1), sub-102 (Rater3, lacune-free), sub-103 (no rater mask → imagesTs)."""
    rng = np.random.default_rng(seed)
    exp = {}
    for sub, rater, empty in (("101", 1, False), ("102", 3, True), ("103", None, False)):
        s = f"sub-{sub}"
        stems = [f"{s}_space-T1_desc-masked_{m}" for m in ("T1", "T2", "FLAIR")]
        label_stem = None if rater is None else f"{s}_space-T1_desc-Rater{rater}_Lacunes"
        exp[f"VALDO_{sub}"] = _case(rng, os.path.join(root, s), stems, ".nii.gz", label_stem, (0, 1),
                                    test=rater is None, empty=empty)
    return exp


BRATS_VALUES = {2020: (0, 1, 2, 4), 2021: (0, 1, 2, 4), 2023: (0, 1, 2, 3)}


def make_brats(root: str, year: int, seed: int = 2) -> Dict[str, Expected]:
    """Two training cases and one validation case (no seg) in the release's folder/file naming.

    2020 uses ``.nii`` files in ``MICCAI_BraTS2020_*Data`` folders and case 355 has its segmentation under
    the public copy's odd name ``W39_1998.09.19_Segm.nii``.
    """
    rng = np.random.default_rng(seed + year)
    values = BRATS_VALUES[year]
    if year == 2020:
        train = [("MICCAI_BraTS2020_TrainingData", "BraTS20_Training_001"),
                 ("MICCAI_BraTS2020_TrainingData", "BraTS20_Training_355")]
        val = [("MICCAI_BraTS2020_ValidationData", "BraTS20_Validation_001")]
        ext, sep, mods = ".nii", "_", ("t1", "t1ce", "t2", "flair")
    elif year == 2021:
        train = [("", "BraTS2021_00000"), ("", "BraTS2021_00002")]
        val = [("", "BraTS2021_00100")]
        ext, sep, mods = ".nii.gz", "_", ("t1", "t1ce", "t2", "flair")
    else:
        train = [("", "BraTS-GLI-00000-000"), ("", "BraTS-GLI-00002-001")]
        val = [("", "BraTS-GLI-00100-000")]
        ext, sep, mods = ".nii.gz", "-", ("t1n", "t1c", "t2w", "t2f")
    exp = {}
    for container, case in train + val:
        d = os.path.join(root, container, case)
        stems = [f"{case}{sep}{m}" for m in mods]
        label_stem = None if (container, case) in val else f"{case}{sep}seg"
        exp[case] = _case(rng, d, stems, ext, label_stem, values, test=label_stem is None)
    if year == 2020:
        e = exp["BraTS20_Training_355"]
        odd = os.path.join(os.path.dirname(e.label_path), "W39_1998.09.19_Segm.nii")
        os.rename(e.label_path, odd)
        e.label_path = odd
        with open(os.path.join(root, "MICCAI_BraTS2020_TrainingData", "name_mapping.csv"), "w") as f:
            f.write("BraTS_2020_subject_ID\nBraTS20_Training_001\n")
    return exp


def make_acdc(root: str, seed: int = 3) -> Dict[str, Expected]:
    """training/patient001 (ED 1, ES 12, extra frame 05, 4D cine), patient002; testing/patient101 (with gt)."""
    rng = np.random.default_rng(seed)
    exp = {}
    for container, patient, ed, es in (("training", "patient001", 1, 12), ("training", "patient002", 1, 9),
                                       ("testing", "patient101", 1, 14)):
        d = os.path.join(root, container, patient)
        for frame in (ed, es):
            stem = f"{patient}_frame{frame:02d}"
            exp[stem] = _case(rng, d, [stem], ".nii.gz", stem + "_gt", (0, 1, 2, 3), test=container == "testing")
        with open(os.path.join(d, "Info.cfg"), "w") as f:
            f.write(f"ED: {ed}\nES: {es}\nGroup: DCM\nHeight: 184.0\nNbFrame: 30\nWeight: 95.0\n")
        cine = sitk.JoinSeries([sitk.GetImageFromArray(_image(rng)) for _ in range(3)])
        sitk.WriteImage(cine, os.path.join(d, f"{patient}_4d.nii.gz"))
    write(os.path.join(root, "training", "patient001", "patient001_frame05.nii.gz"), _image(rng))
    return exp


MAKERS = {"msseg2": make_msseg2, "valdo": make_valdo, "brats2020": lambda r: make_brats(r, 2020),
          "brats2021": lambda r: make_brats(r, 2021), "brats2023": lambda r: make_brats(r, 2023),
          "acdc": make_acdc}
