"""Precision (fp32 / fp16 / bf16), normalisation (Instance / Batch / Group) and optimiser variants of
nnU-Net's trainer, and the BTRSeg family (Carmo, "Automated Glioma Segmentation using mixed-precision 3D
UNet"), all found by stock ``nnUNetv2_train -tr NAME``.

How precision is made real with the fewest hooks. nnU-Net 2.8.1 hard-codes
``autocast('cuda')`` (fp16) in ``train_step``/``validation_step`` and in ``nnUNetPredictor`` when the device is
CUDA, and no autocast at all otherwise. Rather than copying those long methods we give the *network* its
precision: ``build_network_architecture`` (the one trainer hook that training, the final validation and stock
``nnUNetv2_predict`` all go through) returns the network with a forward that runs under
``torch.autocast(device, dtype)`` (bf16/fp16) or with autocast explicitly disabled (fp32), and hands fp32
logits to whatever comes next. An inner autocast region overrides nnU-Net's outer one, so the network math
follows the trainer everywhere; the loss then sees fp32 logits (nnU-Net's losses contain no op that CUDA
autocast lowers to fp16). ``__init__`` swaps nnU-Net's GradScaler for the one the precision needs (fp16 only).

What nnU-Net does not let a trainer change: the predictor accumulates sliding-window logits in an fp16
buffer on every device, and exports from that buffer.
"""
import sys
from copy import deepcopy
from dataclasses import dataclass
from pydoc import locate
from typing import Dict, Optional, Tuple

import torch
from dynamic_network_architectures.building_blocks.helper import get_matching_batchnorm, get_matching_instancenorm
from torch import nn

from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_ohem import envvars
from nnunetv2_ohem.losses.region_dice import RegionDiceLoss, deep_supervision_weights
from nnunetv2_ohem.networks.norms import GROUPNORM_DOTTED_NAME
from nnunetv2_ohem.preprocessing.btrseg import attach_extension_preprocessor
from nnunetv2_ohem.training.common import debug_variant
from nnunetv2_ohem.training.lesion_validation import LesionValidationMixin
from nnunetv2_ohem.training.schedules import EpochFunctionLRScheduler

PRECISIONS = ("fp32", "fp16", "bf16")
CPU_FP16_ENV = envvars.CPU_FP16
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


# ----------------------------------------------------------------------------------------------- precision
@dataclass(frozen=True)
class PrecisionPolicy:
    """What a run actually does: autocast dtype (None = autocast off), GradScaler or not, and why."""
    requested: str
    effective: str
    autocast_dtype: Optional[torch.dtype]
    grad_scaler: bool
    message: Optional[str] = None


def resolve_precision(requested: str, device_type: str, cpu_fp16: str = "fp32",
                      bf16_supported: bool = True) -> PrecisionPolicy:
    """Map a requested precision to what runs on ``device_type``.

    fp32: no autocast, no scaler. bf16: autocast bf16 and no scaler (bf16 has fp32's exponent range, so
    gradients do not underflow; Kalamkar et al. 2019); on a CUDA GPU without bf16 it falls back to fp16.
    fp16: autocast fp16 + GradScaler (loss scaling against underflow; Micikevicius et al. 2018) on CUDA; on
    CPU, fp16 kernels are mostly emulated and nnU-Net itself runs fp32 there, so by default it falls back to
    fp32 with a message (``cpu_fp16`` = "fp16" forces fp16 + a CPU GradScaler, "bf16" picks bf16). Devices
    other than CUDA/CPU (mps) do not support autocast in nnU-Net's stack: fp32.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if cpu_fp16 not in PRECISIONS:
        raise ValueError(f"{CPU_FP16_ENV} must be one of {PRECISIONS}, got {cpu_fp16!r}")
    if device_type not in ("cuda", "cpu"):
        msg = None if requested == "fp32" else f"{requested} requested but autocast is unsupported on " \
                                               f"'{device_type}': running fp32"
        return PrecisionPolicy(requested, "fp32", None, False, msg)
    effective, msg = requested, None
    if requested == "bf16" and device_type == "cuda" and not bf16_supported:
        effective, msg = "fp16", "bf16 requested but this GPU has no bf16 support: running fp16 + GradScaler"
    elif requested == "fp16" and device_type == "cpu" and cpu_fp16 != "fp16":
        effective = cpu_fp16
        msg = (f"fp16 requested on CPU: CPU fp16 kernels are largely emulated and nnU-Net runs fp32 on CPU, so "
               f"this run uses {cpu_fp16} (set {CPU_FP16_ENV}=fp16 to force fp16 + GradScaler, =bf16 for bf16)")
    return PrecisionPolicy(requested, effective, _DTYPES[effective], effective == "fp16", msg)


def cpu_fp16_setting() -> str:
    return envvars.get_str(CPU_FP16_ENV, "fp32").strip().lower()


_CUDA_BF16: Dict[str, bool] = {}


def _cuda_bf16_supported() -> bool:
    if "v" not in _CUDA_BF16:
        _CUDA_BF16["v"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return _CUDA_BF16["v"]


def device_policy(precision: str, device_type: str) -> PrecisionPolicy:
    """:func:`resolve_precision` with this process's settings (env var, GPU capability)."""
    return resolve_precision(precision, device_type, cpu_fp16_setting(),
                             _cuda_bf16_supported() if device_type == "cuda" else True)


def make_grad_scaler(device_type: str):
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):  # torch >= 2.3, any device
        return torch.amp.GradScaler(device_type)
    if device_type != "cuda":
        raise RuntimeError(f"this torch ({torch.__version__}) has no GradScaler for '{device_type}'")
    return torch.cuda.amp.GradScaler()


def _to_float32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() and out.dtype != torch.float32 else out
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float32(o) for o in out)
    return out


class _PrecisionForward(nn.Module):
    """Mixed into the network's own class so its state_dict, attributes and ``torch.compile`` stay as they
    are; only ``forward`` gains the autocast region (see the module docstring)."""

    _ohem_dtypes: Dict[str, Optional[torch.dtype]] = {}

    def forward(self, x, *args, **kwargs):
        device_type = x.device.type
        if device_type not in self._ohem_dtypes:
            return super().forward(x, *args, **kwargs)
        # resolved when the precision was set: a plain dict lookup keeps torch.compile graphs whole
        dtype = self._ohem_dtypes[device_type]
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            out = super().forward(x, *args, **kwargs)
        return _to_float32(out)


_PRECISION_CLASSES: Dict[type, type] = {}


def set_network_precision(network: nn.Module, precision: str) -> nn.Module:
    """Make ``network`` (in place) run its forward in ``precision`` on whatever device its input is on."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    cls = type(network)
    if not issubclass(cls, _PrecisionForward):
        if cls not in _PRECISION_CLASSES:
            _PRECISION_CLASSES[cls] = type(cls.__name__, (_PrecisionForward, cls),
                                           {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
        network.__class__ = _PRECISION_CLASSES[cls]
    network._ohem_dtypes = {d: device_policy(precision, d).autocast_dtype for d in ("cpu", "cuda")}
    return network


# ----------------------------------------------------------------------------------------------- norms
NORMS = ("instance", "batch", "group")


def configuration_with_norm(configuration_manager: ConfigurationManager, norm: Optional[str],
                            norm_op_kwargs: Optional[dict] = None) -> ConfigurationManager:
    """A copy of ``configuration_manager`` whose network uses ``norm`` (None: keep the plans' norm_op).

    Batch norm is substituted exactly as nnU-Net's ``nnUNetTrainerBN`` does (matching BatchNormNd,
    eps 1e-5, affine); group norm uses our :class:`~nnunetv2_ohem.networks.norms.GroupNorm` (resolvable by
    ``pydoc.locate``) with ``num_groups`` from ``norm_op_kwargs`` (default 8). The input is not modified.
    """
    if norm is None:
        return configuration_manager
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} or None, got {norm!r}")
    cfg = deepcopy(configuration_manager.configuration)
    kwargs = cfg["architecture"]["arch_kwargs"]
    if "norm_op" not in kwargs or "conv_op" not in kwargs:
        raise RuntimeError(f"{norm} norm needs an architecture with 'conv_op'/'norm_op' kwargs (nnU-Net's "
                           f"default U-Nets); got {cfg['architecture'].get('network_class_name')}")
    conv_op = locate(kwargs["conv_op"])
    if norm == "group":
        kwargs["norm_op"] = GROUPNORM_DOTTED_NAME
        kwargs["norm_op_kwargs"] = {"num_groups": 8, "eps": 1e-5, "affine": True, **(norm_op_kwargs or {})}
    else:
        op = get_matching_batchnorm(conv_op) if norm == "batch" else get_matching_instancenorm(conv_op)
        kwargs["norm_op"] = op.__module__ + "." + op.__name__
        kwargs["norm_op_kwargs"] = {"eps": 1e-5, "affine": True, **(norm_op_kwargs or {})}
    return ConfigurationManager(cfg)


# ----------------------------------------------------------------------------------------------- schedule
def exponential_decay_lr(initial_lr: float, gamma: float, epoch: int) -> float:
    """lr(e) = lr₀ · γ^e (BTRSeg: γ = 0.985 per epoch)."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return initial_lr * gamma ** epoch


class ExponentialDecayLRScheduler(EpochFunctionLRScheduler):
    """Per-epoch exponential decay (:func:`exponential_decay_lr`), stepped like nnU-Net's ``PolyLRScheduler``
    (``step(current_epoch)``), so a resumed run gets the same lr from the epoch counter alone."""

    def __init__(self, optimizer, initial_lr: float, gamma: float = 0.985, current_step: Optional[int] = None):
        self.initial_lr = initial_lr
        self.gamma = gamma
        super().__init__(optimizer, current_step=current_step)

    def lr_at(self, step: int) -> float:
        return exponential_decay_lr(self.initial_lr, self.gamma, step)


OPTIMIZERS = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}


# ----------------------------------------------------------------------------------------------- trainers
class PrecisionTrainer(LesionValidationMixin, nnUNetTrainer):
    """nnU-Net's trainer with a chosen precision, norm, optimiser and batch size (class attributes).

    Not exported under an ``nnUNetTrainer*`` name: the named variants below set the attributes.
    ``optimizer_name`` None keeps nnU-Net's SGD + poly schedule; "adam"/"radam" use the BTRSeg settings
    (lr 5e-4, weight decay 1e-5, lr · 0.985^epoch).
    """

    precision: str = "fp16"
    norm: Optional[str] = None
    norm_op_kwargs: Optional[dict] = None
    optimizer_name: Optional[str] = None
    batch_size_override: Optional[int] = None
    paper_initial_lr: float = 5e-4
    paper_weight_decay: float = 1e-5
    lr_gamma: float = 0.985

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.optimizer_name is not None:
            if self.optimizer_name not in OPTIMIZERS:
                raise ValueError(f"optimizer_name must be one of {sorted(OPTIMIZERS)}, got {self.optimizer_name!r}")
            self.initial_lr = self.paper_initial_lr
            self.weight_decay = self.paper_weight_decay
        if self.batch_size_override is not None:
            # before initialize(): nnU-Net reads the batch size (and splits it over DDP workers) from here
            self.configuration_manager.configuration["batch_size"] = int(self.batch_size_override)
        attach_extension_preprocessor(self.configuration_manager)
        self.precision_policy = device_policy(self.precision, self.device.type)
        self.grad_scaler = make_grad_scaler(self.device.type) if self.precision_policy.grad_scaler else None
        if self.precision_policy.message:
            self.print_to_log_file(f"PRECISION: {self.precision_policy.message}")
        self.print_to_log_file(
            f"Precision {self.precision_policy.effective} (requested {self.precision}), autocast dtype "
            f"{self.precision_policy.autocast_dtype}, GradScaler {'on' if self.grad_scaler else 'off'}; norm "
            f"{self.norm or 'from plans'}; optimizer {self.optimizer_name or 'SGD (nnU-Net)'}")

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        # stock nnUNetv2_predict calls only this hook; it also makes its preprocessing know our schemes
        attach_extension_preprocessor(configuration_manager)
        network = nnUNetTrainer.build_network_architecture(
            plans_manager, configuration_with_norm(configuration_manager, cls.norm, cls.norm_op_kwargs),
            num_input_channels, num_output_channels, enable_deep_supervision)
        return set_network_precision(network, cls.precision)

    def configure_optimizers(self):
        if self.optimizer_name is None:
            return super().configure_optimizers()
        optimizer = OPTIMIZERS[self.optimizer_name](self.network.parameters(), lr=self.initial_lr,
                                                    weight_decay=self.weight_decay)
        return optimizer, ExponentialDecayLRScheduler(optimizer, self.initial_lr, self.lr_gamma)


class BTRSegTrainer(PrecisionTrainer):
    """BTRSeg on nnU-Net region datasets (BraTS WT/TC/ET via ``regions_class_order``).

    Loss 1 − mean region Dice (sigmoid outputs) with nnU-Net's deep-supervision weights, Adam (or RAdam)
    lr 5e-4, weight decay 1e-5, lr · 0.985^epoch, 300 epochs; default: the paper's best Table 1 row (mixed
    precision, GroupNorm, Adam). Patch size and network come from the plans (``nnunetv2_ohem_plan btrseg``
    writes 128³ where the images allow).
    """

    precision = "fp16"
    norm = "group"
    optimizer_name = "adam"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 300

    def _build_loss(self):
        if not self.label_manager.has_regions:
            raise RuntimeError("BTRSeg trainers need a region dataset (dataset.json labels as regions with "
                               "'regions_class_order', e.g. BraTS WT/TC/ET as in nnU-Net's Dataset137)")
        if self.label_manager.has_ignore_label:
            raise RuntimeError("BTRSeg's region Dice loss does not support an ignore label")
        loss = RegionDiceLoss(batch_dice=self.configuration_manager.batch_dice)
        if self.enable_deep_supervision:
            weights = deep_supervision_weights(len(self._get_deep_supervision_scales()))
            loss = DeepSupervisionWrapper(loss, weights)
        return loss


_MODULE = sys.modules[__name__]
_PRECISION_TAGS = {"FP32": "fp32", "FP16": "fp16", "BF16": "bf16"}
_NORM_TAGS = {"IN": "instance", "BN": "batch", "GN": "group"}
_OPT_TAGS = {"Adam": "adam", "RAdam": "radam"}


def _define(name: str, base: type, **attrs) -> type:
    """Create trainer ``name`` (+ its ``_Debug`` variant) as module-level names, so nnU-Net finds them."""
    cls = type(name, (base,), {"__module__": __name__, "__qualname__": name, **attrs,
                               "__doc__": f"{base.__name__} with " + ", ".join(f"{k}={v!r}" for k, v in attrs.items())})
    setattr(_MODULE, name, cls)
    dbg = debug_variant(cls, module=__name__)
    dbg.__qualname__ = dbg.__name__
    setattr(_MODULE, name + "_Debug", dbg)
    return cls


def btrseg_name(precision: str, norm: str, optimizer_name: str, batch_size: Optional[int] = None) -> str:
    """The naming scheme of BTRSeg variants: ``nnUNetTrainerBTRSeg_{FP32,FP16,BF16}_{IN,BN,GN}_{Adam,RAdam}[_bsN]``."""
    tag = {v: k for tags in (_PRECISION_TAGS, _NORM_TAGS, _OPT_TAGS) for k, v in tags.items()}
    return f"nnUNetTrainerBTRSeg_{tag[precision]}_{tag[norm]}_{tag[optimizer_name]}" + \
        (f"_bs{batch_size}" if batch_size else "")


# generic family: nnUNetTrainer{FP32,FP16,BF16}[_{BN,GN}][_{Adam,RAdam}], nnU-Net's loss and plans otherwise
for _p, _prec in _PRECISION_TAGS.items():
    for _n, _norm in {"": None, "_BN": "batch", "_GN": "group"}.items():
        for _o, _opt in {"": None, "_Adam": "adam", "_RAdam": "radam"}.items():
            _define(f"nnUNetTrainer{_p}{_n}{_o}", PrecisionTrainer, precision=_prec, norm=_norm, optimizer_name=_opt)

#: The BTRSeg paper's Table 1 ("mixed" = AMP fp16 on their GTX Titan X): row -> (precision, norm, optimiser,
#: batch size). Only these rows and ``nnUNetTrainerBTRSeg`` (the best row, with the plans' batch size) are
#: named trainers; any other combination is a two-line subclass (docs/mixed_precision.md), because a full
#: grid of every combination put a hundred names nobody asked for into the trainer list.
TABLE1_SETTINGS: Tuple[Tuple[str, Tuple[str, str, str, int]], ...] = (
    ("Isensee: Adam, batch 2, full precision, InstanceNorm", ("fp32", "instance", "adam", 2)),
    ("BTRSeg: Adam, batch 2, full precision, BatchNorm", ("fp32", "batch", "adam", 2)),
    ("BTRSeg: Adam, batch 6, mixed precision, BatchNorm", ("fp16", "batch", "adam", 6)),
    ("BTRSeg: Adam, batch 3, mixed precision, GroupNorm", ("fp16", "group", "adam", 3)),
    ("BTRSeg: RAdam, batch 2, mixed precision, GroupNorm", ("fp16", "group", "radam", 2)),
    ("BTRSeg: RAdam, batch 3, mixed precision, GroupNorm", ("fp16", "group", "radam", 3)),
)
#: Table 1 row -> trainer reproducing the row
TABLE1: Tuple[Tuple[str, str], ...] = tuple((row, btrseg_name(*settings)) for row, settings in TABLE1_SETTINGS)

_define("nnUNetTrainerBTRSeg", BTRSegTrainer)
for (_row, (_prec, _norm, _opt, _bs)), (_, _name) in zip(TABLE1_SETTINGS, TABLE1):
    _define(_name, BTRSegTrainer, precision=_prec, norm=_norm, optimizer_name=_opt, batch_size_override=_bs)
