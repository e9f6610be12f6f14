"""Fast fingerprinting and *tiny* nnU-Net plans, so that tests and the demo train in seconds on a CPU.

The plans are produced by nnU-Net's own planner (:class:`ExperimentPlanner` or any other, e.g. the ResEnc
presets, chosen with ``-pl`` as in nnU-Net: spacing, normalisation, resampling, transpose all stay that
planner's decisions) and only the network/patch/batch of each configuration are shrunk: 3 stages with few
features, a 32³ (3d) / 32² (2d) patch and batch 2. They are saved under their own plans identifier (default
``nnUNetTinyPlans``) so a user's ``nnUNetPlans`` is never touched; select them with
``nnUNetv2_train ... -p nnUNetTinyPlans``. nnU-Net's ``dataset_fingerprint.json`` is not changed either (see
:mod:`nnunetv2_ohem.plans.common`).
"""
from typing import Optional, Sequence, Tuple, Type, Union

import numpy as np

from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunetv2_ohem.plans.common import TINY_PLANS_IDENTIFIER

class FastFingerprintExtractor(DatasetFingerprintExtractor):
    """Samples 1e4 instead of 1e8 foreground voxels for the intensity statistics.

    nnU-Net's default costs ~155 s on 2 CPU cores even for a toy dataset; the statistics (percentiles used
    by CT normalisation only) stay stable enough for small data at this sample size.
    """

    def __init__(self, dataset_name_or_id: Union[str, int], num_processes: int = 2, verbose: bool = False,
                 num_foreground_voxels: int = 10_000):
        super().__init__(dataset_name_or_id, num_processes, verbose)
        self.num_foreground_voxels_for_intensitystats = num_foreground_voxels


class TinyPlannerMixin:
    """Put before an nnU-Net planner class: every configuration it plans shrunk to a 3-stage, few-feature
    network, small patch and batch."""

    features_per_stage: Tuple[int, ...] = (4, 8, 16)
    patch_edge: int = 32
    batch_size: int = 2

    def __init__(self, dataset_name_or_id: Union[str, int], plans_name: str = TINY_PLANS_IDENTIFIER,
                 features_per_stage: Optional[Sequence[int]] = None, patch_edge: Optional[int] = None,
                 batch_size: Optional[int] = None, **kwargs):
        super().__init__(dataset_name_or_id, plans_name=plans_name, **kwargs)
        if features_per_stage is not None:
            self.features_per_stage = tuple(features_per_stage)
        if patch_edge is not None:
            self.patch_edge = patch_edge
        if batch_size is not None:
            self.batch_size = batch_size
        if self.patch_edge % 2 ** (len(self.features_per_stage) - 1):
            raise ValueError(f"patch_edge {self.patch_edge} must be divisible by "
                             f"2**{len(self.features_per_stage) - 1} for {len(self.features_per_stage)} stages")
        # a tiny patch needs no lowres cascade
        self.lowres_creation_threshold = 0.0

    @staticmethod
    def static_estimate_VRAM_usage(*args, **kwargs) -> float:
        """Skip nnU-Net's VRAM estimate: it instantiates the default network (slow on CPU, and it calls
        ``torch.set_num_threads(nnUNet_n_proc_DA)`` which fails for 0) only to size a patch and batch
        that :func:`shrink_configuration` replaces anyway."""
        return 1.0

    def generate_data_identifier(self, configuration_name: str) -> str:
        """Always our own data folder: the ResEnc planners reuse ``nnUNetPlans_<config>``, the user's data."""
        return self.plans_identifier + "_" + configuration_name

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        return shrink_configuration(plan, self.features_per_stage, self.patch_edge, self.batch_size)


class TinyPlanner(TinyPlannerMixin, ExperimentPlanner):
    """nnU-Net's default planner with every configuration shrunk to a 3-stage, few-feature network."""


def tiny_planner_class(planner_class: Type[ExperimentPlanner]) -> type:
    """The tiny variant of any nnU-Net planner class (``TinyPlanner`` for nnU-Net's default one)."""
    if planner_class is ExperimentPlanner:
        return TinyPlanner
    return type(f"Tiny{planner_class.__name__}", (TinyPlannerMixin, planner_class), {})


def shrink_configuration(plan: dict, features_per_stage: Sequence[int], patch_edge: int, batch_size: int) -> dict:
    """Return ``plan`` (one configuration of a plans file) with a small U-Net, patch and batch.

    Isotropic 3×3(×3) kernels and stride 2 on every axis; the patch edge is capped at the median image
    size rounded down to the network's divisibility so patches never exceed typical images.
    """
    ndim = len(plan["patch_size"])
    n_stages = len(features_per_stage)
    divisor = 2 ** (n_stages - 1)
    median = np.asarray(plan["median_image_size_in_voxels"], dtype=float)
    patch = [int(max(divisor, min(patch_edge, (m // divisor) * divisor))) for m in median]
    plan = dict(plan)
    plan["patch_size"] = patch
    plan["batch_size"] = int(batch_size)
    arch = dict(plan["architecture"])
    kwargs = dict(arch["arch_kwargs"])
    kwargs.update({
        "n_stages": n_stages,
        "features_per_stage": list(features_per_stage),
        "kernel_sizes": [[3] * ndim for _ in range(n_stages)],
        "strides": [[1] * ndim] + [[2] * ndim for _ in range(n_stages - 1)],
        # PlainConvUNet counts convolutions per stage, ResidualEncoderUNet (ResEnc planners) residual blocks
        ("n_blocks_per_stage" if "n_blocks_per_stage" in kwargs else "n_conv_per_stage"): [2] * n_stages,
        "n_conv_per_stage_decoder": [2] * (n_stages - 1),
    })
    arch["arch_kwargs"] = kwargs
    plan["architecture"] = arch
    return plan


def plan_and_preprocess_tiny(dataset_id: int, configurations: Sequence[str] = ("3d_fullres",),
                             plans_identifier: Optional[str] = None, num_processes: int = 2,
                             features_per_stage: Sequence[int] = TinyPlanner.features_per_stage,
                             patch_edge: int = TinyPlanner.patch_edge, batch_size: int = TinyPlanner.batch_size,
                             verbose: bool = False, planner_class: Union[str, type] = ExperimentPlanner,
                             fast_fingerprint_if_missing: bool = False, show_progress_bar: bool = False) -> str:
    """Fingerprint (fast, in memory), plan (tiny) and preprocess ``dataset_id`` through nnU-Net's own API.

    ``planner_class``: the nnU-Net planner (class or its name, as ``-pl``) whose plans are shrunk;
    ``plans_identifier`` defaults to :func:`~nnunetv2_ohem.plans.common.tiny_plans_name` of it.
    ``fast_fingerprint_if_missing``: see :mod:`nnunetv2_ohem.plans.common` (only for folders you own).
    Needs ``nnUNet_raw`` and ``nnUNet_preprocessed`` set. Returns the plans identifier.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    from nnunetv2_ohem.plans.common import (check_configurations, find_planner_class, fingerprint_for_planning,
                                            tiny_plans_name)

    base = find_planner_class(planner_class) if isinstance(planner_class, str) else planner_class
    plans_identifier = plans_identifier or tiny_plans_name(base)
    fingerprint = fingerprint_for_planning(dataset_id, num_processes, fast_fingerprint_if_missing,
                                           show_progress_bar, verbose)
    planner = tiny_planner_class(base)(dataset_id, plans_name=plans_identifier,
                                       features_per_stage=features_per_stage, patch_edge=patch_edge,
                                       batch_size=batch_size)
    planner.dataset_fingerprint = fingerprint
    plans = planner.plan_experiment()
    check_configurations(plans, configurations)
    preprocess_dataset(dataset_id, plans_identifier, configurations=tuple(configurations),
                       num_processes=[num_processes] * len(configurations), verbose=verbose,
                       show_progress_bar=show_progress_bar)
    return plans_identifier
