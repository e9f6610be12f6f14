"""Exponential moving average (EMA) of a network's weights: the update, its momentum schedule, and a weight swap.

One home for both uses in this package: OHEM-EMA's miner (Schmidt-Mengin et al. 2021, Alg. 1; the same update
as MoCo's key encoder, He et al. CVPR 2020) and the weight EMA of any trainer (Polyak averaging as in timm's
``ModelEma``), wired into nnU-Net by :class:`nnunetv2_ohem.training.ema.EMAMixin`.
"""
from typing import List, NamedTuple

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


class PairedTensors(NamedTuple):
    """The tensors of an EMA network and its online network, matched by name: floating ones (averaged) and
    the others (integer buffers, copied). Online parameters are the ``Parameter`` objects themselves, so a
    pairing stays valid while the modules keep their tensors (``load_state_dict`` copies in place)."""
    float_ema: List[torch.Tensor]
    float_online: List[torch.Tensor]
    other_ema: List[torch.Tensor]
    other_online: List[torch.Tensor]


def pair_tensors(ema: nn.Module, online: nn.Module) -> PairedTensors:
    """Match every parameter and buffer of ``ema`` and ``online`` (unwrapped first) by name and shape."""
    ema, online = unwrap_model(ema), unwrap_model(online)
    ema_sd = dict(ema.named_parameters())
    ema_sd.update(dict(ema.named_buffers()))
    on_sd = dict(online.named_parameters())
    on_sd.update(dict(online.named_buffers()))
    if ema_sd.keys() != on_sd.keys():
        missing = sorted(set(on_sd) ^ set(ema_sd))[:5]
        raise ValueError(f"EMA and online network differ in parameters/buffers, e.g. {missing}")
    pairs = PairedTensors([], [], [], [])
    for name, e in ema_sd.items():
        o = on_sd[name]
        if e.shape != o.shape:
            raise ValueError(f"shape mismatch for '{name}': EMA {tuple(e.shape)} vs online {tuple(o.shape)}")
        if e.is_floating_point():
            pairs.float_ema.append(e)
            pairs.float_online.append(o)
        else:
            pairs.other_ema.append(e)
            pairs.other_online.append(o)
    return pairs


@torch.no_grad()
def ema_update_pairs_(pairs: PairedTensors, momentum: float) -> None:
    """:func:`ema_update_` on a pairing from :func:`pair_tensors` (a trainer pairs once, updates every step:
    matching by name costs more than the foreach update itself on small networks)."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if momentum == 0.0:
        torch._foreach_copy_(pairs.float_ema, pairs.float_online)
    elif momentum != 1.0:
        torch._foreach_mul_(pairs.float_ema, momentum)
        torch._foreach_add_(pairs.float_ema, pairs.float_online, alpha=1.0 - momentum)
    for e, o in zip(pairs.other_ema, pairs.other_online):
        e.copy_(o)


def ema_update_(ema: nn.Module, online: nn.Module, momentum: float) -> None:
    """In place: ``w̄ ← μ·w̄ + (1−μ)·w`` for every parameter *and* floating-point buffer.

    ``ema`` and ``online`` may be wrapped (DDP / ``torch.compile``); they are unwrapped first. Integer
    buffers (e.g. BatchNorm's ``num_batches_tracked``) cannot be averaged and are copied. ``μ = 0`` makes
    the EMA an exact copy of the online net (classic OHEM), ``μ = 1`` freezes it. Two foreach kernels
    (``_foreach_mul_``, ``_foreach_add_``) over all floating tensors.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    ema_update_pairs_(pair_tensors(ema, online), momentum)


def ema_momentum_at(num_updates: int, momentum: float, warmup: bool = True) -> float:
    """Momentum of update number ``num_updates`` (0-based): ``μ_t = min(μ, (1 + t) / (10 + t))`` with warm-up,
    else ``μ``.

    The ramp is TensorFlow's ``tf.train.ExponentialMovingAverage(num_updates=…)`` rule (also timm's
    ``ModelEmaV2/V3`` option): the average starts from the random initial weights (w̄_0 = w_0), and with a
    constant μ = 0.999 that start would still carry μ^t = 78 % of the weight after one nnU-Net epoch
    (250 steps). With the ramp its weight is Π_s (1+s)/(10+s) ≈ 9!·t⁻⁹, negligible after a few dozen
    steps, and μ_t reaches μ = 0.999 after ~9000 steps (36 epochs). Bias correction (Adam-style division by
    1 − μ^t) is the alternative for a zero-initialised average; it does not apply to w̄_0 = w_0.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if num_updates < 0:
        raise ValueError(f"num_updates must be >= 0, got {num_updates}")
    return min(momentum, (1.0 + num_updates) / (10.0 + num_updates)) if warmup else momentum


@torch.no_grad()
def swap_weights_(a: nn.Module, b: nn.Module) -> None:
    """In place: exchange the values of every parameter and buffer of ``a`` and ``b`` (same architecture).

    Values move, tensors stay: storages, ``requires_grad``, optimizer references, DDP hooks and
    ``torch.compile`` graphs of both modules are untouched, so a trainer can evaluate its EMA weights
    through its own (wrapped, compiled) network and swap back. Extra memory: one tensor at a time.
    """
    pairs = pair_tensors(a, b)
    for x, y in zip(pairs.float_ema + pairs.other_ema, pairs.float_online + pairs.other_online):
        tmp = x.clone()
        x.copy_(y)
        y.copy_(tmp)
