"""BTRSeg plans: nnU-Net's planner with the paper's normalisation, a 128³ patch and a precision-aware batch size.

``nnunetv2_ohem_plan btrseg -d ID [--precision fp16|bf16|fp32] [--norm group|batch|instance]`` fingerprints,
plans (plans identifier ``nnUNetBTRSegPlans``) and preprocesses with :class:`ExtendedPreprocessor`, because
stock ``nnUNetv2_preprocess`` cannot resolve a normalisation scheme that lives outside nnunetv2 (see
``nnunetv2_ohem/preprocessing/btrseg.py``). ``--tiny`` gives the tiny test network (features 4/8/16, 32³).

Batch size (issue: "raise the batch size to fill the memory that lower precision frees"): nnU-Net sizes
batches from a reference activation count calibrated for its AMP (fp16) training. Activations take 2 bytes
in fp16/bf16 and 4 in fp32, so for fp32 we halve the budget: B = round(ref_bs · budget · f_precision /
estimate), f = 1 (fp16, bf16) or 0.5 (fp32), capped like nnU-Net (≤ 5 % of the dataset's voxels, ≥ 2).
"""
import argparse
import os
import shutil
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunetv2_ohem.plans.tiny import TinyPlanner
from nnunetv2_ohem.plans.common import BTRSEG_PLANS_IDENTIFIER, PRECISION_MEMORY_FACTOR  # noqa: F401 (re-exported)
from nnunetv2_ohem.preprocessing.btrseg import BTRSEG_SCHEME


def batch_size_for_memory(reference: float, estimate: float, reference_batch_size: int, precision: str,
                          max_batch_size: int, min_batch_size: int = 2) -> int:
    """B = round(ref_bs · reference · f_precision / estimate), clipped to [min, max] (see module docstring)."""
    if precision not in PRECISION_MEMORY_FACTOR:
        raise ValueError(f"precision must be one of {sorted(PRECISION_MEMORY_FACTOR)}, got {precision!r}")
    if estimate <= 0 or reference <= 0:
        raise ValueError(f"reference and estimate must be > 0, got {reference}, {estimate}")
    b = round(reference_batch_size * reference * PRECISION_MEMORY_FACTOR[precision] / estimate)
    return int(max(min(b, max_batch_size), min_batch_size))


def _with_norm(plan: dict, norm: Optional[str], num_groups: int) -> dict:
    from nnunetv2_ohem.training.precision import configuration_with_norm  # trainer module: import lazily

    kwargs = {"num_groups": num_groups} if norm == "group" else None
    return configuration_with_norm(ConfigurationManager(plan), norm, kwargs).configuration


class _BTRSegPlansMixin:
    """The paper's normalisation for every channel; the brain mask is nnU-Net's non-zero mask when cropping
    to it shrank the images (nnU-Net's own rule for z-score), else each channel's non-zero voxels."""

    norm: Optional[str] = "group"
    num_groups: int = 8

    def determine_normalization_scheme_and_whether_mask_is_used_for_norm(self):
        n = len(self.dataset_json["channel_names"])
        use_mask = bool(self.dataset_fingerprint["median_relative_size_after_cropping"] < 3 / 4.)
        return [BTRSEG_SCHEME] * n, [use_mask] * n


class BTRSegPlanner(_BTRSegPlansMixin, ExperimentPlanner):
    def __init__(self, dataset_name_or_id: Union[str, int], plans_name: str = BTRSEG_PLANS_IDENTIFIER,
                 precision: str = "fp16", norm: Optional[str] = "group", num_groups: int = 8,
                 patch_edge: int = 128, batch_size: Optional[int] = None, gpu_memory_target_in_gb: float = 8,
                 **kwargs):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb=gpu_memory_target_in_gb,
                         plans_name=plans_name, **kwargs)
        if precision not in PRECISION_MEMORY_FACTOR:
            raise ValueError(f"precision must be one of {sorted(PRECISION_MEMORY_FACTOR)}, got {precision!r}")
        self.precision, self.norm, self.num_groups = precision, norm, num_groups
        self.patch_edge, self.fixed_batch_size = patch_edge, batch_size

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        if len(spacing) == 3:
            plan = self._btrseg_patch_and_batch(plan, spacing, median_shape, approximate_n_voxels_dataset)
        return _with_norm(plan, self.norm, self.num_groups)

    def _btrseg_patch_and_batch(self, plan, spacing, median_shape, approximate_n_voxels_dataset) -> dict:
        """Re-derive nnU-Net's topology for a patch of ``patch_edge`` per axis (capped at the median image)."""
        wanted = [min(self.patch_edge, int(m)) for m in median_shape]
        _, pool, conv, patch, _ = get_pool_and_conv_props(spacing, wanted, self.UNet_featuremap_min_edge_length,
                                                          999999)
        n = len(pool)
        kwargs = dict(plan["architecture"]["arch_kwargs"])
        kwargs.update({
            "n_stages": n, "kernel_sizes": conv, "strides": pool,
            "features_per_stage": [min(self.UNet_max_features_3d, self.UNet_base_num_features * 2 ** i)
                                   for i in range(n)],
            "n_conv_per_stage": list(self.UNet_blocks_per_stage_encoder[:n]),
            "n_conv_per_stage_decoder": list(self.UNet_blocks_per_stage_decoder[:n - 1]),
        })
        plan = dict(plan, patch_size=[int(p) for p in patch])
        plan["architecture"] = dict(plan["architecture"], arch_kwargs=kwargs)
        if self.fixed_batch_size is not None:
            plan["batch_size"] = int(self.fixed_batch_size)
            return plan
        estimate = self.static_estimate_VRAM_usage(
            patch, len(self.dataset_json["channel_names"]), len(self.dataset_json["labels"]),
            plan["architecture"]["network_class_name"], kwargs, plan["architecture"]["_kw_requires_import"])
        reference = self.UNet_reference_val_3d * self.UNet_vram_target_GB / self.UNet_reference_val_corresp_GB
        max_bs = round(approximate_n_voxels_dataset * self.max_dataset_covered / np.prod(patch, dtype=np.float64))
        plan["batch_size"] = batch_size_for_memory(reference, estimate, self.UNet_reference_val_corresp_bs_3d,
                                                   self.precision, max_bs, self.UNet_min_batch_size)
        return plan


class BTRSegTinyPlanner(_BTRSegPlansMixin, TinyPlanner):
    """Tiny network/patch (tests, demo) with the BTRSeg normalisation and norm."""

    def __init__(self, dataset_name_or_id, plans_name: str = BTRSEG_PLANS_IDENTIFIER,
                 norm: Optional[str] = "group", num_groups: int = 8, **kwargs):
        super().__init__(dataset_name_or_id, plans_name=plans_name, **kwargs)
        self.norm, self.num_groups = norm, num_groups

    def get_plans_for_configuration(self, *args, **kwargs) -> dict:
        return _with_norm(super().get_plans_for_configuration(*args, **kwargs), self.norm, self.num_groups)


def preprocess_with_extensions(dataset_id: int, plans_identifier: str, configurations: Sequence[str],
                               num_processes: int = 2, verbose: bool = False, show_progress_bar: bool = False) -> None:
    """nnU-Net's ``preprocess_dataset`` with :class:`ExtendedPreprocessor` (knows our schemes)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, maybe_mkdir_p
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from nnunetv2_ohem.preprocessing.btrseg import ExtendedPreprocessor

    for c in configurations:
        preprocessor = ExtendedPreprocessor(verbose=verbose)
        preprocessor.show_progress_bar = show_progress_bar
        preprocessor.run(dataset_id, c, plans_identifier, num_processes=num_processes)
    # like nnU-Net: ground truth next to the preprocessed data, for the final validation
    name = convert_id_to_dataset_name(dataset_id)
    gt = os.path.join(nnUNet_preprocessed, name, "gt_segmentations")
    maybe_mkdir_p(gt)
    dataset_json = load_json(os.path.join(nnUNet_raw, name, "dataset.json"))
    for k, v in get_filenames_of_train_images_and_targets(os.path.join(nnUNet_raw, name), dataset_json).items():
        shutil.copyfile(v["label"], os.path.join(gt, k + dataset_json["file_ending"]))


def plan_and_preprocess_btrseg(dataset_id: int, configurations: Sequence[str] = ("3d_fullres",),
                               plans_identifier: str = BTRSEG_PLANS_IDENTIFIER, precision: str = "fp16",
                               norm: Optional[str] = "group", num_groups: int = 8, patch_edge: int = 128,
                               batch_size: Optional[int] = None, gpu_memory_gb: float = 8, tiny: bool = False,
                               tiny_features: Tuple[int, ...] = (4, 8, 16), num_processes: int = 2,
                               verbose: bool = False, fast_fingerprint_if_missing: bool = False,
                               show_progress_bar: bool = False) -> str:
    """Fingerprint, write BTRSeg plans and preprocess ``dataset_id``; returns the plans identifier.

    Full plans use nnU-Net's own fingerprint (reused when it exists, as ``nnUNetv2_plan_and_preprocess`` does);
    ``tiny`` plans the fast one kept in memory (see :mod:`nnunetv2_ohem.plans.common`)."""
    from nnunetv2_ohem.plans.common import (check_configurations, checked_dataset_name, fingerprint_for_planning,
                                            verify_raw_dataset)

    fingerprint = None
    if tiny:
        fingerprint = fingerprint_for_planning(dataset_id, num_processes, fast_fingerprint_if_missing,
                                               show_progress_bar, verbose)
    else:
        from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import \
            DatasetFingerprintExtractor
        from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

        verify_raw_dataset(checked_dataset_name(dataset_id), num_processes)
        extract_fingerprint_dataset(dataset_id, DatasetFingerprintExtractor, num_processes=num_processes,
                                    check_dataset_integrity=False, clean=False, verbose=verbose,
                                    show_progress_bar=show_progress_bar)
    if tiny:
        planner = BTRSegTinyPlanner(dataset_id, plans_name=plans_identifier, norm=norm, num_groups=num_groups,
                                    features_per_stage=tiny_features, patch_edge=min(patch_edge, 32),
                                    batch_size=batch_size or 2)
    else:
        planner = BTRSegPlanner(dataset_id, plans_name=plans_identifier, precision=precision, norm=norm,
                                num_groups=num_groups, patch_edge=patch_edge, batch_size=batch_size,
                                gpu_memory_target_in_gb=gpu_memory_gb)
    if fingerprint is not None:
        planner.dataset_fingerprint = fingerprint
    check_configurations(planner.plan_experiment(), configurations)
    preprocess_with_extensions(dataset_id, plans_identifier, configurations, num_processes, verbose,
                               show_progress_bar)
    return plans_identifier


def run_btrseg(args: argparse.Namespace) -> None:
    """BTRSeg plans (the paper's normalisation, 128³ patch, GroupNorm, precision-aware batch) + preprocessing."""
    from nnunetv2_ohem.cli_common import show_progress

    ident = plan_and_preprocess_btrseg(args.dataset_id, args.configurations, args.plans_name,
                                       args.precision, args.norm, args.num_groups, args.patch, args.batch,
                                       args.gpu_memory_target, args.tiny, num_processes=args.num_processes,
                                       fast_fingerprint_if_missing=args.fast_fingerprint,
                                       show_progress_bar=show_progress(args.no_progress))
    print(f"Wrote and preprocessed plans '{ident}'. Train with: nnUNetv2_train {args.dataset_id} "
          f"{args.configurations[0]} 0 -p {ident} -tr nnUNetTrainerBTRSeg")
