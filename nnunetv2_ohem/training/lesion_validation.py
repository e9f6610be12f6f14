"""Lesion-wise metrics after nnU-Net's final validation: ``LesionValidationMixin``.

After ``perform_actual_validation`` (end of training, ``--val``, ``--val_best``) rank 0 scores the fold's
``validation/`` predictions against ``gt_segmentations`` of the preprocessed dataset, the references nnU-Net's
own ``summary.json`` uses, with :func:`nnunetv2_ohem.evaluation.validation.lesionwise_validation`, and writes
``validation/summary_lesionwise.json`` (atomically). nnU-Net's files are not touched. The metric family is the
class attribute ``lesion_metric`` or, when it is ``None``, guessed from dataset.json; the file states which
and why. A failure of this step (say, a dataset whose labels do not fit the family) is one line in the
training log; the training run and nnU-Net's outputs stay as they are, and no file from an earlier run is
left behind with numbers that no longer belong to the predictions.

Our trainer families include the mixin; for any other trainer::

    class MyTrainer(LesionValidationMixin, nnUNetTrainer):
        lesion_metric = "msseg2"   # or None: guess from dataset.json
"""
import os
from types import MappingProxyType
from typing import Mapping, Optional

import torch

from nnunetv2_ohem.evaluation.io import write_json_atomic
from nnunetv2_ohem.evaluation.validation import LESIONWISE_FILE, check_family, default_options, \
    lesionwise_validation, resolve_family


class LesionValidationMixin:
    """Writes ``validation/summary_lesionwise.json`` after nnU-Net's final validation; put it before the
    nnU-Net trainer among the bases."""

    #: "msseg2", "valdo", "brats", "segmentation", or None: guessed from dataset.json (BraTS-like label names
    #: -> brats, one lacune label -> valdo, one other foreground label -> msseg2, several -> segmentation)
    lesion_metric: Optional[str] = None
    #: options of the family, as ``nnunetv2_ohem.evaluation.api.evaluate_folders`` takes them
    #: (e.g. ``{"min_volume_mm3": 10.0}`` for msseg2, ``{"lesion_wise": "GLI"}`` for brats)
    lesion_metric_options: Mapping[str, object] = MappingProxyType({})
    #: False: skip the lesion-wise evaluation
    lesion_validation: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        check_family(self.lesion_metric)   # a typo fails now, not after days of training
        super().__init__(plans, configuration, fold, dataset_json, device)

    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self.lesion_validation and self.local_rank == 0:
            self.write_lesionwise_validation()

    def write_lesionwise_validation(self) -> Optional[str]:
        """Score ``validation/`` and write :data:`LESIONWISE_FILE` there; returns its path, or None after
        logging why it could not be written."""
        val_dir = os.path.join(self.output_folder, "validation")
        target = os.path.join(val_dir, LESIONWISE_FILE)
        try:
            if os.path.lexists(target):    # an earlier run's numbers must not survive a failure
                os.remove(target)
            family, source = resolve_family(self.lesion_metric, self.dataset_json)
            options = {**default_options(family, self.dataset_json), **dict(self.lesion_metric_options)}
            result = lesionwise_validation(family, os.path.join(self.preprocessed_dataset_folder_base,
                                                                "gt_segmentations"),
                                           val_dir, self.dataset_json["file_ending"], options)
            result = {"family": result.pop("family"), "family_source": source, "trainer": type(self).__name__,
                      "fold": self.fold, **result}
            write_json_atomic(result, target)
        except Exception as e:  # noqa: BLE001 - the training run must survive; KeyboardInterrupt still stops it
            message = " ".join(str(e).split())
            self.print_to_log_file(f"lesion-wise validation failed, {LESIONWISE_FILE} not written "
                                   f"({type(e).__name__}: {message}); nnU-Net's validation outputs are unaffected",
                                   also_print_to_console=True)
            return None
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items()
                          if isinstance(v, float) and k in _SHOWN) or "see the file"
        self.print_to_log_file(f"lesion-wise validation ({family}, {source}): {shown} -> {target}",
                               also_print_to_console=True)
        return target


_SHOWN = ("lesion_f1", "lesion_f1_pooled", "f1", "dice", "fp_lesions_lesion_free", "mean_region_dice",
          "mean_dice_fg")
