"""OHEM-EMA mining with blob-loss training (issue 5's "welcome" combination of issues 4 and 5).

``nnUNetTrainerOHEMEMA_BlobLoss`` = ``nnUNetTrainerOHEMEMA`` (B̄ = k·B candidates, EMA miner, top-B) on top of
``nnUNetTrainerBlobLoss`` (instance maps from cc3d in the CPU pipeline, ``alpha * DC+CE + beta * blob(DC+CE)``).

The miner ranks candidates by the loss the online net is trained with, evaluated per patch
(:func:`blob_ranking_error`): ``alpha * e_global + beta * e_blob``. The blob term averages over lesions, so a
candidate whose only lesion is a small one the miner misses gets the same blob error as one missing a large lesion:
missed small lesions become hard examples, which a plain DC+CE ranking (dominated by the large lesions' voxels)
does not do. That is the point of combining the two.

Instance maps travel as the trailing channels of every deep-supervision target (see
``nnunetv2_ohem.transforms.instances``); the OHEM trainer indexes whole target tensors, so a selected candidate
keeps its segmentation and its instance maps together at every scale. See ``docs/ohem_blob.md``.
"""
from typing import List, Optional, Sequence, Union

import torch

from nnunetv2_ohem.losses.blob import per_sample_blob_error, split_packed_target
from nnunetv2_ohem.mining import per_sample_error
from nnunetv2_ohem.training.blob import check_finite_batch, nnUNetTrainerBlobLoss
from nnunetv2_ohem.training.common import with_training_length
from nnunetv2_ohem.training.ohem import nnUNetTrainerOHEMEMA

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


def blob_ranking_error(outputs: TensorOrList, packed_targets: TensorOrList, num_instance_channels: int,
                       alpha: float, beta: float, kind: str = "dc_ce", regions: bool = False,
                       ds_weights: Optional[Sequence[float]] = None, weight_dice: float = 1.0,
                       weight_bce: float = 1.0) -> torch.Tensor:
    """Per-patch error of the blob-loss objective, shape (N,) fp32, for ranking OHEM candidates.

    ``e_i = sum_j w_j * (alpha * e_global(out_j, seg_j)_i + beta * e_blob(out_j, inst_j)_i)`` with nnU-Net's
    deep-supervision weights ``w_j`` (scales with ``w_j = 0`` skipped, as nnU-Net does; all 1 without weights),
    ``e_global`` the per-patch error of kind ``kind`` (``nnunetv2_ohem.mining.per_sample_error``; ``dc_ce`` is
    nnU-Net's DC+CE with ``1 - Dice``) and ``e_blob`` :func:`~nnunetv2_ohem.losses.blob.per_sample_blob_error`
    (Kofler et al. 2022, per image, ``1 - Dice``). ``packed_targets`` are targets whose last
    ``num_instance_channels`` channels are instance maps. On one patch this is the blob trainer's loss plus the
    constant ``sum_j w_j * (alpha * w_dc + beta * w_dice * [patch has a blob at scale j])``.
    """
    if isinstance(outputs, torch.Tensor) != isinstance(packed_targets, torch.Tensor):
        raise ValueError("outputs and targets must both be tensors or both be lists (deep supervision)")
    if isinstance(outputs, torch.Tensor):
        outputs, packed_targets = [outputs], [packed_targets]
    if len(outputs) != len(packed_targets):
        raise ValueError(f"{len(outputs)} outputs but {len(packed_targets)} targets")
    weights = [1.0] * len(outputs) if ds_weights is None else list(ds_weights)
    if len(weights) < len(outputs):
        raise ValueError(f"{len(weights)} deep-supervision weights for {len(outputs)} outputs")
    activation = "sigmoid" if regions else "softmax"
    total = None
    for w, out, tgt in zip(weights, outputs, packed_targets):
        if w == 0:
            continue
        seg, inst = split_packed_target(tgt, num_instance_channels)
        e = torch.zeros(out.shape[0], dtype=torch.float32, device=out.device)
        if alpha != 0:
            e = e + alpha * per_sample_error(out, seg, kind, regions=regions)
        if beta != 0:
            e = e + beta * per_sample_blob_error(out, inst, activation, weight_dice, weight_bce)
        total = w * e if total is None else total + w * e
    if total is None:
        raise ValueError("all deep-supervision weights are zero")
    return total


class nnUNetTrainerOHEMEMA_BlobLoss(nnUNetTrainerOHEMEMA, nnUNetTrainerBlobLoss):
    """OHEM-EMA candidates ranked by, and the top B trained with, the blob loss.

    MRO: OHEM's ``train_step`` / ``validation_step`` / ``get_dataloaders`` wrap the blob trainer's (instance
    transforms, NaN check, packed-target validation), which wrap nnU-Net's. Knobs of both parents apply
    (``candidate_factor``, ``ema_momentum``, ``ranking_error`` = kind of the *global* ranking term;
    ``nnUNet_blob_alpha`` / ``nnUNet_blob_beta`` / ``nnUNet_blob_connectivity``); ``mining_alpha`` /
    ``mining_beta`` (None = the training alpha/beta) weigh the ranking terms.
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

    def compute_candidate_errors(self, data: torch.Tensor, target: Union[torch.Tensor, List[torch.Tensor]]
                                 ) -> torch.Tensor:
        """Per-candidate blob ranking error under the miner, (B̄,) fp32, scored in chunks like the parent."""
        chunk = self.miner_chunk_size or 2 * self.batch_size
        weights = self._ds_weights()
        alpha, beta = self.ranking_weights
        self.miner.train(self.miner_train_mode)
        errors = []
        with torch.inference_mode():
            for start in range(0, data.shape[0], chunk):
                sl = slice(start, start + chunk)
                with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
                    out = self._miner_forward(data[sl])
                if isinstance(out, (list, tuple)) and isinstance(target, list):
                    outs, tgts, w = list(out), [t[sl] for t in target], weights
                else:  # miner without deep supervision: full resolution only
                    outs = out[0] if isinstance(out, (list, tuple)) else out
                    tgts = target[0][sl] if isinstance(target, list) else target[sl]
                    w = None
                errors.append(blob_ranking_error(
                    outs, tgts, self.num_instance_channels, alpha, beta, self.ranking_error,
                    regions=self.label_manager.has_regions, ds_weights=w,
                    weight_dice=self.blob_weight_dice, weight_bce=self.blob_weight_bce))
        return torch.cat(errors).clone()

    def train_step(self, batch: dict) -> dict:
        # check all B̄ candidates, not only the selected B: a NaN candidate would otherwise rank last, unnoticed
        check_finite_batch(batch)
        return super().train_step(batch)


nnUNetTrainerOHEMEMA_BlobLoss_Debug = with_training_length(nnUNetTrainerOHEMEMA_BlobLoss,
                                                           "nnUNetTrainerOHEMEMA_BlobLoss_Debug", 2, 5, 2)
