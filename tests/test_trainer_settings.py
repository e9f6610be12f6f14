"""Trainers that state their settings with ``@trainer_settings`` construct with the values their former
``__init__`` overrides set (hard-coded below), and every other plain attribute equals the parent's."""
import inspect
import os

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_ohem.training import blob, deeplab, ohem
from nnunetv2_ohem.training.common import trainer_settings
from nnunetv2_ohem.training.lesion_validation import LesionValidationMixin


class _PlainDeepLabParent(LesionValidationMixin, nnUNetTrainer):
    """What nnUNetTrainerDeepLabV3 derives from, without its settings."""


#: class -> (the class its settings were applied on top of, the values its old __init__ set after super())
PREVIOUS = {
    deeplab.nnUNetTrainerDeepLabV3: (_PlainDeepLabParent, {"enable_deep_supervision": False}),
    deeplab.nnUNetTrainerDeepLabV3_SlidesSchedule: (deeplab.nnUNetTrainerDeepLabV3,
                                                    {"initial_lr": 2.5e-4, "weight_decay": 5e-4}),
    blob.nnUNetTrainerBlobLoss_VALDO: (blob.nnUNetTrainerBlobLoss,
                                       {"initial_lr": 1e-3, "oversample_foreground_percent": 0.95}),
    ohem.nnUNetTrainerOHEMEMA_Paper: (ohem.nnUNetTrainerOHEMEMA,
                                      {"initial_lr": 1e-3, "weight_decay": 0.0, "num_epochs": 120,
                                       "enable_deep_supervision": False}),
}


def _construct(ds, cls):
    plans = load_json(os.path.join(ds.preprocessed_folder, ds.plans_identifier + ".json"))
    plans["continue_training"] = False
    dataset_json = load_json(os.path.join(ds.preprocessed_folder, "dataset.json"))
    return cls(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))


def _plain_attributes(tr) -> dict:
    return {k: v for k, v in vars(tr).items() if isinstance(v, (bool, int, float, str, type(None)))
            and k not in ("log_file", "output_folder", "output_folder_base")}


@pytest.mark.parametrize("cls", list(PREVIOUS), ids=lambda c: c.__name__)
def test_settings_equal_the_previous_init_overrides(tiny_dataset, cls):
    parent, previous = PREVIOUS[cls]
    tr, ref = _construct(tiny_dataset, cls), _construct(tiny_dataset, parent)
    for key, value in previous.items():  # the old __init__: super().__init__(...); self.key = value
        setattr(ref, key, value)
    assert {k: getattr(tr, k) for k in previous} == previous
    # besides those, only what the class declares itself (e.g. VALDO's blob_alpha/beta) differs
    own = set(vars(cls)) - {"trainer_settings"}
    assert ({k: v for k, v in _plain_attributes(tr).items() if k not in own}
            == {k: v for k, v in _plain_attributes(ref).items() if k not in own})
    assert cls.trainer_settings.items() >= previous.items()
    # nnU-Net constructs trainers by keyword with this exact signature
    assert list(inspect.signature(cls.__init__).parameters) == [
        "self", "plans", "configuration", "fold", "dataset_json", "device"]


def test_debug_variants_keep_the_settings_and_their_length(tiny_dataset):
    tr = _construct(tiny_dataset, deeplab.nnUNetTrainerDeepLabV3_SlidesSchedule_Debug)
    assert (tr.initial_lr, tr.weight_decay, tr.enable_deep_supervision, tr.num_epochs) == (2.5e-4, 5e-4, False, 2)
    assert _construct(tiny_dataset, deeplab.nnUNetTrainerDeepLabV2_Debug).enable_deep_supervision is False


@pytest.mark.parametrize("cls", [ohem.nnUNetTrainerOHEMEMA_Debug, blob.nnUNetTrainerBlobLoss_Debug],
                         ids=lambda c: c.__name__)
def test_debug_variants_validate_without_mirroring_but_train_with_it(tiny_dataset, cls):
    base = cls.__mro__[1]
    tr, ref = _construct(tiny_dataset, cls), _construct(tiny_dataset, base)
    assert (tr.num_epochs, tr.num_iterations_per_epoch, tr.num_val_iterations_per_epoch) == (2, 5, 2)
    got, want = (t.configure_rotation_dummyDA_mirroring_and_inital_patch_size() for t in (tr, ref))
    assert tuple(got[3]) == tuple(want[3]) == (0, 1, 2)  # training augmentation still mirrors
    assert tr.inference_allowed_mirroring_axes is None and tuple(ref.inference_allowed_mirroring_axes) == (0, 1, 2)
    assert cls.__module__ == base.__module__ and cls.__name__ == base.__name__ + "_Debug"


def test_decorator_runs_own_init_first_and_cooperates_with_mixins(tiny_dataset):
    calls = []

    class Mixin:
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            calls.append("mixin")
            super().__init__(plans, configuration, fold, dataset_json, device)

    @trainer_settings(num_epochs=3)
    class Own(nnUNetTrainer):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            calls.append("own")
            self.num_epochs = 99  # overridden by the decorator, which runs after

    @trainer_settings(initial_lr=0.5)
    class Inherited(Own):
        pass

    class Combined(Mixin, Inherited):
        pass

    tr = _construct(tiny_dataset, Combined)
    assert calls == ["mixin", "own"] and (tr.num_epochs, tr.initial_lr) == (3, 0.5)
    assert Inherited.trainer_settings == {"num_epochs": 3, "initial_lr": 0.5}
