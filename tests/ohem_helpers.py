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


def always_mining(cls, **attrs):
    """``cls`` with the mining schedule switched off (every step mines, all B trained patches are the hardest)
    and scoring in the training precision (fp32 on CPU, so errors compare with fp32 references), for tests
    that check one mining step right after start-up."""
    settings = {"ohem_warmup_fraction": 0.0, "ohem_end_fraction": 1.0, "ohem_hard_fraction": 1.0,
                "ohem_score_dtype": None, **attrs}
    return type(cls.__name__ + "_AlwaysMining", (cls,), settings)
