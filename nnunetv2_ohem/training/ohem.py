"""OHEM-EMA trainers: online hard example mining with a momentum (EMA) miner inside stock nnU-Net.

Schmidt-Mengin et al., "Segmentation of new MS lesions on FLAIR MRI using online hard example mining"
(MSSEG-II 2021), Algorithm 1, per training step:

1. draw B̄ = k·B candidate patches (a fraction of them centred on foreground, the rest uniform);
2. the miner UNet̄ (EMA of the online net) predicts them without gradients, ``e_i = error(UNet̄(x_i), y_i)``;
3. the online net does one optimiser step on the B candidates with the highest error;
4. ``w̄ ← μ·w̄ + (1−μ)·w`` (parameters and buffers). μ = 0 is classic OHEM.

The trainers are thin: nnU-Net's data loader produces the B̄ augmented candidates in ONE batch (its batch
size is set to B̄), ``train_step`` scores and selects, then hands the selected sub-batch (data and every
deep-supervision target) to nnU-Net's own ``train_step``. Everything else (network, augmentation, loss,
poly LR, validation, inference) stays nnU-Net's. Knobs are class attributes; subclass to change them.
See ``docs/ohem.md``.
"""
import copy
import json
import math
import os
import warnings
from typing import List, Optional, Union

import numpy as np
import torch
from torch import distributed as dist

from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context, softmax_helper_dim1
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_ohem.mining import (RANKING_ERRORS, ema_update_, has_foreground, per_sample_error, select_top_b,
                                  unwrap_model)
from nnunetv2_ohem.networks.paper_unet import PAPER_UNET_CLASS, PaperUNet
from nnunetv2_ohem.training.common import with_training_length

#: per-epoch diagnostics, registered in nnU-Net's logger (one value per epoch each)
OHEM_LOG_KEYS = ("ohem_error_candidates", "ohem_error_selected", "ohem_fg_fraction_candidates",
                 "ohem_fg_fraction_selected", "ohem_miner_online_disagreement")


class nnUNetTrainerOHEMEMA(nnUNetTrainer):
    """OHEM with an EMA miner on top of stock nnU-Net (its network, plans, augmentation, DC+CE, poly LR).

    B = the plan's batch size (per GPU under DDP), B̄ = ``candidate_factor``·B candidates per step.
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
    #: rank with nnU-Net's deep-supervision weights over all output scales (False: full resolution only).
    mining_deep_supervision: bool = True
    #: the miner scores in eval mode: deterministic (no dropout) and it never updates its own BatchNorm
    #: statistics (they come from the online net through the EMA). Instance/GroupNorm behave the same in
    #: both modes, so for nnU-Net's default networks this only matters for dropout/BatchNorm variants.
    miner_train_mode: bool = False
    #: candidates scored per miner forward; None = 2·B. Measured on an H200 (5-stage net, 64³, B=2, k=4):
    #: chunks of B or 2·B both peak at 1.38x plain training's memory (the B̄ batch itself), 2·B is 1.3x
    #: faster; one chunk of B̄ is faster still but peaks at 2x. See docs/ohem.md.
    miner_chunk_size: Optional[int] = None
    #: write the EMA (miner) weights as the checkpoint's ``network_weights`` so stock nnUNetv2_predict
    #: uses the smoothed model (the online weights are kept in the checkpoint for ``--c``).
    export_ema_weights: bool = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.ranking_error not in RANKING_ERRORS:
            raise ValueError(f"{type(self).__name__}.ranking_error must be one of {RANKING_ERRORS}, "
                             f"got {self.ranking_error!r}")
        if int(self.candidate_factor) < 1:
            raise ValueError(f"candidate_factor must be >= 1, got {self.candidate_factor}")
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1], got {self.ema_momentum}")
        self.miner: Optional[torch.nn.Module] = None
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

    def initialize(self):
        super().initialize()
        # w̄_0 = w_0 (Algorithm 1); the miner is a plain module (no DDP/compile wrapper): it is never
        # trained, and every rank computes the same EMA from identical online weights.
        self.miner = copy.deepcopy(unwrap_model(self.network)).requires_grad_(False)
        self.miner.train(self.miner_train_mode)
        if hasattr(self.miner, "decoder") and hasattr(self.miner.decoder, "deep_supervision"):
            self.miner.decoder.deep_supervision = self.enable_deep_supervision and self.mining_deep_supervision
        # compiled like nnU-Net compiles the online net (CUDA, nnUNet_compile); the EMA updates the
        # parameters in place, which the compiled graph reads by reference
        self._miner_forward = torch.compile(self.miner) if self._do_i_compile() else self.miner
        self.print_to_log_file(
            f"OHEM-EMA: B={self.batch_size}, B̄={self.num_candidates} (k={self.candidate_factor}), "
            f"mu={self.ema_momentum}, candidate foreground fraction={self.candidate_foreground_percent}, "
            f"ranking error={self.ranking_error}, miner {'train' if self.miner_train_mode else 'eval'} mode, "
            f"export EMA weights={self.export_ema_weights}")

    def get_dataloaders(self):
        """nnU-Net's loaders, but each batch holds B̄ candidates with the candidate foreground fraction.

        One augmented batch of B̄ instead of k loader calls keeps nnU-Net's multi-process pipeline busy with
        one request per step. Validation batches are B̄ too (scored in chunks of B), so the number of
        validation iterations is divided by k to keep the number of validation patches unchanged.
        """
        saved = self.batch_size, self.oversample_foreground_percent
        self.batch_size, self.oversample_foreground_percent = self.num_candidates, self.candidate_foreground_percent
        try:
            loaders = super().get_dataloaders()
        finally:
            self.batch_size, self.oversample_foreground_percent = saved
        self.num_val_iterations_per_epoch = max(1, math.ceil(self.num_val_iterations_per_epoch
                                                             / int(self.candidate_factor)))
        return loaders

    # ------------------------------------------------------------------ mining
    def _ds_weights(self) -> Optional[List[float]]:
        if isinstance(self.loss, DeepSupervisionWrapper) and self.mining_deep_supervision:
            return list(self.loss.weight_factors)
        return None

    def compute_candidate_errors(self, data: torch.Tensor, target: Union[torch.Tensor, List[torch.Tensor]]
                                 ) -> torch.Tensor:
        """Per-candidate ranking error under the miner, shape (B̄,), float32, scored in chunks."""
        chunk = self.miner_chunk_size or 2 * self.batch_size
        regions = self.label_manager.has_regions
        ignore = self.label_manager.ignore_label
        weights = self._ds_weights()
        errors = []
        self.miner.train(self.miner_train_mode)
        with torch.inference_mode():
            for start in range(0, data.shape[0], chunk):
                sl = slice(start, start + chunk)
                with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" \
                        else dummy_context():
                    out = self._miner_forward(data[sl])
                if isinstance(out, (list, tuple)) and isinstance(target, list):
                    outs, tgts = list(out), [t[sl] for t in target]
                else:
                    outs = out[0] if isinstance(out, (list, tuple)) else out
                    tgts = target[0][sl] if isinstance(target, list) else target[sl]
                    weights = None
                errors.append(per_sample_error(outs, tgts, self.ranking_error, regions=regions,
                                               ds_weights=weights,
                                               ignore_label=None if regions else ignore,
                                               has_ignore_channel=regions and ignore is not None))
        return torch.cat(errors).clone()

    def _disagreement(self, data: torch.Tensor) -> float:
        """Mean |p_miner − p_online| of the full-resolution probabilities on the selected patches, both nets
        in the miner's norm mode (eval by default, so the online net's BatchNorm statistics stay untouched;
        its mode is restored afterwards)."""
        online = unwrap_model(self.network)
        was_training = online.training
        online.train(self.miner_train_mode)
        try:
            with torch.inference_mode():
                with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" \
                        else dummy_context():
                    a, b = self.miner(data), online(data)
        finally:
            online.train(was_training)
        with torch.inference_mode():
            a = (a[0] if isinstance(a, (list, tuple)) else a).float()
            b = (b[0] if isinstance(b, (list, tuple)) else b).float()
            act = torch.sigmoid if self.label_manager.has_regions else (lambda z: torch.softmax(z, 1))
            return float((act(a) - act(b)).abs().mean())

    def train_step(self, batch: dict) -> dict:
        data, target = batch["data"], batch["target"]
        data = data.to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)

        errors = self.compute_candidate_errors(data, target)
        idx = select_top_b(errors, min(self.batch_size, data.shape[0]))
        selected_data = data[idx]
        selected_target = [t[idx] for t in target] if isinstance(target, list) else target[idx]
        disagreement = self._disagreement(selected_data) if self._disagreement_pending else float("nan")
        self._disagreement_pending = False

        result = super().train_step({"data": selected_data, "target": selected_target})
        ema_update_(self.miner, self.network, self.ema_momentum)

        regions, ignore = self.label_manager.has_regions, self.label_manager.ignore_label
        fg = has_foreground(target[0] if isinstance(target, list) else target, regions,
                            None if regions else ignore, regions and ignore is not None).float()
        # one host transfer for all diagnostics (each float() would be a device sync)
        stats = torch.stack([errors.mean(), errors[idx].mean(), fg.mean(), fg[idx].mean()]).tolist()
        result.update(dict(zip(OHEM_LOG_KEYS[:4], stats)))
        result["ohem_miner_online_disagreement"] = disagreement
        self.last_selection = {"errors": errors.detach().cpu(), "indices": idx.cpu()}
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
            "{:.3f}/{:.3f}, miner-online disagreement: {:.4g}".format(
                *[self.logger.get_value(k, step=-1) for k in OHEM_LOG_KEYS]))

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation on chunks of B of the B̄-patch batch: tp/fp/fn summed, loss averaged."""
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

    def _write_diagnostics(self) -> None:
        """``ohem_diagnostics.json`` (per-epoch values, for the demo) and ``ohem_progress.png`` next to
        nnU-Net's ``progress.png``; both written to a temp name and renamed."""
        logging = self.logger.local_logger.my_fantastic_logging
        n = min(len(logging[k]) for k in OHEM_LOG_KEYS)
        diag = {k: [None if not np.isfinite(v) else float(v) for v in logging[k][:n]] for k in OHEM_LOG_KEYS}
        diag.update({"epoch": list(range(n)), "trainer": type(self).__name__,
                     "candidate_factor": int(self.candidate_factor), "ema_momentum": self.ema_momentum,
                     "ranking_error": self.ranking_error, "batch_size": self.batch_size,
                     "num_candidates": self.num_candidates})
        path = os.path.join(self.output_folder, "ohem_diagnostics.json")
        with open(path + ".part", "w") as f:
            json.dump(diag, f, indent=1)
        os.replace(path + ".part", path)
        plot_ohem_diagnostics(diag, os.path.join(self.output_folder, "ohem_progress.png"))

    # ------------------------------------------------------------------ checkpoints
    def _ohem_state(self) -> dict:
        return {"miner_weights": unwrap_model(self.miner).state_dict(), "ema_momentum": self.ema_momentum,
                "candidate_factor": int(self.candidate_factor), "ranking_error": self.ranking_error,
                "candidate_foreground_percent": self.candidate_foreground_percent,
                "weights_exported": bool(self.export_ema_weights)}

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus ``ohem_ema`` (miner weights, mining settings); written under a temp name
        and renamed so a hard kill never leaves a checkpoint without miner state."""
        if self.local_rank != 0 or self.disable_checkpointing or self.miner is None:
            return super().save_checkpoint(filename)
        tmp = filename + ".part"
        super().save_checkpoint(tmp)
        checkpoint = torch.load(tmp, map_location="cpu", weights_only=False)
        state = self._ohem_state()
        if self.export_ema_weights:
            state["online_weights"] = checkpoint["network_weights"]
            checkpoint["network_weights"] = state["miner_weights"]
        checkpoint["ohem_ema"] = state
        torch.save(checkpoint, tmp)
        os.replace(tmp, filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        state = checkpoint.get("ohem_ema")
        online = unwrap_model(self.network)
        if state is None:
            warnings.warn(f"{filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else 'checkpoint'} "
                          f"has no OHEM miner state: initialising the miner from the online weights")
            self.print_to_log_file("WARNING: checkpoint without OHEM miner state; miner := online network")
            self.miner.load_state_dict(online.state_dict())
        else:
            if "online_weights" in state:
                online.load_state_dict(state["online_weights"])
            self.miner.load_state_dict(state["miner_weights"])
        self._register_log_keys()


def plot_ohem_diagnostics(diag: dict, path: str) -> None:
    """Two panels: mean ranking error of selected vs all candidates, and foreground fraction of selected vs
    candidates (with miner–online disagreement on a twin axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def arr(key):
        return np.array([np.nan if v is None else v for v in diag[key]], dtype=float)

    epochs = np.asarray(diag["epoch"])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    ax1.plot(epochs, arr("ohem_error_candidates"), "b-", label="all candidates")
    ax1.plot(epochs, arr("ohem_error_selected"), "r-", label="selected (top-B)")
    ax1.set_ylabel(f"ranking error ({diag.get('ranking_error', '')})")
    ax1.legend(loc="upper right")
    ax2.plot(epochs, arr("ohem_fg_fraction_candidates"), "b--", label="fg fraction, candidates")
    ax2.plot(epochs, arr("ohem_fg_fraction_selected"), "r--", label="fg fraction, selected")
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_ylabel("fraction of patches with foreground")
    ax2.set_xlabel("epoch")
    ax3 = ax2.twinx()
    ax3.plot(epochs, arr("ohem_miner_online_disagreement"), "g-", label="miner-online disagreement")
    ax3.set_ylabel("mean |p_miner - p_online|")
    lines = ax2.get_legend_handles_labels(), ax3.get_legend_handles_labels()
    ax2.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], loc="upper right")
    fig.suptitle(f"{diag.get('trainer', 'OHEM')}: k={diag.get('candidate_factor')}, "
                 f"mu={diag.get('ema_momentum')}")
    fig.tight_layout()
    tmp = path + ".part.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


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
    ``nnUNetv2_predict`` predicts with the smoothed model."""
    export_ema_weights = True


class StepFractionLRScheduler(torch.optim.lr_scheduler.LRScheduler):
    """``lr = lr0 · γ^m`` where m = number of milestones (fractions of ``max_steps``) already reached.

    The paper: 1e-3, ×0.1 at 50 % and again at 80 % of training. ``step(current_step)`` like nnU-Net's
    ``PolyLRScheduler`` (called once per epoch with the epoch index).
    """

    def __init__(self, optimizer, initial_lr: float, max_steps: int, milestones=(0.5, 0.8), gamma: float = 0.1,
                 current_step: Optional[int] = None):
        self.initial_lr, self.max_steps, self.milestones, self.gamma = initial_lr, max_steps, tuple(milestones), gamma
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def lr_at(self, step: int) -> float:
        reached = sum(step >= m * self.max_steps for m in self.milestones)
        return self.initial_lr * self.gamma ** reached

    def step(self, current_step: Optional[int] = None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(current_step)


class nnUNetTrainerOHEMEMA_Paper(nnUNetTrainerOHEMEMA):
    """Seed-exact configuration: paper U-Net (B16-32-64, GroupNorm+ReLU, upsampling), Dice loss for mining
    and training, B̄ = 4·B (128/32 with the paper plans), 30 % foreground candidates, Adam 1e-3 → 1e-4 at
    50 % → 1e-5 at 80 %, 120 epochs × 250 steps = the paper's 30k OHEM iterations, no deep supervision.

    Plans: ``nnunetv2_ohem_plan paper -d ID`` (0.5 mm, per-image z-score, 32³ patch, batch 32), then
    ``nnUNetv2_train ID 3d_fullres FOLD -tr nnUNetTrainerOHEMEMA_Paper -p nnUNetPaperPlans`` and predict
    with ``-step_size 0.75`` (patch 32, stride 24, averaged overlaps).
    """
    ranking_error = "dice"
    candidate_factor = 4
    candidate_foreground_percent = 0.3

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3
        self.weight_decay = 0.0
        self.num_epochs = 120
        self.enable_deep_supervision = False

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


nnUNetTrainerOHEMEMA_Debug = with_training_length(nnUNetTrainerOHEMEMA, "nnUNetTrainerOHEMEMA_Debug", 2, 5, 2)
nnUNetTrainerOHEM_Debug = with_training_length(nnUNetTrainerOHEM, "nnUNetTrainerOHEM_Debug", 2, 5, 2)
nnUNetTrainerOHEMEMA_CE_Debug = with_training_length(nnUNetTrainerOHEMEMA_CE, "nnUNetTrainerOHEMEMA_CE_Debug",
                                                     2, 5, 2)
nnUNetTrainerOHEMEMA_DiceMining_Debug = with_training_length(
    nnUNetTrainerOHEMEMA_DiceMining, "nnUNetTrainerOHEMEMA_DiceMining_Debug", 2, 5, 2)
nnUNetTrainerOHEMEMA_ExportEMA_Debug = with_training_length(
    nnUNetTrainerOHEMEMA_ExportEMA, "nnUNetTrainerOHEMEMA_ExportEMA_Debug", 2, 5, 2)
nnUNetTrainerOHEMEMA_Paper_Debug = with_training_length(nnUNetTrainerOHEMEMA_Paper,
                                                        "nnUNetTrainerOHEMEMA_Paper_Debug", 2, 5, 2)
