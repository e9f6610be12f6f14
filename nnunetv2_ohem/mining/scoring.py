"""Cheaper miner inputs: score candidates at reduced resolution (pure tensor functions).

The miner is fully convolutional, so it can score a copy of each candidate downsampled by ``s`` (Composer's
selective backprop scores a lower-resolution copy, ``scale_factor``); the targets are resized to the
outputs with the nearest-neighbour rule nnU-Net uses for its deep-supervision targets
(``DownsampleSegForDSTransform``: ``interpolate(..., mode='nearest-exact')``). Scores are ≈ ``s^dim`` times
cheaper; whether the selection survives is measured by the selection recall
(:func:`nnunetv2_ohem.mining.selection.selection_recall`).
"""
import math
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


def downsample_images(data: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool ``(N, C, *spatial)`` images by ``factor`` along every spatial axis (area downsampling;
    trailing voxels that do not fill a whole block are dropped)."""
    if factor == 1:
        return data
    if factor < 1:
        raise ValueError(f"downsampling factor must be >= 1, got {factor}")
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[data.ndim - 2]
    return pool(data, factor)


def pad_to_multiple(data: torch.Tensor, multiple: Sequence[int]) -> torch.Tensor:
    """Zero-pad the spatial axes of ``(N, C, *spatial)`` at their end up to a multiple of ``multiple`` (a UNet
    with total stride m needs sizes divisible by m; half a plan patch may not be)."""
    pads = []
    for size, m in zip(reversed(data.shape[2:]), reversed(list(multiple))):
        pads += [0, (-size) % int(m)]
    return F.pad(data, pads) if any(pads) else data


def crop_outputs(outputs: TensorOrList, unpadded: Sequence[int], padded: Sequence[int]) -> TensorOrList:
    """Crop every network output back to the part computed from unpadded voxels: an output of spatial size
    ``o`` for a padded input ``P`` keeps ``ceil(u · o / P)`` voxels per axis (``u`` = unpadded size)."""
    def crop(o: torch.Tensor) -> torch.Tensor:
        keep = [math.ceil(u * s / p) for u, s, p in zip(unpadded, o.shape[2:], padded)]
        return o[(slice(None), slice(None), *[slice(0, k) for k in keep])]
    if isinstance(outputs, torch.Tensor):
        return crop(outputs)
    return [crop(o) for o in outputs]


def resize_target_nearest(target: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resize an ``(N, C, *spatial)`` label/region/instance target to ``shape`` with nnU-Net's
    deep-supervision rule (nearest-exact on a float copy, cast back)."""
    if tuple(target.shape[2:]) == tuple(shape):
        return target
    return F.interpolate(target.float(), list(shape), mode="nearest-exact").to(target.dtype)


def targets_for_outputs(outputs: TensorOrList, full_res_target: torch.Tensor) -> List[torch.Tensor]:
    """One target per output, each the full-resolution target resized to that output's spatial shape."""
    outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    return [resize_target_nearest(full_res_target, o.shape[2:]) for o in outs]


def total_stride(pool_op_kernel_sizes: Sequence[Sequence[int]], ndim: int) -> Tuple[int, ...]:
    """Product of a plan's per-stage pooling kernel sizes per spatial axis (1s when unknown)."""
    out = [1] * ndim
    for k in pool_op_kernel_sizes or []:
        for i, v in enumerate(list(k)[-ndim:]):
            out[i] *= int(v)
    return tuple(out)
