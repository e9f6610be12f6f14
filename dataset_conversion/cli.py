"""nnunetv2_ohem_convert: challenge datasets → nnU-Net raw datasets, and BraTS predictions back.

    nnunetv2_ohem_convert {msseg2,valdo,brats,acdc} SOURCE_DIR -d ID [-n NAME] [-o RAW_DIR] [--overwrite] [-np N]
    nnunetv2_ohem_convert brats-back PRED_DIR OUT_DIR --year {2020,2021,2023}

Bad input: one line on stderr naming the file and the reason, exit code 1, nothing written. Bad options
(e.g. ``-np 0``): exit code 2. Ctrl-C / SIGTERM: the temporary folder is removed, one line, exit code 130 / 143.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from nnunetv2_ohem.cli_common import HelpFormatter, positive_int, run_cli, show_progress

# name -> (module, function, help, extra keyword taken from the namespace)
CONVERTERS = {
    "msseg2": ("msseg2", "convert_msseg2", "MSSEG-II (new MS lesions, two FLAIR time points)", "label"),
    "valdo": ("valdo", "convert_valdo", "VALDO 2021 task 3 (lacunes; T1, T2, FLAIR)", "rater"),
    "brats": ("brats", "convert_brats", "BraTS 2020 / 2021 / 2023 (regions WT, TC, ET)", "year"),
    "acdc": ("acdc", "convert_acdc", "ACDC cardiac cine MRI (ED/ES frames; RV, MYO, LV)", None),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunetv2_ohem_convert", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]).replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, _, help_text, _) in CONVERTERS.items():
        p = sub.add_parser(name, help=help_text, description=help_text + ".", formatter_class=HelpFormatter)
        p.add_argument("source_dir", help="the challenge data folder as downloaded (read only)")
        p.add_argument("-d", "--dataset_id", type=int, required=True, help="nnU-Net dataset id (1..999)")
        p.add_argument("-n", "--name", default=None, help="dataset name (default: MSSEG2, VALDO, BraTS<year>, "
                                                          "ACDC)")
        p.add_argument("-o", "--raw_dir", default=None, help="output raw folder (default: $nnUNet_raw)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing DatasetXXX_NAME written by "
                                                                "this converter (atomically)")
        p.add_argument("-np", "--num_processes", type=positive_int, default=1, help="cases converted in parallel")
        p.add_argument("--no_progress", action="store_true",
                       help="no progress bar (also off when stderr is not a terminal)")
        if name == "msseg2":
            p.add_argument("--label", default="consensus",
                           help="'consensus' (ground_truth, default) or 'expertN' (ground_truth_expertN)")
        elif name == "valdo":
            p.add_argument("--rater", type=int, default=None,
                           help="use RaterN_Lacunes where a subject has several rater masks")
        elif name == "brats":
            p.add_argument("--year", type=int, choices=(2020, 2021, 2023), default=None,
                           help="BraTS release (default: detected from the case folder names)")
    p = sub.add_parser("brats-back", help="nnU-Net BraTS predictions → BraTS labels of that year",
                       formatter_class=HelpFormatter,
                       description="Map nnU-Net predictions (1 edema, 2 necrosis, 3 enhancing) back to the BraTS "
                                   "convention: 2020/2021 labels 2, 1, 4; 2023 labels 2, 1, 3.")
    p.add_argument("pred_dir", help="folder with nnU-Net predictions (*.nii.gz)")
    p.add_argument("out_dir", help="folder to create with the BraTS-labelled files (same names)")
    p.add_argument("--year", type=int, choices=(2020, 2021, 2023), required=True, help="BraTS release")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR written by brats-back "
                                                            "(atomically)")
    p.add_argument("-np", "--num_processes", type=positive_int, default=1, help="files converted in parallel")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Console script: :func:`convert_main` under the shared exit-code and interruption convention."""
    return run_cli("nnunetv2_ohem_convert", convert_main, argv)


def convert_main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from nnunetv2_ohem.dataset_conversion.common import ConversionError

    try:
        if args.command == "brats-back":
            from nnunetv2_ohem.dataset_conversion.brats import brats_back

            brats_back(args.pred_dir, args.out_dir, args.year, args.overwrite, args.num_processes)
        else:
            module, function, _, extra = CONVERTERS[args.command]
            convert = getattr(importlib.import_module(f"nnunetv2_ohem.dataset_conversion.{module}"), function)
            kwargs = {extra: getattr(args, extra)} if extra else {}
            convert(args.source_dir, args.dataset_id, name=args.name, raw_dir=args.raw_dir,
                    overwrite=args.overwrite, num_processes=args.num_processes,
                    progress=show_progress(args.no_progress), **kwargs)
    except ConversionError as e:
        print(f"nnunetv2_ohem_convert {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
