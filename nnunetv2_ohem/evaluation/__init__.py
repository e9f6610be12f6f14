"""Challenge metrics for lesion segmentation (MSSEG-II, VALDO task 3, BraTS) and the slides' PA/MPA/IoU metrics.

Entry points: :func:`nnunetv2_ohem.evaluation.api.evaluate_folders`, :func:`~nnunetv2_ohem.evaluation.api.evaluate_case`
and the console script ``nnunetv2_ohem_evaluate`` (:mod:`nnunetv2_ohem.evaluation.cli`). See docs/evaluation.md.
"""
