"""``nnunetv2_ohem_plan``: write our plans files (and preprocess) through nnU-Net's own API.

Options follow ``nnUNetv2_plan_and_preprocess``: ``-d`` dataset id, ``-c`` configurations, ``-pl`` planner
class, ``-p``/``-overwrite_plans_name`` plans name, ``-np`` processes. The options are defined here and the
work is imported only when a subcommand runs, so ``--help`` needs neither torch nor nnU-Net.
"""
import argparse
import importlib
import sys
from typing import List, Optional

from nnunetv2_ohem.cli_common import (HelpFormatter, UsageError, add_deprecated_alias, positive_int, run_cli,
                                      show_progress)
from nnunetv2_ohem.plans.common import (BTRSEG_PLANS_IDENTIFIER, DEFAULT_PLANNER, PAPER_PLANS_IDENTIFIER,
                                        PRECISION_MEMORY_FACTOR)

PROG = "nnunetv2_ohem_plan"
TINY_CONFIGURATIONS = ("2d", "3d_fullres")  # a 32³ patch needs no 3d_lowres / cascade
BTRSEG_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")

DESCRIPTIONS = {
    "tiny": "Tiny plans (3 stages, features 4/8/16, 32³ patch, batch 2) for smoke runs, tests and the demo: "
            "the plans of an nnU-Net planner (-pl) with only network, patch and batch shrunk.",
    "paper": "Plans of the OHEM-EMA paper: 0.5 mm isotropic, per-image z-normalisation, 32³ patch, "
             "batch 32 and the paper's U-Net, 3d_fullres only.",
    "btrseg": "BTRSeg plans: the BTRSeg paper's normalisation, a 128³ patch, GroupNorm and a batch size sized "
              "for the training precision.",
}
EPILOG = ("nnU-Net's dataset_fingerprint.json is never changed; when it does not exist yet it is created by "
          "nnU-Net's own extraction (nnUNetv2_train needs it), or with --fast_fingerprint by the fast one.")


class _PlannerOptionForbidden(argparse.Action):
    """``-pl`` on a subcommand with a fixed planner: an error that says what ``-pl`` means."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} selects nnU-Net's planner class, which is fixed for this subcommand; "
                     f"name the plans with -p")


def _add_common(p: argparse.ArgumentParser, plans_name_default: Optional[str], plans_name_help: str) -> None:
    p.add_argument("-d", "--dataset_id", type=int, required=True, help="nnU-Net dataset id")
    p.add_argument("-p", "-overwrite_plans_name", dest="plans_name", default=plans_name_default,
                   help=plans_name_help)
    p.add_argument("-np", "--num_processes", type=positive_int, default=2,
                   help="processes for fingerprinting and preprocessing")
    p.add_argument("--fast_fingerprint", action="store_true",
                   help="when nnU-Net's dataset_fingerprint.json does not exist, write the fast one (1e4 "
                        "foreground voxels) in its place instead of running nnU-Net's full extraction; only for "
                        "preprocessed folders you own (tests, the demo): a later nnUNetv2_plan_and_preprocess "
                        "reuses it unless run with --clean")
    p.add_argument("--no_progress", action="store_true", help="no progress bars (also off when not on a terminal)")
    add_deprecated_alias(p, "--plans_identifier", "-p")


def add_tiny_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p, None, "plans name (default: the planner's own name with Tiny before Plans, e.g. "
                         "nnUNetTinyPlans, nnUNetResEncUNetMTinyPlans)")
    p.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"], choices=TINY_CONFIGURATIONS,
                   metavar="CONFIGURATION",
                   help="configurations to plan and preprocess: %(choices)s")
    p.add_argument("-pl", dest="planner", default=DEFAULT_PLANNER,
                   help="nnU-Net planner class whose plans are shrunk, e.g. nnUNetPlannerResEncM")
    p.add_argument("--features", type=int, nargs="+", default=[4, 8, 16], help="features per stage")
    p.add_argument("--patch", type=positive_int, default=32, help="patch edge length in voxels")
    p.add_argument("--batch", type=positive_int, default=2, help="batch size")


def add_paper_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p, PAPER_PLANS_IDENTIFIER, "plans name")
    p.add_argument("-pl", nargs=1, action=_PlannerOptionForbidden, help=argparse.SUPPRESS)
    p.add_argument("--spacing", type=float, default=0.5, help="isotropic target spacing in mm (paper: 0.5)")
    p.add_argument("--patch", type=positive_int, default=32, help="patch edge in voxels (paper: 32)")
    p.add_argument("--batch", type=positive_int, default=32, help="trained batch size B (paper: 32; B̄ = 4·B)")


def add_btrseg_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p, BTRSEG_PLANS_IDENTIFIER, "plans name")
    p.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"], choices=BTRSEG_CONFIGURATIONS,
                   metavar="CONFIGURATION",
                   help="configurations to plan and preprocess: %(choices)s")
    p.add_argument("-pl", nargs=1, action=_PlannerOptionForbidden, help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=sorted(PRECISION_MEMORY_FACTOR), default="fp16",
                   help="precision the batch size is sized for (fp32 halves the activation budget)")
    p.add_argument("--norm", choices=["group", "batch", "instance"], default="group",
                   help="norm_op written into the plans (trainers with an explicit norm override it)")
    p.add_argument("--num_groups", type=positive_int, default=8,
                   help="GroupNorm groups (largest divisor of the channels <= this)")
    p.add_argument("--patch", type=positive_int, default=128, help="patch edge (capped at the median image size)")
    p.add_argument("--batch", type=positive_int, default=None, help="fixed batch size (default: from the memory budget)")
    p.add_argument("-gpu_memory_target", type=float, default=8, help="GPU memory budget in GB (nnU-Net's option)")
    p.add_argument("--tiny", action="store_true", help="tiny network and 32³ patch (tests, CPU smoke runs)")


def check_patch(patch: int, n_stages: int) -> None:
    """The patch edge must be divisible by the network's total stride (usage error otherwise)."""
    if patch % 2 ** (n_stages - 1):
        raise UsageError(f"--patch {patch} must be divisible by {2 ** (n_stages - 1)} ({n_stages} stages)")


def run_tiny(args: argparse.Namespace) -> None:
    check_patch(args.patch, len(args.features))
    from nnunetv2_ohem.plans.tiny import plan_and_preprocess_tiny

    ident = plan_and_preprocess_tiny(args.dataset_id, args.configurations, args.plans_name, args.num_processes,
                                     args.features, args.patch, args.batch, planner_class=args.planner,
                                     fast_fingerprint_if_missing=args.fast_fingerprint,
                                     show_progress_bar=show_progress(args.no_progress))
    print(f"Wrote and preprocessed plans '{ident}'. Train with: nnUNetv2_train {args.dataset_id} "
          f"{args.configurations[0]} 0 -p {ident}")


#: name -> (add its options, "module:function" that does the work, imported only when it runs)
SUBCOMMANDS = {
    "tiny": (add_tiny_arguments, "nnunetv2_ohem.plans.cli:run_tiny"),
    "paper": (add_paper_arguments, "nnunetv2_ohem.plans.paper:run_paper"),
    "btrseg": (add_btrseg_arguments, "nnunetv2_ohem.plans.btrseg:run_btrseg"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Write our plans files (and preprocess) through "
                                     "nnU-Net's own API.", epilog=EPILOG, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, target) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=DESCRIPTIONS[name].split(":")[0], description=DESCRIPTIONS[name],
                           epilog=EPILOG, formatter_class=HelpFormatter)
        add_arguments(p)
        p.set_defaults(_target=target)
    return parser


def _main(argv: Optional[List[str]]) -> int:
    args = build_parser().parse_args(argv)
    module, function = args._target.split(":")
    getattr(importlib.import_module(module), function)(args)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(PROG, _main, argv, interrupted="interrupted; nnU-Net writes plans and preprocessed data in "
                                                  "place, so rerun this command to complete them")


if __name__ == "__main__":
    sys.exit(main())
