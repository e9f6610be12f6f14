"""DeepLabv2 / DeepLabv3 for 2D and 3D: an atrous residual encoder, an ASPP head, up-sampling to input size.

Pure torch, no trainer knowledge, built from plain keyword arguments like ``dynamic_network_architectures``
(``conv_op`` picks 2D or 3D; ``norm_op``/``nonlin`` are classes called as ``op(channels, **kwargs)``).

References
----------
* Chen et al., "DeepLab: Semantic Image Segmentation with Deep Convolutional Nets, Atrous Convolution, and
  Fully Connected CRFs", TPAMI 2018 (DeepLabv2: ASPP = parallel 3×3 atrous classifiers whose logits are summed).
* Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation", arXiv:1706.05587 (DeepLabv3:
  ASPP = 1×1 conv + three 3×3 atrous convs (rates 6, 12, 18 at output stride 16, doubled at output stride 8)
  + image-level pooling → 1×1 conv → up-sample; concatenated, 1×1 projection).
* an unpublished heart-MRI slide deck ("DeepLabv2 and DeepLabv3: our implementation", not part of this
  repository): DeepLabv3 beat DeepLabv2 on heart MRI thanks to the image-level (global average pooling) branch.
"""
import math
from typing import List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.initialization.weight_init import InitWeights_He

IntOrSeq = Union[int, Sequence[int]]

#: DeepLabv3's rates are defined at output stride 16, DeepLabv2's (ASPP-L) at output stride 8.
DEFAULT_RATES = {"v3": ((6, 12, 18), 16), "v2": ((6, 12, 18, 24), 8)}


def _per_axis(value: IntOrSeq, ndim: int, name: str) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(int(v) for v in value)
    if len(value) != ndim:
        raise ValueError(f"{name} must have {ndim} entries (one per spatial axis), got {value}")
    return value


def dilation_schedule(strides: Sequence[IntOrSeq], output_stride: int, ndim: int
                      ) -> Tuple[List[Tuple[int, ...]], List[Tuple[int, ...]]]:
    """Replace stride by dilation once the cumulative stride reaches ``output_stride`` (per axis).

    DeepLab (Chen et al. 2018, §3.1) removes the down-sampling of the last encoder stages and dilates their
    convolutions by the stride that was removed, so the field of view grows as in the original network while
    the feature map stays at 1/``output_stride`` of the input. Along axis ``a`` with nominal stride ``s_i`` in
    stage ``i`` and cumulative stride ``c_{i-1}``:

        kept_i = min(s_i, output_stride / c_{i-1})    (so c_i = c_{i-1} · kept_i ≤ output_stride)
        dilation_i = dilation_{i-1} · s_i / kept_i

    Axes that nnU-Net never down-samples that far (anisotropic plans) keep their strides and get no dilation.

    Returns ``(effective_strides, dilations)``, one tuple per stage.
    """
    if output_stride < 1 or output_stride & (output_stride - 1):
        raise ValueError(f"output_stride must be a power of two, got {output_stride}")
    cumulative = [1] * ndim
    dilation = [1] * ndim
    eff_strides, dilations = [], []
    for i, s in enumerate(strides):
        s = _per_axis(s, ndim, f"strides[{i}]")
        kept = []
        for a in range(ndim):
            if s[a] < 1 or s[a] & (s[a] - 1):
                raise ValueError(f"strides[{i}] must be powers of two, got {s}")
            k = min(s[a], max(1, output_stride // cumulative[a]))
            dilation[a] *= s[a] // k
            cumulative[a] *= k
            kept.append(k)
        eff_strides.append(tuple(kept))
        dilations.append(tuple(dilation))
    return eff_strides, dilations


def scale_atrous_rates(rates: Sequence[int], output_stride: int, reference_output_stride: int = 16
                       ) -> Tuple[int, ...]:
    """Scale ASPP rates defined at ``reference_output_stride`` to ``output_stride``.

    DeepLabv3 (Chen et al. 2017, §4.1): rates (6, 12, 18) at output stride 16 become (12, 24, 36) at output
    stride 8, i.e. ``rate' = rate · reference_output_stride / output_stride`` (at least 1), so each branch
    keeps the same field of view in input voxels.
    """
    if output_stride < 1 or reference_output_stride < 1:
        raise ValueError(f"output strides must be >= 1, got {output_stride} and {reference_output_stride}")
    return tuple(max(1, int(round(r * reference_output_stride / output_stride))) for r in rates)


def atrous_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                dilation: Sequence[int]) -> torch.Tensor:
    """'Same' dilated convolution (odd kernel, stride 1, zero padding ``dilation·(k−1)/2``), computed cheaply.

    Along an axis where ``dilation ≥ size`` every off-centre tap of output ``i`` reads index ``i ± j·d``
    (``j ≥ 1``), which lies outside ``[0, size)``, i.e. in the zero padding: the result is exactly the
    convolution with the kernel's central slice along that axis (DeepLabv3 §3.3 notes that large rates
    degenerate to 1×1 filters). Dropping those taps avoids padding a small feature map by ``2·d`` per side,
    which for 3D ASPP rates of 24–36 costs ~100× the memory of the map itself.
    """
    ndim = x.dim() - 2
    if weight.dim() != ndim + 2:
        raise ValueError(f"weight must be {ndim + 2}-D for a {x.dim()}-D input, got shape {tuple(weight.shape)}")
    if any(k % 2 == 0 for k in weight.shape[2:]):
        raise ValueError(f"atrous_conv needs odd kernel sizes, got {tuple(weight.shape[2:])}")
    dilation = _per_axis(dilation, ndim, "dilation")
    index: List[slice] = [slice(None), slice(None)]
    dil, pad = [], []
    for a in range(ndim):
        k = weight.shape[2 + a]
        if dilation[a] >= x.shape[2 + a] and k > 1:
            index.append(slice(k // 2, k // 2 + 1))
            dil.append(1)
            pad.append(0)
        else:
            index.append(slice(None))
            dil.append(dilation[a])
            pad.append(dilation[a] * (k - 1) // 2)
    conv = (F.conv1d, F.conv2d, F.conv3d)[ndim - 1]
    return conv(x, weight[tuple(index)], bias, 1, tuple(pad), tuple(dil))


class AtrousConv(nn.Module):
    """A ``conv_op`` with 'same' padding and dilation whose forward pass uses :func:`atrous_conv`.

    The wrapped module (``self.conv``) holds the weights and the configured ``dilation`` for inspection.
    """

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int, kernel_size: IntOrSeq,
                 dilation: IntOrSeq, bias: bool):
        super().__init__()
        ndim = convert_conv_op_to_dim(conv_op)
        kernel_size = _per_axis(kernel_size, ndim, "kernel_size")
        dilation = _per_axis(dilation, ndim, "dilation")
        self.conv = conv_op(in_channels, out_channels, kernel_size, stride=1,
                            padding=tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation)),
                            dilation=dilation, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return atrous_conv(x, self.conv.weight, self.conv.bias, self.conv.dilation)


def _norm(norm_op, norm_op_kwargs, channels) -> nn.Module:
    return nn.Identity() if norm_op is None else norm_op(channels, **(norm_op_kwargs or {}))


def _nonlin(nonlin, nonlin_kwargs) -> nn.Module:
    return nn.Identity() if nonlin is None else nonlin(**(nonlin_kwargs or {}))


def group_norm_groups(channels: int, min_channels_per_group: int = 16) -> int:
    """Number of GroupNorm groups for a 1×1 map: as many as possible with ≥ ``min_channels_per_group`` each.

    On a single voxel GroupNorm normalises over the channels of a group only; a group of 1 channel would output
    zeros and a group of 2 only ±1, so groups must be wide (256 channels → 16 groups of 16; ≤ 31 → 1 group).
    """
    groups = max(1, channels // min_channels_per_group)
    while channels % groups:
        groups -= 1
    return groups


class ResidualBlock(nn.Module):
    """ResNet basic block (He et al. 2016) with dilation: conv-norm-nonlin-conv-norm, + skip, nonlin."""

    def __init__(self, conv_op, in_channels, out_channels, kernel_size, stride, dilation, conv_bias,
                 norm_op, norm_op_kwargs, nonlin, nonlin_kwargs, projection_skip: bool):
        super().__init__()
        pad = tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation))
        self.conv1 = conv_op(in_channels, out_channels, kernel_size, stride, pad, dilation, bias=conv_bias)
        self.norm1 = _norm(norm_op, norm_op_kwargs, out_channels)
        self.act1 = _nonlin(nonlin, nonlin_kwargs)
        self.conv2 = conv_op(out_channels, out_channels, kernel_size, 1, pad, dilation, bias=conv_bias)
        self.norm2 = _norm(norm_op, norm_op_kwargs, out_channels)
        if projection_skip:
            self.skip = nn.Sequential(conv_op(in_channels, out_channels, 1, stride, bias=False),
                                      _norm(norm_op, norm_op_kwargs, out_channels))
        else:
            self.skip = nn.Identity()
        self.act2 = _nonlin(nonlin, nonlin_kwargs)

    def forward(self, x):
        return self.act2(self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x))))) + self.skip(x))


class AtrousResidualEncoder(nn.Module):
    """Stem conv + residual stages; stages past ``output_stride`` are dilated instead of strided."""

    def __init__(self, input_channels: int, conv_op: Type[_ConvNd], features_per_stage: Sequence[int],
                 strides: Sequence[IntOrSeq], kernel_sizes: Union[IntOrSeq, Sequence[IntOrSeq]] = 3,
                 n_blocks_per_stage: Union[int, Sequence[int]] = 1, output_stride: int = 16,
                 conv_bias: bool = False, norm_op=None, norm_op_kwargs=None, nonlin=nn.ReLU, nonlin_kwargs=None):
        super().__init__()
        ndim = convert_conv_op_to_dim(conv_op)
        n = len(features_per_stage)
        if len(strides) != n:
            raise ValueError(f"strides has {len(strides)} stages but features_per_stage has {n}")
        if isinstance(kernel_sizes, int) or (len(kernel_sizes) == ndim and all(isinstance(k, int)
                                                                               for k in kernel_sizes)):
            kernel_sizes = [kernel_sizes] * n
        kernel_sizes = [_per_axis(k, ndim, f"kernel_sizes[{i}]") for i, k in enumerate(kernel_sizes)]
        if len(kernel_sizes) != n:
            raise ValueError(f"kernel_sizes has {len(kernel_sizes)} stages but features_per_stage has {n}")
        if isinstance(n_blocks_per_stage, int):
            n_blocks_per_stage = [n_blocks_per_stage] * n
        if len(n_blocks_per_stage) != n or min(n_blocks_per_stage) < 1:
            raise ValueError(f"n_blocks_per_stage must be {n} numbers >= 1, got {n_blocks_per_stage}")
        self.strides, self.dilations = dilation_schedule(strides, output_stride, ndim)
        self.output_stride = tuple(math.prod(s[a] for s in self.strides) for a in range(ndim))

        k0 = kernel_sizes[0]
        self.stem = nn.Sequential(conv_op(input_channels, features_per_stage[0], k0, 1,
                                          tuple((k - 1) // 2 for k in k0), bias=conv_bias),
                                  _norm(norm_op, norm_op_kwargs, features_per_stage[0]),
                                  _nonlin(nonlin, nonlin_kwargs))
        stages, cin = [], features_per_stage[0]
        for i in range(n):
            blocks = []
            # the skip projection depends on the *nominal* stride so the parameters are the same for every
            # output stride (DeepLabv3 trains at 16 and evaluates at 8 with the same weights)
            nominal = _per_axis(strides[i], ndim, f"strides[{i}]")
            for b in range(n_blocks_per_stage[i]):
                blocks.append(ResidualBlock(conv_op, cin, features_per_stage[i], kernel_sizes[i],
                                            self.strides[i] if b == 0 else (1,) * ndim, self.dilations[i],
                                            conv_bias, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs,
                                            projection_skip=b == 0 and (cin != features_per_stage[i]
                                                                        or any(s != 1 for s in nominal))))
                cin = features_per_stage[i]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.output_channels = cin

    def forward(self, x):
        return self.stages(self.stem(x))


class ImagePooling(nn.Module):
    """DeepLabv3's image-level branch: global average pool → 1×1 conv → (GroupNorm) → nonlin → broadcast.

    Never Instance/BatchNorm: on a 1×1(×1) map InstanceNorm outputs its bias (and fails in train mode) and
    BatchNorm fails for batch size 1. Bilinear up-sampling of a 1×1 map is a constant, hence ``expand``.
    """

    def __init__(self, conv_op, in_channels, out_channels, pooling_norm: str, nonlin, nonlin_kwargs):
        super().__init__()
        if pooling_norm not in ("group", "none"):
            raise ValueError(f"pooling_norm must be 'group' or 'none', got {pooling_norm!r}")
        ndim = convert_conv_op_to_dim(conv_op)
        self.pool = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[ndim - 1](1)
        self.conv = conv_op(in_channels, out_channels, 1, bias=pooling_norm == "none")
        self.norm = (nn.GroupNorm(group_norm_groups(out_channels), out_channels) if pooling_norm == "group"
                     else nn.Identity())
        self.act = _nonlin(nonlin, nonlin_kwargs)

    def forward(self, x):
        y = self.act(self.norm(self.conv(self.pool(x))))
        return y.expand(-1, -1, *x.shape[2:])


class ASPPv3(nn.Module):
    """DeepLabv3 ASPP: [1×1, 3×3 atrous per rate, image pooling] → concat → 1×1 projection (+ dropout)."""

    def __init__(self, conv_op, in_channels: int, channels: int, rates: Sequence[IntOrSeq],
                 image_pooling: bool = True, pooling_norm: str = "group", dropout_p: float = 0.1,
                 norm_op=None, norm_op_kwargs=None, nonlin=nn.ReLU, nonlin_kwargs=None):
        super().__init__()
        conv_bias = norm_op is None

        def cnr(conv):
            return nn.Sequential(conv, _norm(norm_op, norm_op_kwargs, channels), _nonlin(nonlin, nonlin_kwargs))

        branches = [cnr(conv_op(in_channels, channels, 1, bias=conv_bias))]
        branches += [cnr(AtrousConv(conv_op, in_channels, channels, 3, r, conv_bias)) for r in rates]
        if image_pooling:
            branches.append(ImagePooling(conv_op, in_channels, channels, pooling_norm, nonlin, nonlin_kwargs))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(conv_op(len(branches) * channels, channels, 1, bias=conv_bias),
                                     _norm(norm_op, norm_op_kwargs, channels), _nonlin(nonlin, nonlin_kwargs),
                                     nn.Dropout(dropout_p) if dropout_p > 0 else nn.Identity())

    def forward(self, x):
        return self.project(torch.cat([b(x) for b in self.branches], 1))


class ASPPv2(nn.Module):
    """DeepLabv2 ASPP (ResNet variant): parallel 3×3 atrous classifiers, one per rate, logits summed."""

    def __init__(self, conv_op, in_channels: int, num_classes: int, rates: Sequence[IntOrSeq]):
        super().__init__()
        self.branches = nn.ModuleList(AtrousConv(conv_op, in_channels, num_classes, 3, r, True) for r in rates)

    def forward(self, x):
        out = self.branches[0](x)
        for b in self.branches[1:]:
            out = out + b(x)
        return out


class DeepLab(nn.Module):
    """DeepLabv2 (``aspp_version='v2'``) or DeepLabv3 (``'v3'``) for 2D or 3D inputs of any size.

    Output: logits of shape ``(B, num_classes, *input_spatial_shape)`` (bilinear/trilinear up-sampling,
    ``align_corners=False``). Single output: there is no deep supervision (``deep_supervision=True`` raises).

    ``atrous_rates`` are given at ``rates_output_stride`` and scaled to ``output_stride`` with
    :func:`scale_atrous_rates`; by default v3 uses (6, 12, 18) at 16, v2 (6, 12, 18, 24) at 8.
    """

    def __init__(self, input_channels: int, num_classes: int, conv_op: Type[_ConvNd],
                 features_per_stage: Sequence[int], strides: Sequence[IntOrSeq],
                 kernel_sizes: Union[IntOrSeq, Sequence[IntOrSeq]] = 3,
                 n_blocks_per_stage: Union[int, Sequence[int]] = 1, output_stride: int = 16,
                 aspp_version: str = "v3", atrous_rates: Optional[Sequence[int]] = None,
                 rates_output_stride: Optional[int] = None, aspp_channels: Optional[int] = None,
                 image_pooling: bool = True, pooling_norm: str = "group", aspp_dropout_p: float = 0.1,
                 conv_bias: bool = False, norm_op: Optional[Type[nn.Module]] = None, norm_op_kwargs: dict = None,
                 nonlin: Optional[Type[nn.Module]] = nn.ReLU, nonlin_kwargs: dict = None,
                 deep_supervision: bool = False):
        super().__init__()
        if aspp_version not in DEFAULT_RATES:
            raise ValueError(f"aspp_version must be 'v2' or 'v3', got {aspp_version!r}")
        if deep_supervision:
            raise ValueError("DeepLab has a single output; deep supervision is not supported")
        self.ndim = convert_conv_op_to_dim(conv_op)
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.aspp_version = aspp_version
        self.encoder = AtrousResidualEncoder(input_channels, conv_op, features_per_stage, strides, kernel_sizes,
                                             n_blocks_per_stage, output_stride, conv_bias, norm_op,
                                             norm_op_kwargs, nonlin, nonlin_kwargs)
        default_rates, default_os = DEFAULT_RATES[aspp_version]
        if atrous_rates is None:
            atrous_rates, rates_output_stride = default_rates, rates_output_stride or default_os
        self.atrous_rates = scale_atrous_rates(atrous_rates, output_stride, rates_output_stride or default_os)
        c_enc = self.encoder.output_channels
        if aspp_version == "v3":
            channels = aspp_channels or min(256, c_enc)
            self.aspp = ASPPv3(conv_op, c_enc, channels, self.atrous_rates, image_pooling, pooling_norm,
                               aspp_dropout_p, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs)
            # torchvision's DeepLabHead: a 3×3 conv after the ASPP projection, then the classifier
            self.head = nn.Sequential(conv_op(channels, channels, 3, padding=1, bias=norm_op is None),
                                      _norm(norm_op, norm_op_kwargs, channels), _nonlin(nonlin, nonlin_kwargs),
                                      conv_op(channels, num_classes, 1, bias=True))
        else:
            if aspp_channels is not None or not image_pooling:
                raise ValueError("aspp_channels/image_pooling apply to aspp_version='v3' only")
            self.aspp = ASPPv2(conv_op, c_enc, num_classes, self.atrous_rates)
            self.head = nn.Identity()
        self.apply(InitWeights_He(1e-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.ndim + 2 or x.shape[1] != self.input_channels:
            raise ValueError(f"DeepLab expects (B, {self.input_channels}, {'H, W' if self.ndim == 2 else 'D, H, W'})"
                             f" input, got shape {tuple(x.shape)}")
        y = self.head(self.aspp(self.encoder(x)))
        return F.interpolate(y, size=x.shape[2:], mode="bilinear" if self.ndim == 2 else "trilinear",
                             align_corners=False)
