"""DeepLabv3 / DeepLabv2 trainers: nnU-Net's pipeline (preprocessing, augmentation, loss, folds, inference)
with :class:`nnunetv2_ohem.networks.deeplab.DeepLab` instead of the U-Net.

Select with ``nnUNetv2_train DATASET 2d|3d_fullres FOLD -tr nnUNetTrainerDeepLabV3`` (or ``...DeepLabV2``);
stock ``nnUNetv2_predict -tr nnUNetTrainerDeepLabV3`` rebuilds the network through
``build_network_architecture``, called on the class. See ``docs/deeplab.md``.
"""
import pydoc
from typing import Optional

import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_ohem.networks.deeplab import DeepLab
from nnunetv2_ohem.training.common import debug_variant, trainer_settings
from nnunetv2_ohem.training.lesion_validation import LesionValidationMixin
from nnunetv2_ohem.training.schedules import EpochFunctionLRScheduler


def deeplab_kwargs_from_plans(arch_kwargs: dict, arch_kwargs_req_import, aspp_version: str,
                              output_stride: int) -> dict:
    """Translate a configuration's U-Net ``arch_kwargs`` into :class:`DeepLab` keyword arguments.

    Kept from the plans: dimension (``conv_op``), ``features_per_stage``, per-axis ``strides`` (nnU-Net's
    anisotropy decisions), ``kernel_sizes``, norm/nonlin ops and ``conv_bias``. Residual blocks per stage:
    ``n_blocks_per_stage`` of residual-encoder plans, else one basic block (2 convs) per 2 convs of
    ``n_conv_per_stage``, so the encoder costs about what the U-Net encoder costs.
    """
    kw = dict(arch_kwargs)
    for key in arch_kwargs_req_import:
        if kw.get(key) is not None:
            located = pydoc.locate(kw[key])
            if located is None:
                raise ImportError(f"plans name {kw[key]!r} for {key!r}, which cannot be imported")
            kw[key] = located
    if "n_blocks_per_stage" in kw:
        blocks = list(kw["n_blocks_per_stage"])
    else:
        blocks = [max(1, n // 2) for n in kw.get("n_conv_per_stage", [2] * len(kw["features_per_stage"]))]
    return dict(conv_op=kw["conv_op"], features_per_stage=list(kw["features_per_stage"]),
                strides=[list(s) if not isinstance(s, int) else s for s in kw["strides"]],
                kernel_sizes=[list(k) if not isinstance(k, int) else k for k in kw["kernel_sizes"]],
                n_blocks_per_stage=blocks, output_stride=output_stride, aspp_version=aspp_version,
                conv_bias=bool(kw.get("conv_bias", False)), norm_op=kw.get("norm_op"),
                norm_op_kwargs=kw.get("norm_op_kwargs"), nonlin=kw.get("nonlin") or nn.ReLU,
                nonlin_kwargs=kw.get("nonlin_kwargs"))


# a single output: nnU-Net's loss then skips its DeepSupervisionWrapper and the loader its target pyramid
@trainer_settings(enable_deep_supervision=False)
class nnUNetTrainerDeepLabV3(LesionValidationMixin, nnUNetTrainer):
    """DeepLabv3 (ASPP with image-level pooling, output stride 16) on nnU-Net's pipeline, no deep supervision.

    Everything else (SGD lr 1e-2 + poly, Dice+CE, augmentation, sliding-window inference) is nnU-Net's.
    Variants set the two class attributes below.
    """

    aspp_version: str = "v3"
    output_stride: int = 16

    # a classmethod, so that variants differ by class attributes only: nnU-Net calls this hook both on the
    # class (nnUNetv2_predict: ``trainer_class.build_network_architecture(...)``) and through ``self``
    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        # enable_deep_supervision is ignored: the network has one output whatever nnU-Net asks for
        return DeepLab(num_input_channels, num_output_channels,
                       **deeplab_kwargs_from_plans(configuration_manager.network_arch_init_kwargs,
                                                   configuration_manager.network_arch_init_kwargs_req_import,
                                                   cls.aspp_version, cls.output_stride))

    def set_deep_supervision_enabled(self, enabled: bool):
        # nnU-Net's version sets network.decoder.deep_supervision, which a DeepLab has no use for; validation
        # toggles it off and on again, so this must accept both values
        pass


class nnUNetTrainerDeepLabV3_OS8(nnUNetTrainerDeepLabV3):
    """DeepLabv3 at output stride 8 (one more dilated stage, rates doubled to 12/24/36): finer maps, more cost."""

    output_stride = 8


class nnUNetTrainerDeepLabV2(nnUNetTrainerDeepLabV3):
    """DeepLabv2 (summed atrous classifiers, rates 6/12/18/24, output stride 8, no pooling branch)."""

    aspp_version = "v2"
    output_stride = 8


def constant_then_poly_lr(step: int, max_steps: int, initial_lr: float, constant_steps: int,
                          exponent: float = 0.9) -> float:
    """The slides' schedule: ``initial_lr`` for ``constant_steps``, then poly decay over the rest.

    lr(t) = lr0                                             for t < c
    lr(t) = lr0 · (1 − (t − c) / (T − c))^exponent           for c ≤ t < T
    (DeepLab's "poly" policy, Chen et al. 2018 §4; the slides trained 15k iterations at a constant 2.5e-4,
    then restarted the counter for a poly phase with power 0.9.)
    """
    if not 0 <= constant_steps < max_steps:
        raise ValueError(f"need 0 <= constant_steps < max_steps, got {constant_steps} and {max_steps}")
    if step < constant_steps:
        return initial_lr
    return initial_lr * max(0.0, 1 - (step - constant_steps) / (max_steps - constant_steps)) ** exponent


class ConstantThenPolyLRScheduler(EpochFunctionLRScheduler):
    """nnU-Net's per-epoch PolyLRScheduler with a constant first phase (:func:`constant_then_poly_lr`)."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, constant_steps: int, exponent: float = 0.9,
                 current_step: Optional[int] = None):
        self.initial_lr, self.max_steps, self.exponent = initial_lr, max_steps, exponent
        self.constant_steps = constant_steps
        super().__init__(optimizer, current_step=current_step)

    def lr_at(self, step: int) -> float:
        return constant_then_poly_lr(step, self.max_steps, self.initial_lr, self.constant_steps, self.exponent)


@trainer_settings(initial_lr=2.5e-4, weight_decay=5e-4)
class nnUNetTrainerDeepLabV3_SlidesSchedule(nnUNetTrainerDeepLabV3):
    """DeepLabv3 with the slides' optimisation: SGD (momentum 0.9, weight decay 5e-4, DeepLab's Caffe
    defaults) at a constant lr 2.5e-4 for the first 60 % of epochs (15k of 25k iterations on the slides), then
    poly decay with power 0.9."""

    constant_fraction = 0.6

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.9)
        constant = min(self.num_epochs - 1, int(round(self.constant_fraction * self.num_epochs)))
        return optimizer, ConstantThenPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, constant)


nnUNetTrainerDeepLabV3_Debug = debug_variant(nnUNetTrainerDeepLabV3)
nnUNetTrainerDeepLabV3_OS8_Debug = debug_variant(nnUNetTrainerDeepLabV3_OS8)
nnUNetTrainerDeepLabV2_Debug = debug_variant(nnUNetTrainerDeepLabV2)
nnUNetTrainerDeepLabV3_SlidesSchedule_Debug = debug_variant(nnUNetTrainerDeepLabV3_SlidesSchedule)
