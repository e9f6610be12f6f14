"""Blob loss (Kofler et al., "blob loss: instance imbalance aware loss functions for semantic segmentation",
arXiv 2205.08209), vectorised: all blob terms come from per-instance sums in one pass, O(voxels), independent of
the number of blobs K.

Definition (the paper's, as in its public reference code)::

    L = alpha * L_global + beta * L_blob
    L_blob = mean over (image b, class c) that contain blobs of  (1/K_bc) * sum_k L_k
    L_k    = w_bce * BCE(p * m_k, y_k) + w_dice * (-Dice(p * m_k, y_k))

``p`` is the foreground probability of class ``c`` (softmax channel ``c`` or sigmoid of region ``c``), ``y_k`` the
binary mask of blob ``k`` and ``m_k`` the mask that is 0 on every *other* blob of the same class and 1 elsewhere
(background of that class, voxels of other classes, blob ``k`` itself). Masking is applied to probabilities, not to
raw logits: a masked voxel has probability 0 and label 0, so it adds nothing to the loss and gets no gradient.
With nnU-Net's sign convention the Dice term is ``-Dice`` (``1 - Dice`` differs by a constant, same gradient).

Closed forms (per image, per class; ``B`` = voxels of that image not in any blob of the class, ``N`` = voxels)::

    Dice_k = (2 tp_k + s) / (tp_k + fp + |k| + s),  tp_k = sum_{v in k} p,  fp = sum_{v in B} p
    BCE_k  = (sum_{v in B} -log(1 - p) + sum_{v in k} -log p) / N

so every blob needs only ``sum p``, ``sum -log p`` and its size over its own voxels, plus two background sums per
(image, class): one ``index_add`` over an instance map whose ids are made unique per (image, class).

For two-class softmax outputs the BCE of the foreground probability equals nnU-Net's cross-entropy, so "DC+CE as
the blob term" is exact there; with more classes each class is scored one-vs-rest (its blobs against everything
that is not that class), which is how the paper applies blob loss per label channel.
"""
from typing import Tuple

import torch
from torch import nn

from nnunetv2_ohem.losses.dice import soft_dice_from_sums

__all__ = ["blob_terms", "blob_loss", "per_sample_blob_error", "fused_binary_dc_ce_and_blob", "BlobLoss", "split_packed_target"]


def _check_shapes(logits: torch.Tensor, instances: torch.Tensor, activation: str) -> int:
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    if logits.ndim not in (4, 5):
        raise ValueError(f"logits must be (B, C, X, Y) or (B, C, X, Y, Z), got shape {tuple(logits.shape)}")
    n_fg = logits.shape[1] - 1 if activation == "softmax" else logits.shape[1]
    expected = (logits.shape[0], n_fg, *logits.shape[2:])
    if tuple(instances.shape) != expected:
        raise ValueError(f"instances must have shape {expected} (one instance channel per foreground "
                         f"{'class' if activation == 'softmax' else 'region'}), got {tuple(instances.shape)}")
    if instances.dtype.is_floating_point and not torch.equal(instances, instances.round()):
        raise ValueError("instances must hold integer ids (0 = no blob), got non-integer values")
    return n_fg


def _probs_and_nll(logits: torch.Tensor, activation: str, in_blob: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per voxel of each foreground channel: p, and -log p inside a blob / -log(1 - p) outside, stably, in at
    least fp32 (fp16/bf16 logits are promoted; fp64 stays fp64 so tests can compare exactly)."""
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    if activation == "sigmoid" or x.shape[1] == 2:
        # sigmoid of z (two-class softmax is a sigmoid of the logit difference): -log p = softplus(-z) and
        # -log(1 - p) = softplus(z), so one softplus of (+-z) serves both; fewer full-volume passes than
        # log_softmax + where (this is most of the cost)
        z = x if activation == "sigmoid" else x[:, 1:] - x[:, :1]
        sign = 1.0 - 2.0 * in_blob.to(z.dtype)
        return torch.sigmoid(z), nn.functional.softplus(z * sign)
    logp = torch.log_softmax(x, 1)
    # log(1 - p_c) = logsumexp over the other classes' log p; a loop over classes (not blobs)
    log1m = torch.cat([torch.logsumexp(torch.cat([logp[:, :c], logp[:, c + 1:]], 1), 1, keepdim=True)
                       for c in range(1, x.shape[1])], 1)
    return logp[:, 1:].exp(), -torch.where(in_blob, logp[:, 1:], log1m)


def blob_terms(logits: torch.Tensor, instances: torch.Tensor, activation: str = "softmax",
               smooth: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dice and BCE of every blob, each blob scored with all other blobs of its class masked out.

    Args:
        logits: (B, C, *spatial) raw network output (fp16/bf16 are computed in fp32).
        instances: (B, F, *spatial) integer instance ids, 0 = no blob; F = C - 1 for softmax (channel f is class
            f + 1), F = C for sigmoid/regions. Ids need not be consecutive (deep-supervision downsampling can drop
            blobs); ids with no voxel are ignored.
        activation: "softmax" (nnU-Net labels) or "sigmoid" (nnU-Net regions).
        smooth: Dice smoothing, nnU-Net's 1e-5 by default.

    Returns:
        ``(dice, bce, group)``: one entry per blob present; ``group`` is the flat (image, channel) index
        ``b * F + f`` each blob belongs to. ``Dice_k = (2tp+s)/(tp+fp+|k|+s)``,
        ``BCE_k = (sum_B -log(1-p) + sum_k -log p) / N`` (module docstring).
    """
    _check_shapes(logits, instances, activation)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _terms_from_sums(_segment_sums(logits, instances, activation), smooth)


def _segment_sums(logits: torch.Tensor, instances: torch.Tensor, activation: str) -> dict:
    """Per-instance sums of ``p`` and of the per-voxel BCE term, and voxel counts, in one pass.

    Ids are made unique per (image, channel): segment ``g = b * F + f`` owns ids ``offsets[g] ..
    offsets[g] + max_id[g]``; id ``offsets[g]`` collects that segment's background (no blob) sums.
    Call with autocast disabled: fp16 sums over 10^6 voxels overflow / lose the small blobs.
    """
    device = logits.device
    inst = instances.long()
    b, f = inst.shape[:2]
    n_vox = inst[0, 0].numel()
    flat_inst = inst.reshape(b * f, n_vox)
    seg_len = flat_inst.amax(1) + 1
    offsets = torch.cumsum(seg_len, 0) - seg_len
    total = int(seg_len.sum().item())
    gid = (flat_inst + offsets[:, None]).reshape(-1)
    p, nll = _probs_and_nll(logits, activation, inst > 0)
    # two 1-D index_adds: a (V, 2) index_add is ~10x slower on CPU (measured)
    sum_p = p.new_zeros(total).index_add(0, gid, p.reshape(-1))
    sum_nll = p.new_zeros(total).index_add(0, gid, nll.reshape(-1))
    counts = torch.bincount(gid, minlength=total)
    group_of_id = torch.repeat_interleave(torch.arange(b * f, device=device), seg_len)
    return dict(sum_p=sum_p, sum_nll=sum_nll, counts=counts, offsets=offsets, group_of_id=group_of_id,
                n_groups=b * f, n_vox=n_vox)


def _terms_from_sums(sums: dict, smooth: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-blob Dice and BCE from the segment sums; blob ``k``'s prediction is ``tp_k + fp`` (its own voxels
    and the background of its image and class), its ground truth its size."""
    sum_p, sum_nll, counts, offsets = sums["sum_p"], sums["sum_nll"], sums["counts"], sums["offsets"]
    is_bg = torch.zeros(sum_p.shape[0], dtype=torch.bool, device=sum_p.device)
    is_bg[offsets] = True
    keep = (~is_bg) & (counts > 0)
    group = sums["group_of_id"][keep]
    tp = sum_p[keep]
    size = counts[keep].to(tp.dtype)
    fp = sum_p[offsets][group]
    bg_nll = sum_nll[offsets][group]
    dice = soft_dice_from_sums(tp, tp + fp, size, smooth)
    bce = (bg_nll + sum_nll[keep]) / sums["n_vox"]
    return dice, bce, group


def blob_loss(logits: torch.Tensor, instances: torch.Tensor, activation: str = "softmax",
              weight_dice: float = 1.0, weight_bce: float = 1.0, smooth: float = 1e-5) -> torch.Tensor:
    """``L_blob``: mean over (image, class) pairs with blobs of the mean over their blobs of
    ``w_bce * BCE_k - w_dice * Dice_k`` (Kofler et al. 2022; per-image averaging as in their reference code).

    Pairs without blobs are skipped; with no blob at all the result is an fp32 zero (not NaN).
    """
    dice, bce, group = blob_terms(logits, instances, activation, smooth)
    return _reduce_blobs(dice, bce, group, instances.shape[0] * instances.shape[1], weight_dice, weight_bce,
                         logits)


def _reduce_blobs(dice: torch.Tensor, bce: torch.Tensor, group: torch.Tensor, n_groups: int, weight_dice: float,
                  weight_bce: float, like: torch.Tensor) -> torch.Tensor:
    if group.numel() == 0:
        return like.new_zeros((), dtype=torch.float32)
    per_blob = weight_bce * bce - weight_dice * dice
    sums = per_blob.new_zeros(n_groups).index_add(0, group, per_blob)
    counts = torch.bincount(group, minlength=n_groups)
    has = counts > 0
    return (sums[has] / counts[has]).mean()


def per_sample_blob_error(logits: torch.Tensor, instances: torch.Tensor, activation: str = "softmax",
                          weight_dice: float = 1.0, weight_bce: float = 1.0, smooth: float = 1e-5) -> torch.Tensor:
    """Blob term of each image on its own, as a non-negative error for ranking OHEM candidates, shape (B,) fp32.

    ``e_b = mean over classes f of image b with blobs of (1/K_bf) * sum_k (w_bce * BCE_k + w_dice * (1 - Dice_k))``
    (Kofler et al. 2022 per image; ``1 - Dice`` instead of ``-Dice`` so that an image without blobs, ``e_b = 0``,
    ranks like a perfectly segmented one rather than above it). On one image this is
    ``blob_loss(...) + w_dice`` when it has blobs, 0 otherwise. Same single O(voxels) pass as :func:`blob_terms`.
    """
    dice, bce, group = blob_terms(logits, instances, activation, smooth)
    b, f = instances.shape[:2]
    per_blob = (weight_bce * bce + weight_dice * (1.0 - dice)).float()
    sums = per_blob.new_zeros(b * f).index_add(0, group, per_blob)
    counts = torch.bincount(group, minlength=b * f).to(sums.dtype)
    per_group = (sums / counts.clamp_min(1)).reshape(b, f)
    has = (counts > 0).reshape(b, f).to(sums.dtype)
    return (per_group * has).sum(1) / has.sum(1).clamp_min(1)


def split_packed_target(target: torch.Tensor, num_instance_channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split a target whose last ``num_instance_channels`` channels are instance maps (see
    :class:`nnunetv2_ohem.transforms.instances.InstanceMapTransform`) into (segmentation, instances)."""
    if target.shape[1] <= num_instance_channels:
        raise ValueError(f"target has {target.shape[1]} channels; expected segmentation channels followed by "
                         f"{num_instance_channels} instance channels")
    return target[:, :-num_instance_channels], target[:, -num_instance_channels:]


def _fusable_dc_ce(global_loss: nn.Module) -> bool:
    """Is ``global_loss`` exactly nnU-Net's plain DC+CE (soft Dice without background, unweighted mean CE)?"""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss
    from nnunetv2.utilities.helpers import softmax_helper_dim1
    if type(global_loss) is not DC_and_CE_loss or global_loss.ignore_label is not None:
        return False
    dc, ce = global_loss.dc, global_loss.ce
    return (type(dc) is MemoryEfficientSoftDiceLoss and dc.apply_nonlin is softmax_helper_dim1 and not dc.do_bg
            and not (dc.batch_dice and dc.ddp) and type(ce) is RobustCrossEntropyLoss and ce.weight is None
            and ce.reduction == "mean" and ce.label_smoothing == 0 and ce.ignore_index < 0)


def fused_binary_dc_ce_and_blob(logits: torch.Tensor, seg: torch.Tensor, instances: torch.Tensor,
                                dc_ce: nn.Module, weight_dice: float = 1.0, weight_bce: float = 1.0,
                                smooth: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dc_ce(logits, seg), blob_loss(logits, instances, "softmax", ...))`` for two-class softmax outputs, both
    from the blob term's single pass over the volume.

    With two classes the instance map's foreground is the label's (``InstanceMapTransform`` builds it from the
    label), so nnU-Net's terms are sums the blob term already has, per image ``b``:
    ``CE = sum_b sum_ids sum_nll / (B N)``, soft Dice of the foreground with ``intersect = sum_{blobs} sum p``,
    ``sum_pred = sum_{all ids} sum p``, ``sum_gt = N - |background|`` (per image, or summed first for
    ``batch_dice``); ``DC+CE = w_ce CE - w_dc Dice`` as in ``DC_and_CE_loss``. ``dc_ce`` must pass
    ``_fusable_dc_ce`` and ``seg == 1`` must be exactly ``instances > 0`` (checked).
    """
    if logits.shape[1] != 2 or instances.shape[1] != 1:
        raise ValueError(f"fused DC+CE needs two-class logits and one instance channel, got {tuple(logits.shape)} "
                         f"and {tuple(instances.shape)}")
    if not _fusable_dc_ce(dc_ce):
        raise ValueError("fused DC+CE needs nnU-Net's plain DC_and_CE_loss (MemoryEfficientSoftDiceLoss without "
                         "background, unweighted CE, no ignore label)")
    _check_shapes(logits, instances, "softmax")
    if seg.shape != instances.shape or not torch.equal(seg == 1, instances > 0):
        raise ValueError("fused DC+CE needs a label whose foreground is exactly the instance map's")
    return _fused_unchecked(logits, instances, dc_ce, weight_dice, weight_bce, smooth)


def _fused_unchecked(logits: torch.Tensor, instances: torch.Tensor, dc_ce: nn.Module, weight_dice: float,
                     weight_bce: float, smooth: float) -> Tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(device_type=logits.device.type, enabled=False):
        sums = _segment_sums(logits, instances, "softmax")
        dice, bce, group = _terms_from_sums(sums, smooth)
        blob = _reduce_blobs(dice, bce, group, sums["n_groups"], weight_dice, weight_bce, logits)
        b, offsets, n_vox = logits.shape[0], sums["offsets"], sums["n_vox"]
        gi = sums["group_of_id"]
        pred = sums["sum_p"].new_zeros(b).index_add(0, gi, sums["sum_p"])
        nll = sums["sum_nll"].new_zeros(b).index_add(0, gi, sums["sum_nll"])
        intersect = pred - sums["sum_p"][offsets]
        gt = (n_vox - sums["counts"][offsets]).to(pred.dtype)
        if dc_ce.dc.batch_dice:
            intersect, pred, gt = intersect.sum(0), pred.sum(0), gt.sum(0)
        dc = soft_dice_from_sums(intersect, pred, gt, float(dc_ce.dc.smooth)).mean()
        glob = (dc_ce.weight_ce * (nll.sum() / (b * n_vox)) if dc_ce.weight_ce != 0 else 0) + \
            (dc_ce.weight_dice * -dc if dc_ce.weight_dice != 0 else 0)
    return glob, blob


class BlobLoss(nn.Module):
    """``alpha * global_loss(output, seg) + beta * blob_loss(output, instances)`` for one resolution.

    The target is nnU-Net's target with the instance channels appended (``split_packed_target``), so nnU-Net's
    own ``DeepSupervisionWrapper`` and ``train_step`` work unchanged and instance maps are downsampled by the
    very transform that downsamples the segmentation. ``alpha = 1, beta = 0`` gives exactly ``global_loss``.
    """

    def __init__(self, global_loss: nn.Module, num_instance_channels: int, activation: str = "softmax",
                 alpha: float = 2.0, beta: float = 1.0, weight_dice: float = 1.0, weight_bce: float = 1.0,
                 smooth: float = 1e-5):
        super().__init__()
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        self.global_loss = global_loss
        self.num_instance_channels = int(num_instance_channels)
        self.activation = activation
        self.alpha, self.beta = float(alpha), float(beta)
        self.weight_dice, self.weight_bce, self.smooth = float(weight_dice), float(weight_bce), float(smooth)
        # two-class softmax with nnU-Net's plain DC+CE: both terms from one pass (same values, ~half the time)
        self._fused = activation == "softmax" and self.num_instance_channels == 1 and _fusable_dc_ce(global_loss)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seg, inst = split_packed_target(target, self.num_instance_channels)
        if self.alpha != 0 and self.beta != 0 and self._fused and output.shape[1] == 2 and \
                seg.shape == inst.shape and torch.equal(seg == 1, inst > 0):
            _check_shapes(output, inst, "softmax")
            glob, blob = _fused_unchecked(output, inst, self.global_loss, self.weight_dice, self.weight_bce,
                                          self.smooth)
            return self.alpha * glob + self.beta * blob
        result = self.alpha * self.global_loss(output, seg) if self.alpha != 0 else 0.0
        if self.beta != 0:
            result = result + self.beta * blob_loss(output, inst, self.activation, self.weight_dice,
                                                    self.weight_bce, self.smooth)
        return result
