"""The end-to-end demo (``nnunetv2_ohem_demo`` / ``make demo``): phantoms to HTML report through stock nnU-Net."""
