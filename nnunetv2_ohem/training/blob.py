"""Blob loss trainers (Kofler et al. 2022, arXiv 2205.08209; VALDO 2021 task 3 configuration).

``nnUNetTrainerBlobLoss``: ``alpha * (nnU-Net DC+CE) + beta * blob(DC+CE)``; instance maps are computed with cc3d
in the CPU data pipeline (``InstanceMapTransform``) and travel as extra target channels, so nnU-Net's
``train_step`` and ``DeepSupervisionWrapper`` are reused unchanged.

``nnUNetTrainerBlobLoss_VALDO``: the paper's configuration where it fits nnU-Net: alpha 0.66, beta 0.33, Dice + BCE,
Mish activations, dropout 0.1, Ranger21 (lr 1e-3) and 95 % foreground-centred patches. Use
``nnUNetv2_predict ... -step_size 0.3`` for the paper's sliding-window overlap of 0.7.

Options for the stock CLI (read when the trainer is created, written to the training log):
``nnUNet_ohem_blob_alpha``, ``nnUNet_ohem_blob_beta`` (loss weights) and ``nnUNet_ohem_blob_connectivity`` (4/8 in 2D,
6/18/26 in 3D; default 8 / 26).
"""
from typing import Optional

import torch
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunetv2_ohem import envvars
from nnunetv2_ohem.losses.blob import BlobLoss, split_packed_target
from nnunetv2_ohem.training.common import debug_variant, trainer_settings
from nnunetv2_ohem.training.lesion_validation import LesionValidationMixin
from nnunetv2_ohem.transforms.instances import InstanceMapTransform


def check_finite_batch(batch: dict) -> None:
    """Raise naming the case(s) when images or float labels of a batch hold NaN/Inf (the paper's input check)."""
    keys = list(batch.get("keys", []))
    for name, value in (("image", batch["data"]), ("label", batch["target"])):
        tensors = value if isinstance(value, (list, tuple)) else [value]
        for t in tensors:
            if not t.dtype.is_floating_point:
                continue
            bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
            if bad.any():
                cases = [keys[i] if i < len(keys) else f"#{i}" for i in torch.nonzero(bad).flatten().tolist()]
                raise ValueError(f"NaN or Inf values in the {name} of training case(s) {cases}: fix the source "
                                 f"data or its preprocessing")


class nnUNetTrainerBlobLoss(LesionValidationMixin, nnUNetTrainer):
    """nnU-Net with blob loss: ``alpha * DC+CE + beta * mean over blobs of DC+CE`` (other blobs masked)."""

    blob_alpha: float = 2.0  # the blob loss paper's lambda_main / lambda_blob = 2 / 1
    blob_beta: float = 1.0
    blob_connectivity: Optional[int] = None  # None: 26 in 3D, 8 in 2D
    blob_weight_dice: float = 1.0
    blob_weight_bce: float = 1.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.blob_alpha = envvars.get_float(envvars.BLOB_ALPHA, self.blob_alpha)
        self.blob_beta = envvars.get_float(envvars.BLOB_BETA, self.blob_beta)
        self.blob_connectivity = envvars.get_int(envvars.BLOB_CONNECTIVITY, self.blob_connectivity)
        if self.label_manager.ignore_label is not None:
            raise NotImplementedError(f"{type(self).__name__}: datasets with an ignore label are not supported "
                                      f"(blobs of partially annotated images are ill-defined)")

    @property
    def num_instance_channels(self) -> int:
        lm = self.label_manager
        return len(lm.foreground_regions) if lm.has_regions else len(lm.foreground_labels)

    def _build_loss(self):
        # nnU-Net's own loss (with its deep-supervision wrapper) is the global term: build it, then put the
        # per-resolution loss inside a BlobLoss, keeping nnU-Net's weights and wrapper
        loss = super()._build_loss()
        inner = loss.loss if self.enable_deep_supervision else loss
        blob = BlobLoss(inner, self.num_instance_channels,
                        activation="sigmoid" if self.label_manager.has_regions else "softmax",
                        alpha=self.blob_alpha, beta=self.blob_beta, weight_dice=self.blob_weight_dice,
                        weight_bce=self.blob_weight_bce)
        self.print_to_log_file(f"blob loss: alpha={self.blob_alpha}, beta={self.blob_beta}, "
                               f"connectivity={self.blob_connectivity or 'full (26 in 3D, 8 in 2D)'}, "
                               f"{self.num_instance_channels} instance channel(s)")
        if self.enable_deep_supervision:
            loss.loss = blob
            return loss
        return blob

    def _with_instances(self, composed: ComposeTransforms) -> ComposeTransforms:
        lm = self.label_manager
        transform = InstanceMapTransform(num_regions=len(lm.foreground_regions)) if lm.has_regions else \
            InstanceMapTransform(labels=lm.foreground_labels)
        transform.connectivity = self.blob_connectivity
        ts = composed.transforms
        pos = next((i for i, t in enumerate(ts) if isinstance(t, DownsampleSegForDSTransform)), len(ts))
        ts.insert(pos, transform)
        return composed

    # nnU-Net declares these static but calls them through self, so instance methods can see our settings
    def get_training_transforms(self, *args, **kwargs):
        return self._with_instances(nnUNetTrainer.get_training_transforms(*args, **kwargs))

    def get_validation_transforms(self, *args, **kwargs):
        return self._with_instances(nnUNetTrainer.get_validation_transforms(*args, **kwargs))

    def train_step(self, batch: dict) -> dict:
        check_finite_batch(batch)
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        # nnU-Net's online Dice reads every target channel as labels: hand it the plain segmentation, and let the
        # loss see the packed target (segmentation + instances) it needs
        check_finite_batch(batch)
        packed = batch["target"]
        n = self.num_instance_channels
        if isinstance(packed, list):
            plain = [split_packed_target(t, n)[0] for t in packed]
            packed_dev = [t.to(self.device, non_blocking=True) for t in packed]
        else:
            plain = split_packed_target(packed, n)[0]
            packed_dev = packed.to(self.device, non_blocking=True)
        real_loss = self.loss
        self.loss = lambda output, _plain_target: real_loss(output, packed_dev)
        try:
            return super().validation_step({**batch, "target": plain})
        finally:
            self.loss = real_loss


class _ConstantLR:
    """nnU-Net calls ``lr_scheduler.step(epoch)``; Ranger21 runs its own warm-up / warm-down schedule inside."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def step(self, current_step: Optional[int] = None) -> None:
        pass


#: one line, naming the extra that provides the optional optimizer
RANGER21_MISSING = ("nnUNetTrainerBlobLoss_VALDO needs the optional package 'ranger21' (the Ranger21 optimizer): "
                    "install the extra nnunetv2-ohem[valdo], e.g. pip install -e '.[valdo]' in the repository, "
                    "or pip install ranger21")


@trainer_settings(initial_lr=1e-3, oversample_foreground_percent=0.95)
class nnUNetTrainerBlobLoss_VALDO(nnUNetTrainerBlobLoss):
    """The VALDO 2021 lacune submission (Kofler et al.): alpha 0.66 / beta 0.33 blob loss over equally weighted
    Dice + BCE, Mish, dropout 0.1, Ranger21 at lr 1e-3, 95 % foreground-centred patches."""

    blob_alpha = 0.66
    blob_beta = 0.33

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        kwargs = dict(configuration_manager.network_arch_init_kwargs)
        # MONAI's BasicUNet (the paper's network) uses element-wise dropout after each convolution
        kwargs.update(nonlin="torch.nn.Mish", nonlin_kwargs={"inplace": True},
                      dropout_op="torch.nn.Dropout", dropout_op_kwargs={"p": 0.1})
        req = tuple(set(configuration_manager.network_arch_init_kwargs_req_import) | {"nonlin", "dropout_op"})
        return get_network_from_plans(configuration_manager.network_arch_class_name, kwargs, req,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)

    def configure_optimizers(self):
        try:
            from ranger21 import Ranger21
        except ImportError as e:
            raise ImportError(RANGER21_MISSING) from e
        optimizer = Ranger21(self.network.parameters(), lr=self.initial_lr, num_epochs=self.num_epochs,
                             num_batches_per_epoch=self.num_iterations_per_epoch, logging_active=False)
        return optimizer, _ConstantLR(optimizer)


nnUNetTrainerBlobLoss_Debug = debug_variant(nnUNetTrainerBlobLoss)
nnUNetTrainerBlobLoss_VALDO_Debug = debug_variant(nnUNetTrainerBlobLoss_VALDO)
