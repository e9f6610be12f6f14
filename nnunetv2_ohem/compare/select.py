"""Lesion-wise model selection from a compare folder (``nnunetv2_ohem_compare select -o OUT``).

nnU-Net's ``nnUNetv2_find_best_configuration`` ranks by voxel Dice (and fails on a validation fold that holds
only lesion-free cases). Here trainers are ranked by a lesion metric:

* ``lesion_f1_pooled`` (default for msseg2/valdo): the detection F1 of the lesion counts summed over all runs
  of a trainer (its folds × seeds): lesion-free cases and lesion-free folds add their false-positive lesions
  to the precision's denominator; they never make the score NaN;
* any other column of ``results.csv`` (``--by``): the mean over the runs that have a value (lower is better
  for FP counts/volumes, distances and volume errors), the number of runs without a value is shown.

Ties keep the order of ``-tr``. The winner's ``nnUNetv2_predict`` command uses the best of its seeds with all
its folds (nnU-Net's fold ensemble). The keep-largest-component postprocessing nnU-Net would consider is
re-scored on the winner's evaluated predictions: whether nnU-Net's rule (mean foreground Dice improves)
would choose it, and what it does to the lesion metric.
"""
from __future__ import annotations

import json
import math
import os
import shlex
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from nnunetv2_ohem.atomic import write_text_atomic
from nnunetv2_ohem.cli_common import UsageError, UserError
from nnunetv2_ohem.evaluation.run_metrics import (COUNT_COLUMNS, LOWER_IS_BETTER, default_selection_metric,
                                           pooled_lesion_f1, run_metrics)

POOLED = "lesion_f1_pooled"


def load_compare(out: str) -> Tuple[pd.DataFrame, Dict]:
    res, info = os.path.join(out, "results.csv"), os.path.join(out, "compare.json")
    if not os.path.isfile(res) or not os.path.isfile(info):
        raise UserError(f"{out}: not a finished compare folder (results.csv / compare.json missing); run "
                        f"nnunetv2_ohem_compare -o {out} first")
    with open(info) as f:
        return pd.read_csv(res), json.load(f)


def score_runs(runs: pd.DataFrame, family: str, by: str) -> float:
    """Selection score of a set of runs (see module docstring)."""
    if by == POOLED:
        return pooled_lesion_f1(runs, family)
    x = pd.to_numeric(runs[by], errors="coerce").to_numpy(float)
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else math.nan


def rank_trainers(results: pd.DataFrame, family: str, by: str, budget: str,
                  trainers: Optional[List[str]] = None) -> pd.DataFrame:
    """One row per trainer of ``budget``, best first: ``score``, ``n_runs``, ``runs_without_value``,
    ``runs_without_reference_lesions`` and, for lesion families, the pooled counts."""
    if by == POOLED and family not in COUNT_COLUMNS:
        raise UsageError(f"--by {POOLED} needs lesion counts (metric msseg2 or valdo), this compare used {family}")
    if by != POOLED and by not in results.columns:
        numeric = [c for c in results.select_dtypes("number").columns if c not in ("fold", "seed")]
        raise UsageError(f"--by {by}: no such column in results.csv (choose from {', '.join(numeric)})")
    g = results[results["budget"] == budget]
    if g.empty:
        raise UsageError(f"--budget {budget}: no runs (budgets: {', '.join(dict.fromkeys(results['budget']))})")
    order = trainers or list(dict.fromkeys(g["trainer"]))
    rows = []
    for i, tr in enumerate(t for t in order if t in set(g["trainer"])):
        runs = g[g["trainer"] == tr]
        row = {"trainer": tr, "score": score_runs(runs, family, by), "n_runs": int(len(runs)),
               "runs_without_value": int(pd.to_numeric(runs[by], errors="coerce").isna().sum()) if by != POOLED else 0,
               "_order": i}
        if family in COUNT_COLUMNS:
            row["runs_without_reference_lesions"] = int((runs["n_ref_lesions"] == 0).sum())
            for c in ("n_ref_lesions", "fp_lesions", "fn_lesions"):
                row[c] = int(runs[c].sum())
        rows.append(row)
    ranked = pd.DataFrame(rows)
    lower = by in LOWER_IS_BETTER
    key = ranked["score"].where(np.isfinite(ranked["score"]), np.inf if lower else -np.inf)
    ranked = ranked.assign(_key=key if lower else -key).sort_values(["_key", "_order"], kind="stable")
    return ranked.drop(columns=["_key", "_order"]).reset_index(drop=True)


def best_seed(results: pd.DataFrame, family: str, by: str, budget: str, trainer: str) -> int:
    g = results[(results["budget"] == budget) & (results["trainer"] == trainer)]
    scores = [(s, score_runs(gs, family, by)) for s, gs in g.groupby("seed", sort=True)]
    lower = by in LOWER_IS_BETTER
    finite = [(s, v) for s, v in scores if math.isfinite(v)]
    if not finite:
        return int(scores[0][0])
    return int((min if lower else max)(finite, key=lambda sv: sv[1])[0])


def predict_command(out: str, info: Dict, runs: pd.DataFrame) -> str:
    """``nnUNetv2_predict`` of the model trained in ``runs`` (one trainer and seed, its folds)."""
    from nnunetv2_ohem.compare.trainers import EXT_FOLDER, wrapped_name
    cfg = info["config"]
    results_root = os.path.join(os.path.abspath(out), os.path.dirname(runs["run_dir"].iloc[0]), "nnUNet_results")
    folds = " ".join(str(f) for f in sorted(runs["fold"].unique()))
    return (f"nnUNet_results={shlex.quote(results_root)} "
            f"nnUNet_extTrainer={shlex.quote(EXT_FOLDER)}${{nnUNet_extTrainer:+:$nnUNet_extTrainer}} "
            f"nnUNetv2_predict -i INPUT_FOLDER -o OUTPUT_FOLDER -d {cfg['dataset_id']} -c {cfg['configuration']} "
            f"-p {cfg['plans']} -tr {wrapped_name(runs['trainer'].iloc[0])} -f {folds} -chk checkpoint_final.pth")


# ------------------------------------------------------------------------------------- postprocessing check

def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """nnU-Net's "remove all but the largest component" on the foreground (full connectivity, as skimage's
    default used by acvl_utils)."""
    from scipy import ndimage
    lab, n = ndimage.label(mask > 0, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(lab.ravel())[1:]
    return np.where(lab == 1 + int(np.argmax(sizes)), mask, 0).astype(mask.dtype)


def nnunet_dice(ref: np.ndarray, pred: np.ndarray) -> float:
    """nnU-Net's foreground Dice: NaN when reference and prediction are both empty (ignored in its means)."""
    r, p = ref > 0, pred > 0
    tp, fp, fn = int((r & p).sum()), int((~r & p).sum()), int((r & ~p).sum())
    return math.nan if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def postprocessing_check(out: str, info: Dict, runs: pd.DataFrame, by: str) -> List[str]:
    """Re-score the runs' evaluated predictions after keep-largest-component; lines of text."""
    import SimpleITK as sitk

    from nnunetv2_ohem.evaluation.api import evaluate_folders
    from nnunetv2_ohem.evaluation.io import match_cases
    cfg = info["config"]
    family = cfg["metric"]
    if family not in COUNT_COLUMNS:
        return [f"(postprocessing check: only for binary lesion metrics, not {family})"]
    dice_before, dice_after, frames_before, frames_after = [], [], [], []
    for _, r in runs.iterrows():
        run_dir = os.path.join(os.path.abspath(out), r["run_dir"])
        pred_dir = os.path.join(os.path.abspath(out), r["predictions"]) if "predictions" in r else None
        ref_dir = (os.path.join(run_dir, "validation_reference") if r["evaluated_on"] == "validation"
                   else cfg["test_labels"])
        if pred_dir is None or not os.path.isdir(pred_dir) or not os.path.isdir(ref_dir):
            return [f"(postprocessing check skipped: predictions of {r['run_dir']} are gone)"]
        pp_dir = os.path.join(os.path.abspath(out), "select", "postprocessed", r["run_dir"])
        os.makedirs(pp_dir, exist_ok=True)
        before, _ = evaluate_folders(family, ref_dir, pred_dir)
        for _, ref_path, pred_path in match_cases(ref_dir, pred_dir):
            pred_img = sitk.ReadImage(pred_path)
            ref, pred = sitk.GetArrayFromImage(sitk.ReadImage(ref_path)), sitk.GetArrayFromImage(pred_img)
            pp = keep_largest_component(pred)
            dice_before.append(nnunet_dice(ref, pred))
            dice_after.append(nnunet_dice(ref, pp))
            out_img = sitk.GetImageFromArray(pp)
            out_img.CopyInformation(pred_img)
            sitk.WriteImage(out_img, os.path.join(pp_dir, os.path.basename(pred_path)))
        after, _ = evaluate_folders(family, ref_dir, pp_dir)
        frames_before.append(before)
        frames_after.append(after)
    b, a = float(np.nanmean(dice_before)), float(np.nanmean(dice_after))
    chosen = a > b
    cb = pd.concat(frames_before, ignore_index=True)
    ca = pd.concat(frames_after, ignore_index=True)
    mb = run_metrics(family, cb, {}) if family != "segmentation" else {}
    ma = run_metrics(family, ca, {}) if family != "segmentation" else {}
    metric = by if by in mb else POOLED
    where = "validation folds" if runs["evaluated_on"].iloc[0] == "validation" else "held-out test images"
    lines = [f"nnU-Net's postprocessing (keep the largest connected component), re-scored on the winner's {where}:",
             f"  mean foreground Dice {b:.4f} -> {a:.4f}: nnU-Net's rule (apply if it improves) would "
             f"{'CHOOSE' if chosen else 'not choose'} it;",
             f"  {metric} {mb[metric]:.4f} -> {ma[metric]:.4f}; predicted lesions {int(mb['n_pred_lesions'])} -> "
             f"{int(ma['n_pred_lesions'])}, missed reference lesions {int(mb['fn_lesions'])} -> "
             f"{int(ma['fn_lesions'])}.",
             "WARNING: that postprocessing keeps one lesion per case and deletes all the others; in multi-lesion "
             "data do not apply nnUNetv2_apply_postprocessing (or the postprocessing.pkl of "
             "nnUNetv2_find_best_configuration) to these predictions."]
    if chosen:
        lines.append("  (here it would be chosen: nnUNetv2_find_best_configuration would recommend it)")
    return lines


def run_select(out: str, by: Optional[str] = None, budget: Optional[str] = None,
               check_postprocessing: bool = True) -> str:
    """Rank, name the winner and its predict command; writes ``OUT/selection.md`` and returns its text."""
    results, info = load_compare(out)
    cfg = info["config"]
    family = cfg["metric"]
    by = by or default_selection_metric(family)
    budgets = list(dict.fromkeys(results["budget"]))
    budget = budget or ("time" if "time" in budgets else budgets[0])
    ranked = rank_trainers(results, family, by, budget, list(cfg["trainers"]))
    lower = by in LOWER_IS_BETTER
    lines = [f"# Model selection: {cfg['dataset_name']} ({cfg['configuration']}), budget {budget}, by {by} "
             f"({'lower' if lower else 'higher'} is better"
             + (", lesion counts pooled over folds and seeds" if by == POOLED else ", mean over runs") + ")", ""]
    cols = [c for c in ("trainer", "score", "n_runs", "runs_without_value", "runs_without_reference_lesions",
                        "n_ref_lesions", "fp_lesions", "fn_lesions") if c in ranked.columns]
    lines += ["| rank | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for i, r in ranked.iterrows():
        cells = [f"{r[c]:.4f}" if c == "score" and math.isfinite(r[c]) else
                 ("n/a" if c == "score" else str(r[c])) for c in cols]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines.append("")
    free = int(ranked.get("runs_without_reference_lesions", pd.Series([0])).sum())
    if free:
        lines += [f"{free} run(s) validated only lesion-free cases: their false-positive lesions count in the "
                  f"pooled precision; they have no lesion F1 of their own." if by == POOLED else
                  f"{free} run(s) validated only lesion-free cases: they have no value of {by} and are left out "
                  f"of that trainer's mean (see runs_without_value).", ""]
    top = ranked.iloc[0]
    if not math.isfinite(top["score"]):
        raise UserError(f"no trainer has a value of {by} in budget {budget}; choose another --by")
    winner = top["trainer"]
    ties = ranked[ranked["score"] == top["score"]]["trainer"].tolist()
    if len(ties) > 1:
        lines += [f"Tie between {', '.join(ties)}: the first in -tr order is taken.", ""]
    seed = best_seed(results, family, by, budget, winner)
    runs = results[(results["budget"] == budget) & (results["trainer"] == winner) & (results["seed"] == seed)]
    lines += [f"Winner: **{winner}** (seed {seed}, folds {sorted(runs['fold'].tolist())}). Predict with:", "",
              "```", predict_command(out, info, runs), "```", ""]
    if check_postprocessing:
        lines += postprocessing_check(out, info, runs, by) + [""]
    else:
        lines += ["WARNING: nnU-Net's postprocessing (keep the largest connected component) deletes all but one "
                  "lesion per case; do not apply it to multi-lesion data.", ""]
    text = "\n".join(lines)
    write_text_atomic(os.path.join(out, "selection.md"), text)
    return text


__all__ = ["rank_trainers", "run_select", "score_runs", "keep_largest_component", "nnunet_dice", "predict_command"]
