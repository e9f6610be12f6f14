"""Helpers shared by our trainer modules."""
import sys
from typing import Type, TypeVar

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

T = TypeVar("T", bound=nnUNetTrainer)


def with_training_length(base: Type[T], name: str, num_epochs: int, num_iterations_per_epoch: int,
                         num_val_iterations_per_epoch: int) -> Type[T]:
    """Return a subclass of ``base`` named ``name`` that trains for a fixed, short schedule.

    nnU-Net style ``_Xepochs`` variants, generated instead of written out per trainer. The class must be
    bound to a module-level name equal to ``name`` so nnU-Net's by-name lookup finds it.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = num_epochs
        self.num_iterations_per_epoch = num_iterations_per_epoch
        self.num_val_iterations_per_epoch = num_val_iterations_per_epoch

    return type(name, (base,), {
        "__init__": __init__,
        "__doc__": f"{base.__name__} for {num_epochs} epochs x {num_iterations_per_epoch} iterations "
                   f"({num_val_iterations_per_epoch} validation iterations): smoke runs and tests.",
        # like namedtuple: the defining module is the caller's, so pickling and repr point to it
        "__module__": sys._getframe(1).f_globals.get("__name__", base.__module__),
    })
