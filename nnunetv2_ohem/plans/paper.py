"""Paper-exact plans for the OHEM-EMA paper (Schmidt-Mengin et al., MSSEG-II 2021) as a real nnU-Net plans file.

The paper resamples every FLAIR to 0.5 mm isotropic, z-normalises each image on its own, concatenates the
two time points as 2 channels and trains its small U-Net (B16-32-64, GroupNorm) on 32³ patches, B = 32
(B̄ = 128 candidates with ``nnUNetTrainerOHEMEMA_Paper``'s k = 4). :class:`PaperPlanner` is nnU-Net's own
``ExperimentPlanner`` with exactly these decisions forced, so cropping, resampling functions and everything
else stay nnU-Net's. Only ``3d_fullres`` is written (the paper is 3D; no 2d, no cascade), under its own
identifier (default ``nnUNetPaperPlans``) so a user's ``nnUNetPlans`` is never touched::

    nnunetv2_ohem_plan paper -d 501
    nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerOHEMEMA_Paper -p nnUNetPaperPlans
    nnUNetv2_predict ... -tr nnUNetTrainerOHEMEMA_Paper -p nnUNetPaperPlans -step_size 0.75

``-step_size 0.75`` gives the paper's inference grid: 32³ tiles with stride 24 (8 voxels overlap), and
nnU-Net averages the overlapping predictions (Gaussian-weighted by default; the paper averages uniformly).
"""
import argparse
from typing import Sequence, Union

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunetv2_ohem.networks.paper_unet import PAPER_UNET_CLASS, paper_arch_kwargs
from nnunetv2_ohem.plans.cli import add_paper_arguments  # noqa: F401 (the subcommand's options, for tests)
from nnunetv2_ohem.plans.common import PAPER_PLANS_IDENTIFIER


class PaperPlanner(ExperimentPlanner):
    """nnU-Net's planner with the paper's spacing, normalisation, patch, batch and network forced."""

    def __init__(self, dataset_name_or_id: Union[str, int], plans_name: str = PAPER_PLANS_IDENTIFIER,
                 spacing_mm: float = 0.5, patch_edge: int = 32, batch_size: int = 32,
                 features_per_stage: Sequence[int] = (16, 32, 64), num_groups: int = 8, **kwargs):
        divisor = 2 ** (len(features_per_stage) - 1)
        if patch_edge % divisor:
            raise ValueError(f"patch_edge {patch_edge} must be divisible by {divisor} "
                             f"({len(features_per_stage)} stages)")
        if spacing_mm <= 0 or batch_size < 1:
            raise ValueError(f"need spacing_mm > 0 and batch_size >= 1, got {spacing_mm}, {batch_size}")
        super().__init__(dataset_name_or_id, plans_name=plans_name,
                         overwrite_target_spacing=[float(spacing_mm)] * 3, **kwargs)
        self.patch_edge, self.paper_batch_size = int(patch_edge), int(batch_size)
        self.features_per_stage, self.num_groups = tuple(features_per_stage), int(num_groups)
        self.lowres_creation_threshold = 0.0  # a 32³ patch needs no cascade

    @staticmethod
    def static_estimate_VRAM_usage(*args, **kwargs) -> float:
        """Skip nnU-Net's VRAM estimate of its default network: patch, batch and network are replaced by the
        paper's below (and the estimate calls ``torch.set_num_threads(nnUNet_n_proc_DA)``, failing for 0)."""
        return 1.0

    def determine_normalization_scheme_and_whether_mask_is_used_for_norm(self):
        """Per-image z-score of every channel over the whole image (the paper normalises each FLAIR alone)."""
        n = len(self.dataset_json["channel_names"])
        return ["ZScoreNormalization"] * n, [False] * n

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        dim = len(plan["patch_size"])
        plan["patch_size"] = [self.patch_edge] * dim
        plan["batch_size"] = self.paper_batch_size
        plan["architecture"] = {"network_class_name": PAPER_UNET_CLASS,
                                "arch_kwargs": paper_arch_kwargs(dim, self.features_per_stage, self.num_groups),
                                "_kw_requires_import": []}
        return plan

    def save_plans(self, plans):
        plans["configurations"].pop("2d", None)
        super().save_plans(plans)


def plan_and_preprocess_paper(dataset_id: int, plans_identifier: str = PAPER_PLANS_IDENTIFIER,
                              num_processes: int = 2, spacing_mm: float = 0.5, patch_edge: int = 32,
                              batch_size: int = 32, verbose: bool = False, fast_fingerprint_if_missing: bool = False,
                              show_progress_bar: bool = False) -> str:
    """Fingerprint (fast, in memory; see :mod:`nnunetv2_ohem.plans.common`), write the paper plans and
    preprocess ``3d_fullres`` through nnU-Net's API."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    from nnunetv2_ohem.plans.common import fingerprint_for_planning

    fingerprint = fingerprint_for_planning(dataset_id, num_processes, fast_fingerprint_if_missing,
                                           show_progress_bar, verbose)
    planner = PaperPlanner(dataset_id, plans_name=plans_identifier, spacing_mm=spacing_mm, patch_edge=patch_edge,
                           batch_size=batch_size)
    planner.dataset_fingerprint = fingerprint
    planner.plan_experiment()
    preprocess_dataset(dataset_id, plans_identifier, configurations=("3d_fullres",),
                       num_processes=[num_processes], verbose=verbose, show_progress_bar=show_progress_bar)
    return plans_identifier


def run_paper(args: argparse.Namespace) -> None:
    """Plans of the OHEM-EMA paper (0.5 mm, per-image z-norm, 32³ patch, batch 32, paper U-Net)."""
    from nnunetv2_ohem.cli_common import show_progress
    from nnunetv2_ohem.plans.cli import check_patch

    check_patch(args.patch, 3)
    ident = plan_and_preprocess_paper(args.dataset_id, args.plans_name, args.num_processes, args.spacing,
                                      args.patch, args.batch, fast_fingerprint_if_missing=args.fast_fingerprint,
                                      show_progress_bar=show_progress(args.no_progress))
    print(f"Wrote and preprocessed plans '{ident}'. Train with: nnUNetv2_train {args.dataset_id} 3d_fullres 0 "
          f"-tr nnUNetTrainerOHEMEMA_Paper -p {ident}; predict with -step_size 0.75 (stride 24)")
