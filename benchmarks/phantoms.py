"""Phantom generation cost per subject at the template resolution vs the downsampled grids, per generator.

Prints one JSON line: for each generator (msseg2, valdo, brats) and voxel size 1, 2 and 3 mm the seconds per
subject (median of --repeats, template loading excluded) and voxels, with the speed-up of 2 mm and 3 mm over
1 mm measured in this process.
"""
import argparse
import json
import platform
import time

import numpy as np

from nnunetv2_ohem.phantoms.anatomy import template_1mm
from nnunetv2_ohem.phantoms.brats import BraTSPhantomConfig, make_brats_subject
from nnunetv2_ohem.phantoms.mni import MSSEG2PhantomConfig, make_msseg2_subject
from nnunetv2_ohem.phantoms.valdo import VALDOPhantomConfig, make_valdo_subject

GENERATORS = {
    "msseg2": (MSSEG2PhantomConfig, make_msseg2_subject, lambda sub: sub.ground_truth.size),
    "valdo": (VALDOPhantomConfig, make_valdo_subject, lambda sub: sub.t1.size),
    "brats": (BraTSPhantomConfig, make_brats_subject, lambda sub: sub.label.size),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kinds", nargs="+", default=list(GENERATORS), choices=list(GENERATORS))
    args = p.parse_args()
    template_1mm()  # nilearn load, shared by all sizes and generators
    result = {"benchmark": "phantoms", "machine": platform.machine(), "repeats": args.repeats}
    for kind in args.kinds:
        config_cls, make, voxels = GENERATORS[kind]
        rows = {}
        for v in (1.0, 2.0, 3.0):
            cfg = config_cls(voxel_size=v)
            make(0, 0, cfg)  # warm the per-resolution smoothed template cache
            times = []
            for i in range(args.repeats):
                t = time.perf_counter()
                sub = make(0, i + 1, cfg)
                times.append(time.perf_counter() - t)
            rows[f"{v:g}mm"] = {"seconds_per_subject": float(np.median(times)), "voxels": int(voxels(sub))}
        for v in ("2mm", "3mm"):
            rows[f"speedup_{v}_vs_1mm"] = rows["1mm"]["seconds_per_subject"] / rows[v]["seconds_per_subject"]
        result[kind] = rows
    print(json.dumps(result))


if __name__ == "__main__":
    main()
