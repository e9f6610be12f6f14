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


def trainer_settings(**settings):
    """Class decorator: set these instance attributes right after nnU-Net's ``__init__`` has run.

    nnU-Net sets ``initial_lr``, ``weight_decay``, ``num_epochs``, ``oversample_foreground_percent``,
    ``enable_deep_supervision``... in ``nnUNetTrainer.__init__``, so a class attribute would be overwritten; a
    variant states them here instead of overriding ``__init__``. The merged settings of a class and its
    decorated bases are its ``trainer_settings`` attribute.
    """

    def decorate(cls: Type[T]) -> Type[T]:
        own_init = cls.__dict__.get("__init__")

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            if own_init is not None:
                own_init(self, plans, configuration, fold, dataset_json, device)
            else:
                super(cls, self).__init__(plans, configuration, fold, dataset_json, device)
            for key, value in settings.items():
                setattr(self, key, value)

        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        __init__.__module__ = cls.__module__
        cls.__init__ = __init__
        cls.trainer_settings = {**getattr(cls, "trainer_settings", {}), **settings}
        return cls

    return decorate
