"""Per-epoch learning-rate schedulers built from a pure ``lr(step) -> float`` function.

nnU-Net's ``PolyLRScheduler`` is stepped once per epoch with the epoch index (``step(current_epoch)``) or
without an argument (its own counter ``ctr``), so a resumed run gets the same lr from the epoch counter alone.
:class:`EpochFunctionLRScheduler` keeps that protocol and leaves only the formula to each schedule.
"""
from typing import Callable, Optional

from torch.optim.lr_scheduler import _LRScheduler


class EpochFunctionLRScheduler(_LRScheduler):
    """Sets every param group's lr to ``lr_at(step)``; ``step()`` counts like nnU-Net's ``PolyLRScheduler``.

    Give the formula either as ``lr_fn`` or by overriding :meth:`lr_at` in a subclass. ``lr_fn`` is not part
    of ``state_dict()`` (like torch's ``LambdaLR``), so the state stays picklable.
    """

    def __init__(self, optimizer, lr_fn: Optional[Callable[[int], float]] = None,
                 current_step: Optional[int] = None):
        self.optimizer = optimizer
        self._lr_fn = lr_fn
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def lr_at(self, step: int) -> float:
        if self._lr_fn is None:
            raise NotImplementedError("pass lr_fn or override lr_at")
        return self._lr_fn(step)

    def step(self, current_step: Optional[int] = None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        new_lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr

    def state_dict(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_lr_fn")}
