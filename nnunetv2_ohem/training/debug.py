"""Short plain nnU-Net trainer for tests and smoke runs."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_ohem.training.common import with_training_length

nnUNetTrainer_Debug = with_training_length(nnUNetTrainer, "nnUNetTrainer_Debug", 2, 5, 2)
