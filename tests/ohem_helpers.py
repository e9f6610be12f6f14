"""Test helpers shared by the trainer tests."""
import os
from typing import Optional, Tuple

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def make_trainer(ds, cls, configuration: str = "3d_fullres", dataset_json: Optional[dict] = None,
                 start: bool = True):
    """A CPU trainer of class ``cls`` on fold 0 of the preprocessed test dataset ``ds`` (its plans and
    dataset.json, or ``dataset_json``), started (``on_train_start``) or only initialised."""
    plans = load_json(os.path.join(ds.preprocessed_folder, ds.plans_identifier + ".json"))
    plans["continue_training"] = False
    dj = dataset_json or load_json(os.path.join(ds.preprocessed_folder, "dataset.json"))
    tr = cls(plans, configuration, 0, dj, torch.device("cpu"))
    if start:
        tr.on_train_start()
    else:
        tr.initialize()
    return tr


def train_step_capturing_subbatch(trainer, batch: dict, monkeypatch) -> Tuple[dict, dict]:
    """Run ``trainer.train_step(batch)`` for one epoch-start and return (its result, the sub-batch that
    nnU-Net's own ``train_step`` received), i.e. exactly what the online network was trained on."""
    seen = {}
    parent = nnUNetTrainer.train_step

    def spy(self, sub):
        seen["batch"] = sub
        return parent(self, sub)

    monkeypatch.setattr(nnUNetTrainer, "train_step", spy)
    trainer.on_train_epoch_start()
    result = trainer.train_step(batch)
    monkeypatch.setattr(nnUNetTrainer, "train_step", parent)
    return result, seen["batch"]


def always_mining(cls, **attrs):
    """``cls`` with the mining schedule switched off (every step mines, all B trained patches are the hardest)
    and scoring in the training precision (fp32 on CPU, so errors compare with fp32 references), for tests
    that check one mining step right after start-up."""
    settings = {"ohem_warmup_fraction": 0.0, "ohem_end_fraction": 1.0, "ohem_hard_fraction": 1.0,
                "ohem_score_dtype": None, **attrs}
    return type(cls.__name__ + "_AlwaysMining", (cls,), settings)
