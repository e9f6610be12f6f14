"""Challenge datasets → validated nnU-Net raw datasets (``nnunetv2_ohem_convert``).

``convert_msseg2``, ``convert_valdo``, ``convert_brats``, ``convert_acdc`` and ``brats_back`` live in their
modules (imported lazily so ``import nnunetv2_ohem.dataset_conversion`` stays cheap); all share the
validated, atomic writer in :mod:`nnunetv2_ohem.dataset_conversion.common`.
"""
__all__ = ["ConversionError"]


def __getattr__(name: str):
    # lazily, so that ``nnunetv2_ohem_convert --help`` does not import SimpleITK
    if name == "ConversionError":
        from nnunetv2_ohem.dataset_conversion.common import ConversionError

        return ConversionError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
