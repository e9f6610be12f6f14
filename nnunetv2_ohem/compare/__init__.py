"""Compare trainers on your own nnU-Net dataset (``nnunetv2_ohem_compare``) and select a model."""
