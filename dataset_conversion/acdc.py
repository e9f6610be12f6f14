"""ACDC (MICCAI 2017 cardiac cine MRI) → nnU-Net raw dataset (used with the DeepLab trainers).

Source layout::

    SOURCE/{training,testing}/patientNNN/patientNNN_frameXX.nii.gz      ED and ES frames (3D)
                                         patientNNN_frameXX_gt.nii.gz   labels: RV 1, MYO 2, LV 3
                                         patientNNN_4d.nii.gz           full cine (ignored)
                                         Info.cfg                       "ED: 1", "ES: 12", ...

(``SOURCE/patientNNN/`` works too.) Each ED/ES frame is one case ``patientNNN_frameXX`` (as nnU-Net's
``Dataset027_ACDC.py``). When ``Info.cfg`` names the ED/ES frames, exactly those are used (a missing one is
an error, other frames are skipped); without it every ``frameXX`` file is used. Patients under
``testing/`` go to ``imagesTs`` (labels to ``labelsTs``), as do patients without any ``_gt`` file.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Optional

from nnunetv2_ohem.dataset_conversion.common import (Case, ConversionError, DatasetSpec, check_source_dir,
                                                     find_nifti, scan_case_dirs, strip_nifti, visible_entries,
                                                     write_dataset)

_PATIENT_RE = re.compile(r"^patient\d+$")
TEST_CONTAINERS = ("test", "testing")


def read_info_cfg(path: str) -> Dict[str, str]:
    """``Info.cfg`` as a dict (``{"ED": "1", "ES": "12", "Group": "DCM", ...}``)."""
    info = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if ":" in line:
                key, value = line.split(":", 1)
                info[key.strip()] = value.strip()
    return info


def discover_acdc(source_dir: str) -> DatasetSpec:
    """Find ACDC ED/ES frames under ``source_dir`` (nothing is read or written yet)."""
    source = check_source_dir(source_dir)
    case_dirs, skipped = scan_case_dirs(source, lambda p: bool(_PATIENT_RE.match(os.path.basename(p))), "ACDC")
    cases = []
    for folder, container in case_dirs:
        patient = os.path.basename(folder)
        frame_re = re.compile(rf"^{patient}_frame(\d+)$")
        frames = sorted(int(m.group(1)) for m in (frame_re.match(strip_nifti(n) or "") for n in visible_entries(folder))
                        if m)
        info_path = os.path.join(folder, "Info.cfg")
        wanted = frames
        if os.path.isfile(info_path):
            info = read_info_cfg(info_path)
            try:
                wanted = sorted({int(info["ED"]), int(info["ES"])})
            except (KeyError, ValueError):
                raise ConversionError(f"{info_path}: no integer 'ED:' and 'ES:' entries") from None
        if not wanted:
            raise ConversionError(f"{folder}: no {patient}_frameXX.nii.gz images")
        used = {"Info.cfg"} if os.path.isfile(info_path) else set()
        found = []
        for frame in wanted:
            stem = f"{patient}_frame{frame:02d}"
            image = find_nifti(folder, stem)
            if image is None:
                raise ConversionError(f"{os.path.join(folder, stem)}.nii.gz: missing ED/ES frame of {patient}")
            found.append((stem, image, find_nifti(folder, stem + "_gt")))
        labelled = [gt is not None for _, _, gt in found]
        if any(labelled) and not all(labelled):
            stem = found[labelled.index(False)][0]
            raise ConversionError(f"{os.path.join(folder, stem)}_gt.nii.gz: missing label (other frames of {patient} "
                                  f"have one)")
        test = container.lower() in TEST_CONTAINERS or not any(labelled)
        for stem, image, gt in found:
            cases.append(Case(stem, (image,), gt, test=test))
            used |= {os.path.basename(image)} | ({os.path.basename(gt)} if gt else set())
        for n in visible_entries(folder):
            if n not in used:
                reason = ("4D cine, ignored" if (strip_nifti(n) or "").endswith("_4d") else
                          "not an ED/ES frame or its label")
                skipped.append((os.path.join(folder, n), reason))
    return DatasetSpec(
        command="acdc", source_dir=source, default_name="ACDC", channel_names={0: "cineMRI"},
        labels={"background": 0, "RV": 1, "MYO": 2, "LV": 3}, label_map={0: 0, 1: 1, 2: 2, 3: 3}, cases=cases,
        description="ACDC (MICCAI 2017) cardiac cine MRI, end-diastolic and end-systolic frames: right "
                    "ventricle, myocardium, left ventricle",
        reference="https://www.creatis.insa-lyon.fr/Challenge/acdc/",
        licence="see https://www.creatis.insa-lyon.fr/Challenge/acdc/ (non-commercial research use)",
        skipped=skipped)


def convert_acdc(source_dir: str, dataset_id: int, name: Optional[str] = None, raw_dir: Optional[str] = None,
                 overwrite: bool = False, num_processes: int = 1, progress: bool = False) -> str:
    """Convert ACDC to ``raw_dir/DatasetXXX_<name or ACDC>``; returns that folder."""
    spec = discover_acdc(source_dir)
    return write_dataset(spec, dataset_id, name, raw_dir, overwrite, num_processes, progress=progress)
