"""BraTS evaluation: Dice and HD95 (mm) per region WT / TC / ET, with the BraTS empty-mask conventions.

Label conventions (the region definitions are the challenges'; be explicit, ``auto`` can only tell ``2021``
apart from the two {1,2,3} conventions, and picks ``nnunet`` for those):

========  ==========================================  ===========  ========  ====
name      labels                                      WT           TC        ET
========  ==========================================  ===========  ========  ====
2021      BraTS 2017-2021 raw: 1 NCR/NET, 2 ED, 4 ET  {1, 2, 4}    {1, 4}    {4}
          (``2020`` is an alias)
2023      BraTS-GLI 2023 raw: 1 NETC, 2 SNFH, 3 ET    {1, 2, 3}    {1, 3}    {3}
nnunet    nnU-Net Dataset137 conversion:              {1, 2, 3}    {2, 3}    {3}
          1 ED, 2 NCR, 3 ET (2→1, 1→2, 4→3)
========  ==========================================  ===========  ========  ====

Empty masks (BraTS 2021 Synapse/CaPTk evaluation as used by the challenge's ranking): reference and
prediction both empty -> Dice 1, HD95 0; exactly one empty -> Dice 0 and HD95 = 373.1287 mm, the diagonal
of the 240×240×155 BraTS volume at 1 mm (sqrt(240² + 240² + 155²)), i.e. the worst possible distance.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_ohem.evaluation.brats_lesionwise import lesion_wise_parameters, lesion_wise_scores
from nnunetv2_ohem.evaluation.distances import dice, hd95
from nnunetv2_ohem.evaluation.lesions import EvaluationError, check_same_shape

HD95_EMPTY_PENALTY_MM = 373.1287
REGIONS = ("WT", "TC", "ET")
CONVENTIONS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    "2021": {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
    "2023": {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
    "nnunet": {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)},
}
ALLOWED_LABELS = {"2021": (0, 1, 2, 4), "2023": (0, 1, 2, 3), "nnunet": (0, 1, 2, 3)}
YEARS = ("auto", "2020", "2021", "2023", "nnunet")
DEFAULTS = dict(year="auto", empty_penalty_mm=HD95_EMPTY_PENALTY_MM, lesion_wise=None)


def normalise_year(year: str) -> str:
    year = str(year).lower()
    if year not in YEARS:
        raise EvaluationError(f"unknown BraTS label convention '{year}', use one of {YEARS}")
    return "2021" if year == "2020" else year


def detect_convention(label_sets: Iterable[Iterable[int]]) -> str:
    """``auto``: '2021' if any label 4 occurs, else 'nnunet'; labels outside both conventions are an error."""
    seen = set()
    for s in label_sets:
        seen.update(int(v) for v in s)
    if 4 in seen:
        if 3 in seen:
            raise EvaluationError(f"labels {sorted(seen)} mix BraTS 2021 (4 = ET) and {{1,2,3}} conventions")
        return "2021"
    return "nnunet"


def region_masks(seg: np.ndarray, convention: str) -> Dict[str, np.ndarray]:
    """Boolean WT/TC/ET masks of a label map in the given convention."""
    conv = CONVENTIONS[normalise_year(convention)]
    return {r: np.isin(seg, conv[r]) for r in REGIONS}


def region_dice_hd95(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float],
                     empty_penalty_mm: float = HD95_EMPTY_PENALTY_MM) -> Tuple[float, float]:
    """(Dice, HD95 mm) of one binary region with the BraTS empty conventions (see module docstring)."""
    r_any, p_any = bool(np.any(ref)), bool(np.any(pred))
    if not r_any and not p_any:
        return 1.0, 0.0
    if not r_any or not p_any:
        return 0.0, float(empty_penalty_mm)
    return dice(ref, pred), hd95(ref, pred, spacing)


def evaluate_brats_arrays(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], year: str = "auto",
                          empty_penalty_mm: float = HD95_EMPTY_PENALTY_MM,
                          lesion_wise: Optional[str] = None) -> Dict[str, object]:
    """One case: ``dice_WT/TC/ET``, ``hd95_WT/TC/ET`` and the label convention used.

    ``lesion_wise`` (a BraTS 2023 sub-challenge: GLI, SSA, PED, MEN, MET) adds the lesion-wise ranking
    metrics per region (``brats_lesionwise``): ``lw_dice_R``, ``lw_hd95_R`` and the lesion counts
    ``lw_tp_R``, ``lw_fn_R``, ``lw_fp_R``.
    """
    check_same_shape(ref, pred)
    params = lesion_wise_parameters(lesion_wise) if lesion_wise else None
    year = normalise_year(year)
    if year == "auto":
        year = detect_convention([np.unique(ref), np.unique(pred)])
    rm, pm = region_masks(ref, year), region_masks(pred, year)
    row: Dict[str, object] = {}
    for r in REGIONS:
        d, h = region_dice_hd95(rm[r], pm[r], spacing, empty_penalty_mm)
        row[f"dice_{r}"] = d
        row[f"hd95_{r}"] = h
    if params is not None:
        for r in REGIONS:
            lw = lesion_wise_scores(rm[r], pm[r], spacing, *params)
            row.update({f"lw_dice_{r}": lw.dice, f"lw_hd95_{r}": lw.hd95, f"lw_tp_{r}": lw.n_tp,
                        f"lw_fn_{r}": lw.n_fn, f"lw_fp_{r}": lw.n_fp})
    row["label_convention"] = year
    return row
