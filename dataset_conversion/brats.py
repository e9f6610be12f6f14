"""BraTS 2020 / 2021 / 2023 → nnU-Net raw dataset, and predictions back to the BraTS label convention.

Source layouts (``SOURCE/<case>/`` or one folder deeper, e.g. ``SOURCE/MICCAI_BraTS2020_TrainingData/<case>/``)::

    2020  BraTS20_Training_NNN/BraTS20_Training_NNN_{t1,t1ce,t2,flair,seg}.nii[.gz]   labels 0, 1, 2, 4
    2021  BraTS2021_NNNNN/BraTS2021_NNNNN_{t1,t1ce,t2,flair,seg}.nii.gz               labels 0, 1, 2, 4
    2023  BraTS-GLI-NNNNN-NNN/BraTS-GLI-NNNNN-NNN-{t1n,t1c,t2w,t2f,seg}.nii.gz        labels 0, 1, 2, 3

Channels and labels follow nnU-Net's ``Dataset137_BraTS21.py`` for every year: T1 → 0000, T1ce → 0001,
T2 → 0002, FLAIR → 0003; source 2 (edema) → 1, 1 (necrosis / non-enhancing core) → 2, enhancing tumour
(4, or 3 in 2023) → 3; trained as regions whole tumour (1, 2, 3), tumour core (2, 3), enhancing (3) with
``regions_class_order`` (1, 2, 3). Cases without a segmentation (validation data) go to ``imagesTs``.

BraTS 2020 quirk: in the public training data one case (``BraTS20_Training_355``) ships its segmentation
as ``W39_1998.09.19_Segm.nii`` instead of ``..._seg.nii``. A 2020 training case without ``_seg`` but with
exactly one other NIfTI file uses that file (it still has to pass every label/geometry check) and the
summary says so; more than one candidate is an error naming them.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from nnunetv2_ohem.atomic import AtomicFolder
from nnunetv2_ohem.cli_common import ignore_sigint
from nnunetv2_ohem.dataset_conversion.common import (Case, ConversionError, DatasetSpec,
                                                     check_source_dir, find_nifti, invert_mapping, remap_labels,
                                                     scan_case_dirs, strip_nifti, visible_entries, write_dataset,
                                                     read_image)

YEARS = (2020, 2021, 2023)
CASE_PATTERNS = {
    2020: re.compile(r"^BraTS20_(Training|Validation|Testing)_\d+$"),
    2021: re.compile(r"^BraTS2021_\d+$"),
    2023: re.compile(r"^BraTS-[A-Za-z]+-\d+-\d+$"),
}
#: modality file suffixes in nnU-Net channel order (T1, T1ce, T2, FLAIR)
MODALITY_SUFFIXES = {2020: ("_t1", "_t1ce", "_t2", "_flair"), 2021: ("_t1", "_t1ce", "_t2", "_flair"),
                     2023: ("-t1n", "-t1c", "-t2w", "-t2f")}
SEG_SUFFIX = {2020: "_seg", 2021: "_seg", 2023: "-seg"}
#: BraTS source label -> nnU-Net label (Dataset137 convention; 2023 marks enhancing tumour with 3, not 4)
LABEL_MAPS: Dict[int, Dict[int, int]] = {
    2020: {0: 0, 2: 1, 1: 2, 4: 3},
    2021: {0: 0, 2: 1, 1: 2, 4: 3},
    2023: {0: 0, 2: 1, 1: 2, 3: 3},
}
REGIONS = {"background": 0, "whole tumor": (1, 2, 3), "tumor core": (2, 3), "enhancing tumor": (3,)}
REGIONS_CLASS_ORDER = (1, 2, 3)
#: hidden file in a brats-back output folder: ``--overwrite`` replaces only folders that have it
BACK_MARKER = ".nnunetv2_ohem_brats_back"
REFERENCES = {
    2020: "https://www.med.upenn.edu/cbica/brats2020/data.html",
    2021: "https://www.synapse.org/#!Synapse:syn25829067/wiki/610863",
    2023: "https://www.synapse.org/#!Synapse:syn51156910/wiki/621282",
}


def check_year(year: Union[int, str, None]) -> Optional[int]:
    if year is None:
        return None
    try:
        value = int(year)
    except (TypeError, ValueError):
        value = None
    if value not in YEARS:
        raise ConversionError(f"BraTS year must be one of {', '.join(map(str, YEARS))}, got {year!r}")
    return value


def year_of_case(name: str) -> Optional[int]:
    """BraTS release a case folder name belongs to (``BraTS20_Training_001`` → 2020), else ``None``."""
    for year, pattern in CASE_PATTERNS.items():
        if pattern.match(name):
            return year
    return None


def detect_year(names: Iterable[str], source: str = "") -> int:
    """The one BraTS release all case names belong to; mixed or unknown names are an error."""
    years = {year_of_case(n) for n in names} - {None}
    if not years:
        raise ConversionError(f"{source}: no BraTS case folders (BraTS20_Training_NNN, BraTS2021_NNNNN or "
                              f"BraTS-GLI-NNNNN-NNN) found")
    if len(years) > 1:
        raise ConversionError(f"{source}: case folders of several BraTS releases ({sorted(years)}); convert "
                              f"them separately")
    return years.pop()


def discover_brats(source_dir: str, year: Union[int, str, None] = None) -> DatasetSpec:
    """Find BraTS cases under ``source_dir``; ``year`` (2020/2021/2023) is detected from names if ``None``."""
    year = check_year(year)
    source = check_source_dir(source_dir)
    case_dirs, skipped = scan_case_dirs(source, lambda p: year_of_case(os.path.basename(p)) is not None,
                                        "BraTS")
    detected = detect_year([os.path.basename(p) for p, _ in case_dirs], source)
    if year is not None and year != detected:
        raise ConversionError(f"{source}: case folders are named like BraTS {detected}, but year {year} was "
                              f"requested")
    year = detected
    cases, notes = [], []
    for folder, _ in case_dirs:
        case = os.path.basename(folder)
        images = []
        for suffix in MODALITY_SUFFIXES[year]:
            path = find_nifti(folder, case + suffix)
            if path is None:
                raise ConversionError(f"{os.path.join(folder, case + suffix)}.nii.gz: missing {suffix[1:]} channel of "
                                      f"BraTS case {case}")
            images.append(path)
        seg = find_nifti(folder, case + SEG_SUFFIX[year])
        others = [n for n in visible_entries(folder)
                  if os.path.join(folder, n) not in images and os.path.join(folder, n) != seg]
        if seg is None and year == 2020 and "_Training_" in case:
            candidates = [n for n in others if strip_nifti(n)]
            if len(candidates) != 1:
                found = f"candidates: {', '.join(candidates)}" if candidates else "no other NIfTI file"
                raise ConversionError(f"{os.path.join(folder, case + SEG_SUFFIX[year])}.nii: missing segmentation of "
                                      f"BraTS 2020 training case {case} ({found})")
            seg = os.path.join(folder, candidates[0])
            others.remove(candidates[0])
            notes.append(f"{case}: segmentation taken from '{candidates[0]}' (known BraTS 2020 file-name quirk; "
                         f"checked like any other)")
        skipped.extend((os.path.join(folder, n), "not a BraTS modality or segmentation") for n in others)
        cases.append(Case(case, tuple(images), seg, test=seg is None))
    return DatasetSpec(
        command="brats", source_dir=source, default_name=f"BraTS{year}",
        channel_names={0: "T1", 1: "T1ce", 2: "T2", 3: "Flair"}, labels=dict(REGIONS),
        label_map=dict(LABEL_MAPS[year]), regions_class_order=REGIONS_CLASS_ORDER, cases=cases,
        description=f"BraTS {year} glioma segmentation; labels remapped as nnU-Net's Dataset137 "
                    f"({LABEL_MAPS[year]}), trained as regions WT/TC/ET; nnunetv2_ohem_convert brats-back "
                    f"--year {year} maps predictions back",
        reference=REFERENCES[year], licence=f"see {REFERENCES[year]} (data usage agreement of the challenge)",
        skipped=skipped, notes=notes,
        value_names={0: "background", 1: "edema", 2: "necrotic/non-enhancing core", 3: "enhancing tumour"})


def convert_brats(source_dir: str, dataset_id: int, name: Optional[str] = None, raw_dir: Optional[str] = None,
                  overwrite: bool = False, num_processes: int = 1, year: Union[int, str, None] = None,
                  progress: bool = False) -> str:
    """Convert BraTS 2020/2021/2023 to ``raw_dir/DatasetXXX_<name or BraTS<year>>``; returns that folder."""
    spec = discover_brats(source_dir, year)
    return write_dataset(spec, dataset_id, name, raw_dir, overwrite, num_processes, progress=progress)


# -------------------------------------------------------------------------------------------- brats-back

def labels_back_to_brats(segmentation: np.ndarray, year: Union[int, str]) -> np.ndarray:
    """nnU-Net labels (1 edema, 2 necrosis, 3 enhancing) → BraTS ``year`` labels; inverse of ``LABEL_MAPS``.

    2020/2021: 1→2, 2→1, 3→4; 2023: 1→2, 2→1, 3→3. Values other than 0..3 raise ``ValueError``.
    """
    return remap_labels(segmentation, invert_mapping(LABEL_MAPS[check_year(year)]))


def _back_one(args: Tuple[str, str, int]) -> str:
    src, dst, year = args
    image = read_image(src, label=True)
    try:
        out = labels_back_to_brats(sitk.GetArrayViewFromImage(image), year)
    except ValueError as e:
        raise ConversionError(f"{src}: {e}") from None
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    sitk.WriteImage(result, dst, useCompression=True)
    return dst


def brats_back(pred_dir: str, out_dir: str, year: Union[int, str], overwrite: bool = False,
               num_processes: int = 1) -> List[str]:
    """Write every NIfTI prediction of ``pred_dir`` with BraTS ``year`` labels into ``out_dir`` (same names).

    ``out_dir`` is built atomically (temporary sibling, renamed at the end); it must not exist unless
    ``overwrite``, and then it must be an earlier brats-back output (it holds :data:`BACK_MARKER`). Returns the
    written files.
    """
    year = check_year(year)
    if year is None:
        raise ConversionError("brats-back needs the BraTS year (--year 2020, 2021 or 2023)")
    pred = check_source_dir(pred_dir)
    files = [n for n in visible_entries(pred) if strip_nifti(n) and os.path.isfile(os.path.join(pred, n))]
    if not files:
        raise ConversionError(f"{pred}: no NIfTI predictions found")
    out = os.path.abspath(out_dir)
    if os.path.realpath(out) == os.path.realpath(pred) or os.path.realpath(out).startswith(
            os.path.realpath(pred) + os.sep):
        raise ConversionError(f"{out}: output folder must not be (inside) the prediction folder")
    if os.path.lexists(out) and not overwrite:
        raise ConversionError(f"{out}: output folder already exists (use --overwrite to replace it)")
    if os.path.lexists(out) and not os.path.isfile(os.path.join(out, BACK_MARKER)):
        raise ConversionError(f"{out}: --overwrite refused, the folder has no {BACK_MARKER}, so brats-back did not "
                              f"write it; remove it yourself or choose another output folder")
    jobs = []
    with AtomicFolder(out, overwrite) as tmp:
        jobs = [(os.path.join(pred, n), os.path.join(tmp, strip_nifti(n) + ".nii.gz"), year) for n in files]
        if num_processes > 1 and len(jobs) > 1:
            import multiprocessing
            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs)), ignore_sigint) as pool:
                pool.map(_back_one, jobs)
        else:
            for job in jobs:
                _back_one(job)
        with open(os.path.join(tmp, BACK_MARKER), "w") as f:
            f.write(f"written by nnunetv2_ohem_convert brats-back --year {year} from {pred}; --overwrite replaces "
                    f"only folders with this file\n")
    written = [os.path.join(out, os.path.basename(dst)) for _, dst, _ in jobs]
    mapping = ", ".join(f"{k}→{v}" for k, v in invert_mapping(LABEL_MAPS[year]).items() if k != v)
    print(f"Wrote {len(written)} BraTS {year} segmentations to {out} (labels {mapping})")
    return written
