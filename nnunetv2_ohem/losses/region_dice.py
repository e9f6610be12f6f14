"""BTRSeg's region Dice loss: L = 1 − mean over regions of the soft Dice (WT, TC, ET on BraTS).

Carmo, "Automated Glioma Segmentation using mixed-precision 3D UNet": the loss is
1 − (Dice_WT + Dice_TC + Dice_ET) / 3 on sigmoid outputs, one per (overlapping) region, which is what
nnU-Net's region-based training (``regions_class_order``) produces as network outputs and targets.
"""
import numpy as np
import torch
from torch import nn

from nnunetv2_ohem.losses.dice import soft_dice


def soft_region_dice(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool = False,
                     smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice per region: D_r = (2 Σ p_r y_r + s) / (Σ p_r + Σ y_r + s), p = sigmoid(logits).

    ``logits`` and ``target`` are (B, R, *spatial) with a binary (or soft) target per region. Sums run over
    the spatial axes, and over the batch too when ``batch_dice`` (nnU-Net's ``batch_dice`` plans flag).
    Returns (R,) if ``batch_dice`` else (B, R). Computed in float32 whatever the autocast dtype of the logits.
    An empty region predicted empty has D = s/s = 1. :func:`~nnunetv2_ohem.losses.dice.soft_dice` of the
    sigmoid, with its denominator unclamped as this loss has always been (``smooth = 0`` on an empty region
    gives NaN, not 0).
    """
    if logits.ndim < 3:
        raise ValueError(f"logits must be (B, R, *spatial), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape:
        raise ValueError(f"target shape {tuple(target.shape)} must equal logits shape {tuple(logits.shape)} "
                         f"(one binary target channel per region)")
    return soft_dice(torch.sigmoid(logits.float()), target.float(), batch_dice=batch_dice, smooth=smooth, eps=None)


def region_dice_loss(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool = False,
                     smooth: float = 1e-5) -> torch.Tensor:
    """L = 1 − mean_r D_r (mean over batch too when per-sample), see :func:`soft_region_dice`."""
    return 1 - soft_region_dice(logits, target, batch_dice, smooth).mean()


def deep_supervision_weights(num_outputs: int) -> np.ndarray:
    """nnU-Net's deep-supervision weights: w_i = 1/2^i, the lowest resolution gets 0, normalised to sum 1.

    Same rule as ``nnUNetTrainer._build_loss`` (non-DDP), so our loss weighs the decoder outputs like nnU-Net.
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    if num_outputs == 1:
        return np.ones(1)
    w = np.array([1 / (2 ** i) for i in range(num_outputs)])
    w[-1] = 0
    return w / w.sum()


class RegionDiceLoss(nn.Module):
    """``1 − mean region Dice`` as an nnU-Net loss module; wrap in ``DeepSupervisionWrapper`` for DS."""

    def __init__(self, batch_dice: bool = False, smooth: float = 1e-5):
        super().__init__()
        self.batch_dice = batch_dice
        self.smooth = smooth

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return region_dice_loss(net_output, target, self.batch_dice, self.smooth)

