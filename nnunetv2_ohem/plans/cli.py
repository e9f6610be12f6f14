"""``nnunetv2_ohem_plan``: write our plans files (and preprocess) through nnU-Net's own API.

Subcommands are registered in ``SUBCOMMANDS`` as ``name -> "module:function"``; each module provides
``add_arguments(parser)`` via ``<function>.add_arguments`` and the function takes the parsed namespace.
Imports are lazy so ``--help`` is instant.
"""
import argparse
import importlib
from typing import List, Optional

SUBCOMMANDS = {
    "tiny": "nnunetv2_ohem.plans.cli:run_tiny",
    "paper": "nnunetv2_ohem.plans.paper:run_paper",
    "btrseg": "nnunetv2_ohem.plans.btrseg:run_btrseg",
}


def add_tiny_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--dataset_id", type=int, required=True)
    p.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"])
    p.add_argument("-pl", "--plans_identifier", default="nnUNetTinyPlans")
    p.add_argument("--features", type=int, nargs="+", default=[4, 8, 16], help="features per stage")
    p.add_argument("--patch", type=int, default=32, help="patch edge length (voxels)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("-np", "--num_processes", type=int, default=2)


def run_tiny(args: argparse.Namespace) -> None:
    """Tiny plans (3 stages, few features, 32³ patch, batch 2) for smoke runs, tests and the demo."""
    from nnunetv2_ohem.plans.tiny import plan_and_preprocess_tiny

    ident = plan_and_preprocess_tiny(args.dataset_id, args.configurations, args.plans_identifier,
                                     args.num_processes, args.features, args.patch, args.batch)
    print(f"Wrote and preprocessed plans '{ident}'. Train with: nnUNetv2_train {args.dataset_id} "
          f"{args.configurations[0]} 0 -p {ident}")


run_tiny.add_arguments = add_tiny_arguments


def _resolve(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="nnunetv2_ohem_plan", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, target in SUBCOMMANDS.items():
        func = _resolve(target)
        p = sub.add_parser(name, help=(func.__doc__ or "").strip().splitlines()[0] if func.__doc__ else None)
        func.add_arguments(p)
        p.set_defaults(_func=func)
    args = parser.parse_args(argv)
    args._func(args)


if __name__ == "__main__":
    main()
