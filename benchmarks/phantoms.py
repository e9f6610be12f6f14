"""Phantom generation cost per subject at the template resolution vs the demo's downsampled grids.

Prints one JSON line: seconds per subject (median of --repeats, template loading excluded) and voxels for
voxel sizes 1, 2 and 3 mm, with the speed-up of 2 mm and 3 mm over 1 mm measured in this process.
"""
import argparse
import json
import platform
import time

import numpy as np

from nnunetv2_ohem.phantoms.anatomy import template_1mm
from nnunetv2_ohem.phantoms.mni import MSSEG2PhantomConfig, make_msseg2_subject


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    template_1mm()  # nilearn load, shared by all sizes
    result = {"benchmark": "phantoms", "machine": platform.machine(), "repeats": args.repeats}
    for v in (1.0, 2.0, 3.0):
        cfg = MSSEG2PhantomConfig(voxel_size=v)
        make_msseg2_subject(0, 0, cfg)  # warm the per-resolution smoothed template cache
        times = []
        for i in range(args.repeats):
            t = time.perf_counter()
            sub = make_msseg2_subject(0, i + 1, cfg)
            times.append(time.perf_counter() - t)
        result[f"{v:g}mm"] = {"seconds_per_subject": float(np.median(times)), "voxels": int(sub.ground_truth.size)}
    for v in ("2mm", "3mm"):
        result[f"speedup_{v}_vs_1mm"] = result["1mm"]["seconds_per_subject"] / result[v]["seconds_per_subject"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
