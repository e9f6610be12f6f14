"""A BraTS-like region dataset (4 channels, nested labels 1 ⊃ 2 ⊃ 3 → regions WT/TC/ET) with tiny BTRSeg plans.

The cases are our BraTS phantoms (``nnunetv2_ohem.phantoms.brats``: MNI anatomy, a glioma with edema around
an enhancing shell around necrosis, skull-stripped T1/T1ce/T2/FLAIR) written in the BraTS 2021 layout and
converted by our BraTS converter, so the dataset is what a user gets from real BraTS: nnU-Net's Dataset137
convention, channels T1, T1ce, T2, FLAIR, labels whole tumour (1,2,3), tumour core (2,3), enhancing tumour
(3) with ``regions_class_order`` (1, 2, 3). The brain sits in a zero background, so nnU-Net crops to it and
the BTRSeg scheme's brain mask is non-trivial.
"""
import os
from dataclasses import dataclass

import numpy as np

REGION_DATASET_ID = 920
REGION_DATASET_NAME = f"Dataset{REGION_DATASET_ID:03d}_BraTSPhantom"


def write_region_dataset(raw_dir: str, dataset_id: int = REGION_DATASET_ID, n_train: int = 5, n_test: int = 1,
                         voxel_size: float = 3.0, seed: int = 0) -> str:
    """``n_train`` training cases and ``n_test`` BraTS validation cases (``imagesTs``) as
    ``raw_dir/DatasetXXX_BraTSPhantom``; the test cases' truth goes to ``labelsTs`` for shape/metric checks.

    The truth is regenerated from ``(seed, index)`` (phantom subjects are reproducible one by one), mapped to
    nnU-Net's labels and written with the case's affine, since BraTS validation cases ship without seg.
    """
    from nnunetv2_ohem.dataset_conversion.brats import convert_brats
    from nnunetv2_ohem.phantoms.anatomy import save_nifti
    from nnunetv2_ohem.phantoms.brats import (BraTSPhantomConfig, brats_case_name, has_enhancing,
                                              make_brats_subject, write_brats_phantoms)

    config = BraTSPhantomConfig(voxel_size=voxel_size)
    source = write_brats_phantoms(os.path.join(os.path.dirname(os.path.abspath(raw_dir)),
                                               f"brats_phantoms_{dataset_id}"),
                                  n_subjects=n_train, seed=seed, config=config, year=2021, n_validation=n_test)
    folder = convert_brats(source, dataset_id, name="BraTSPhantom", raw_dir=raw_dir)
    os.makedirs(os.path.join(folder, "labelsTs"), exist_ok=True)
    for index in range(n_train, n_train + n_test):
        sub = make_brats_subject(seed, index, config, has_enhancing(index, config.no_enhancing_fraction))
        save_nifti(sub.nnunet_label().astype(np.uint8), sub.affine,
                   os.path.join(folder, "labelsTs", brats_case_name(2021, index) + ".nii.gz"))
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
                                       num_groups=4, tiny=True, num_processes=1, fast_fingerprint_if_missing=True)
    return RegionDataset(REGION_DATASET_ID, REGION_DATASET_NAME, raw, plans,
                         os.path.join(nnunet_env["nnUNet_preprocessed"], REGION_DATASET_NAME))
