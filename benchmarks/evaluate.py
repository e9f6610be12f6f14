"""Speed of our Dice + HD95 vs MedPy on three 256³ cases with ~100 small lesions each (values compared).

Prints one JSON line: ``ratio`` = MedPy time / our time (same process, same masks), ``max_abs_diff`` = the
largest |ours − MedPy| over all Dice and HD95 values, plus the time of our full MSSEG-II lesion-wise row.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/evaluate.py``
"""
import json
import time

import numpy as np
from medpy.metric.binary import dc, hd95 as medpy_hd95

from nnunetv2_ohem.evaluation.distances import dice, hd95
from nnunetv2_ohem.evaluation.msseg2 import evaluate_msseg2_arrays


def make_case(rng, shape=(256, 256, 256), n_lesions=100):
    zz, yy, xx = np.ogrid[-5:6, -5:6, -5:6]
    ref = np.zeros(shape, bool)
    pred = np.zeros(shape, bool)
    for k in range(n_lesions):
        c = rng.integers(8, np.array(shape) - 8)
        r = rng.uniform(1.0, 4.5, size=3)
        ball = (zz / r[0]) ** 2 + (yy / r[1]) ** 2 + (xx / r[2]) ** 2 <= 1
        sl = tuple(slice(ci - 5, ci + 6) for ci in c)
        ref[sl] |= ball
        if k % 10:  # 90 % detected, with a shift of up to one voxel
            s = rng.integers(-1, 2, size=3)
            pred[tuple(slice(ci - 5 + si, ci + 6 + si) for ci, si in zip(c, s))] |= ball
    for _ in range(10):  # false positives
        c = rng.integers(8, np.array(shape) - 8)
        pred[tuple(slice(ci - 1, ci + 2) for ci in c)] = True
    return ref, pred


def main():
    rng = np.random.default_rng(0)
    spacing = (1.0, 0.8, 0.8)
    cases = [make_case(rng) for _ in range(3)]
    t0 = time.perf_counter()
    ours = [(dice(r, p), hd95(r, p, spacing)) for r, p in cases]
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_vals = [(dc(p, r), medpy_hd95(p, r, voxelspacing=spacing)) for r, p in cases]
    t_medpy = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = [evaluate_msseg2_arrays(r.astype(np.uint8), p.astype(np.uint8), spacing) for r, p in cases]
    t_msseg = time.perf_counter() - t0
    diff = max(abs(a - b) for o, m in zip(ours, ref_vals) for a, b in zip(o, m))
    print(json.dumps({
        "benchmark": "evaluate_dice_hd95_vs_medpy", "cases": 3, "shape": [256, 256, 256],
        "lesions_per_case": [int(r["n_ref_lesions"]) for r in rows],
        "ours_s": round(t_ours, 3), "medpy_s": round(t_medpy, 3), "ratio": round(t_medpy / t_ours, 2),
        "max_abs_diff": diff, "ours_msseg2_lesionwise_s": round(t_msseg, 3),
        "lesion_f1": [round(r["lesion_f1"], 4) for r in rows],
    }))


if __name__ == "__main__":
    main()
