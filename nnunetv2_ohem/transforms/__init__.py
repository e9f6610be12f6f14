"""batchgeneratorsv2 transforms that run in nnU-Net's CPU data pipeline (never in the GPU step)."""
