"""OHEM-EMA mining with blob-loss training (issue 5's "welcome" combination of issues 4 and 5).

``nnUNetTrainerOHEMEMA_BlobLoss`` = ``nnUNetTrainerOHEMEMA`` (B̄ = k·B candidates, EMA miner, top-B) on top of
``nnUNetTrainerBlobLoss`` (instance maps from cc3d in the CPU pipeline, ``alpha * DC+CE + beta * blob(DC+CE)``).

The miner ranks candidates by the loss the online net is trained with, evaluated per patch
(:func:`nnunetv2_ohem.mining.errors.blob_ranking_error`, swapped into the parent's one scoring hook):
``alpha * e_global + beta * e_blob``. The blob term averages over lesions, so a
candidate whose only lesion is a small one the miner misses gets the same blob error as one missing a large lesion:
missed small lesions become hard examples, which a plain DC+CE ranking (dominated by the large lesions' voxels)
does not do. That is the point of combining the two.

Instance maps travel as the trailing channels of every deep-supervision target (see
``nnunetv2_ohem.transforms.instances``); the OHEM trainer indexes whole target tensors, so a selected candidate
keeps its segmentation and its instance maps together at every scale. See ``docs/ohem_blob.md``.
"""
from typing import List, Optional, Sequence, Union

import torch

from nnunetv2_ohem.mining.errors import blob_ranking_error
from nnunetv2_ohem.training.blob import check_finite_batch, nnUNetTrainerBlobLoss
from nnunetv2_ohem.training.common import debug_variant
from nnunetv2_ohem.training.ohem import nnUNetTrainerOHEMEMA


class nnUNetTrainerOHEMEMA_BlobLoss(nnUNetTrainerOHEMEMA, nnUNetTrainerBlobLoss):
    """OHEM-EMA candidates ranked by, and the top B trained with, the blob loss.

    MRO: OHEM's ``train_step`` / ``validation_step`` / ``get_dataloaders`` wrap the blob trainer's (instance
    transforms, NaN check, packed-target validation), which wrap nnU-Net's; ``EMAMixin`` sits between the two
    (one miner update after each blob-loss step), ``LesionValidationMixin`` comes once, after the blob
    trainer. Knobs of both parents apply (``candidate_factor``, ``ema_momentum``, ``ranking_error`` = kind of
    the *global* ranking term; ``nnUNet_ohem_blob_alpha`` / ``nnUNet_ohem_blob_beta`` / ``nnUNet_ohem_blob_connectivity``);
    ``mining_alpha`` / ``mining_beta`` (None = the training alpha/beta) weigh the ranking terms.
    """

    mining_alpha: Optional[float] = None
    mining_beta: Optional[float] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions and self.label_manager.ignore_label is not None:
            raise NotImplementedError("regions with an ignore label are not supported by the blob loss")

    @property
    def ranking_weights(self) -> tuple:
        a = self.blob_alpha if self.mining_alpha is None else self.mining_alpha
        b = self.blob_beta if self.mining_beta is None else self.mining_beta
        return float(a), float(b)

    def initialize(self):
        super().initialize()
        a, b = self.ranking_weights
        self.print_to_log_file(f"OHEM-EMA + blob loss: candidates ranked by {a} * {self.ranking_error} + "
                               f"{b} * blob({'DC+BCE' if self.label_manager.has_regions else 'DC+CE'}) per patch")

    def candidate_errors(self, outputs: Union[torch.Tensor, List[torch.Tensor]],
                         targets: Union[torch.Tensor, List[torch.Tensor]],
                         ds_weights: Optional[Sequence[float]]) -> torch.Tensor:
        """Blob ranking error (:func:`nnunetv2_ohem.mining.errors.blob_ranking_error`) of the miner outputs; the
        chunking, precision, resolution and deep-supervision handling are the parent's ``score_candidates``."""
        alpha, beta = self.ranking_weights
        return blob_ranking_error(outputs, targets, self.num_instance_channels, alpha, beta, self.ranking_error,
                                  regions=self.label_manager.has_regions, ds_weights=ds_weights,
                                  weight_dice=self.blob_weight_dice, weight_bce=self.blob_weight_bce)

    def train_step(self, batch: dict) -> dict:
        # check all B̄ candidates, not only the selected B: a NaN candidate would otherwise rank last, unnoticed
        check_finite_batch(batch)
        return super().train_step(batch)


nnUNetTrainerOHEMEMA_BlobLoss_Debug = debug_variant(nnUNetTrainerOHEMEMA_BlobLoss)
