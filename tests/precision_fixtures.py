"""A BraTS-like region phantom (4 channels, nested labels 1 ⊃ 2 ⊃ 3 → regions WT/TC/ET) with tiny BTRSeg plans.

Follows nnU-Net's Dataset137 convention: channels t1, t1ce, t2, flair; labels whole tumour (1,2,3), tumour
core (2,3), enhancing tumour (3) with ``regions_class_order`` (1, 2, 3). The "brain" sits in a zero background
so nnU-Net crops to it and the BTRSeg scheme's brain mask is non-trivial.
"""
import json
import os
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

REGION_DATASET_ID = 920
REGION_DATASET_NAME = f"Dataset{REGION_DATASET_ID:03d}_BraTSPhantom"


def _ellipsoid(shape, centre, radii):
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def make_region_case(rng: np.random.Generator, shape=(36, 36, 36)):
    """Return (4 channel images float32, label uint8 with 0 bg, 1 edema, 2 necrosis, 3 enhancing)."""
    s = np.asarray(shape)
    brain = _ellipsoid(shape, s / 2 - 0.5, s * 0.45)
    inner = np.argwhere(_ellipsoid(shape, s / 2 - 0.5, s * 0.2))
    centre = inner[rng.integers(len(inner))]
    r = rng.uniform(4.0, 6.0)
    label = np.zeros(shape, np.uint8)
    label[_ellipsoid(shape, centre, (r, r, r)) & brain] = 1
    label[_ellipsoid(shape, centre, (0.65 * r,) * 3) & brain] = 3
    label[_ellipsoid(shape, centre, (0.35 * r,) * 3) & brain] = 2
    # extra intensity of labels 1, 2, 3 per channel (t1, t1ce, t2, flair), so every region is visible somewhere
    contrast = np.array([[0, -40, -20, -20], [0, 10, -30, 250], [0, 250, 150, 100], [0, 300, 80, 120]], np.float32)
    images = []
    for ch in range(4):
        img = 200.0 + 30 * ch + contrast[ch][label] + rng.normal(0, 10, shape)
        images.append(np.where(brain, img, 0).astype(np.float32))
    return images, label


def write_region_dataset(raw_dir: str, dataset_id: int = REGION_DATASET_ID, n_train: int = 5, n_test: int = 1,
                         shape=(36, 36, 36), seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    folder = os.path.join(raw_dir, f"Dataset{dataset_id:03d}_BraTSPhantom")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for split, n in (("Tr", n_train), ("Ts", n_test)):
        for i in range(n):
            case = f"brats_{split.lower()}{i:03d}"
            images, label = make_region_case(rng, shape)
            for ch, img in enumerate(images):
                sitk.WriteImage(sitk.GetImageFromArray(img),
                                os.path.join(folder, f"images{split}", f"{case}_{ch:04d}.nii.gz"))
            sitk.WriteImage(sitk.GetImageFromArray(label), os.path.join(folder, f"labels{split}", f"{case}.nii.gz"))
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({
            "channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"},
            "labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [3]},
            "regions_class_order": [1, 2, 3],
            "numTraining": n_train,
            "file_ending": ".nii.gz",
        }, f, indent=2)
    return folder


@dataclass
class RegionDataset:
    dataset_id: int
    name: str
    raw_folder: str
    plans_identifier: str
    preprocessed_folder: str


def build_region_dataset(nnunet_env: dict) -> RegionDataset:
    from nnunetv2_ohem.plans.btrseg import plan_and_preprocess_btrseg

    raw = write_region_dataset(nnunet_env["nnUNet_raw"])
    plans = plan_and_preprocess_btrseg(REGION_DATASET_ID, ("3d_fullres",), "nnUNetBTRSegTinyPlans", norm="group",
                                       num_groups=4, tiny=True, num_processes=1)
    return RegionDataset(REGION_DATASET_ID, REGION_DATASET_NAME, raw, plans,
                         os.path.join(nnunet_env["nnUNet_preprocessed"], REGION_DATASET_NAME))
