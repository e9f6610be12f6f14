"""Python API: evaluate one case or two folders with one of the metric sets (msseg2, valdo, brats, segmentation).

    from nnunetv2_ohem.evaluation.api import evaluate_folders, evaluate_case
    df, agg = evaluate_folders("msseg2", "labelsTs", "predictions", num_processes=4)

``df`` has one row per case (column ``case`` first); ``agg`` holds ``mean``/``median``/``std`` of every numeric
column and ``challenge``, the challenge's own aggregation (e.g. MSSEG-II lesion-free cases separately).
"""
from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from nnunetv2_ohem.evaluation import brats, msseg2, valdo
from nnunetv2_ohem.evaluation.io import Mask, check_geometry, match_cases, read_mask, require_labels
from nnunetv2_ohem.evaluation.lesions import EvaluationError
from nnunetv2_ohem.evaluation.segmentation import evaluate_segmentation_arrays, metrics_from_confusion

KINDS = ("msseg2", "valdo", "brats", "segmentation")
_GEOMETRY_OPTIONS = ("spacing_tol", "origin_tol", "direction_tol")
_OPTIONS = {
    "msseg2": dict(msseg2.DEFAULTS),
    "valdo": dict(valdo.DEFAULTS),
    "brats": dict(brats.DEFAULTS),
    "segmentation": dict(num_classes=None),
}


def _split_options(kind: str, options: Dict) -> Tuple[Dict, Dict]:
    if kind not in KINDS:
        raise EvaluationError(f"unknown evaluation kind '{kind}', use one of {KINDS}")
    unknown = set(options) - set(_OPTIONS[kind]) - set(_GEOMETRY_OPTIONS)
    if unknown:
        raise EvaluationError(f"unknown option(s) for {kind}: {sorted(unknown)}; "
                              f"valid: {sorted(_OPTIONS[kind]) + list(_GEOMETRY_OPTIONS)}")
    metric = {**_OPTIONS[kind], **{k: v for k, v in options.items() if k in _OPTIONS[kind]}}
    geometry = {k: v for k, v in options.items() if k in _GEOMETRY_OPTIONS}
    return metric, geometry


def _evaluate_masks(kind: str, ref: Mask, pred: Mask, metric: Dict) -> Dict:
    if kind in ("msseg2", "valdo"):
        for m, what in ((ref, "reference"), (pred, "prediction")):
            require_labels(m, (0, 1), f"a binary {what} mask for {kind}")
        fn = msseg2.evaluate_msseg2_arrays if kind == "msseg2" else valdo.evaluate_valdo_arrays
        return fn(ref.array, pred.array, ref.spacing, **metric)
    if kind == "brats":
        year = brats.normalise_year(metric["year"])
        allowed = (0, 1, 2, 3, 4) if year == "auto" else brats.ALLOWED_LABELS[year]
        for m, what in ((ref, "reference"), (pred, "prediction")):
            require_labels(m, allowed, f"a BraTS {what} in convention '{year}'")
        return brats.evaluate_brats_arrays(ref.array, pred.array, ref.spacing, year, metric["empty_penalty_mm"],
                                           metric["lesion_wise"], metric["definition"])
    n = metric["num_classes"]
    if n is not None:
        for m, what in ((ref, "reference"), (pred, "prediction")):
            require_labels(m, range(int(n)), f"the {what}")
    return evaluate_segmentation_arrays(ref.array, pred.array, None if n is None else int(n))


def evaluate_case(kind: str, ref_path: str, pred_path: str, **options) -> Dict:
    """Metrics of one reference/prediction pair (files are read, geometry checked, labels validated)."""
    metric, geometry = _split_options(kind, options)
    ref, pred = read_mask(ref_path), read_mask(pred_path)
    check_geometry(ref, pred, **geometry)
    return _evaluate_masks(kind, ref, pred, metric)


def _unique_labels(path: str) -> List[int]:
    return np.unique(read_mask(path).array).astype(int).tolist()


def _case_job(args) -> Dict:
    case, kind, ref_path, pred_path, options = args
    return {"case": case, **evaluate_case(kind, ref_path, pred_path, **options)}


def _map(fn: Callable, jobs: List, num_processes: int, progress: bool = False, desc: str = "cases") -> List:
    from tqdm import tqdm

    def bar(items):
        return tqdm(items, total=len(jobs), desc=desc, unit="case", disable=not progress, leave=False)

    if num_processes <= 1 or len(jobs) <= 1:
        return [fn(j) for j in bar(jobs)]
    with ProcessPoolExecutor(max_workers=min(num_processes, len(jobs))) as ex:
        return list(bar(ex.map(fn, jobs)))


def _stats(df: pd.DataFrame) -> Dict[str, Dict[str, Optional[float]]]:
    num = df.select_dtypes(include=[np.number, "bool"]).astype(float)
    return {name: {c: _finite(getattr(num[c], name)(**({"ddof": 0} if name == "std" else {})))
                   for c in num.columns}
            for name in ("mean", "median", "std")}


def _finite(v) -> Optional[float]:
    v = float(v)
    return None if math.isnan(v) else v


def json_safe(obj):
    """Replace NaN/inf by None and numpy scalars by Python ones, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


def evaluate_folders(kind: str, ref_dir: str, pred_dir: str, num_processes: int = 1, progress: bool = False,
                     **options) -> Tuple[pd.DataFrame, Dict]:
    """Evaluate every reference case against the prediction of the same name (see module docstring);
    ``progress``: a tqdm bar per case on stderr."""
    metric, _ = _split_options(kind, options)
    pairs = match_cases(ref_dir, pred_dir)
    options = dict(options)
    needs_scan = (kind == "brats" and brats.normalise_year(metric["year"]) == "auto") or \
                 (kind == "segmentation" and metric["num_classes"] is None)
    if needs_scan:  # one decision for the whole folder, so every case uses the same convention / classes
        labels = _map(_unique_labels, [p for _, r, q in pairs for p in (r, q)], num_processes, progress,
                      "scanning labels")
        if kind == "brats":
            options["year"] = brats.detect_convention(labels)
        else:
            options["num_classes"] = max(max(s) for s in labels) + 1
    rows = _map(_case_job, [(c, kind, r, p, options) for c, r, p in pairs], num_processes, progress, kind)
    df = pd.DataFrame(rows)
    agg: Dict = {"kind": kind, "n_cases": int(len(df)),
                 "options": json_safe({**_split_options(kind, options)[0],
                                       **{k: v for k, v in options.items() if k not in _OPTIONS[kind]}})}
    if kind == "segmentation":
        cm = np.sum([np.asarray(c) for c in df.pop("confusion_matrix")], axis=0)
        agg["challenge"] = {"pooled": metrics_from_confusion(cm), "confusion_matrix": cm.tolist()}
    elif kind == "msseg2":
        agg["challenge"] = msseg2.aggregate_msseg2(df)
    elif kind == "valdo":
        agg["challenge"] = valdo.aggregate_valdo(df)
    else:
        de = brats.get_definition(metric["definition"])
        agg["challenge"] = {"label_convention": sorted(set(df["label_convention"])),
                            "definition": de.name, "definition_follows": de.follows,
                            "hd95_empty_penalty_mm": de.empty_penalty_mm if metric["empty_penalty_mm"] is None
                            else float(metric["empty_penalty_mm"])}
    agg.update(_stats(df.drop(columns=["case"])))
    return df, json_safe(agg)
