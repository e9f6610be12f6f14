"""Helpers shared by our trainer modules."""
import sys
from typing import Optional, Type, TypeVar

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

T = TypeVar("T", bound=nnUNetTrainer)


def with_training_length(base: Type[T], name: str, num_epochs: int, num_iterations_per_epoch: int,
                         num_val_iterations_per_epoch: int, validation_tta: bool = True,
                         module: Optional[str] = None) -> Type[T]:
    """Return a subclass of ``base`` named ``name`` that trains for a fixed, short schedule.

    nnU-Net style ``_Xepochs`` variants, generated instead of written out per trainer. The class must be
    bound to a module-level name equal to ``name`` in ``module`` (default: the caller's) so nnU-Net's by-name
    lookup finds it. ``validation_tta=False``: nnU-Net's final validation (and a stock prediction from the
    checkpoint) without mirroring test-time augmentation; training augmentation is unchanged.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = num_epochs
        self.num_iterations_per_epoch = num_iterations_per_epoch
        self.num_val_iterations_per_epoch = num_val_iterations_per_epoch

    attrs = {
        "__init__": __init__,
        "__doc__": f"{base.__name__} for {num_epochs} epochs x {num_iterations_per_epoch} iterations "
                   f"({num_val_iterations_per_epoch} validation iterations"
                   f"{'' if validation_tta else ', validation without mirroring'}): smoke runs and tests.",
        # like namedtuple: the defining module is the caller's, so pickling and repr point to it
        "__module__": module or sys._getframe(1).f_globals.get("__name__", base.__module__),
    }
    if not validation_tta:
        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
            settings = base.configure_rotation_dummyDA_mirroring_and_inital_patch_size(self)
            self.inference_allowed_mirroring_axes = None  # nnU-Net keeps this for validation and the checkpoint
            return settings
        attrs["configure_rotation_dummyDA_mirroring_and_inital_patch_size"] = \
            configure_rotation_dummyDA_mirroring_and_inital_patch_size
    return type(name, (base,), attrs)


#: the ``_Debug`` schedule: 2 epochs x 5 iterations, 2 validation iterations
DEBUG_LENGTH = (2, 5, 2)


def debug_variant(base: Type[T], name: Optional[str] = None, module: Optional[str] = None) -> Type[T]:
    """``<base>_Debug``: :data:`DEBUG_LENGTH` and a final validation without mirroring TTA (on a CPU the
    2-8 mirrored passes per tile cost several times the two epochs; the tests check that validation runs and
    what it writes, not TTA). Bind it to a module-level name equal to its name."""
    return with_training_length(base, name or base.__name__ + "_Debug", *DEBUG_LENGTH, validation_tta=False,
                                module=module or sys._getframe(1).f_globals.get("__name__", base.__module__))


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
