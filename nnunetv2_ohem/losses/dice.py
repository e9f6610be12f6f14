"""Soft Dice, once: the formula every Dice term of the package evaluates (Milletari et al., "V-Net", 3DV 2016,
with nnU-Net's smoothing ``s`` and denominator clamp)::

    D = (2·I + s) / max(P + G + s, eps),   I = Σ p·y,  P = Σ p,  G = Σ y

MONAI's ``DiceLoss`` keeps one implementation with a ``reduction`` knob; here the knob is the same idea with
the one reduction the OHEM paper needs made explicit: its ranking error *is* the training loss of one patch,
i.e. the soft Dice with no reduction over the batch (``reduction="per_sample"``).

Callers: ``mining.errors.per_sample_dice_loss`` (OHEM ranking, masks ignored voxels), ``losses.region_dice``
(BTRSeg loss, sigmoid regions, optional ``batch_dice``) and the blob loss (``losses.blob``), which does not
have voxels at hand but per-instance sums and so calls :func:`soft_dice_from_sums` directly, both for the
per-blob Dice and for the DC+CE it fuses into the same pass. nnU-Net's own ``MemoryEfficientSoftDiceLoss``
(the global term of the OHEM and blob trainers) stays nnU-Net's: same formula, but it is nnU-Net's code path
that the trainers must keep. The BTRSeg region Dice never clamped its denominator, so it passes ``eps=None``
rather than changing its result for ``smooth = 0``.
"""
from typing import Optional, Sequence

import torch

REDUCTIONS = ("none", "per_sample", "mean")


def soft_dice_from_sums(intersect: torch.Tensor, sum_pred: torch.Tensor, sum_gt: torch.Tensor,
                        smooth: float = 1e-5, eps: Optional[float] = 1e-8) -> torch.Tensor:
    """``(2·I + s) / max(P + G + s, eps)`` elementwise; ``eps=None`` leaves the denominator unclamped (then
    ``smooth = 0`` on an empty prediction and target gives NaN instead of 0)."""
    denominator = sum_pred + sum_gt + smooth
    if eps is not None:
        denominator = denominator.clamp_min(eps)
    return (2 * intersect + smooth) / denominator


def soft_dice(probs: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
              batch_dice: bool = False, smooth: float = 1e-5, eps: Optional[float] = 1e-8,
              reduction: str = "none") -> torch.Tensor:
    """Soft Dice of probabilities ``probs`` against a one-hot / region ``target``, both ``(N, C, *spatial)``.

    Sums run over the spatial axes (and the batch with ``batch_dice``, nnU-Net's plans flag) of the voxels
    where ``mask`` (broadcastable, 1 = counts) is set. ``reduction``: ``"none"`` gives ``(N, C)`` (``(C,)``
    with ``batch_dice``), ``"per_sample"`` the mean over channels ``(N,)``, ``"mean"`` the mean of all entries.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if batch_dice and reduction == "per_sample":
        raise ValueError("batch_dice sums over the batch, so there is no per-sample Dice")
    axes: Sequence[int] = tuple(range(2, probs.ndim))
    if batch_dice:
        axes = (0,) + tuple(axes)
    if mask is None:
        intersect, sum_pred, sum_gt = (probs * target).sum(axes), probs.sum(axes), target.sum(axes)
    else:
        intersect = (probs * target * mask).sum(axes)
        sum_pred, sum_gt = (probs * mask).sum(axes), (target * mask).sum(axes)
    dice = soft_dice_from_sums(intersect, sum_pred, sum_gt, smooth, eps)
    if reduction == "per_sample":
        return dice.mean(1)
    return dice.mean() if reduction == "mean" else dice
