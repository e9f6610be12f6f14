"""Converter time vs plain SimpleITK read+write of the same files, measured side by side in one process.

Builds an MSSEG-II-shaped tree (two float32 FLAIR channels + a uint8 consensus mask per case) once as
``.nii.gz`` and once as ``.nii``, then times (best of ``--repeats``):

* plain: ``sitk.ReadImage`` + ``sitk.WriteImage(useCompression=True)`` of every source file, nothing else;
* convert: ``convert_msseg2`` (all checks: header/truncation, NaN/Inf, geometry, label values; byte copies
  where the source already is ``.nii.gz`` on the reference grid; dataset.json; atomic rename).

Prints one JSON line; ``ratio`` = convert / plain for ``.nii.gz`` sources (goal ≤ 1.3), ``ratio_nii`` the
same for ``.nii`` sources, which must be encoded.
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import SimpleITK as sitk

from nnunetv2_ohem.dataset_conversion.msseg2 import convert_msseg2


def make_tree(root: str, n_cases: int, shape, ext: str, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    brain = (zz ** 2 + yy ** 2 + xx ** 2 < 0.8).astype(np.float32)
    files = []
    for i in range(n_cases):
        d = os.path.join(root, "training", f"{i + 1:03d}")
        os.makedirs(d)
        for t in (1, 2):
            arr = (brain * 400 + rng.normal(0, 20, shape)).astype(np.float32)
            files.append(_write(arr, os.path.join(d, f"flair_time0{t}_on_middle_space{ext}")))
        label = np.zeros(shape, np.uint8)
        if i % 2:
            c = rng.integers(10, np.array(shape) - 10)
            label[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 3:c[2] + 3] = 1
        files.append(_write(label, os.path.join(d, f"ground_truth{ext}")))
    return files


def _write(arr, path):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.5, 0.5))
    sitk.WriteImage(img, path, useCompression=path.endswith(".gz"))
    return path


def plain(files, out_dir):
    os.makedirs(out_dir)
    for i, f in enumerate(files):
        sitk.WriteImage(sitk.ReadImage(f), os.path.join(out_dir, f"{i}.nii.gz"), useCompression=True)


def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--shape", type=int, nargs=3, default=[128, 128, 96])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    result = {"benchmark": "convert_msseg2_vs_sitk_read_write", "cases": args.cases, "shape": args.shape,
              "files": 3 * args.cases}
    root = tempfile.mkdtemp(prefix="bench_convert_")
    counter = iter(range(10 ** 6))   # fresh output folder for every run
    try:
        for ext, key in ((".nii.gz", ""), (".nii", "_nii")):
            src = os.path.join(root, "src" + key)
            files = make_tree(src, args.cases, tuple(args.shape), ext)

            def run_plain():
                plain(files, os.path.join(root, f"plain{next(counter)}"))

            def run_convert():
                with contextlib.redirect_stdout(io.StringIO()):
                    convert_msseg2(src, 999, raw_dir=os.path.join(root, f"raw{next(counter)}"))

            t_plain, t_convert = timed(run_plain, args.repeats), timed(run_convert, args.repeats)
            result[f"plain_s{key}"] = round(t_plain, 3)
            result[f"convert_s{key}"] = round(t_convert, 3)
            result[f"ratio{key}"] = round(t_convert / t_plain, 3)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
