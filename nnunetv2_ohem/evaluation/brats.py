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

Metric definitions (``definition=``; every output names the one used). Dice is the same in all three; they
differ in the HD95 flavour, the empty-mask conventions and the lesion-wise rules:

=============  =====================================  ================================  ==========================
               ``brats2025`` (default)                ``brats2023``                     ``medpy``
=============  =====================================  ================================  ==========================
follows        BraTS-evaluation 0.0.10 (panoptica),   BraTS 2023 lesion-wise metrics    this package before
               the current official package           script (Saluja et al.)            definitions existed
region HD95    MedPy's ``hd95`` (pooled surface       ``surface_hd95`` (DeepMind        MedPy's ``hd95``
               voxels), mm                            surface-distance), mm
both empty     Dice NaN, HD95 NaN (left out of        Dice 1, HD95 0                    Dice 1, HD95 0
               the means)
one empty      Dice 0, HD95 373                       Dice 0, HD95 374 (inf -> 374)     Dice 0, HD95 373.1287
no overlap     HD95 373 (panoptica's zero-TP rule)    HD95 measured                     HD95 measured
lesion-wise    ``matched_lesion_scores``: one-to-one  ``lesion_wise_scores`` with       ``lesion_wise_scores``
               matching; MET penalised, the others    ``surface_hd95``                  with MedPy's ``hd95``
               averaged over matched lesions only
=============  =====================================  ================================  ==========================

373.1287 mm is the diagonal of the 240×240×155 BraTS volume at 1 mm (sqrt(240² + 240² + 155²)), the BraTS
2021 (CaPTk) penalty; the 2023 script writes 374 and BraTS-evaluation 373 for the same "worst distance".
``empty_penalty_mm`` overrides the region HD95 penalty of the chosen definition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_ohem.evaluation.brats_lesionwise import (LESION_WISE_PENALTY_MM, METS_MIN_VOLUME_MM3,
                                                        PANOPTICA_PENALTY_MM, HD95Function,
                                                        LesionWiseResult, lesion_wise_parameters,
                                                        lesion_wise_scores, matched_lesion_scores)
from nnunetv2_ohem.evaluation.distances import dice, hd95, surface_hd95
from nnunetv2_ohem.evaluation.lesions import EvaluationError, check_same_shape

HD95_EMPTY_PENALTY_MM = 373.1287


@dataclass(frozen=True)
class Definition:
    """One BraTS metric definition (see the module docstring's table)."""
    name: str
    follows: str
    hd95: HD95Function
    both_empty: Tuple[float, float]   # (Dice, HD95) when reference and prediction are both empty
    empty_penalty_mm: float           # HD95 when exactly one of them is empty
    no_overlap_penalty: bool          # HD95 of non-empty masks that do not overlap := the penalty
    lesion_rules: str                 # "brats2023" (dilation, merging, size threshold) or "panoptica"
    lesion_penalty_mm: float

    def lesion_wise(self, ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float],
                    challenge: str) -> LesionWiseResult:
        """Lesion-wise scores of one region for a sub-challenge (GLI, SSA, PED, MEN, MET)."""
        d, min_volume = lesion_wise_parameters(challenge)
        if self.lesion_rules == "panoptica":
            # BraTS-evaluation scores metastases with its ``mets`` parser, every other config with ``seg``
            penalise = challenge.upper().replace("BRATS-", "") == "MET"
            return matched_lesion_scores(ref, pred, spacing, penalise, METS_MIN_VOLUME_MM3,
                                         self.lesion_penalty_mm, self.hd95)
        return lesion_wise_scores(ref, pred, spacing, d, min_volume, self.lesion_penalty_mm, self.hd95)


DEFINITIONS: Dict[str, Definition] = {
    "brats2025": Definition("brats2025", "BraTS-evaluation 0.0.10 (panoptica), lengths in mm", hd95,
                            (math.nan, math.nan), PANOPTICA_PENALTY_MM, True, "panoptica", PANOPTICA_PENALTY_MM),
    "brats2023": Definition("brats2023", "BraTS 2023 lesion-wise metrics script (surface-distance HD95)",
                            surface_hd95, (1.0, 0.0), LESION_WISE_PENALTY_MM, False, "brats2023",
                            LESION_WISE_PENALTY_MM),
    "medpy": Definition("medpy", "MedPy HD95, BraTS 2021 empty penalty, BraTS 2023 lesion-wise rules", hd95,
                        (1.0, 0.0), HD95_EMPTY_PENALTY_MM, False, "brats2023", LESION_WISE_PENALTY_MM),
}
DEFAULT_DEFINITION = "brats2025"


def get_definition(name: str) -> Definition:
    """The definition of this name (``brats2025``, ``brats2023``, ``medpy``); an unknown name is an error."""
    key = str(name).lower()
    if key not in DEFINITIONS:
        raise EvaluationError(f"unknown BraTS metric definition '{name}', use one of {sorted(DEFINITIONS)}")
    return DEFINITIONS[key]


REGIONS = ("WT", "TC", "ET")
CONVENTIONS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    "2021": {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
    "2023": {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
    "nnunet": {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)},
}
ALLOWED_LABELS = {"2021": (0, 1, 2, 4), "2023": (0, 1, 2, 3), "nnunet": (0, 1, 2, 3)}
YEARS = ("auto", "2020", "2021", "2023", "nnunet")
DEFAULTS = dict(year="auto", empty_penalty_mm=None, lesion_wise=None, definition=DEFAULT_DEFINITION)


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
                     empty_penalty_mm: Optional[float] = None,
                     definition: str = DEFAULT_DEFINITION) -> Tuple[float, float]:
    """(Dice, HD95 mm) of one binary region under a definition's empty conventions (module docstring)."""
    de = get_definition(definition)
    penalty = de.empty_penalty_mm if empty_penalty_mm is None else float(empty_penalty_mm)
    r_any, p_any = bool(np.any(ref)), bool(np.any(pred))
    if not r_any and not p_any:
        return de.both_empty
    if not r_any or not p_any:
        return 0.0, penalty
    d = dice(ref, pred)
    if d == 0.0 and de.no_overlap_penalty:
        return 0.0, penalty
    return d, de.hd95(ref, pred, spacing)


def evaluate_brats_arrays(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], year: str = "auto",
                          empty_penalty_mm: Optional[float] = None, lesion_wise: Optional[str] = None,
                          definition: str = DEFAULT_DEFINITION) -> Dict[str, object]:
    """One case: ``dice_WT/TC/ET``, ``hd95_WT/TC/ET``, the label convention and the metric definition used.

    ``lesion_wise`` (a BraTS sub-challenge: GLI, SSA, PED, MEN, MET) adds the lesion-wise ranking metrics per
    region under the definition's rules: ``lw_dice_R``, ``lw_hd95_R`` and the lesion counts ``lw_tp_R``,
    ``lw_fn_R``, ``lw_fp_R``.
    """
    check_same_shape(ref, pred)
    de = get_definition(definition)
    if lesion_wise:
        lesion_wise_parameters(lesion_wise)  # refuse an unknown sub-challenge before any work
    year = normalise_year(year)
    if year == "auto":
        year = detect_convention([np.unique(ref), np.unique(pred)])
    rm, pm = region_masks(ref, year), region_masks(pred, year)
    row: Dict[str, object] = {}
    for r in REGIONS:
        d, h = region_dice_hd95(rm[r], pm[r], spacing, empty_penalty_mm, de.name)
        row[f"dice_{r}"] = d
        row[f"hd95_{r}"] = h
    if lesion_wise:
        for r in REGIONS:
            lw = de.lesion_wise(rm[r], pm[r], spacing, lesion_wise)
            row.update({f"lw_dice_{r}": lw.dice, f"lw_hd95_{r}": lw.hd95, f"lw_tp_{r}": lw.n_tp,
                        f"lw_fn_{r}": lw.n_fn, f"lw_fp_{r}": lw.n_fp})
    row["label_convention"] = year
    row["definition"] = de.name
    return row
