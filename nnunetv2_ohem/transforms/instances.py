"""Instance (blob) maps computed in the CPU data pipeline with ``cc3d``, for the blob loss.

:class:`InstanceMapTransform` appends one instance channel per foreground class (nnU-Net labels) or per region
(nnU-Net regions) to the ``segmentation`` tensor of a sample. It runs after the spatial augmentation (so blobs are
those of the augmented label) and before nnU-Net's ``DownsampleSegForDSTransform``, which then downsamples
segmentation and instance channels with the same nearest-neighbour call: at every deep-supervision scale an
instance voxel is non-zero exactly where the downsampled label is that class.

nnU-Net's loader keeps only ``image`` and ``segmentation`` of a transformed sample, which is why the instance maps
travel as extra segmentation channels (``nnunetv2_ohem.losses.blob.split_packed_target`` splits them again).
"""
from typing import Optional, Sequence

import cc3d
import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import SegOnlyTransform

__all__ = ["default_connectivity", "instance_maps", "InstanceMapTransform"]

_VALID = {2: (4, 8), 3: (6, 18, 26)}


def default_connectivity(spatial_dims: int) -> int:
    """Full connectivity: 26 in 3D, 8 in 2D (the blob loss paper's choice; diagonal voxels form one lesion)."""
    if spatial_dims not in _VALID:
        raise ValueError(f"only 2D and 3D segmentations are supported, got {spatial_dims} spatial dims")
    return 26 if spatial_dims == 3 else 8


def instance_maps(masks: np.ndarray, connectivity: Optional[int] = None) -> np.ndarray:
    """Connected components of each binary mask in ``masks`` (F, *spatial): ids 1..n_f per channel, 0 = none."""
    spatial = masks.ndim - 1
    conn = default_connectivity(spatial) if connectivity is None else int(connectivity)
    if spatial not in _VALID or conn not in _VALID[spatial]:
        raise ValueError(f"connectivity {conn} is invalid for {spatial}D masks; use one of {_VALID.get(spatial)}")
    out = np.zeros(masks.shape, dtype=np.int32)
    for f in range(masks.shape[0]):
        m = np.ascontiguousarray(masks[f], dtype=bool)
        if m.any():
            out[f] = cc3d.connected_components(m, connectivity=conn, out_dtype=np.uint32)
    return out


class InstanceMapTransform(SegOnlyTransform):
    """Append ``len(labels)`` (labels mode) or ``num_regions`` (regions mode) instance channels to the segmentation.

    Args:
        labels: foreground labels, one instance channel each, read from segmentation channel ``channel_in_seg``
            (nnU-Net labels, softmax training). Exclusive with ``num_regions``.
        num_regions: the segmentation already holds this many binary region channels (after nnU-Net's
            ``ConvertSegmentationToRegionsTransform``); one instance channel per region.
        connectivity: 4/8 (2D) or 6/18/26 (3D); None = 8 in 2D, 26 in 3D.

    The output dtype is float32 if the segmentation is floating point (ids are exact below 2**24), else int32.
    """

    def __init__(self, labels: Optional[Sequence[int]] = None, num_regions: Optional[int] = None,
                 connectivity: Optional[int] = None, channel_in_seg: int = 0):
        super().__init__()
        if (labels is None) == (num_regions is None):
            raise ValueError("give exactly one of labels (nnU-Net labels) or num_regions (nnU-Net regions)")
        self.labels = None if labels is None else [int(i) for i in labels]
        self.num_regions = None if num_regions is None else int(num_regions)
        self.connectivity = connectivity
        self.channel_in_seg = channel_in_seg

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        seg = segmentation.numpy() if segmentation.device.type == "cpu" else segmentation.cpu().numpy()
        if self.labels is not None:
            masks = np.stack([seg[self.channel_in_seg] == lab for lab in self.labels]) if self.labels else \
                np.zeros((0, *seg.shape[1:]), bool)
        else:
            if seg.shape[0] < self.num_regions:
                raise ValueError(f"segmentation has {seg.shape[0]} channels, expected {self.num_regions} regions")
            masks = seg[:self.num_regions] != 0
        inst = torch.from_numpy(instance_maps(masks, self.connectivity))
        dtype = torch.float32 if segmentation.dtype.is_floating_point else torch.int32
        return torch.cat([segmentation.to(dtype), inst.to(dtype)], 0)
