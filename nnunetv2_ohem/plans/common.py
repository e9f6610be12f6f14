"""What every ``nnunetv2_ohem_plan`` subcommand shares: dataset checks, the fingerprint rule, planner lookup.

The fingerprint rule: nnU-Net's ``dataset_fingerprint.json`` belongs to the user's nnU-Net setup (a later
``nnUNetv2_plan_and_preprocess`` without ``--clean`` reuses it), so our planning never changes it. Our plans are
made from a fast fingerprint (1e4 instead of 1e8 foreground voxels for the intensity statistics; spacings and
shapes are exact) that is computed in a temporary folder and kept in memory. Only when the file does not exist
yet is it created, because ``nnUNetv2_train`` copies it at start and fails without it: by nnU-Net's own
extraction (the same file ``nnUNetv2_extract_fingerprint`` writes), or, with ``fast_fingerprint_if_missing``,
by the fast one, for preprocessed folders the caller owns (tests, the demo).

Torch-free at import so that ``nnunetv2_ohem_plan --help`` stays fast; nnU-Net is imported inside functions.
"""
from __future__ import annotations

import inspect
import os
import tempfile
from typing import Dict, Sequence

from nnunetv2_ohem.cli_common import UsageError, UserError

FINGERPRINT_FILE = "dataset_fingerprint.json"
TINY_PLANS_IDENTIFIER = "nnUNetTinyPlans"
PAPER_PLANS_IDENTIFIER = "nnUNetPaperPlans"
BTRSEG_PLANS_IDENTIFIER = "nnUNetBTRSegPlans"
#: activation bytes relative to nnU-Net's fp16 AMP reference, per training precision (btrseg batch sizing)
PRECISION_MEMORY_FACTOR = {"fp16": 1.0, "bf16": 1.0, "fp32": 0.5}
DEFAULT_PLANNER = "ExperimentPlanner"


def checked_dataset_name(dataset_id: int) -> str:
    """``DatasetXXX_NAME`` of ``dataset_id``; :class:`UserError` (one line) when nnU-Net cannot use it."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw

    for var, value in (("nnUNet_raw", nnUNet_raw), ("nnUNet_preprocessed", nnUNet_preprocessed)):
        if not value:
            raise UserError(f"{var} is not set: export {var}=/path/to/{var} (nnU-Net's folder variables)")
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    try:
        name = convert_id_to_dataset_name(dataset_id)
    except RuntimeError:
        raise UserError(f"dataset {dataset_id}: no Dataset{dataset_id:03d}_* folder in nnUNet_raw "
                        f"({nnUNet_raw})") from None
    if not os.path.isdir(os.path.join(nnUNet_raw, name)):  # known only from nnUNet_preprocessed/results
        raise UserError(f"dataset {dataset_id}: no {name} folder in nnUNet_raw ({nnUNet_raw})")
    dataset_json = os.path.join(nnUNet_raw, name, "dataset.json")
    if not os.path.isfile(dataset_json):
        raise UserError(f"{dataset_json}: missing (nnU-Net's description of the dataset; "
                        f"nnunetv2_ohem_convert writes it)")
    return name


def verify_raw_dataset(dataset_name: str, num_processes: int) -> None:
    """nnU-Net's ``verify_dataset_integrity``, its failure reported as one line."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    from nnunetv2.paths import nnUNet_raw

    folder = os.path.join(nnUNet_raw, dataset_name)
    try:
        verify_dataset_integrity(folder, num_processes)
    except (AssertionError, RuntimeError, FileNotFoundError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"{folder}: nnU-Net's dataset check failed: {reason}") from None


def fast_fingerprint(dataset_id: int, num_processes: int, show_progress_bar: bool = False,
                     verbose: bool = False) -> Dict:
    """The fast fingerprint as nnU-Net's planner would load it, computed where nobody looks.

    nnU-Net's extractor writes to ``$nnUNet_preprocessed/DatasetXXX/dataset_fingerprint.json``; its module-level
    ``nnUNet_preprocessed`` is pointed at a temporary folder for the call, so the user's file is never touched.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor as module

    from nnunetv2_ohem.plans.tiny import FastFingerprintExtractor

    extractor = FastFingerprintExtractor(dataset_id, num_processes, verbose=verbose)
    extractor.show_progress_bar = show_progress_bar
    saved = module.nnUNet_preprocessed
    with tempfile.TemporaryDirectory(prefix=".nnunetv2_ohem_fingerprint-") as tmp:
        module.nnUNet_preprocessed = tmp
        try:
            extractor.run(overwrite_existing=True)
        finally:
            module.nnUNet_preprocessed = saved
        return load_json(os.path.join(tmp, extractor.dataset_name, FINGERPRINT_FILE))


def fingerprint_for_planning(dataset_id: int, num_processes: int, fast_fingerprint_if_missing: bool = False,
                             show_progress_bar: bool = False, verbose: bool = False) -> Dict:
    """Check the dataset, return the fast fingerprint to plan with and apply the module's fingerprint rule."""
    from batchgenerators.utilities.file_and_folder_operations import maybe_mkdir_p, save_json
    from nnunetv2.paths import nnUNet_preprocessed

    name = checked_dataset_name(dataset_id)
    verify_raw_dataset(name, num_processes)
    fingerprint = fast_fingerprint(dataset_id, num_processes, show_progress_bar, verbose)
    path = os.path.join(nnUNet_preprocessed, name, FINGERPRINT_FILE)
    if os.path.isfile(path):
        return fingerprint
    if fast_fingerprint_if_missing:
        maybe_mkdir_p(os.path.dirname(path))
        save_json(fingerprint, path)
        return fingerprint
    print(f"{path} does not exist yet (nnUNetv2_train needs it): running nnU-Net's fingerprint extraction")
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    extractor = DatasetFingerprintExtractor(dataset_id, num_processes, verbose=verbose)
    extractor.show_progress_bar = show_progress_bar
    extractor.run(overwrite_existing=False)
    return fingerprint


def find_planner_class(name: str) -> type:
    """nnU-Net's planner class ``name`` (e.g. ``nnUNetPlannerResEncM``), looked up as ``-pl`` does in nnU-Net."""
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), name,
                                      current_module="nnunetv2.experiment_planning")
    if cls is None:
        raise UsageError(f"-pl {name}: no such planner class in nnunetv2.experiment_planning (e.g. "
                         f"ExperimentPlanner, nnUNetPlannerResEncM, nnUNetPlannerResEncL); -pl selects the "
                         f"planner class as in nnU-Net, -p names the plans")
    return cls


def tiny_plans_name(planner_class: type) -> str:
    """Default name of tiny plans made from ``planner_class``: its own default name with ``Tiny`` before
    ``Plans`` (``nnUNetPlans`` -> ``nnUNetTinyPlans``, ``nnUNetResEncUNetMPlans`` -> ``nnUNetResEncUNetMTinyPlans``),
    so tiny plans never take the name of the user's real plans."""
    default = inspect.signature(planner_class.__init__).parameters.get("plans_name")
    base = default.default if default is not None and isinstance(default.default, str) else "nnUNetPlans"
    return base[:-len("Plans")] + "TinyPlans" if base.endswith("Plans") else base + "Tiny"


def check_configurations(plans: Dict, configurations: Sequence[str]) -> None:
    """:class:`UsageError` naming the configurations the plans have when one asked for is not among them."""
    have = list(plans["configurations"])
    missing = [c for c in configurations if c not in have]
    if missing:
        raise UsageError(f"configuration {missing[0]} is not in the plans '{plans['plans_name']}' of this dataset; "
                         f"valid: {', '.join(have)}")
