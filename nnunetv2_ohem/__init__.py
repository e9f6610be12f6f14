"""nnU-Net v2 extension for small-lesion segmentation research.

This module is imported at interpreter start-up by the discovery hook (``nnunetv2_ohem-discovery.pth``)
so it must stay free of heavy imports (no torch, no nnunetv2).
"""
__version__ = "0.1.0"
