"""Test helper shared by the OHEM trainer tests."""
from typing import Tuple

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


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
