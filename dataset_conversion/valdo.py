"""VALDO 2021 task 3 (lacunes) → nnU-Net raw dataset.

Source layout (``.nii.gz`` or ``.nii``)::

    SOURCE/sub-XXX/sub-XXX_space-T1_desc-masked_T1.nii.gz      -> VALDO_XXX_0000
                   sub-XXX_space-T1_desc-masked_T2.nii.gz      -> VALDO_XXX_0001
                   sub-XXX_space-T1_desc-masked_FLAIR.nii.gz   -> VALDO_XXX_0002
                   sub-XXX_space-T1_desc-Rater{N}_Lacunes.nii.gz   binary lacune mask; N varies per subject

(``SOURCE/<folder>/sub-XXX/...`` works too). The rater file is found by pattern; a subject with several
rater files needs ``rater=N``. Subjects without a rater file go to ``imagesTs``.
"""
from __future__ import annotations

import os
import re
from typing import Optional

from nnunetv2_ohem.dataset_conversion.common import (Case, ConversionError, DatasetSpec, check_source_dir,
                                                     digits_or_name, find_nifti, scan_case_dirs, strip_nifti,
                                                     visible_entries, write_dataset)

MODALITIES = ("T1", "T2", "FLAIR")
_SUBJECT_RE = re.compile(r"^sub-(.+)$")
_RATER_RE = re.compile(r"^(?P<sub>sub-.+)_space-T1_desc-Rater(?P<rater>\d+)_Lacunes$")


def _is_case(folder: str) -> bool:
    return bool(_SUBJECT_RE.match(os.path.basename(folder)))


def discover_valdo(source_dir: str, rater: Optional[int] = None) -> DatasetSpec:
    """Find VALDO task 3 subjects under ``source_dir`` (nothing is read or written yet)."""
    source = check_source_dir(source_dir)
    case_dirs, skipped = scan_case_dirs(source, _is_case, "VALDO")
    cases = []
    for folder, _ in case_dirs:
        subject = os.path.basename(folder)
        images = []
        for modality in MODALITIES:
            stem = f"{subject}_space-T1_desc-masked_{modality}"
            path = find_nifti(folder, stem)
            if path is None:
                raise ConversionError(f"{os.path.join(folder, stem)}.nii.gz: missing {modality} channel of VALDO "
                                      f"subject {subject}")
            images.append(path)
        raters = {}
        for n in visible_entries(folder):
            m = _RATER_RE.match(strip_nifti(n) or "")
            if m and m.group("sub") == subject:
                raters[int(m.group("rater"))] = os.path.join(folder, n)
        if rater is not None and raters and rater not in raters:
            raise ConversionError(f"{folder}: no Rater{rater} lacune mask (found "
                                  f"{', '.join(os.path.basename(p) for p in raters.values())})")
        if rater is None and len(raters) > 1:
            raise ConversionError(f"{folder}: several rater masks ({', '.join(sorted(map(os.path.basename, raters.values())))}); "
                                  f"choose one with --rater N")
        label = raters.get(rater) if rater is not None else next(iter(raters.values()), None)
        used = {os.path.basename(p) for p in images} | ({os.path.basename(label)} if label else set())
        skipped.extend((os.path.join(folder, n), "not a VALDO task-3 image or the chosen rater mask")
                       for n in visible_entries(folder) if n not in used)
        cases.append(Case(f"VALDO_{digits_or_name(_SUBJECT_RE.match(subject).group(1))}", tuple(images), label,
                          test=label is None))
    return DatasetSpec(
        command="valdo", source_dir=source, default_name="VALDO",
        channel_names={0: "T1", 1: "T2", 2: "FLAIR"}, labels={"background": 0, "lacune": 1},
        label_map={0: 0, 1: 1}, cases=cases,
        description="VALDO 2021 (MICCAI) task 3: lacunes of presumed vascular origin on T1, T2 and FLAIR in T1 "
                    "space" + (f"; rater {rater}" if rater is not None else "; rater mask found by pattern"),
        reference="https://valdo.grand-challenge.org/Task3/",
        licence="see https://valdo.grand-challenge.org/ (data usage agreement of the challenge)",
        skipped=skipped)


def convert_valdo(source_dir: str, dataset_id: int, name: Optional[str] = None, raw_dir: Optional[str] = None,
                  overwrite: bool = False, num_processes: int = 1, rater: Optional[int] = None,
                  progress: bool = False) -> str:
    """Convert VALDO task 3 to ``raw_dir/DatasetXXX_<name or VALDO>``; returns that folder.

    ``rater``: pick ``Rater{rater}_Lacunes`` where a subject has several masks (default: the only one).
    """
    spec = discover_valdo(source_dir, rater)
    return write_dataset(spec, dataset_id, name, raw_dir, overwrite, num_processes, progress=progress)
