"""Challenge datasets → validated nnU-Net raw datasets (``nnunetv2_ohem_convert``).

``convert_msseg2``, ``convert_valdo``, ``convert_brats``, ``convert_acdc`` and ``brats_back`` live in their
modules (imported lazily so ``import nnunetv2_ohem.dataset_conversion`` stays cheap); all share the
validated, atomic writer in :mod:`nnunetv2_ohem.dataset_conversion.common`.
"""
from nnunetv2_ohem.dataset_conversion.common import ConversionError

__all__ = ["ConversionError"]
