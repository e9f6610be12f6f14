"""OHEM-EMA trainers: online hard example mining with a momentum (EMA) miner inside stock nnU-Net.

Schmidt-Mengin et al., "Segmentation of new MS lesions on FLAIR MRI using online hard example mining"
(MSSEG-II 2021), Algorithm 1, per training step:

1. draw B̄ = k·B candidate patches (a fraction of them centred on foreground, the rest uniform);
2. the miner UNet̄ (EMA of the online net) predicts them without gradients, ``e_i = error(UNet̄(x_i), y_i)``;
3. the online net does one optimiser step on the B candidates with the highest error;
4. ``w̄ ← μ·w̄ + (1−μ)·w`` (parameters and buffers). μ = 0 is classic OHEM.

The trainers are thin: a candidate loader (nnU-Net's multi-process loader with batch size B̄) produces the
candidates, either as nnU-Net-augmented patches (``ohem_candidates = "augmented"``) or as un-augmented crops
whose B winners alone get nnU-Net's augmentation (``"crops"``, :mod:`nnunetv2_ohem.training.ohem_crops`);
``train_step`` scores them through ONE hook (:meth:`nnUNetTrainerOHEMEMA.score_candidates`), selects, and hands
the selected sub-batch (data and every deep-supervision target) to nnU-Net's own ``train_step``. A schedule
(warm-up, end, hard/random mix) decides which steps mine; the others are plain nnU-Net steps from nnU-Net's
own loader. Everything else (network, augmentation, loss, poly LR, validation, inference) stays nnU-Net's.
Knobs are class attributes; subclass to change them. See ``docs/ohem.md``.
"""
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from torch import distributed as dist

from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context, softmax_helper_dim1
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_ohem import ohem_diagnostics as diagnostics
from nnunetv2_ohem.mining.ema import unwrap_model
from nnunetv2_ohem.mining.errors import RANKING_ERRORS, has_foreground, per_sample_error
from nnunetv2_ohem.mining.schedule import is_mining_step, mining_window
from nnunetv2_ohem.mining.scoring import (crop_outputs, downsample_images, pad_to_multiple, targets_for_outputs,
                                          total_stride)
from nnunetv2_ohem.mining.selection import hard_count, select_hard_and_random, select_top_b, selection_recall
from nnunetv2_ohem.networks.paper_unet import PAPER_UNET_CLASS, PaperUNet
from nnunetv2_ohem.training.common import debug_variant, trainer_settings
from nnunetv2_ohem.training.ema import EMAMixin
from nnunetv2_ohem.training.lesion_validation import LesionValidationMixin
from nnunetv2_ohem.training.ohem_crops import CandidateCropLoader, WinnerAugmenter
from nnunetv2_ohem.training.schedules import EpochFunctionLRScheduler

#: per-epoch diagnostics, registered in nnU-Net's logger (one value per epoch each); see :mod:`..ohem_diagnostics`
OHEM_LOG_KEYS = diagnostics.LOG_KEYS
CANDIDATE_MODES = ("crops", "augmented")
SCORE_DTYPES = (None, "auto", "fp32", "bf16", "fp16")


def native_cpu_bf16() -> bool:
    """Does this CPU compute bf16 natively (AVX512-BF16 or AMX)? Without it bf16 autocast is emulated and slow."""
    probe = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(f()) for f in probe if f is not None)


def resolve_score_dtype(dtype: Optional[str], device_type: str) -> Optional[str]:
    """``"auto"``: bf16 on a CPU with native bf16 (measured 4.1x faster scoring than fp32 with selection recall
    1.00, docs/ohem.md), otherwise the training precision (None: fp16 autocast on CUDA, fp32 elsewhere)."""
    if dtype != "auto":
        return dtype
    return "bf16" if device_type == "cpu" and native_cpu_bf16() else None


@dataclass(frozen=True)
class ScoringOptions:
    """How the miner scores candidates. ``EXACT`` = fp32, full resolution, every deep-supervision head."""
    downsample: int = 1
    dtype: Optional[str] = None
    deep_supervision: bool = True
    channels_last: bool = False


EXACT_SCORING = ScoringOptions(downsample=1, dtype="fp32", deep_supervision=True, channels_last=False)


class _ScheduledLoader:
    """``dataloader_train`` of an OHEM trainer: each ``next()`` serves the batch the next optimiser step needs,
    B̄ candidates on mining steps, nnU-Net's own plain batch of B otherwise (decided by the trainer's schedule,
    in the main process). The idle loader's workers just keep their queue full."""

    def __init__(self, trainer: "nnUNetTrainerOHEMEMA", plain, candidates):
        self.trainer, self.plain, self.candidates = trainer, plain, candidates

    def __iter__(self):
        return self

    def __next__(self):
        if self.trainer.mines_at(self.trainer.ohem_step):
            return next(self.candidates)
        if self.plain is None:
            raise RuntimeError("the mining schedule needs nnU-Net's plain loader, which was not built")
        return next(self.plain)

    @property
    def data_loader(self):
        """The candidate loader's batchgenerators ``DataLoader`` (as ``SingleThreadedAugmenter.data_loader``)."""
        return getattr(self.candidates, "data_loader", getattr(self.candidates, "generator", None))

    def _finish(self):
        for loader in (self.plain, self.candidates):
            if loader is not None and hasattr(loader, "_finish"):
                loader._finish()
        if self.trainer.winner_augmenter is not None:
            self.trainer.winner_augmenter.close()


class nnUNetTrainerOHEMEMA(EMAMixin, LesionValidationMixin, nnUNetTrainer):
    """OHEM with an EMA miner on top of stock nnU-Net (its network, plans, augmentation, DC+CE, poly LR).

    B = the plan's batch size (per GPU under DDP), B̄ = ``candidate_factor``·B candidates per mining step.
    """

    #: k: candidates per trained patch (B̄ = k·B). The paper uses 128/32 = 4.
    candidate_factor: int = 4
    #: μ: miner momentum. 0.99 averages over ~100 steps (< half an nnU-Net epoch of 250 steps), the
    #: MoCo-style order of magnitude for nnU-Net's ~250k-step schedule: smooth, yet never more than an
    #: epoch behind the online net. The paper gives no value.
    ema_momentum: float = 0.99
    #: fraction of the B̄ candidates centred on a foreground voxel (paper: 30 %); the rest are uniform.
    candidate_foreground_percent: float = 0.3
    #: ranking error: "dc_ce" (nnU-Net's training loss, default), "dice" (paper), "ce".
    ranking_error: str = "dc_ce"
    #: the miner scores in eval mode: deterministic (no dropout) and it never updates its own BatchNorm
    #: statistics (they come from the online net through the EMA). Instance/GroupNorm behave the same in
    #: both modes, so for nnU-Net's default networks this only matters for dropout/BatchNorm variants.
    miner_train_mode: bool = False
    #: candidates scored per miner forward; None = 2·B. Measured on an H200 (5-stage net, 64³, B=2, k=4):
    #: chunks of B or 2·B both peak at 1.38x plain training's memory (the B̄ batch itself), 2·B is 1.3x
    #: faster; one chunk of B̄ is faster still but peaks at 2x. See docs/ohem.md.
    miner_chunk_size: Optional[int] = None
    #: the miner is the EMAMixin's weight EMA (``self.ema_model``), updated once after every optimiser step:
    #: Algorithm 1's constant μ from w̄_0 = w_0 (no warm-up ramp); validation, ``checkpoint_best`` and the
    #: exported ``network_weights`` are the online net's unless a variant sets the knobs (``_ExportEMA``)
    ema_warmup: bool = False
    ema_validate: bool = False
    ema_select_best: bool = False
    ema_export: bool = False

    #: "crops": B̄ un-augmented centre crops are scored, only the B winners get nnU-Net's augmentation
    #: (nnunetv2_ohem.training.ohem_crops); "augmented": B̄ nnU-Net-augmented patches are scored (k× the
    #: augmentation work). See docs/ohem.md for the measured costs.
    ohem_candidates: str = "crops"
    #: score a copy of the candidates downsampled by this factor (targets resized like nnU-Net's DS targets)
    ohem_score_downsample: int = 1
    #: miner precision: None = training precision (fp16 autocast on CUDA, fp32 elsewhere), "fp32", "bf16"
    #: (CPU and CUDA autocast), "fp16", "auto" = bf16 on a CPU with native bf16, else None
    ohem_score_dtype: Optional[str] = "auto"
    #: rank with nnU-Net's deep-supervision weights over all output scales (False: full-resolution head only)
    ohem_score_deep_supervision: bool = True
    #: miner weights and inputs in channels-last memory layout (same numbers, other kernels)
    ohem_score_channels_last: bool = False
    #: "crops" only: select the next step's winners before this step trains, so that their augmentation in the
    #: worker pool overlaps with the training step instead of being waited for. The winners trained at step t
    #: were then selected by the miner of step t−1 (one EMA update older); the first mining step (and the first
    #: after a resume) selects twice to fill the pipeline. Off: select and train in the same step (Algorithm 1).
    ohem_crops_prefetch: bool = False
    #: every mining step also scores exactly (fp32, full resolution, all heads) and logs the selection recall
    #: |top-h(option) ∩ top-h(exact)| / h as ``ohem_selection_recall`` (costs one more miner pass per step)
    ohem_measure_recall: bool = False
    #: first fraction of the optimiser steps: plain nnU-Net batches (its loader, its foreground oversampling),
    #: no miner forward; the EMA keeps tracking the online net
    ohem_warmup_fraction: float = 0.5
    #: mining stops at this fraction of the optimiser steps (1 = never; Composer's selective backprop: 0.9)
    ohem_end_fraction: float = 0.9
    #: h = round(ohem_hard_fraction·B) of the B trained patches are the hardest candidates, the rest are drawn
    #: uniformly from the other candidates
    ohem_hard_fraction: float = 0.5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.ranking_error not in RANKING_ERRORS:
            raise ValueError(f"{type(self).__name__}.ranking_error must be one of {RANKING_ERRORS}, "
                             f"got {self.ranking_error!r}")
        if int(self.candidate_factor) < 1:
            raise ValueError(f"candidate_factor must be >= 1, got {self.candidate_factor}")
        if self.ohem_candidates not in CANDIDATE_MODES:
            raise ValueError(f"ohem_candidates must be one of {CANDIDATE_MODES}, got {self.ohem_candidates!r}")
        if self.ohem_score_dtype not in SCORE_DTYPES:
            raise ValueError(f"ohem_score_dtype must be one of {SCORE_DTYPES}, got {self.ohem_score_dtype!r}")
        if int(self.ohem_score_downsample) < 1:
            raise ValueError(f"ohem_score_downsample must be >= 1, got {self.ohem_score_downsample}")
        mining_window(1, self.ohem_warmup_fraction, self.ohem_end_fraction)  # validates the fractions
        hard_count(1, self.ohem_hard_fraction)
        self.miner: Optional[torch.nn.Module] = None
        self.winner_augmenter: Optional[WinnerAugmenter] = None
        #: optimiser steps done (warm-up included); checkpointed, drives the schedule
        self.ohem_step = 0
        #: draws the random part of a hard/random selection; its state is checkpointed
        self.ohem_generator = torch.Generator()
        #: crops prefetch: the winners selected one step ahead, being augmented
        self._prefetched = None
        self._disagreement_pending = True
        self._register_log_keys()

    # ------------------------------------------------------------------ setup
    def _register_log_keys(self) -> None:
        """nnU-Net's logger asserts known keys; pad with NaN for epochs logged before (old checkpoints)."""
        logging = self.logger.local_logger.my_fantastic_logging
        n_epochs_logged = len(logging.get("train_losses", []))
        for key in OHEM_LOG_KEYS:
            values = logging.setdefault(key, [])
            values.extend([float("nan")] * (n_epochs_logged - len(values)))

    @property
    def num_candidates(self) -> int:
        return int(self.candidate_factor) * self.batch_size

    @property
    def scoring_options(self) -> ScoringOptions:
        return ScoringOptions(int(self.ohem_score_downsample), resolve_score_dtype(self.ohem_score_dtype,
                                                                                     self.device.type),
                              bool(self.ohem_score_deep_supervision), bool(self.ohem_score_channels_last))

    @property
    def mining_window(self):
        """Optimiser steps ``[start, end)`` that mine, from the fractions and nnU-Net's schedule length."""
        return mining_window(self.num_epochs * self.num_iterations_per_epoch, self.ohem_warmup_fraction,
                             self.ohem_end_fraction)

    def mines_at(self, step: int) -> bool:
        return is_mining_step(step, self.mining_window)

    @property
    def num_hard(self) -> int:
        return hard_count(self.batch_size, self.ohem_hard_fraction)

    def initialize(self):
        super().initialize()
        # w̄_0 = w_0 (Algorithm 1): the miner is the mixin's EMA network, a plain module (no DDP/compile
        # wrapper) that is never trained; every rank computes the same EMA from identical online weights
        self.miner = self.ema_model
        self.miner.train(self.miner_train_mode)
        if self.ohem_score_channels_last:
            self.miner.to(memory_format=self._channels_last_format())
        # compiled like nnU-Net compiles the online net (CUDA, nnUNet_compile); the EMA updates the
        # parameters in place, which the compiled graph reads by reference
        self._miner_forward = torch.compile(self.miner) if self._do_i_compile() else self.miner
        # drawn after the network's initialisation so that seeding torch seeds it without moving the init
        self.ohem_generator.manual_seed(int(torch.randint(0, 2 ** 62, (1,))))
        start, end = self.mining_window
        self.print_to_log_file(
            f"OHEM-EMA: B={self.batch_size}, B̄={self.num_candidates} (k={self.candidate_factor}), "
            f"mu={self.ema_momentum}, candidates={self.ohem_candidates}, candidate foreground fraction="
            f"{self.candidate_foreground_percent}, ranking error={self.ranking_error}, scoring "
            f"{asdict(self.scoring_options)}, miner {'train' if self.miner_train_mode else 'eval'} mode, "
            f"mining steps [{start}, {end}) of {self.num_epochs * self.num_iterations_per_epoch}, hardest "
            f"{self.num_hard} of B, export EMA weights={self.ema_export}")

    def _channels_last_format(self):
        return torch.channels_last_3d if len(self.configuration_manager.patch_size) == 3 else torch.channels_last

    # ------------------------------------------------------------------ loaders
    def get_dataloaders(self):
        """nnU-Net's own loaders (plain batches of B for warm-up/after-mining steps, and validation) plus the
        candidate loader (B̄ per batch), served by one ``dataloader_train`` that follows the schedule.

        Validation is exactly nnU-Net's. nnU-Net's plain training loader is shut down at once when the
        schedule never uses it.
        """
        plain, val = super().get_dataloaders()
        start, end = self.mining_window
        if start == 0 and end >= self.num_epochs * self.num_iterations_per_epoch:
            if hasattr(plain, "_finish"):
                plain._finish()
            plain = None
        return _ScheduledLoader(self, plain, self._build_candidate_loader()), val

    def _build_candidate_loader(self):
        """B̄ candidates per batch with ``candidate_foreground_percent`` foreground forcing, from nnU-Net's own
        sampler, transforms and multi-process augmenter (arguments as nnU-Net's ``get_dataloaders`` builds
        them)."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        ds_scales = self._get_deep_supervision_scales()
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        lm = self.label_manager
        regions = lm.foreground_regions if lm.has_regions else None
        tr_transforms = self.get_training_transforms(
            patch_size, rotation, ds_scales, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=lm.foreground_labels, regions=regions, ignore_label=lm.ignore_label)
        dataset_tr, _ = self.get_tr_and_val_datasets()
        n_proc = get_allowed_n_proc_DA()
        common = dict(oversample_foreground_percent=self.candidate_foreground_percent,
                      sampling_probabilities=None, pad_sides=None,
                      probabilistic_oversampling=self.probabilistic_oversampling)
        if self.ohem_candidates == "augmented":
            loader = nnUNetDataLoader(dataset_tr, self.num_candidates, initial_patch_size, patch_size, lm,
                                      transforms=tr_transforms, **common)
        else:
            # candidates get nnU-Net's validation transforms: target formatting (−1 → 0, regions, DS targets)
            val_transforms = self.get_validation_transforms(ds_scales, is_cascaded=self.is_cascaded,
                                                            foreground_labels=lm.foreground_labels,
                                                            regions=regions, ignore_label=lm.ignore_label)
            loader = CandidateCropLoader(dataset_tr, self.num_candidates, initial_patch_size, patch_size, lm,
                                         transforms=val_transforms, **common)
            self.winner_augmenter = WinnerAugmenter(dataset_tr, tr_transforms, loader.patch_size_was_2d, n_proc)
        if n_proc == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=n_proc,
                                            num_cached=max(6, n_proc // 2), seeds=None,
                                            pin_memory=self.device.type == "cuda", wait_time=0.002)

    # ------------------------------------------------------------------ scoring: the one hook
    def _ds_weights(self, options: ScoringOptions) -> Optional[List[float]]:
        if isinstance(self.loss, DeepSupervisionWrapper) and options.deep_supervision:
            return list(self.loss.weight_factors)
        return None

    def _score_autocast(self, dtype: Optional[str]):
        if dtype is None:  # training precision: nnU-Net autocasts (fp16) on CUDA only
            return torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()
        if dtype == "fp32":
            return dummy_context()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)

    def candidate_errors(self, outputs: Union[torch.Tensor, List[torch.Tensor]],
                         targets: Union[torch.Tensor, List[torch.Tensor]],
                         ds_weights: Optional[Sequence[float]]) -> torch.Tensor:
        """Per-patch ranking error of miner outputs (one tensor, or one per deep-supervision scale with
        matching targets and weights), shape (N,) fp32. Subclasses swap only this (e.g. the blob loss)."""
        regions, ignore = self.label_manager.has_regions, self.label_manager.ignore_label
        return per_sample_error(outputs, targets, self.ranking_error, regions=regions, ds_weights=ds_weights,
                                ignore_label=None if regions else ignore,
                                has_ignore_channel=regions and ignore is not None)

    def score_candidates(self, data: torch.Tensor, target: Union[torch.Tensor, List[torch.Tensor]],
                         options: Optional[ScoringOptions] = None) -> torch.Tensor:
        """Per-candidate ranking error under the miner, shape (B̄,), fp32: the one scoring hook of every OHEM
        trainer. Scores in chunks of ``miner_chunk_size`` under ``options`` (default: the class attributes):
        precision, resolution (downsampled copy, targets resized nearest-exact), deep-supervision heads or
        the full-resolution head only, memory layout; the error itself is :meth:`candidate_errors`."""
        opts = options or self.scoring_options
        chunk = self.miner_chunk_size or 2 * self.batch_size
        weights = self._ds_weights(opts)
        decoder = getattr(self.miner, "decoder", None)
        if decoder is not None and hasattr(decoder, "deep_supervision"):
            decoder.deep_supervision = self.enable_deep_supervision and opts.deep_supervision
        full_res = target[0] if isinstance(target, list) else target
        stride = self._total_stride(data.ndim - 2) if opts.downsample > 1 else None
        errors = []
        self.miner.train(self.miner_train_mode)
        with torch.inference_mode():
            for start in range(0, data.shape[0], chunk):
                sl = slice(start, start + chunk)
                x = data[sl]
                if opts.downsample > 1:
                    x = downsample_images(x, opts.downsample)
                    unpadded = x.shape[2:]
                    x = pad_to_multiple(x, stride)
                if opts.channels_last:
                    x = x.contiguous(memory_format=self._channels_last_format())
                with self._score_autocast(opts.dtype):
                    out = self._miner_forward(x)
                if opts.downsample > 1:
                    out = crop_outputs(out, unpadded, x.shape[2:])
                if isinstance(out, (list, tuple)) and weights is not None:
                    outs = list(out)
                    tgts = targets_for_outputs(outs, full_res[sl]) if opts.downsample > 1 or \
                        not isinstance(target, list) else [t[sl] for t in target]
                    w = weights
                else:  # full-resolution head only
                    outs = out[0] if isinstance(out, (list, tuple)) else out
                    tgts = targets_for_outputs(outs, full_res[sl])[0]
                    w = None
                errors.append(self.candidate_errors(outs, tgts, w))
        return torch.cat(errors).clone()

    def _total_stride(self, ndim: int):
        """Input sizes the network needs to be divisible by: the plan's pooling strides (the paper U-Net's
        plans carry none: it pools twice by 2)."""
        try:
            return total_stride(self.configuration_manager.pool_op_kernel_sizes, ndim)
        except KeyError:
            return (4,) * ndim

    def compute_candidate_errors(self, data: torch.Tensor, target: Union[torch.Tensor, List[torch.Tensor]]
                                 ) -> torch.Tensor:
        """Former name of :meth:`score_candidates` (kept for scripts)."""
        return self.score_candidates(data, target)

    def _disagreement(self, data: torch.Tensor) -> float:
        """Mean |p_miner − p_online| of the full-resolution probabilities on the selected patches, both nets
        in the miner's norm mode (eval by default, so the online net's BatchNorm statistics stay untouched;
        its mode is restored afterwards)."""
        online = unwrap_model(self.network)
        was_training = online.training
        online.train(self.miner_train_mode)
        try:
            with torch.inference_mode():
                with self._score_autocast(None):
                    a, b = self.miner(data), online(data)
        finally:
            online.train(was_training)
        with torch.inference_mode():
            a = (a[0] if isinstance(a, (list, tuple)) else a).float()
            b = (b[0] if isinstance(b, (list, tuple)) else b).float()
            act = torch.sigmoid if self.label_manager.has_regions else (lambda z: torch.softmax(z, 1))
            return float((act(a) - act(b)).abs().mean())

    # ------------------------------------------------------------------ steps
    def _plain_step(self, batch: dict) -> dict:
        """Warm-up / after-mining step: nnU-Net's batch and train step, no miner forward; the EMA tracks
        (the mixin's ``train_step`` updates it after nnU-Net's)."""
        self._prefetched = None  # winners prefetched by the last mining step are not trained
        result = super().train_step(batch)
        result.update({k: float("nan") for k in OHEM_LOG_KEYS})
        result["ohem_mining_fraction"] = 0.0
        return result

    def train_step(self, batch: dict) -> dict:
        """One optimiser step. ``batch`` is ``next(self.dataloader_train)``: B̄ candidates on mining steps,
        nnU-Net's plain batch otherwise."""
        mining = self.mines_at(self.ohem_step)
        result = self._mining_step(batch) if mining else self._plain_step(batch)
        self.ohem_step += 1
        return result

    def _select(self, batch: dict):
        """Score a candidate batch and select: (data, target, errors, indices, recall) on the device."""
        data, target = batch["data"], batch["target"]
        data = data.to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)

        errors = self.score_candidates(data, target)
        b = min(self.batch_size, data.shape[0])
        n_hard = min(self.num_hard, b)
        idx = select_hard_and_random(errors, b, n_hard, self.ohem_generator)
        recall = float("nan")
        if self.ohem_measure_recall and n_hard > 0:
            exact = self.score_candidates(data, target, EXACT_SCORING)
            recall = selection_recall(select_top_b(errors, n_hard), select_top_b(exact, n_hard))
        return data, target, errors, idx, recall

    def _winners(self, batch: dict, idx: torch.Tensor):
        picks = idx.cpu().tolist()
        return self.winner_augmenter.submit([batch["keys"][i] for i in picks], [batch["bboxes"][i] for i in picks])

    def _mining_step(self, batch: dict) -> dict:
        data, target, errors, idx, recall = self._select(batch)
        disagreement = self._disagreement(data[idx]) if self._disagreement_pending else float("nan")
        self._disagreement_pending = False

        if "bboxes" in batch and self.ohem_crops_prefetch:
            # this batch's winners are trained next step; train on those selected one step ago
            if self._prefetched is None:  # pipeline empty: train these winners now, select the next ones
                trained = self._winners(batch, idx).result()
                extra = next(self.dataloader_train.candidates)
                self._prefetched = self._winners(extra, self._select(extra)[3])
            else:  # submit first, so the pool can start on them while the previous ones finish
                upcoming = self._winners(batch, idx)
                trained = self._prefetched.result()
                self._prefetched = upcoming
        elif "bboxes" in batch:  # crops: only the winners get nnU-Net's augmentation
            trained = self._winners(batch, idx).result()
        else:
            trained = {"data": data[idx], "target": [t[idx] for t in target] if isinstance(target, list)
                       else target[idx]}
        result = super().train_step(trained)  # the mixin's: nnU-Net's step, then one EMA update

        regions, ignore = self.label_manager.has_regions, self.label_manager.ignore_label
        fg = has_foreground(target[0] if isinstance(target, list) else target, regions,
                            None if regions else ignore, regions and ignore is not None).float()
        # one host transfer for all diagnostics (each float() would be a device sync)
        stats = torch.stack([errors.mean(), errors[idx].mean(), fg.mean(), fg[idx].mean()]).tolist()
        result.update(dict(zip(OHEM_LOG_KEYS[:4], stats)))
        result.update(ohem_miner_online_disagreement=disagreement, ohem_mining_fraction=1.0,
                      ohem_selection_recall=recall)
        self.last_selection = {"errors": errors.detach().cpu(), "indices": idx.cpu(), "trained": trained}
        return result

    # ------------------------------------------------------------------ epochs and logging
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._disagreement_pending = True

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        for key in OHEM_LOG_KEYS:
            values = np.asarray([o[key] for o in train_outputs], dtype=float)
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, values)
                values = np.concatenate(gathered)
            value = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
            self.logger.log(key, value, self.current_epoch)
        self.print_to_log_file(
            "OHEM error candidates/selected: {:.4f}/{:.4f}, foreground fraction candidates/selected: "
            "{:.3f}/{:.3f}, miner-online disagreement: {:.4g}, steps mined: {:.0%}, selection recall: {:.3f}"
            .format(*[self.logger.get_value(k, step=-1) for k in OHEM_LOG_KEYS]))

    def on_train_end(self):
        super().on_train_end()
        # nnU-Net only shuts down loaders that are batchgenerators augmenters; ours wraps two and a pool
        if isinstance(self.dataloader_train, _ScheduledLoader):
            self.dataloader_train._finish()

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation on chunks of B (validation batches are nnU-Net's own B; larger ones, e.g. from
        scripts, are split): tp/fp/fn summed, loss averaged."""
        n, chunk = batch["data"].shape[0], self.batch_size
        if n <= chunk:
            return super().validation_step(batch)
        outs = []
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            tgt = batch["target"]
            outs.append(super().validation_step({
                "data": batch["data"][sl],
                "target": [t[sl] for t in tgt] if isinstance(tgt, list) else tgt[sl]}))
        return {"loss": np.mean([o["loss"] for o in outs]),
                **{k: np.sum([o[k] for o in outs], 0) for k in ("tp_hard", "fp_hard", "fn_hard")}}

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.local_rank == 0:
            self._write_diagnostics()

    def _settings(self) -> dict:
        start, end = self.mining_window
        return {"candidate_factor": int(self.candidate_factor), "ema_momentum": self.ema_momentum,
                "ranking_error": self.ranking_error, "candidate_foreground_percent": self.candidate_foreground_percent,
                "candidates": self.ohem_candidates, "scoring": asdict(self.scoring_options),
                "warmup_fraction": self.ohem_warmup_fraction, "end_fraction": self.ohem_end_fraction,
                "hard_fraction": self.ohem_hard_fraction, "mining_start_step": start, "mining_end_step": end,
                "num_hard": self.num_hard}

    def _write_diagnostics(self) -> None:
        """``ohem_diagnostics.json`` (per-epoch values, for the demo) and ``ohem_progress.png`` next to
        nnU-Net's ``progress.png``; both written to a temp name and renamed (:mod:`..ohem_diagnostics`)."""
        diag = diagnostics.diagnostics_from_log(
            self.logger.local_logger.my_fantastic_logging, trainer=type(self).__name__, batch_size=self.batch_size,
            num_candidates=self.num_candidates, **self._settings())
        diagnostics.write_diagnostics(self.output_folder, diag)

    # ------------------------------------------------------------------ checkpoints
    def _ohem_state(self) -> dict:
        return {"ohem_step": int(self.ohem_step), "generator_state": self.ohem_generator.get_state(),
                **self._settings()}

    def checkpoint_extras(self) -> dict:
        """``ohem_ema``: schedule position, selection RNG, settings; the miner weights are the mixin's
        ``weight_ema`` entry, written in the same atomic save."""
        return {**super().checkpoint_extras(), "ohem_ema": self._ohem_state()}

    def load_checkpoint_extras(self, checkpoint: dict) -> None:
        super().load_checkpoint_extras(checkpoint)
        state = checkpoint.get("ohem_ema") or {}
        # older checkpoints and plain nnU-Net ones: nnU-Net checkpoints at epoch ends, so the step is the epoch's first
        self.ohem_step = int(state.get("ohem_step", self.current_epoch * self.num_iterations_per_epoch))
        if "generator_state" in state:
            self.ohem_generator.set_state(state["generator_state"].cpu())
        self._prefetched = None  # not checkpointed: the first mining step after a resume refills the pipeline
        self._register_log_keys()


class nnUNetTrainerOHEM(nnUNetTrainerOHEMEMA):
    """Classic OHEM (Shrivastava et al. 2016): μ = 0, the miner is the online network itself."""
    ema_momentum = 0.0


class nnUNetTrainerOHEMEMA_CE(nnUNetTrainerOHEMEMA):
    """Rank candidates by cross-entropy only (tests the paper's suspicion that Dice ranking hurts)."""
    ranking_error = "ce"


class nnUNetTrainerOHEMEMA_DiceMining(nnUNetTrainerOHEMEMA):
    """Rank candidates by the soft Dice error (the paper's mining error), train with nnU-Net's DC+CE."""
    ranking_error = "dice"


class nnUNetTrainerOHEMEMA_ExportEMA(nnUNetTrainerOHEMEMA):
    """As nnUNetTrainerOHEMEMA, but checkpoints carry the EMA weights as ``network_weights`` so stock
    ``nnUNetv2_predict`` predicts with the smoothed model; the final validation (and its lesion-wise summary)
    scores that same model, so ``validation/`` describes what is exported."""
    ema_export = True
    ema_validate = True


class nnUNetTrainerOHEMEMA_Classic(nnUNetTrainerOHEMEMA):
    """The first version of this trainer: B̄ nnU-Net-augmented candidates, every step mines, top-B only."""
    ohem_candidates = "augmented"
    ohem_warmup_fraction = 0.0
    ohem_end_fraction = 1.0
    ohem_hard_fraction = 1.0


class nnUNetTrainerOHEMEMA_NoSchedule(nnUNetTrainerOHEMEMA):
    """Cheap candidates (crops) but Algorithm 1's schedule: every step mines, all B trained patches the hardest."""
    ohem_warmup_fraction = 0.0
    ohem_end_fraction = 1.0
    ohem_hard_fraction = 1.0


def step_fraction_lr(step: int, max_steps: int, initial_lr: float, milestones=(0.5, 0.8),
                     gamma: float = 0.1) -> float:
    """``lr = lr0 · γ^m`` where m = number of milestones (fractions of ``max_steps``) already reached."""
    reached = sum(step >= m * max_steps for m in milestones)
    return initial_lr * gamma ** reached


class StepFractionLRScheduler(EpochFunctionLRScheduler):
    """:func:`step_fraction_lr` per epoch.

    The paper: 1e-3, ×0.1 at 50 % and again at 80 % of training. ``step(current_step)`` like nnU-Net's
    ``PolyLRScheduler`` (called once per epoch with the epoch index).
    """

    def __init__(self, optimizer, initial_lr: float, max_steps: int, milestones=(0.5, 0.8), gamma: float = 0.1,
                 current_step: Optional[int] = None):
        self.initial_lr, self.max_steps, self.milestones, self.gamma = initial_lr, max_steps, tuple(milestones), gamma
        super().__init__(optimizer, current_step=current_step)

    def lr_at(self, step: int) -> float:
        return step_fraction_lr(step, self.max_steps, self.initial_lr, self.milestones, self.gamma)


@trainer_settings(initial_lr=1e-3, weight_decay=0.0, num_epochs=120, enable_deep_supervision=False)
class nnUNetTrainerOHEMEMA_Paper(nnUNetTrainerOHEMEMA):
    """Paper-exact configuration: paper U-Net (B16-32-64, GroupNorm+ReLU, upsampling), Dice loss for mining
    and training, B̄ = 4·B (128/32 with the paper plans), 30 % foreground candidates, Adam 1e-3 → 1e-4 at
    50 % → 1e-5 at 80 %, 120 epochs × 250 steps = the paper's 30k OHEM iterations, no deep supervision.

    Plans: ``nnunetv2_ohem_plan paper -d ID`` (0.5 mm, per-image z-score, 32³ patch, batch 32), then
    ``nnUNetv2_train ID 3d_fullres FOLD -tr nnUNetTrainerOHEMEMA_Paper -p nnUNetPaperPlans`` and predict
    with ``-step_size 0.75`` (patch 32, stride 24, averaged overlaps).
    """
    ranking_error = "dice"
    candidate_factor = 4
    candidate_foreground_percent = 0.3
    # Algorithm 1 as published: every step mines, all B trained patches are the hardest, exact scoring; its
    # ``sample_patches`` draws candidates without augmentation, i.e. candidate mode "crops"
    ohem_candidates = "crops"
    ohem_warmup_fraction = 0.0
    ohem_end_fraction = 1.0
    ohem_hard_fraction = 1.0
    ohem_score_downsample = 1
    ohem_score_dtype = None
    ohem_score_deep_supervision = True

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> torch.nn.Module:
        """Always the paper U-Net; its features/groups come from the plans when they select it."""
        kwargs = {}
        if configuration_manager.network_arch_class_name == PAPER_UNET_CLASS:
            kwargs = {k: v for k, v in configuration_manager.network_arch_init_kwargs.items()
                      if k in ("features_per_stage", "num_groups")}
        return PaperUNet(num_input_channels, num_output_channels, dim=len(configuration_manager.patch_size),
                         deep_supervision=enable_deep_supervision, **kwargs)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, StepFractionLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def _build_loss(self):
        regions = self.label_manager.has_regions
        return MemoryEfficientSoftDiceLoss(apply_nonlin=torch.sigmoid if regions else softmax_helper_dim1,
                                           batch_dice=self.configuration_manager.batch_dice,
                                           do_bg=regions, smooth=1e-5, ddp=self.is_ddp)


nnUNetTrainerOHEMEMA_Debug = debug_variant(nnUNetTrainerOHEMEMA)
nnUNetTrainerOHEM_Debug = debug_variant(nnUNetTrainerOHEM)
nnUNetTrainerOHEMEMA_CE_Debug = debug_variant(nnUNetTrainerOHEMEMA_CE)
nnUNetTrainerOHEMEMA_DiceMining_Debug = debug_variant(nnUNetTrainerOHEMEMA_DiceMining)
nnUNetTrainerOHEMEMA_ExportEMA_Debug = debug_variant(nnUNetTrainerOHEMEMA_ExportEMA)
nnUNetTrainerOHEMEMA_Classic_Debug = debug_variant(nnUNetTrainerOHEMEMA_Classic)
nnUNetTrainerOHEMEMA_NoSchedule_Debug = debug_variant(nnUNetTrainerOHEMEMA_NoSchedule)
nnUNetTrainerOHEMEMA_Paper_Debug = debug_variant(nnUNetTrainerOHEMEMA_Paper)
