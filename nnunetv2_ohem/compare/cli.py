"""``nnunetv2_ohem_compare``: compare nnU-Net trainers on a planned and preprocessed dataset, then pick one.

    nnunetv2_ohem_compare -d 991 -c 3d_fullres -p nnUNetPlans -tr nnUNetTrainer nnUNetTrainerOHEMEMA \\
        -f 0 1 2 3 4 --metric msseg2 -o compare_991
    nnunetv2_ohem_compare select -o compare_991

Torch-free at import (``--help`` is fast); see ``docs/compare.md``.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from typing import List, Optional, Sequence

from nnunetv2_ohem.cli_common import UsageError, run_cli

PROG = "nnunetv2_ohem_compare"


def _slurm_minutes(value: str) -> int:
    """``--slurm_time`` as minutes: ``90``, ``1:30:00`` (H:MM:SS) or ``2-00:00:00`` (D-HH:MM:SS)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})", value)
    if m:
        d, h, mi, s = (int(g or 0) for g in m.groups())
        minutes = d * 1440 + h * 60 + mi + (1 if s else 0)
    elif value.isdigit():
        minutes = int(value)
    else:
        raise argparse.ArgumentTypeError(f"{value!r}: give minutes (90) or H:MM:SS / D-HH:MM:SS")
    if minutes < 1:
        raise argparse.ArgumentTypeError("must be at least one minute")
    return minutes


def build_parser() -> argparse.ArgumentParser:
    from nnunetv2_ohem.compare.defaults import DEFAULT_TRAINERS, LAUNCHERS
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train nnU-Net trainers over folds and training seeds with stock nnUNetv2_train, evaluate "
                    "each fold with lesion-wise challenge metrics and write results.csv, summary.md (means, "
                    "95%% CIs, paired differences against the first trainer) and report.html. Finished runs "
                    "are reused. Then: '%(prog)s select -o OUT' picks the model to ship.")
    p.add_argument("-d", dest="dataset", required=True, help="dataset ID or name (planned and preprocessed)")
    p.add_argument("-c", dest="configuration", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-tr", dest="trainers", nargs="+", default=list(DEFAULT_TRAINERS),
                   help="trainers to compare (ours, nnU-Net's or yours in nnUNet_extTrainer); the first is the "
                        "reference for paired differences and the equal-time budget")
    p.add_argument("-f", dest="folds", nargs="+", type=int, default=[0], help="folds of splits_final.json")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (initialisation, sampling, "
                                                                     "augmentation)")
    p.add_argument("--budget", choices=("iterations", "time", "both"), default="iterations",
                   help="equal iterations, equal wall time (epochs scaled by the per-epoch cost measured "
                        "against the first trainer), or both")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: each trainer's own)")
    p.add_argument("--iterations", type=int, default=None,
                   help="iterations per epoch (default: each trainer's own)")
    p.add_argument("--val_iterations", type=int, default=None,
                   help="validation iterations per epoch, for the pseudo Dice (default: each trainer's own)")
    p.add_argument("--metric", choices=("msseg2", "valdo", "brats", "segmentation"), default="msseg2",
                   help="challenge metric family used to score each fold (see nnunetv2_ohem_evaluate)")
    p.add_argument("--test", default=None, metavar="IMAGES_DIR",
                   help="evaluate predictions of these held-out images instead of the validation folds "
                        "(nnUNetv2_predict; on a CPU nnU-Net's predictor in the run's own process)")
    p.add_argument("--test_labels", default=None, metavar="LABELS_DIR", help="labels of --test")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring at prediction (--test only)")
    p.add_argument("--step_size", type=float, default=0.5,
                   help="sliding-window step as a fraction of the patch, as nnUNetv2_predict -step_size "
                        "(--test only)")
    p.add_argument("--num_processes", type=int, default=3, help="nnUNetv2_predict -npp/-nps (--test on a GPU; a CPU predicts in "
                                                           "the run's process, without workers)")
    p.add_argument("-o", dest="out", required=True, help="output folder (runs, results.csv, summary.md, ...)")
    p.add_argument("--device", choices=("cpu", "cuda", "mps"), default="cuda",
                   help="passed to nnUNetv2_train and nnUNetv2_predict")
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time (local launcher)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: here; slurm: one SLURM job per run through submitit; submitit_local: the slurm "
                        "code path with submitit's local executor (try a setup on one machine)")
    p.add_argument("--slurm_partition", default=None, help="SLURM partition (default: the cluster's default)")
    p.add_argument("--slurm_gpus_per_node", type=int, default=1, help="GPUs per SLURM job (one run per job)")
    p.add_argument("--slurm_cpus_per_task", type=int, default=8,
                   help="CPUs per SLURM job (nnU-Net's data-loading workers need them)")
    p.add_argument("--slurm_time", type=_slurm_minutes, default=24 * 60,
                   help="time limit per run: minutes or H:MM:SS / D-HH:MM:SS")
    p.add_argument("--rerun", action="store_true",
                   help="train again the runs that exist with other settings (default: refuse)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (drawn only on a terminal anyway)")
    return p


def build_select_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} select", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Rank the trainers of a compare folder by a lesion metric (pooled over folds and seeds; "
                    "lesion-free folds count their false positives), print the nnUNetv2_predict command of the "
                    "winner and check nnU-Net's keep-largest-component postprocessing.")
    p.add_argument("-o", dest="out", required=True, help="a folder written by nnunetv2_ohem_compare")
    p.add_argument("--by", default=None, help="metric column of results.csv (default: lesion_f1_pooled for "
                                              "msseg2/valdo, mean_region_dice for brats, mean_dice_fg otherwise)")
    p.add_argument("--budget", default=None, help="budget to select in (default: time if run, else iterations)")
    p.add_argument("--no_postprocessing_check", action="store_true",
                   help="skip re-scoring the winner's validation predictions with nnU-Net's postprocessing")
    return p


def _main_compare(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    from nnunetv2_ohem.compare.engine import CompareConfig, SlurmOptions, run_compare
    cfg = CompareConfig(dataset=args.dataset, configuration=args.configuration, out=args.out, plans=args.plans,
                        trainers=tuple(args.trainers), folds=tuple(args.folds), seeds=tuple(args.seeds),
                        budget=args.budget, epochs=args.epochs, iterations=args.iterations,
                        val_iterations=args.val_iterations, metric=args.metric, test=args.test,
                        test_labels=args.test_labels, disable_tta=args.disable_tta, step_size=args.step_size,
                        num_processes=args.num_processes, device=args.device, jobs=args.jobs,
                        launcher=args.launcher,
                        slurm=SlurmOptions(partition=args.slurm_partition, gpus_per_node=args.slurm_gpus_per_node,
                                           cpus_per_task=args.slurm_cpus_per_task, time_min=args.slurm_time),
                        rerun=args.rerun, progress=not args.no_progress and sys.stderr.isatty(),
                        command=" ".join([PROG] + [shlex.quote(a) for a in argv]))
    result = run_compare(cfg)
    c = result["counts"]
    print(f"{PROG}: {len(result['results'])} result rows ({c['trained']} run(s) trained, {c['evaluated']} "
          f"re-evaluated, {c['reused']} reused) in {result['seconds'] / 60:.1f} min; see "
          f"{cfg.out}/summary.md and {cfg.out}/report.html; choose a model with: {PROG} select -o "
          f"{shlex.quote(cfg.out)}")
    n_min = result["results"].groupby(["budget", "trainer"]).size().min()
    if n_min < 2:
        print(f"{PROG}: note: {n_min} run per trainer, too few for a confidence interval (give more folds or "
              f"seeds); summary.md shows means only", file=sys.stderr)
    return 0


def _main_select(argv: List[str]) -> int:
    args = build_select_parser().parse_args(argv)
    from nnunetv2_ohem.compare.select import run_select
    print(run_select(args.out, by=args.by, budget=args.budget, check_postprocessing=not args.no_postprocessing_check))
    return 0


def _main(argv: Optional[Sequence[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "select":
        return _main_select(argv[1:])
    return _main_compare(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from nnunetv2_ohem.evaluation.lesions import EvaluationError
    return run_cli(PROG, _main, argv, known_errors=(EvaluationError,))


__all__ = ["main", "build_parser", "build_select_parser", "UsageError"]


if __name__ == "__main__":
    sys.exit(main())
