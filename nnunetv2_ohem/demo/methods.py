"""The methods the demo and its study compare: one torch-free registry.

A method is named by the trainer class a user would train it with (``nnUNetv2_train ... -tr <name>``); the
demo trains ``<name>_Demo`` (:mod:`nnunetv2_ohem.training.demo`: the demo's schedule, training seed, no final
validation). Labels are the OHEM-EMA paper's terms (Schmidt-Mengin et al., MSSEG-II 2021) with the ranking
error in brackets.
"""
from dataclasses import dataclass
from typing import Dict, Tuple

DEMO_SUFFIX = "_Demo"
#: the demo's training budget, shared by every method (``nnunetv2_ohem_demo --epochs/--iterations/--val_iterations``
#: and the ``_Demo`` trainers' defaults); chosen from the sweep in docs/demo.md
DEMO_EPOCHS = 50
DEMO_ITERATIONS = 10
DEMO_VAL_ITERATIONS = 1


@dataclass(frozen=True)
class Method:
    name: str    #: the base trainer's class name
    module: str  #: module that defines it
    label: str   #: how tables and plots name it

    @property
    def trainer(self) -> str:
        """The demo-length trainer ``nnUNetv2_train -tr`` is given."""
        return self.name + DEMO_SUFFIX


_OHEM = "nnunetv2_ohem.training.ohem"
METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("nnUNetTrainerOHEMEMA", _OHEM, "OHEM-EMA (DC+CE ranking)"),
    Method("nnUNetTrainer", "nnunetv2.training.nnUNetTrainer.nnUNetTrainer", "plain nnU-Net"),
    Method("nnUNetTrainerEMA", "nnunetv2_ohem.training.ema", "plain + weight EMA"),
    Method("nnUNetTrainer_probabilisticOversampling",
           "nnunetv2.training.nnUNetTrainer.variants.sampling.nnUNetTrainer_probabilisticOversampling", "uniform p"),
    Method("nnUNetTrainerDiceTopK10Loss", "nnunetv2.training.nnUNetTrainer.variants.loss.nnUNetTrainerTopkLoss",
           "DC+TopK10 (voxel-level mining)"),
    Method("nnUNetTrainerOHEM", _OHEM, "OHEM (mu=0, DC+CE)"),
    Method("nnUNetTrainerOHEMEMA_DiceMining", _OHEM, "OHEM-EMA (Dice ranking, paper)"),
    Method("nnUNetTrainerOHEMEMA_CE", _OHEM, "OHEM-EMA (CE ranking)"),
)}
NAMES: Tuple[str, ...] = tuple(METHODS)


def label(name: str) -> str:
    """Display name of a method (the name itself for anything not in the registry)."""
    return METHODS[name].label if name in METHODS else name


def trainer_for(name: str) -> str:
    """Demo-length trainer class that method ``name`` runs as."""
    return METHODS[name].trainer
