"""MSSEG-II (MICCAI 2021, new multiple-sclerosis lesions) → nnU-Net raw dataset.

Source layout (``.nii.gz`` or ``.nii``)::

    SOURCE/training/<id>/flair_time01_on_middle_space.nii.gz   -> <case>_0000
                         flair_time02_on_middle_space.nii.gz   -> <case>_0001
                         ground_truth.nii.gz                   consensus of new lesions (default label)
                         ground_truth_expert{1..4}.nii.gz      single experts (``label="expertN"``)

``SOURCE/<id>/...`` works too. Cases are named ``MSSEG2_<id>`` (e.g. ``MSSEG2_013``). Cases without any
ground truth go to ``imagesTs``; cases under a ``test``/``testing`` folder go to ``imagesTs`` with their
label in ``labelsTs``. Lesion-free patients are kept: the challenge scores false positives on them.
"""
from __future__ import annotations

import os
import re
from typing import Optional

from nnunetv2_ohem.dataset_conversion.common import (Case, ConversionError, DatasetSpec, check_source_dir,
                                                     digits_or_name, find_nifti, scan_case_dirs, strip_nifti,
                                                     visible_entries, write_dataset)

CHANNELS = ("flair_time01_on_middle_space", "flair_time02_on_middle_space")
CONSENSUS = "ground_truth"
TEST_CONTAINERS = ("test", "testing")
_LABEL_RE = re.compile(r"^(consensus|expert\d+)$")


def _label_stem(label: str) -> str:
    if not _LABEL_RE.match(label):
        raise ConversionError(f"label must be 'consensus' or 'expertN' (e.g. expert1), got {label!r}")
    return CONSENSUS if label == "consensus" else f"{CONSENSUS}_{label}"


def _is_case(folder: str) -> bool:
    stems = [strip_nifti(n) for n in os.listdir(folder)]
    return any(s and (s.startswith("flair_time0") or s.startswith(CONSENSUS)) for s in stems)


def discover_msseg2(source_dir: str, label: str = "consensus") -> DatasetSpec:
    """Find MSSEG-II cases under ``source_dir`` (nothing is read or written yet)."""
    label_stem = _label_stem(label)
    source = check_source_dir(source_dir)
    case_dirs, skipped = scan_case_dirs(source, _is_case, "MSSEG-II")
    cases = []
    for folder, container in case_dirs:
        images = []
        for stem in CHANNELS:
            path = find_nifti(folder, stem)
            if path is None:
                raise ConversionError(f"{os.path.join(folder, stem)}.nii.gz: missing channel of MSSEG-II case "
                                      f"{os.path.basename(folder)}")
            images.append(path)
        ground_truths = [n for n in visible_entries(folder) if (strip_nifti(n) or "").startswith(CONSENSUS)]
        label_path = find_nifti(folder, label_stem)
        if ground_truths and label_path is None:
            raise ConversionError(f"{os.path.join(folder, label_stem)}.nii.gz: missing label ({label}) although the "
                                  f"case has {', '.join(ground_truths)}")
        used = {os.path.basename(p) for p in images} | ({os.path.basename(label_path)} if label_path else set())
        for n in visible_entries(folder):
            if n not in used:
                reason = (f"ground truth not used (label={label})" if (strip_nifti(n) or "").startswith(CONSENSUS)
                          else "not an MSSEG-II image")
                skipped.append((os.path.join(folder, n), reason))
        cases.append(Case(f"MSSEG2_{digits_or_name(os.path.basename(folder))}", tuple(images), label_path,
                          test=label_path is None or container.lower() in TEST_CONTAINERS))
    return DatasetSpec(
        command="msseg2", source_dir=source, default_name="MSSEG2",
        channel_names={0: "FLAIR_time01", 1: "FLAIR_time02"},
        labels={"background": 0, "new_lesion": 1}, label_map={0: 0, 1: 1}, cases=cases,
        description=f"MSSEG-II (MICCAI 2021) new MS lesions on two co-registered FLAIR time points; label: "
                    f"{label}",
        reference="https://portal.fli-iam.irisa.fr/msseg-2/",
        licence="see https://portal.fli-iam.irisa.fr/msseg-2/data/ (data usage agreement of the challenge)",
        skipped=skipped)


def convert_msseg2(source_dir: str, dataset_id: int, name: Optional[str] = None, raw_dir: Optional[str] = None,
                   overwrite: bool = False, num_processes: int = 1, label: str = "consensus",
                   progress: bool = False) -> str:
    """Convert MSSEG-II to ``raw_dir/DatasetXXX_<name or MSSEG2>``; returns that folder.

    ``label``: ``"consensus"`` (``ground_truth``) or ``"expertN"`` (``ground_truth_expertN``). Raises
    :class:`~nnunetv2_ohem.dataset_conversion.common.ConversionError` on bad input, leaving no output.
    """
    spec = discover_msseg2(source_dir, label)
    return write_dataset(spec, dataset_id, name, raw_dir, overwrite, num_processes, progress=progress)
