"""Short variants of the stock nnU-Net baselines for tests and smoke runs (2 epochs x 5 iterations)."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.sampling.nnUNetTrainer_probabilisticOversampling import \
    nnUNetTrainer_probabilisticOversampling

from nnunetv2_ohem.training.common import debug_variant

nnUNetTrainer_Debug = debug_variant(nnUNetTrainer)
#: the paper's "uniform p" baseline
nnUNetTrainer_probabilisticOversampling_Debug = debug_variant(nnUNetTrainer_probabilisticOversampling)
