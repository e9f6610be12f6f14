"""``nnunetv2_ohem_evaluate {msseg2,valdo,brats,segmentation} -ref REF -pred PRED [-o metrics.json] [--csv cases.csv] [-np N]``

Pairs files by nnU-Net case name, refuses missing/extra predictions and geometry mismatches, prints a
compact table and writes the per-case rows and the aggregate atomically. Bad input (a truncated, NaN or
non-integer file, a missing case, a geometry mismatch): one line naming the file, exit code 1, nothing written;
bad options (e.g. ``-np 0``): exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from nnunetv2_ohem.cli_common import HelpFormatter, UserError, positive_int, run_cli, show_progress

KIND_HELP = {
    "msseg2": "MSSEG-II: Dice, lesion-wise F1 (animaSegPerfAnalyzer rule), FP lesions/volume on lesion-free cases",
    "valdo": "VALDO task 3: DSC, absolute volume difference, detection F1 by centre of mass",
    "brats": "BraTS: Dice and HD95 (mm) for WT/TC/ET, per named definition (brats2025, brats2023, medpy)",
    "segmentation": "PA, MPA, per-class IoU, MIoU, FWIoU, per-class Dice from one confusion matrix",
}
TABLE_COLUMNS = {
    "msseg2": ["dice", "lesion_f1", "lesion_sensitivity", "lesion_ppv", "n_ref_lesions", "n_pred_lesions",
               "fp_lesions", "fp_volume_mm3"],
    "valdo": ["dice", "avd_mm3", "f1", "precision", "recall", "n_ref_lesions", "n_pred_lesions"],
    "brats": ["dice_WT", "dice_TC", "dice_ET", "hd95_WT", "hd95_TC", "hd95_ET"],
    "segmentation": ["pixel_accuracy", "mean_pixel_accuracy", "mean_iou", "fw_iou"],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunetv2_ohem_evaluate",
                                     description=__doc__.split("\n\n")[1].replace("``", ""),
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind, help_ in KIND_HELP.items():
        p = sub.add_parser(kind, help=help_, description=help_ + ".", formatter_class=HelpFormatter)
        p.add_argument("-ref", required=True, help="folder of reference label files (e.g. labelsTs)")
        p.add_argument("-pred", required=True, help="folder of predictions named like the references")
        p.add_argument("-o", "--output", default=None, help="metrics JSON (aggregate + per-case rows)")
        p.add_argument("--csv", default=None, help="per-case CSV")
        p.add_argument("-np", "--num_processes", type=positive_int, default=1, help="cases evaluated in parallel")
        p.add_argument("--no_progress", action="store_true",
                       help="no progress bar (also off when stderr is not a terminal)")
        p.add_argument("--origin_tol", type=float, default=1e-3, help="origin tolerance in mm (default 1e-3)")
        p.add_argument("--spacing_tol", type=float, default=1e-4, help="relative spacing tolerance")
        if kind == "msseg2":
            p.add_argument("--alpha", type=float, default=0.10, help="min. lesion sensitivity (default 0.10)")
            p.add_argument("--beta", type=float, default=0.70, help="max. outside ratio (default 0.70)")
            p.add_argument("--gamma", type=float, default=0.65, help="overlap share checked (default 0.65)")
            p.add_argument("--min_volume_mm3", type=float, default=3.0, help="lesions must be larger than this, in mm³")
            p.add_argument("--connectivity", type=int, default=6, help="6, 18 or 26 (default 6, as Anima)")
            p.add_argument("--anima_loop_bound", action="store_true",
                           help="reproduce the C++ loop bound of animaSegPerfAnalyzer (see docs)")
        elif kind == "valdo":
            p.add_argument("--connectivity", type=int, default=26, help="6, 18 or 26 (default 26)")
        elif kind == "brats":
            p.add_argument("--year", default="auto", choices=["auto", "2020", "2021", "2023", "nnunet"],
                           help="label convention: 2020/2021 raw (1,2,4), 2023 raw (1 NETC, 2 SNFH, 3 ET), "
                                "nnunet = Dataset137 (1 ED, 2 NCR, 3 ET); auto: 2021 if a 4 occurs, else nnunet")
            p.add_argument("--definition", default="brats2025", choices=["brats2025", "brats2023", "medpy"],
                           help="metric definition: brats2025 = BraTS-evaluation (panoptica) rules in mm "
                                "(default), brats2023 = the 2023 script (surface-distance HD95), medpy = MedPy "
                                "HD95 with 2023 lesion-wise rules; see docs/evaluation.md")
            p.add_argument("--empty_penalty_mm", type=float, default=None,
                           help="HD95 when exactly one of reference/prediction is empty (default: the "
                                "definition's: 373, 374 or 373.1287)")
            p.add_argument("--lesion_wise", default=None, choices=["GLI", "SSA", "PED", "MEN", "MET"],
                           help="add lesion-wise Dice/HD95 (ranking metrics) of this sub-challenge under the "
                                "definition's rules")
        else:
            p.add_argument("--num_classes", type=int, default=None, help="default: max label + 1")
    return parser


def _options(args: argparse.Namespace) -> dict:
    skip = {"kind", "ref", "pred", "output", "csv", "num_processes", "no_progress"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def format_table(df, agg: dict, kind: str) -> str:
    import pandas as pd

    cols = ["case"] + [c for c in TABLE_COLUMNS[kind] if c in df.columns]
    if kind == "brats":
        cols += [f"lw_{m}_{r}" for m in ("dice", "hd95") for r in ("WT", "TC", "ET") if f"lw_{m}_{r}" in df.columns]
    if kind == "segmentation":
        cols += [c for c in df.columns if c.startswith("dice_")]
    table = df[cols].copy()
    summary = pd.DataFrame([{"case": name, **{c: agg[name].get(c) for c in cols[1:]}}
                            for name in ("mean", "median", "std")])
    text = pd.concat([table, summary], ignore_index=True).to_string(index=False, float_format=lambda v: f"{v:.4g}",
                                                                     na_rep="nan")
    lines = [text]
    ch = agg.get("challenge", {})
    if kind == "msseg2":
        w, f = ch["cases_with_lesions"], ch["lesion_free_cases"]
        lines.append(f"cases with lesions: {w['n_cases']}  Dice {_fmt(w['dice']['mean'])}  "
                     f"F1 {_fmt(w['lesion_f1']['mean'])}")
        lines.append(f"lesion-free cases: {f['n_cases']}  FP lesions {f['fp_lesions']['total']}  "
                     f"FP volume {_fmt(f['fp_volume_mm3']['total'])} mm³")
    elif kind == "valdo":
        lines.append(f"pooled detection F1 {_fmt(ch['pooled_f1'])} (P {_fmt(ch['pooled_precision'])}, "
                     f"R {_fmt(ch['pooled_recall'])})")
    elif kind == "brats":
        lines.append(f"label convention: {', '.join(ch['label_convention'])}")
        lines.append(f"metric definition: {ch['definition']} ({ch['definition_follows']})")
    else:
        p = ch["pooled"]
        lines.append(f"pooled over cases: PA {_fmt(p['pixel_accuracy'])}  MPA {_fmt(p['mean_pixel_accuracy'])}  "
                     f"MIoU {_fmt(p['mean_iou'])}  FWIoU {_fmt(p['fw_iou'])}")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "nan" if v is None else f"{v:.4g}"


def main(argv: Optional[List[str]] = None) -> int:
    """Console script: :func:`evaluate_main` under the shared exit-code and interruption convention."""
    return run_cli("nnunetv2_ohem_evaluate", evaluate_main, argv)


def evaluate_main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from nnunetv2_ohem.evaluation.api import evaluate_folders, json_safe
    from nnunetv2_ohem.evaluation.io import write_csv_atomic, write_json_atomic
    from nnunetv2_ohem.evaluation.lesions import EvaluationError

    try:
        df, agg = evaluate_folders(args.kind, args.ref, args.pred, args.num_processes,
                                   progress=show_progress(args.no_progress), **_options(args))
    except EvaluationError as e:  # imported only after parsing (cc3d): --help stays fast
        raise UserError(str(e)) from None
    print(format_table(df, agg, args.kind))
    if args.output:
        write_json_atomic({"aggregate": agg, "cases": json_safe(df.to_dict(orient="records"))}, args.output)
        print(f"wrote {args.output}")
    if args.csv:
        write_csv_atomic(df, args.csv)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
