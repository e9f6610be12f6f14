"""Normalisation layers with nnU-Net's ``norm_op(num_channels, **norm_op_kwargs)`` calling convention.

nnU-Net builds its networks from plans where ``norm_op`` is a dotted name resolved by ``pydoc.locate`` and
then called as ``norm_op(channels, **norm_op_kwargs)``. ``torch.nn.GroupNorm`` takes
``(num_groups, num_channels)`` instead, so it cannot be named in a plans file directly; :class:`GroupNorm`
here can (``"nnunetv2_ohem.networks.norms.GroupNorm"``), and ``num_groups`` travels in ``norm_op_kwargs``.
"""
from typing import Optional

import torch
from torch import nn

GROUPNORM_DOTTED_NAME = "nnunetv2_ohem.networks.norms.GroupNorm"


def resolve_num_groups(num_channels: int, num_groups: Optional[int] = 8,
                       channels_per_group: Optional[int] = None) -> int:
    """Number of GroupNorm groups for ``num_channels`` channels: the largest divisor of ``num_channels`` that
    is ≤ the request.

    Group Normalization (Wu & He, ECCV 2018) normalises each of G groups of C/G channels over (C/G, *spatial),
    so G must divide C. Requests are either a group count (``num_groups``, paper default 32; nnU-Net's first
    stages often have 32 channels, deeper ones 320, so we default to 8) or a group width
    (``channels_per_group``, then G = C / width). When the request does not divide C (e.g. C=20, G=8) we take
    the largest divisor of C not above it (G=5), never more groups than channels, so 1 ≤ G ≤ C always.
    """
    if num_channels < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels}")
    if channels_per_group is not None:
        if channels_per_group < 1:
            raise ValueError(f"channels_per_group must be >= 1, got {channels_per_group}")
        request = max(1, num_channels // channels_per_group)
    else:
        if num_groups is None or num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        request = num_groups
    request = min(request, num_channels)
    for g in range(request, 0, -1):
        if num_channels % g == 0:
            return g
    return 1  # unreachable: 1 divides everything


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` with nnU-Net's norm-op signature ``GroupNorm(num_channels, **kwargs)``.

    ``num_groups`` / ``channels_per_group`` are requests resolved per layer by :func:`resolve_num_groups`, so
    one plans entry works for every stage width. ``eps`` and ``affine`` mean what they mean in torch (and in
    nnU-Net's default ``norm_op_kwargs``), so the InstanceNorm kwargs can be reused unchanged.
    """

    def __init__(self, num_channels: int, num_groups: Optional[int] = 8, channels_per_group: Optional[int] = None,
                 eps: float = 1e-5, affine: bool = True, device=None, dtype=None):
        groups = resolve_num_groups(num_channels, num_groups, channels_per_group)
        super().__init__(groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm expects input (B, {self.num_channels}, ...), got {tuple(x.shape)}")
        return super().forward(x)
