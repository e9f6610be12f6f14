"""Small, fast two-time-point lesion phantoms written directly as an nnU-Net raw dataset.

Used by the test fixture where seconds matter. Each case is a noisy ellipsoidal "brain" seen at two time
points (channels ``_0000`` and ``_0001``); new lesions are small bright ellipsoids present at time 2 only
and labelled 1. A share of cases is lesion-free. Deterministic: same arguments, same bytes.
"""
import json
import os
from typing import Dict, Tuple

import numpy as np
import SimpleITK as sitk


def _ellipsoid(shape: Tuple[int, ...], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    return dist <= 1.0


def make_case(rng: np.random.Generator, shape: Tuple[int, int, int], n_lesions: int):
    """Return (time1, time2, label) float32/float32/uint8 arrays of ``shape``."""
    shape_arr = np.asarray(shape)
    brain = _ellipsoid(shape, shape_arr / 2 - 0.5, shape_arr * 0.42)
    base = np.where(brain, 1.0, 0.05).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    inner = np.argwhere(_ellipsoid(shape, shape_arr / 2 - 0.5, shape_arr * 0.30))
    for _ in range(n_lesions):
        centre = inner[rng.integers(len(inner))]
        radii = rng.uniform(1.0, 2.5, size=3)
        label[_ellipsoid(shape, centre, radii) & brain] = 1
    t1 = base + rng.normal(0, 0.08, shape).astype(np.float32)
    t2 = base + 1.2 * label + rng.normal(0, 0.08, shape).astype(np.float32)
    return t1.astype(np.float32), t2.astype(np.float32), label


def _write(arr: np.ndarray, path: str, spacing: Tuple[float, float, float]) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(img, path, useCompression=True)


def write_simple_lesion_dataset(raw_dir: str, dataset_id: int, name: str = "Phantom", n_train: int = 6,
                                n_test: int = 2, shape: Tuple[int, int, int] = (40, 40, 40),
                                spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0), seed: int = 0,
                                lesion_free_every: int = 4) -> str:
    """Write ``DatasetXXX_name`` under ``raw_dir``; returns its folder.

    Every ``lesion_free_every``-th case (index 0, k, 2k, ...) has no lesion; the others have 1-4.
    Test cases also get their labels in ``labelsTs`` so predictions can be evaluated.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(raw_dir, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for split, n in (("Tr", n_train), ("Ts", n_test)):
        for i in range(n):
            case = f"{name.lower()}_{split.lower()}{i:03d}"
            n_lesions = 0 if i % lesion_free_every == 0 else int(rng.integers(1, 5))
            t1, t2, label = make_case(rng, shape, n_lesions)
            _write(t1, os.path.join(folder, f"images{split}", f"{case}_0000.nii.gz"), spacing)
            _write(t2, os.path.join(folder, f"images{split}", f"{case}_0001.nii.gz"), spacing)
            _write(label, os.path.join(folder, f"labels{split}", f"{case}.nii.gz"), spacing)
    dataset_json: Dict = {
        "channel_names": {"0": "FLAIR_t1", "1": "FLAIR_t2"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "description": "Synthetic two-time-point new-lesion phantoms (nnunetv2-ohem test data)",
    }
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    return folder
