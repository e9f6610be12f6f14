"""The small 3D U-Net of Schmidt-Mengin et al. (MSSEG-II 2021), buildable from an nnU-Net plans file.

    B(n)      := 2 × {Conv(n, 3×3×3) → GroupNorm → ReLU}
    3D U-Net  := B(16)↓ → B(32)↓ → B(64) → ↑B(32) → ↑B(16) → Conv(1×1×1, num_classes)

↓ = 2× max pooling, ↑ = 2× (tri/bi)linear upsampling followed by concatenation with the encoder skip.
The paper's head is ``Conv(1)`` + sigmoid (one lesion channel); inside nnU-Net the number of outputs is
the label manager's number of segmentation heads (2 with softmax for a binary label dataset; the same
model class, since a 2-way softmax is a sigmoid of the logit difference). Works in 2D too (``dim=2``).

In a plans file::

    "architecture": {"network_class_name": "nnunetv2_ohem.networks.paper_unet.PaperUNet",
                     "arch_kwargs": {"features_per_stage": [16, 32, 64], "dim": 3, "num_groups": 8,
                                     "kernel_sizes": [[3,3,3]]*3, "strides": [[1,1,1],[2,2,2],[2,2,2]]},
                     "_kw_requires_import": []}

``kernel_sizes``/``strides`` are only there because nnU-Net's ``ConfigurationManager`` derives pooling
(deep-supervision scales) from ``arch_kwargs['strides']``; they are validated, not free parameters.
"""
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from nnunetv2_ohem.networks.norms import GroupNorm


def conv_block(in_ch: int, out_ch: int, dim: int, num_groups: int) -> nn.Sequential:
    """``B(n)``: two 3×3(×3) convolutions, each followed by GroupNorm (largest divisor of n ≤ ``num_groups``
    groups; the paper does not state G) and ReLU."""
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    return nn.Sequential(conv(in_ch, out_ch, 3, padding=1), GroupNorm(out_ch, num_groups=num_groups), nn.ReLU(inplace=True),
                         conv(out_ch, out_ch, 3, padding=1), GroupNorm(out_ch, num_groups=num_groups), nn.ReLU(inplace=True))


class PaperDecoder(nn.Module):
    """Upsample → concat skip → ``B(n)`` per level, 1×1 conv head; ``deep_supervision`` adds one head per
    lower decoder level (nnU-Net's ``set_deep_supervision_enabled`` toggles ``decoder.deep_supervision``)."""

    def __init__(self, features: Sequence[int], num_classes: int, dim: int, num_groups: int,
                 deep_supervision: bool):
        super().__init__()
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        self.deep_supervision = deep_supervision
        self.upsample = nn.Upsample(scale_factor=2, mode="trilinear" if dim == 3 else "bilinear",
                                    align_corners=False)
        # stage s (from the bottom) merges features[s+1] upsampled with the skip features[s]
        self.blocks = nn.ModuleList(conv_block(features[s] + features[s + 1], features[s], dim, num_groups)
                                    for s in reversed(range(len(features) - 1)))
        self.seg_layers = nn.ModuleList(conv(features[s], num_classes, 1) for s in reversed(range(len(features) - 1)))

    def forward(self, skips: List[torch.Tensor]) -> Union[torch.Tensor, List[torch.Tensor]]:
        x = skips[-1]
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(torch.cat([self.upsample(x), skips[-(i + 2)]], 1))
            if self.deep_supervision or i == len(self.blocks) - 1:
                outputs.append(self.seg_layers[i](x))
        # nnU-Net expects the highest resolution first
        outputs = outputs[::-1]
        return outputs if self.deep_supervision else outputs[0]


class PaperUNet(nn.Module):
    """The OHEM-EMA paper's U-Net; constructor signature matches nnU-Net's ``get_network_from_plans``."""

    def __init__(self, input_channels: int, num_classes: int, features_per_stage: Sequence[int] = (16, 32, 64),
                 dim: int = 3, num_groups: int = 8, deep_supervision: bool = False,
                 kernel_sizes: Optional[Sequence[Sequence[int]]] = None,
                 strides: Optional[Sequence[Sequence[int]]] = None):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        if len(features_per_stage) < 2:
            raise ValueError("PaperUNet needs at least 2 stages")
        n = len(features_per_stage)
        if kernel_sizes is not None and [list(k) for k in kernel_sizes] != [[3] * dim] * n:
            raise ValueError(f"PaperUNet uses 3-voxel kernels on every stage; plans say {kernel_sizes}")
        if strides is not None and [list(s) for s in strides] != [[1] * dim] + [[2] * dim] * (n - 1):
            raise ValueError(f"PaperUNet pools by 2 after every stage but the first; plans say {strides}")
        self.dim = dim
        pool = nn.MaxPool3d if dim == 3 else nn.MaxPool2d
        chans = [input_channels, *features_per_stage]
        self.encoder = nn.ModuleList(conv_block(chans[i], chans[i + 1], dim, num_groups) for i in range(n))
        self.pool = pool(2)
        self.decoder = PaperDecoder(features_per_stage, num_classes, dim, num_groups, deep_supervision)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        divisor = 2 ** (len(self.encoder) - 1)
        if x.ndim != self.dim + 2 or any(s % divisor for s in x.shape[2:]):
            raise ValueError(f"PaperUNet({self.dim}D) needs input (N, C, *spatial) with spatial sizes divisible "
                             f"by {divisor}, got {tuple(x.shape)}")
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        return self.decoder(skips)


def paper_arch_kwargs(dim: int = 3, features_per_stage: Sequence[int] = (16, 32, 64), num_groups: int = 8) -> dict:
    """The ``arch_kwargs`` of a plans file that selects :class:`PaperUNet`."""
    n = len(features_per_stage)
    return {"features_per_stage": list(features_per_stage), "dim": dim, "num_groups": num_groups,
            "kernel_sizes": [[3] * dim for _ in range(n)],
            "strides": [[1] * dim] + [[2] * dim for _ in range(n - 1)]}


PAPER_UNET_CLASS = f"{PaperUNet.__module__}.{PaperUNet.__name__}"
