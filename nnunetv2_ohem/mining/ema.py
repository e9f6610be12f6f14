"""Momentum (exponential moving average) update of the miner network (Schmidt-Mengin et al. 2021, Alg. 1;
the same update as MoCo's key encoder, He et al. CVPR 2020)."""
from typing import List, Tuple

import torch
from torch import nn


def unwrap_model(module: nn.Module) -> nn.Module:
    """The plain module behind DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, in any nesting."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def _paired_tensors(ema: nn.Module, online: nn.Module) -> Tuple[List[torch.Tensor], List[torch.Tensor],
                                                                  List[torch.Tensor], List[torch.Tensor]]:
    ema_sd = dict(ema.named_parameters())
    ema_sd.update(dict(ema.named_buffers()))
    on_sd = dict(online.named_parameters())
    on_sd.update(dict(online.named_buffers()))
    if ema_sd.keys() != on_sd.keys():
        missing = sorted(set(on_sd) ^ set(ema_sd))[:5]
        raise ValueError(f"miner and online network differ in parameters/buffers, e.g. {missing}")
    float_e, float_o, other_e, other_o = [], [], [], []
    for name, e in ema_sd.items():
        o = on_sd[name]
        if e.shape != o.shape:
            raise ValueError(f"shape mismatch for '{name}': miner {tuple(e.shape)} vs online {tuple(o.shape)}")
        if e.is_floating_point():
            float_e.append(e)
            float_o.append(o.detach())
        else:
            other_e.append(e)
            other_o.append(o)
    return float_e, float_o, other_e, other_o


@torch.no_grad()
def ema_update_(ema: nn.Module, online: nn.Module, momentum: float) -> None:
    """In place: ``w̄ ← μ·w̄ + (1−μ)·w`` for every parameter *and* floating-point buffer.

    ``ema`` and ``online`` may be wrapped (DDP / ``torch.compile``); they are unwrapped first. Integer
    buffers (e.g. BatchNorm's ``num_batches_tracked``) cannot be averaged and are copied. ``μ = 0`` makes
    the miner an exact copy of the online net (classic OHEM), ``μ = 1`` freezes it.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    float_e, float_o, other_e, other_o = _paired_tensors(unwrap_model(ema), unwrap_model(online))
    if momentum == 0.0:
        torch._foreach_copy_(float_e, float_o)
    elif momentum != 1.0:
        torch._foreach_mul_(float_e, momentum)
        torch._foreach_add_(float_e, float_o, alpha=1.0 - momentum)
    for e, o in zip(other_e, other_o):
        e.copy_(o)
