"""BTRSeg intensity normalisation as an nnU-Net normalisation scheme, and how stock nnU-Net finds it.

BTRSeg (Carmo, "Automated Glioma Segmentation using mixed-precision 3D UNet", following Isensee et al. 2018)
normalises each MRI channel by the mean and standard deviation of the brain, clips to [-5, 5] and min-max
scales the result to [0, 1].

Why the plumbing below: nnU-Net 2.8.1 resolves ``normalization_schemes`` names (and ``preprocessor_name``)
only by scanning its own ``nnunetv2/preprocessing`` folder, and we must not add files there. So:

* Plans name the scheme ``"BTRSegNormalization"`` and keep ``preprocessor_name: "DefaultPreprocessor"``.
  A stock process that never loads our code fails loudly with nnU-Net's own
  ``Unable to locate class 'BTRSegNormalization' for normalization`` instead of silently mis-normalising.
* :class:`ExtendedPreprocessor` (a ``DefaultPreprocessor``) resolves our scheme names first, then nnU-Net's.
  Our planning command preprocesses with it (its spawn workers unpickle it, which imports this module).
* :func:`attach_extension_preprocessor` turns a ``ConfigurationManager`` into an
  :class:`ExtendedConfigurationManager` whose ``preprocessor_class`` is :class:`ExtendedPreprocessor`. Our
  trainers call it in ``build_network_architecture``, the one trainer hook stock ``nnUNetv2_predict`` runs,
  on the very object the predictor later pickles into its preprocessing workers; unpickling it there imports
  this module, so stock ``nnUNetv2_predict -tr <our trainer>`` preprocesses test images exactly like training.
"""
from typing import Dict, Optional, Type

import numpy as np

import nnunetv2
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.preprocessing.normalization.default_normalization_schemes import ImageNormalization
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

BTRSEG_SCHEME = "BTRSegNormalization"


def btrseg_normalize(image: np.ndarray, brain_mask: Optional[np.ndarray] = None, clip: float = 5.0,
                     eps: float = 1e-8) -> np.ndarray:
    """BTRSeg / Isensee et al. (BraTS 2017) normalisation of one channel.

    z = (x − μ_brain) / σ_brain over the whole image (statistics from brain voxels only), z ← clip(z, −clip,
    clip), out = (z − min z) / (max z − min z) ∈ [0, 1]. ``brain_mask`` defaults to the non-zero voxels
    (BraTS images are skull-stripped with a zero background); if the mask is empty the whole image is used.
    A constant image maps to zeros. Returns a new float32 array; the input is not modified.
    """
    image = np.asarray(image)
    if brain_mask is None:
        brain_mask = image != 0
    else:
        brain_mask = np.asarray(brain_mask, dtype=bool)
        if brain_mask.shape != image.shape:
            raise ValueError(f"brain_mask shape {brain_mask.shape} does not match image shape {image.shape}")
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    x = image.astype(np.float64)
    brain = x[brain_mask] if brain_mask.any() else x.ravel()
    z = (x - brain.mean()) / max(float(brain.std()), eps)
    np.clip(z, -clip, clip, out=z)
    lo, hi = z.min(), z.max()
    if hi - lo < eps:
        return np.zeros(image.shape, dtype=np.float32)
    return ((z - lo) / (hi - lo)).astype(np.float32)


class BTRSegNormalization(ImageNormalization):
    """nnU-Net normalisation scheme wrapping :func:`btrseg_normalize`.

    The brain is nnU-Net's non-zero mask (``seg >= 0`` after cropping) when the plans set
    ``use_mask_for_norm``, else the channel's own non-zero voxels. Outside voxels are normalised too (they
    become the low end of [0, 1]), so the scheme does not leave them at zero.
    """

    leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true = False
    clip = 5.0

    def run(self, image: np.ndarray, seg: np.ndarray = None) -> np.ndarray:
        mask = (seg >= 0) if (self.use_mask_for_norm and seg is not None) else None
        if mask is not None and mask.shape != image.shape:
            raise ValueError(f"{BTRSEG_SCHEME}: seg shape {mask.shape} != image shape {image.shape}")
        return btrseg_normalize(image, mask, self.clip).astype(self.target_dtype, copy=False)


NORMALIZATION_SCHEMES: Dict[str, Type[ImageNormalization]] = {BTRSEG_SCHEME: BTRSegNormalization}


def resolve_normalization_class(name: str) -> Type[ImageNormalization]:
    """Our schemes first, then nnU-Net's own lookup (its ``preprocessing/normalization`` folder)."""
    if name in NORMALIZATION_SCHEMES:
        return NORMALIZATION_SCHEMES[name]
    cls = recursive_find_python_class(join(nnunetv2.__path__[0], "preprocessing", "normalization"), name,
                                      "nnunetv2.preprocessing.normalization")
    if cls is None:
        raise RuntimeError(f"Unknown normalization scheme '{name}': not one of ours "
                           f"({sorted(NORMALIZATION_SCHEMES)}) nor found in nnunetv2/preprocessing/normalization")
    return cls


class ExtendedPreprocessor(DefaultPreprocessor):
    """nnU-Net's ``DefaultPreprocessor`` that also knows the schemes in :data:`NORMALIZATION_SCHEMES`."""

    def _normalize(self, data: np.ndarray, seg: np.ndarray, configuration_manager: ConfigurationManager,
                   foreground_intensity_properties_per_channel: dict) -> np.ndarray:
        for c in range(data.shape[0]):
            normalizer_class = resolve_normalization_class(configuration_manager.normalization_schemes[c])
            normalizer = normalizer_class(use_mask_for_norm=configuration_manager.use_mask_for_norm[c],
                                          intensityproperties=foreground_intensity_properties_per_channel[str(c)])
            data[c] = normalizer.run(data[c], seg[0])
        return data


class ExtendedConfigurationManager(ConfigurationManager):
    """A ``ConfigurationManager`` whose preprocessor understands our normalisation schemes."""

    @property
    def preprocessor_class(self) -> Type[DefaultPreprocessor]:
        if self.preprocessor_name != DefaultPreprocessor.__name__:
            raise RuntimeError(f"Plans use normalization schemes {self.normalization_schemes} from nnunetv2_ohem, "
                               f"which need preprocessor_name 'DefaultPreprocessor' (got '{self.preprocessor_name}')")
        return ExtendedPreprocessor


def uses_extension_schemes(configuration_manager: ConfigurationManager) -> bool:
    return any(s in NORMALIZATION_SCHEMES for s in configuration_manager.normalization_schemes)


def attach_extension_preprocessor(configuration_manager: ConfigurationManager) -> ConfigurationManager:
    """Make ``configuration_manager`` (in place) use :class:`ExtendedPreprocessor` if its plans need it.

    In place on purpose: nnU-Net's predictor keeps and pickles this very object. Returns it for chaining.
    """
    if uses_extension_schemes(configuration_manager) and \
            not isinstance(configuration_manager, ExtendedConfigurationManager):
        configuration_manager.__class__ = ExtendedConfigurationManager
    return configuration_manager
