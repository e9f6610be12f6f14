"""Per-patch segmentation errors used to rank OHEM candidates (step 1 of Algorithm 1 in Schmidt-Mengin et
al., MSSEG-II 2021: ``e_i = error(UNet̄(x_i), y_i)``).

All functions take raw network logits of shape ``(N, C, *spatial)`` and return one error per patch, shape
``(N,)``, in float32. Two target layouts, the same as nnU-Net's losses:

* labels (softmax): ``target`` is ``(N, 1, *spatial)`` holding integer class ids; an optional
  ``ignore_label`` marks voxels that count nowhere.
* regions (sigmoid, BraTS-style): ``target`` is ``(N, R, *spatial)`` binary masks, one per output channel,
  plus one trailing channel that is 1 on ignored voxels when ``has_ignore_channel`` is set.

The errors equal nnU-Net's own losses evaluated on one patch at a time with ``batch_dice=False`` (up to a
constant: nnU-Net minimises ``-Dice``, we report ``1 - Dice`` so errors are ≥ 0; rankings are identical).
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from nnunetv2_ohem.losses.blob import per_sample_blob_error, split_packed_target
from nnunetv2_ohem.losses.dice import soft_dice

RANKING_ERRORS = ("dice", "dc_ce", "ce")

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


def _prepare(logits: torch.Tensor, target: torch.Tensor, regions: bool, ignore_label: Optional[int],
             has_ignore_channel: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes; return (one-hot / region target as float, voxel mask (N, 1, *spatial) as float)."""
    if logits.ndim < 3:
        raise ValueError(f"logits must be (N, C, *spatial), got shape {tuple(logits.shape)}")
    if target.ndim != logits.ndim or target.shape[0] != logits.shape[0] or target.shape[2:] != logits.shape[2:]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)} "
                         f"(expected (N, 1 or C, *spatial) with the same N and spatial size)")
    n_ch = logits.shape[1]
    if regions:
        expected = n_ch + int(has_ignore_channel)
        if target.shape[1] != expected:
            raise ValueError(f"region target needs {expected} channels ({n_ch} regions"
                             f"{' + ignore' if has_ignore_channel else ''}), got {target.shape[1]}")
        if has_ignore_channel:
            mask = 1.0 - target[:, -1:].float()
            onehot = target[:, :-1].float()
        else:
            mask = torch.ones_like(target[:, :1], dtype=torch.float32)
            onehot = target.float()
        return onehot, mask
    if target.shape[1] != 1:
        raise ValueError(f"label target must have 1 channel of class ids, got {target.shape[1]}")
    t = target.long()
    if ignore_label is not None:
        valid = t != ignore_label
        mask = valid.float()
        t = torch.where(valid, t, torch.zeros_like(t))
    else:
        mask = torch.ones_like(t, dtype=torch.float32)
    # on CUDA this check would force a host sync per call; scatter_ asserts on bad ids there anyway
    if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_ch):
        raise ValueError(f"label ids must lie in [0, {n_ch - 1}] for {n_ch} output channels, found "
                         f"[{int(t.min())}, {int(t.max())}]")
    onehot = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter_(1, t, 1.0)
    return onehot, mask


def per_sample_dice_loss(logits: torch.Tensor, target: torch.Tensor, regions: bool = False,
                         ignore_label: Optional[int] = None, has_ignore_channel: bool = False,
                         do_bg: Optional[bool] = None, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice error per patch: ``e_i = 1 − mean_c (2·Σ p·y + s) / max(Σ p + Σ y + s, 1e-8)``.

    ``p`` = softmax (labels) or sigmoid (regions) of the logits, sums over the voxels of patch ``i`` that are
    not ignored, ``c`` over classes (without background for labels unless ``do_bg``; every region channel for
    regions), ``s = smooth`` (nnU-Net: 1e-5). The paper's mining and training loss (Dice): one minus
    :func:`~nnunetv2_ohem.losses.dice.soft_dice` with no reduction over the batch.
    """
    onehot, mask = _prepare(logits, target, regions, ignore_label, has_ignore_channel)
    probs = torch.sigmoid(logits.float()) if regions else torch.softmax(logits.float(), 1)
    if do_bg is None:
        do_bg = regions
    if not do_bg:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    return 1.0 - soft_dice(probs, onehot, mask, smooth=smooth, reduction="per_sample")


def per_sample_ce(logits: torch.Tensor, target: torch.Tensor, regions: bool = False,
                  ignore_label: Optional[int] = None, has_ignore_channel: bool = False) -> torch.Tensor:
    """Mean cross-entropy per patch over its non-ignored voxels.

    Labels: ``e_i = −(1/|V_i|) Σ_{v∈V_i} log softmax(z_v)[y_v]``; regions: binary cross-entropy with logits
    averaged over channels and non-ignored voxels. A patch whose voxels are all ignored gets 0.
    """
    onehot, mask = _prepare(logits, target, regions, ignore_label, has_ignore_channel)
    z = logits.float()
    axes = tuple(range(1, logits.ndim))
    if regions:
        bce = F.binary_cross_entropy_with_logits(z, onehot, reduction="none")
        return (bce * mask).sum(axes) / (mask.sum(axes) * z.shape[1]).clamp_min(1e-8)
    nll = -(torch.log_softmax(z, 1) * onehot).sum(1, keepdim=True)
    return (nll * mask).sum(axes) / mask.sum(axes).clamp_min(1e-8)


def per_sample_dc_ce(logits: torch.Tensor, target: torch.Tensor, regions: bool = False,
                     ignore_label: Optional[int] = None, has_ignore_channel: bool = False,
                     weight_ce: float = 1.0, weight_dice: float = 1.0, smooth: float = 1e-5) -> torch.Tensor:
    """nnU-Net's compound loss per patch: ``e_i = w_ce·CE_i + w_dc·(1 − Dice_i)`` (Dice without background
    for labels, all regions for regions; BCE for regions), i.e. ``DC_and_CE_loss`` / ``DC_and_BCE_loss`` on
    patch ``i`` alone plus the constant ``w_dc``."""
    ce = per_sample_ce(logits, target, regions, ignore_label, has_ignore_channel)
    dc = per_sample_dice_loss(logits, target, regions, ignore_label, has_ignore_channel, smooth=smooth)
    return weight_ce * ce + weight_dice * dc


def per_sample_error(outputs: TensorOrList, targets: TensorOrList, kind: str = "dc_ce", regions: bool = False,
                     ds_weights: Optional[Sequence[float]] = None, ignore_label: Optional[int] = None,
                     has_ignore_channel: bool = False) -> torch.Tensor:
    """Per-patch ranking error of kind ``"dice"``, ``"dc_ce"`` or ``"ce"``, with deep supervision.

    With lists (deep supervision) ``e_i = Σ_j w_j · e_i(outputs[j], targets[j])`` using nnU-Net's
    ``DeepSupervisionWrapper`` weights ``w_j`` (terms with ``w_j = 0`` are skipped, like nnU-Net does);
    without weights every scale counts 1. A single tensor pair is one scale.
    """
    fns = {"dice": per_sample_dice_loss, "dc_ce": per_sample_dc_ce, "ce": per_sample_ce}
    if kind not in fns:
        raise ValueError(f"unknown ranking error '{kind}', choose one of {RANKING_ERRORS}")
    if isinstance(outputs, torch.Tensor) != isinstance(targets, torch.Tensor):
        raise ValueError("outputs and targets must both be tensors or both be lists (deep supervision)")
    if isinstance(outputs, torch.Tensor):
        outputs, targets = [outputs], [targets]
    if len(outputs) != len(targets):
        raise ValueError(f"{len(outputs)} outputs but {len(targets)} targets")
    weights = [1.0] * len(outputs) if ds_weights is None else list(ds_weights)
    if len(weights) < len(outputs):
        raise ValueError(f"{len(weights)} deep-supervision weights for {len(outputs)} outputs")
    fn = fns[kind]
    total = None
    for w, out, tgt in zip(weights, outputs, targets):
        if w == 0:
            continue
        e = w * fn(out, tgt, regions=regions, ignore_label=ignore_label, has_ignore_channel=has_ignore_channel)
        total = e if total is None else total + e
    if total is None:
        raise ValueError("all deep-supervision weights are zero")
    return total


def blob_ranking_error(outputs: TensorOrList, packed_targets: TensorOrList, num_instance_channels: int,
                       alpha: float, beta: float, kind: str = "dc_ce", regions: bool = False,
                       ds_weights: Optional[Sequence[float]] = None, weight_dice: float = 1.0,
                       weight_bce: float = 1.0) -> torch.Tensor:
    """Per-patch error of the blob-loss objective, shape (N,) fp32, for ranking OHEM candidates.

    ``e_i = sum_j w_j * (alpha * e_global(out_j, seg_j)_i + beta * e_blob(out_j, inst_j)_i)`` with nnU-Net's
    deep-supervision weights ``w_j`` (scales with ``w_j = 0`` skipped, as nnU-Net does; all 1 without weights),
    ``e_global`` the per-patch error of kind ``kind`` (:func:`per_sample_error`; ``dc_ce`` is nnU-Net's DC+CE
    with ``1 - Dice``) and ``e_blob`` :func:`~nnunetv2_ohem.losses.blob.per_sample_blob_error` (Kofler et al.,
    "blob loss: instance imbalance aware loss functions for semantic segmentation", IPMI 2023; per image,
    ``1 - Dice``). ``packed_targets`` are targets whose last ``num_instance_channels`` channels are instance
    maps. On one patch this is the blob trainer's loss plus the constant
    ``sum_j w_j * (alpha * w_dc + beta * w_dice * [patch has a blob at scale j])``.
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


def has_foreground(target: torch.Tensor, regions: bool = False, ignore_label: Optional[int] = None,
                   has_ignore_channel: bool = False) -> torch.Tensor:
    """Bool ``(N,)``: does patch ``i`` contain any foreground voxel (label > 0 that is not the ignore label,
    or any voxel inside any region)?"""
    axes = tuple(range(1, target.ndim))
    if regions:
        t = target[:, :-1] if has_ignore_channel else target
        return (t > 0).any(dim=axes) if t.shape[1] else torch.zeros(t.shape[0], dtype=torch.bool)
    fg = target > 0
    if ignore_label is not None:
        fg &= target != ignore_label
    return fg.any(dim=axes)
