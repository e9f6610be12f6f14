"""``nnunetv2_ohem_demo``: phantoms -> conversion -> plans -> training per method -> prediction -> metrics ->
report.html, all inside ``--out``. Reruns reuse finished steps; ``--fresh`` starts over. ``--study`` runs the
multi-seed method comparison instead (see ``nnunetv2_ohem.demo.study``)."""
import argparse
import sys
from typing import List, Optional

from nnunetv2_ohem.cli_common import EXIT_BAD_DATA, EXIT_USAGE, HelpFormatter, add_deprecated_alias, show_progress
from nnunetv2_ohem.demo.pipeline import KNOWN_METHODS, STEP_ORDER, DemoConfig, DemoError, run_demo

_D = DemoConfig()
DESCRIPTION = ("The whole pipeline on MSSEG-II-like phantoms: phantoms, conversion, tiny plans, stock nnU-Net "
               "training per method, prediction, metrics and report.html, all inside --out. Reruns reuse "
               "finished steps; --fresh starts over.\n\n"
               "nnunetv2_ohem_demo --study [--help] runs the study instead: the methods compared over several "
               "training seeds at equal iterations and equal wall time.")
#: former spellings, still accepted with a note on stderr
DEPRECATED = {"--test-cases": "--test_cases", "--val-iterations": "--val_iterations", "--voxel-size": "--voxel_size",
              "--lesion-volume": "--lesion_volume", "--dataset-id": "-d", "--no-progress": "--no_progress"}


def add_data_options(p: argparse.ArgumentParser, d) -> None:
    """Phantom, plans and device options shared by the demo and its study; defaults from ``d`` (a DemoConfig
    or StudyConfig, which use the same field names)."""
    p.add_argument("--cases", type=int, default=d.n_train, help="training phantoms")
    p.add_argument("--test_cases", type=int, default=d.n_test, help="held-out phantoms (predicted and scored)")
    p.add_argument("--voxel_size", type=float, default=d.voxel_size,
                   help="isotropic phantom voxel size in mm (1 = template resolution; larger trains faster)")
    p.add_argument("--lesion_volume", type=float, nargs=2, default=list(d.lesion_volume), metavar=("LO", "HI"),
                   help="new-lesion volumes in mm³ (a few lesions up to 6*HI); 1 50 is MSSEG-II-like and much harder")
    p.add_argument("--new_lesions", type=int, nargs=2, default=list(d.new_lesions), metavar=("LO", "HI"),
                   help="new lesions per lesion-bearing phantom")
    p.add_argument("--lesion_contrast", type=float, nargs=2, default=list(d.lesion_contrast), metavar=("LO", "HI"),
                   help="new-lesion FLAIR intensity as a multiple of white matter; 1.6 2.1 is the generator's "
                        "fainter default")
    p.add_argument("-d", "--dataset_id", type=int, default=d.dataset_id, help="nnU-Net dataset id of the phantoms")
    p.add_argument("--features", type=int, nargs="+", default=list(d.features), help="U-Net features per stage")
    p.add_argument("--patch", type=int, default=d.patch, help="patch edge (voxels)")
    p.add_argument("--batch", type=int, default=d.batch, help="batch size")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda", "mps"),
                   help="auto = cuda when available")


def data_settings(args: argparse.Namespace) -> dict:
    """The :func:`add_data_options` values as DemoConfig / StudyConfig keyword arguments."""
    return {"n_train": args.cases, "n_test": args.test_cases, "voxel_size": args.voxel_size,
            "lesion_volume": tuple(args.lesion_volume), "new_lesions": tuple(args.new_lesions),
            "lesion_contrast": tuple(args.lesion_contrast),
            "dataset_id": args.dataset_id, "features": tuple(args.features), "patch": args.patch,
            "batch": args.batch, "device": args.device}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnunetv2_ohem_demo", description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("--out", default=_D.out, help="output folder (created; everything is written inside)")
    p.add_argument("--fresh", action="store_true", help="delete previous demo outputs in --out and start over")
    p.add_argument("-tr", "--methods", nargs="+", default=list(_D.methods), choices=KNOWN_METHODS,
                   metavar="TRAINER", help="trainers to compare, all with the same budget: %(choices)s")
    p.add_argument("--epochs", type=int, default=_D.epochs, help="training epochs per method")
    p.add_argument("--iterations", type=int, default=_D.iterations, help="training iterations per epoch")
    p.add_argument("--val_iterations", type=int, default=_D.val_iterations, help="validation iterations per epoch")
    p.add_argument("--seed", type=int, default=_D.seed, help="phantom seed (same seed: byte-identical phantoms)")
    p.add_argument("--train_seed", type=int, default=_D.train_seed,
                   help="training seed (network initialisation, patch sampling, augmentation); same seed on the "
                        "same machine: same metrics. -1: unseeded, as plain nnU-Net")
    add_data_options(p, _D)
    p.add_argument("--until", choices=STEP_ORDER, default=None, help="stop after this step")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    for old, new in DEPRECATED.items():
        add_deprecated_alias(p, old, new)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Console script. Ctrl-C / SIGTERM stop the running step (its nnU-Net subprocess too), keep the finished
    ones for the next run and exit 130 / 143 with one line; a half-written report is removed."""
    from nnunetv2_ohem.cli_common import run_cli

    return run_cli("nnunetv2_ohem_demo", demo_main, argv,
                   interrupted="interrupted; finished steps are kept and reused by the next run")


def demo_main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--study" in argv:  # the study has its own options: nnunetv2_ohem_demo --study --help
        from nnunetv2_ohem.demo.study import main as study_main
        return study_main([a for a in argv if a != "--study"])
    args = build_parser().parse_args(argv)
    try:
        cfg = DemoConfig(out=args.out, seed=args.seed, train_seed=None if args.train_seed == -1 else args.train_seed,
                         methods=tuple(args.methods), epochs=args.epochs, iterations=args.iterations,
                         val_iterations=args.val_iterations, fresh=args.fresh, until=args.until,
                         progress=show_progress(args.no_progress), **data_settings(args))
    except ValueError as e:  # an option value out of range: a usage error
        print(f"nnunetv2_ohem_demo: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = run_demo(cfg)
    except (ValueError, DemoError, FileNotFoundError) as e:
        print(f"nnunetv2_ohem_demo: error: {e}", file=sys.stderr)
        return EXIT_BAD_DATA
    ran = [k for k, v in result["steps"].items() if v["status"] == "ran"]
    reused = [k for k, v in result["steps"].items() if v["status"] == "reused"]
    print(f"Finished in {result['seconds']:.0f} s ({len(ran)} steps ran, {len(reused)} reused).")
    if args.until is None:
        print(f"Report: {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
