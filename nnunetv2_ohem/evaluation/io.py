"""Reading masks, pairing reference and prediction files by case name, geometry checks, atomic writes.

Case names follow nnU-Net: a label file is ``<case><file_ending>`` (``labelsTr/BRATS_001.nii.gz``; the
``_0000`` channel suffix exists only for images), and ``nnUNetv2_predict`` writes ``<case><file_ending>``
next to ``dataset.json``, ``plans.json`` and ``predict_from_raw_data_args.json``, which are not images and
are ignored, as are probability files (``.npz``, ``.pkl``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnunetv2_ohem.atomic import atomic_file
from nnunetv2_ohem.dataset_conversion.nifti import NiftiError, read_image
from nnunetv2_ohem.evaluation.lesions import EvaluationError

IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


@dataclass
class Mask:
    """A label image as a numpy array (SimpleITK's z, y, x order) with its geometry in the same axis order."""
    path: str
    array: np.ndarray
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]  # SimpleITK order (x, y, z): only compared, never used for indexing
    direction: Tuple[float, ...]


def case_name(filename: str) -> Optional[str]:
    """``BRATS_001.nii.gz`` -> ``BRATS_001``; None for files that are not images."""
    for ending in IMAGE_ENDINGS:
        if filename.endswith(ending) and len(filename) > len(ending):
            return filename[: -len(ending)]
    return None


def list_cases(folder: str) -> Dict[str, str]:
    """Map case name -> path of every image file directly in ``folder``."""
    if not os.path.isdir(folder):
        raise EvaluationError(f"{folder}: not a directory")
    out: Dict[str, str] = {}
    for f in sorted(os.listdir(folder)):
        name = case_name(f)
        if name is None or not os.path.isfile(os.path.join(folder, f)):
            continue
        if name in out:
            raise EvaluationError(f"{folder}: case '{name}' appears twice ({os.path.basename(out[name])}, {f})")
        out[name] = os.path.join(folder, f)
    return out


def match_cases(ref_dir: str, pred_dir: str) -> List[Tuple[str, str, str]]:
    """(case, ref_path, pred_path) for every reference case; refuses missing or extra predictions with a list."""
    refs, preds = list_cases(ref_dir), list_cases(pred_dir)
    if not refs:
        raise EvaluationError(f"{ref_dir}: no reference images ({', '.join(IMAGE_ENDINGS)}) found")
    missing = sorted(set(refs) - set(preds))
    extra = sorted(set(preds) - set(refs))
    problems = []
    if missing:
        problems.append(f"{len(missing)} reference case(s) have no prediction in {pred_dir}: {', '.join(missing)}")
    if extra:
        problems.append(f"{len(extra)} prediction file(s) in {pred_dir} have no reference in {ref_dir}: "
                        f"{', '.join(os.path.basename(preds[c]) for c in extra)}")
    if problems:
        raise EvaluationError("; ".join(problems))
    return [(c, refs[c], preds[c]) for c in sorted(refs)]


def read_mask(path: str) -> Mask:
    """Read a label image with the converters' validated reader: a truncated or unreadable file, NaN/Inf voxels
    (checked in the raw NIfTI data) and non-integer values are refused with one line naming the file."""
    try:
        img = read_image(str(path), label=True)
    except NiftiError as e:
        raise EvaluationError(str(e)) from None
    arr = sitk.GetArrayFromImage(img)
    if not np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.int32)
    return Mask(str(path), arr, tuple(float(s) for s in img.GetSpacing()[::-1]),
                tuple(float(o) for o in img.GetOrigin()), tuple(float(d) for d in img.GetDirection()))


def check_geometry(ref: Mask, pred: Mask, spacing_tol: float = 1e-4, origin_tol: float = 1e-3,
                   direction_tol: float = 1e-4) -> None:
    """Shape must match exactly; spacing (relative), origin (mm) and direction within tolerances."""
    pair = f"{pred.path} vs reference {ref.path}"
    if ref.array.shape != pred.array.shape:
        raise EvaluationError(f"geometry mismatch for {pair}: shape {pred.array.shape} != {ref.array.shape}")
    rs, ps = np.asarray(ref.spacing), np.asarray(pred.spacing)
    if np.any(np.abs(rs - ps) > spacing_tol * np.maximum(np.abs(rs), 1e-12)):
        raise EvaluationError(f"geometry mismatch for {pair}: spacing {pred.spacing} != {ref.spacing}")
    if np.any(np.abs(np.asarray(ref.origin) - np.asarray(pred.origin)) > origin_tol):
        raise EvaluationError(f"geometry mismatch for {pair}: origin {pred.origin} != {ref.origin}")
    if np.any(np.abs(np.asarray(ref.direction) - np.asarray(pred.direction)) > direction_tol):
        raise EvaluationError(f"geometry mismatch for {pair}: direction {pred.direction} != {ref.direction}")


def require_labels(mask: Mask, allowed: Sequence[int], what: str) -> np.ndarray:
    """Unique labels of ``mask``; error naming the file if any is not in ``allowed``."""
    u = np.unique(mask.array)
    bad = sorted(set(u.tolist()) - set(int(a) for a in allowed))
    if bad:
        raise EvaluationError(f"{mask.path}: {what} must only contain labels {sorted(allowed)}, found {bad}")
    return u


def write_json_atomic(obj, path: str) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False, allow_nan=True)


def write_csv_atomic(df, path: str) -> None:
    with atomic_file(path, newline="") as f:
        df.to_csv(f, index=False)
