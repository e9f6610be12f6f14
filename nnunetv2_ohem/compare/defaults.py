"""Defaults of ``nnunetv2_ohem_compare`` that its ``--help`` shows (import-light: no pandas, no torch).

The default trainers separate the effects a patch-level mining method must beat: plain nnU-Net, nnU-Net's
"uniform p" foreground oversampling, nnU-Net's voxel-level hard mining (Dice + top-10 % CE, no extra cost),
plain nnU-Net with EMA weights (so a gain of OHEM-EMA is not just weight averaging), and OHEM-EMA.
"""
DEFAULT_TRAINERS = ("nnUNetTrainer", "nnUNetTrainer_probabilisticOversampling_033", "nnUNetTrainerDiceTopK10Loss",
                    "nnUNetTrainerEMA", "nnUNetTrainerOHEMEMA")
LAUNCHERS = ("local", "slurm", "submitit_local")
