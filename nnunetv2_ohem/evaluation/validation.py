"""Lesion-wise metrics of an nnU-Net fold's validation predictions (``fold_X/validation``).

nnU-Net's final validation writes ``validation/CASE<file_ending>`` and scores them against
``gt_segmentations`` of the preprocessed dataset (``summary.json``, voxel Dice). :func:`lesionwise_validation`
scores the same predictions against the same references with one of :data:`~nnunetv2_ohem.evaluation.api.KINDS`
through :func:`~nnunetv2_ohem.evaluation.api.evaluate_folders`, so its ``aggregate`` and ``cases`` are exactly
what ``nnunetv2_ohem_evaluate KIND -ref REF -pred validation -o metrics.json`` writes, where ``REF`` holds the
``gt_segmentations`` files of the validation cases (``gt_segmentations`` holds every training case; the fold
validates a fifth of them). ``metrics`` are the run-level numbers of :func:`nnunetv2_ohem.evaluation.run_metrics.run_metrics`
(the columns ``nnunetv2_ohem_compare`` reports); a number that is undefined for this fold (lesion F1 of a
fold without lesions, FP per lesion-free case of a fold without lesion-free cases) is ``null`` and its reason
is in ``absent``.

:func:`guess_family` picks the metric family from ``dataset.json`` when the trainer does not name one.
Torch-free.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import pandas as pd

from nnunetv2_ohem.evaluation.api import KINDS, evaluate_folders, json_safe
from nnunetv2_ohem.evaluation.lesions import EvaluationError
from nnunetv2_ohem.evaluation.run_metrics import run_metrics

#: written next to nnU-Net's ``validation/summary.json``
LESIONWISE_FILE = "summary_lesionwise.json"

#: words of label/region names that mark a BraTS-style dataset (whole words, lower case). "tumor" alone is not
#: one: LiTS (liver, tumor) and KiTS (kidney, tumor, cyst) are multi-class segmentation datasets.
_BRATS_WORDS = ("edema", "oedema", "enhancing", "enhanced", "necrosis", "necrotic", "netc", "snfh", "ncr", "ed",
                "et", "tc", "wt")
_BRATS_PHRASES = ("whole tumor", "whole tumour", "tumor core", "tumour core")
_VALDO_WORDS = ("lacune", "lacunes", "lacunar")


def _words(name: str) -> List[str]:
    return re.findall(r"[a-z]+", name.lower())


def foreground_labels(dataset_json: Mapping) -> Dict[str, object]:
    """``dataset.json`` labels without background (value 0) and ``ignore``."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise EvaluationError("dataset.json has no 'labels'")
    return {k: v for k, v in labels.items() if k != "ignore" and v != 0 and k != "background"}


def guess_family(dataset_json: Mapping) -> Tuple[str, str]:
    """(family, why) from ``dataset.json``'s labels:

    * a label or region named like a BraTS tumour part (edema, enhancing, necrotic, whole tumor, tumor core,
      NETC, SNFH, WT/TC/ET, ...) -> ``brats``;
    * one foreground label named lacune(s) -> ``valdo``;
    * any other single foreground label (or region) -> ``msseg2``;
    * two or more foreground labels -> ``segmentation``.

    A dataset with an ``ignore`` label is refused (its voxels would count as foreground or as a class):
    name the family explicitly there.
    """
    if "ignore" in (dataset_json.get("labels") or {}):
        raise EvaluationError("dataset.json has an 'ignore' label, which the lesion metrics would count as "
                              "foreground; set the trainer's lesion_metric explicitly")
    fg = foreground_labels(dataset_json)
    if not fg:
        raise EvaluationError("dataset.json has no foreground label")
    names = sorted(fg)
    brats_like = [n for n in names if set(_words(n)) & set(_BRATS_WORDS)
                  or any(p in " ".join(_words(n)) for p in _BRATS_PHRASES)]
    if brats_like:
        return "brats", f"guessed from dataset.json: BraTS-like label/region name(s) {brats_like}"
    if len(fg) == 1:
        (name,) = names
        if set(_words(name)) & set(_VALDO_WORDS):
            return "valdo", f"guessed from dataset.json: one foreground label {name!r} (lacunes)"
        return "msseg2", f"guessed from dataset.json: one foreground label {name!r}"
    return "segmentation", f"guessed from dataset.json: {len(fg)} foreground labels {names}"


def resolve_family(lesion_metric: Optional[str], dataset_json: Mapping) -> Tuple[str, str]:
    """(family, why): ``lesion_metric`` if given (checked), else :func:`guess_family`."""
    if lesion_metric is None:
        return guess_family(dataset_json)
    check_family(lesion_metric)
    return lesion_metric, "set by the trainer's lesion_metric"


def check_family(lesion_metric: Optional[str]) -> None:
    if lesion_metric is not None and lesion_metric not in KINDS:
        raise ValueError(f"lesion_metric must be one of {KINDS} or None (guess from dataset.json), "
                         f"got {lesion_metric!r}")


def default_options(family: str, dataset_json: Mapping) -> Dict[str, object]:
    """``nnunetv2_ohem_evaluate FAMILY``'s default options (so the aggregate equals what it writes), with the
    number of classes of dataset.json for ``segmentation`` (a class absent from the fold still counts: the
    CLI equivalent is ``--num_classes K``)."""
    from nnunetv2_ohem.evaluation.cli import _options, build_parser

    check_family(family)
    options = _options(build_parser().parse_args([family, "-ref", "REF", "-pred", "PRED"]))
    labels = dataset_json.get("labels") or {}
    if family == "segmentation" and all(isinstance(v, int) for k, v in labels.items() if k != "ignore"):
        options["num_classes"] = len([k for k in labels if k != "ignore"])
    return options


def validation_cases(pred_dir: str, file_ending: str) -> List[str]:
    """Case names of the predictions nnU-Net exported into ``pred_dir``."""
    if not os.path.isdir(pred_dir):
        raise EvaluationError(f"{pred_dir}: no validation folder")
    cases = sorted(f[: -len(file_ending)] for f in os.listdir(pred_dir)
                   if f.endswith(file_ending) and len(f) > len(file_ending))
    if not cases:
        raise EvaluationError(f"{pred_dir}: no validation predictions ({file_ending})")
    return cases


def link_references(gt_dir: str, cases: Sequence[str], file_ending: str, dest: str) -> None:
    """Fill ``dest`` with links to (or copies of) ``gt_dir``'s files of exactly ``cases``."""
    for c in cases:
        src = os.path.join(gt_dir, c + file_ending)
        if not os.path.isfile(src):
            raise EvaluationError(f"{src}: reference of validation case {c} is missing")
        try:
            os.symlink(os.path.abspath(src), os.path.join(dest, c + file_ending))
        except OSError:
            shutil.copy2(src, os.path.join(dest, c + file_ending))


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def absent_reasons(family: str, metrics: Mapping[str, object], cases: pd.DataFrame) -> Dict[str, str]:
    """Why each undefined (NaN) entry of ``metrics`` is undefined for this fold."""
    n_free = metrics.get("n_lesion_free")
    n_les = metrics.get("n_cases_with_lesions")
    n_pred = int(pd.to_numeric(cases["n_pred_lesions"]).sum()) if "n_pred_lesions" in cases else None
    out: Dict[str, str] = {}
    for key, value in metrics.items():
        if not _nan(value):
            continue
        if key.endswith("_lesion_free") and n_free == 0:
            out[key] = "no lesion-free validation case"
        elif n_les == 0 and key != "dice_all_cases":
            out[key] = (f"no validation case has a reference lesion (all {metrics['n_cases']} are lesion-free): "
                        "nothing to detect; see the *_lesion_free entries for the false positives")
        elif key in ("lesion_ppv", "precision") and n_pred == 0:
            out[key] = "no predicted lesion in any validation case"
        else:
            out[key] = "undefined in every validation case (see 'cases')"
    return out


def _fp_volume_lesion_free(family: str, cases: pd.DataFrame) -> Dict[str, float]:
    # VALDO reports no FP volume; on a lesion-free case every predicted voxel is a false positive
    if family != "valdo":
        return {}
    free = cases.loc[pd.to_numeric(cases["n_ref_lesions"]) == 0, "pred_volume_mm3"]
    return {"fp_volume_mm3_lesion_free": float(free.mean()) if len(free) else math.nan}


def lesionwise_validation(family: str, gt_dir: str, pred_dir: str, file_ending: str,
                          options: Optional[Mapping[str, object]] = None) -> Dict[str, object]:
    """Lesion-wise metrics of the predictions in ``pred_dir`` against ``gt_dir``'s files of the same cases
    (``options``: those of :func:`evaluate_folders`; default: the CLI's defaults).

    Returns a JSON-safe dict: ``family``, ``reference``, ``predictions``, ``n_cases``, ``metrics`` (run level),
    ``absent`` (reasons for the ``null`` metrics), ``aggregate`` and ``cases`` (as ``nnunetv2_ohem_evaluate
    -o`` writes them). Raises :class:`EvaluationError` on anything it cannot score (missing reference,
    geometry mismatch, labels outside the family's convention, ...).
    """
    check_family(family)
    options = default_options(family, {}) if options is None else options
    cases = validation_cases(pred_dir, file_ending)
    with tempfile.TemporaryDirectory(prefix="lesionwise_ref_") as ref:
        link_references(gt_dir, cases, file_ending, ref)
        try:
            df, agg = evaluate_folders(family, ref, pred_dir, **dict(options))
        except EvaluationError as e:   # name the reference files by where they are, not by their links
            raise EvaluationError(str(e).replace(ref, os.path.abspath(gt_dir))) from None
    metrics = {**run_metrics(family, df, agg), **_fp_volume_lesion_free(family, df)}
    return {
        "family": family,
        "reference": os.path.abspath(gt_dir),
        "predictions": os.path.abspath(pred_dir),
        "n_cases": len(cases),
        "metrics": json_safe(metrics),
        "absent": absent_reasons(family, metrics, df),
        "aggregate": agg,
        "cases": json_safe(df.to_dict(orient="records")),
    }
