"""One validated image reader for the converters and the evaluator.

SimpleITK alone is not enough for NIfTI: it reads a truncated ``.nii.gz`` without complaint (the missing voxels
become 0) and some paths turn NaN voxels into 0. :func:`read_image` therefore checks NIfTI files with nibabel
first (header parsed by nibabel; float data read raw, *before* ``scl_slope``/``scl_inter`` scaling, so a NaN
cannot hide behind it; integer data checked for completeness without decoding when the gzip trailer allows),
then reads the image with SimpleITK (the reader nnU-Net uses, so geometry is what nnU-Net sees) and refuses:

* a truncated or unreadable file,
* NaN or Inf voxels (raw, or after scaling, and in any other format ITK reads),
* more than one component per voxel,
* for label maps (``label=True``): values that are not whole numbers.

Every refusal is a :class:`NiftiError` whose message is one line: ``PATH: reason``.
"""
from __future__ import annotations

import gzip
import os
import zlib
from typing import Optional

import numpy as np
import SimpleITK as sitk

NIFTI_ENDINGS = (".nii.gz", ".nii")
#: what a broken gzip stream or short file raises while reading
_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError)


class NiftiError(ValueError):
    """An image file that must not be used; the message is one line naming the file and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(" ".join(f"{path}: {reason}".split()))


def is_nifti(path: str) -> bool:
    return str(path).endswith(NIFTI_ENDINGS)


def _short(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]


def payload_size(image) -> int:
    """Bytes a NIfTI file (uncompressed) must hold for this nibabel image: data offset + voxels × item size."""
    header = image.header
    n_voxels = int(np.prod(header.get_data_shape(), dtype=np.int64))
    return int(image.dataobj.offset) + n_voxels * header.get_data_dtype().itemsize


def _stored_size(path: str, required: int) -> int:
    """Uncompressed size of ``path``; for gzip first the trailer's ISIZE (size mod 2³²) is tried, which
    avoids decoding complete files; a mismatch (or a multi-member file) is settled by decoding."""
    if not path.endswith(".gz"):
        return os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() >= 4:
            f.seek(-4, os.SEEK_END)
            if int.from_bytes(f.read(4), "little") == required % (1 << 32):
                return required
    size = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            size += len(chunk)
    return size


def check_nifti_file(path: str) -> None:
    """Raise :class:`NiftiError` for a NIfTI file that is truncated, unreadable or has non-finite voxels."""
    import nibabel as nib

    try:
        image = nib.load(path)
    except Exception as e:   # nibabel raises its own ImageFileError, HeaderDataError, OSError, ...
        raise NiftiError(path, f"unreadable or truncated image ({_short(e)})") from None
    if not isinstance(image, nib.Nifti1Image):   # Nifti2Image is a subclass
        raise NiftiError(path, f"not a NIfTI-1/2 image ({type(image).__name__})")
    dtype = image.header.get_data_dtype()
    required = payload_size(image)
    try:
        if dtype.kind in "fc":
            raw = np.asanyarray(image.dataobj.get_unscaled())   # raises on truncation
            if not np.isfinite(raw).all():
                raise NiftiError(path, "image contains NaN or Inf values")
        else:
            size = _stored_size(path, required)
            if size < required:
                raise NiftiError(path, f"truncated image ({size} of {required} bytes)")
    except NiftiError:
        raise
    except _READ_ERRORS as e:
        raise NiftiError(path, f"unreadable or truncated image ({_short(e)})") from None
    for name, value in (("scl_slope", image.dataobj.slope), ("scl_inter", image.dataobj.inter)):
        if not np.isfinite(value):
            raise NiftiError(path, f"header {name} is {value}")


def integer_problem(values: np.ndarray) -> Optional[str]:
    """Why ``values`` cannot be a label map (``"NaN or Inf values"``, ``"non-integer values (e.g. 0.5)"``),
    or ``None`` when every value is a whole number."""
    flat = np.asarray(values).ravel()
    if flat.dtype.kind in "iub" or flat.size == 0:
        return None
    if flat.dtype.kind != "f":
        return f"unsupported label dtype {flat.dtype}"
    if not np.isfinite(flat).all():
        return "NaN or Inf values"
    whole = np.round(flat)
    if not np.array_equal(flat, whole):
        return f"non-integer values (e.g. {flat[flat != whole][0]:g}); expected a label map"
    return None


def read_image(path: str, label: bool = False) -> sitk.Image:
    """Read a single-component image with SimpleITK after the checks above; ``label`` adds the integer check.

    Any format SimpleITK reads is accepted; the nibabel checks apply to ``.nii``/``.nii.gz`` files.
    """
    path = str(path)
    if is_nifti(path):
        check_nifti_file(path)
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "rror" in ln), lines[-1] if lines else "")
        raise NiftiError(path, f"unreadable or truncated image ({reason[:200]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise NiftiError(path, f"image has {image.GetNumberOfComponentsPerPixel()} components per voxel, "
                               f"expected 1")
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise NiftiError(path, "image contains NaN or Inf values")
    if array.dtype.kind not in "fiub":
        raise NiftiError(path, f"unsupported pixel type {image.GetPixelIDTypeAsString()}")
    if label:
        problem = integer_problem(array)
        if problem:
            raise NiftiError(path, problem)
    return image
