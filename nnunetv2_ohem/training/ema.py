"""Weight EMA for any nnU-Net trainer: ``EMAMixin`` and ``nnUNetTrainerEMA`` (plain nnU-Net + EMA weights).

After every optimiser step the mixin updates an exponential moving average of the online network's weights,
``w̄ ← μ_t·w̄ + (1−μ_t)·w`` over parameters and floating buffers (integer buffers copied), with the pure
functions of :mod:`nnunetv2_ohem.mining.ema` (foreach ops, DDP/``torch.compile`` unwrapped). The average can
be used for the per-epoch validation (hence nnU-Net's pseudo-Dice and ``checkpoint_best``), for the final
validation, and as the checkpoints' ``network_weights`` so stock ``nnUNetv2_predict`` predicts with it; the
online weights stay in the checkpoint so ``--c`` resumes exactly. Memory: one extra copy of the weights.

Compose with any trainer by putting the mixin first::

    class MyTrainer(EMAMixin, nnUNetTrainerBlobLoss):
        ema_momentum = 0.999

OHEM-EMA's miner is the same average: a trainer that inherits the mixin mines with ``ema_model``
(constant μ, no warm-up, online weights for validation and export unless it sets the knobs). See ``docs/ema.md``.
"""
import contextlib
import copy
import warnings
from typing import Iterator, Optional, Union

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_ohem.atomic import atomic_path
from nnunetv2_ohem.mining.ema import PairedTensors, ema_momentum_at, ema_update_pairs_, pair_tensors, swap_weights_, \
    unwrap_model
from nnunetv2_ohem.training import precision
from nnunetv2_ohem.training.blob import nnUNetTrainerBlobLoss
from nnunetv2_ohem.training.common import debug_variant
from nnunetv2_ohem.training.lesion_validation import LesionValidationMixin

#: checkpoint entry holding the EMA state (weights, momentum, number of updates, online weights if exported)
EMA_CHECKPOINT_KEY = "weight_ema"
#: the entry OHEM-EMA checkpoints used before the mixin (``miner_weights``/``online_weights``); still read
LEGACY_OHEM_KEY = "ohem_ema"


class EMAMixin:
    """Keeps ``self.ema_model``, an EMA of the online network's weights; put it first among the bases.

    Hooks: ``train_step`` (update after nnU-Net's step), the validation hooks (swap the EMA weights into the
    network, then back), ``save_checkpoint``/``load_checkpoint`` (both weight sets). Everything else is the
    family's own. The EMA network is a plain module (no DDP/compile wrapper): every rank computes the same
    average from the same online weights, so no communication is needed.
    """

    #: μ. nnU-Net trains 1000 epochs × 250 steps = 250k steps; 0.999 averages over ~1/(1−μ) = 1000 steps =
    #: 4 epochs (0.4 % of the run; timm's ImageNet default 0.9998 is ~0.7 % of its run). Long enough to
    #: smooth the step-to-step SGD noise, short enough that the average follows the poly-LR schedule and the
    #: per-epoch pseudo-Dice of the EMA model is not stale by tens of epochs (0.9999 would lag 40 epochs).
    ema_momentum: float = 0.999
    #: ramp μ_t = min(μ, (1+t)/(10+t)) (TensorFlow/timm): the random initial weights are forgotten within a
    #: few dozen steps instead of weighing μ^250 = 78 % after the first epoch. False: constant μ.
    ema_warmup: bool = True
    #: the final validation (``perform_actual_validation``, also ``--val``/``--val_best``) uses EMA weights
    ema_validate: bool = True
    #: the per-epoch validation uses EMA weights, so nnU-Net's pseudo-Dice, val loss and the choice of
    #: ``checkpoint_best`` are the EMA model's
    ema_select_best: bool = True
    #: checkpoints carry the EMA weights as ``network_weights`` (what stock ``nnUNetv2_predict`` loads); the
    #: online weights are kept under ``weight_ema/online_weights`` for ``--c``
    ema_export: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ValueError(f"{type(self).__name__}.ema_momentum must be in [0, 1], got {self.ema_momentum}")
        self.ema_model: Optional[torch.nn.Module] = None
        #: EMA updates done so far (t of the warm-up ramp); saved in checkpoints
        self.ema_num_updates = 0
        self._ema_in_network = False
        self._ema_pairs: Optional[PairedTensors] = None

    # ------------------------------------------------------------------ the average
    def initialize(self):
        super().initialize()
        # w̄_0 = w_0; requires_grad off so the copy never enters an autograd graph or an optimizer
        self.ema_model = copy.deepcopy(unwrap_model(self.network)).requires_grad_(False).eval()
        self.print_to_log_file(
            f"weight EMA: mu={self.ema_momentum}, warm-up={'on' if self.ema_warmup else 'off'}, EMA weights for "
            f"epoch validation/checkpoint_best={self.ema_select_best}, final validation={self.ema_validate}, "
            f"exported as network_weights={self.ema_export}")

    def on_train_start(self):
        super().on_train_start()
        # -pretrained_weights are loaded after initialize(): start the average from them, not from the init
        if self.ema_num_updates == 0:
            self.ema_model.load_state_dict(unwrap_model(self.network).state_dict())
        self._ema_pairs = None

    def ema_current_momentum(self) -> float:
        """μ of the next update."""
        return ema_momentum_at(self.ema_num_updates, self.ema_momentum, self.ema_warmup)

    def ema_update(self) -> None:
        """One EMA step from the current online weights (called after every optimiser step)."""
        if self._ema_pairs is None:
            # paired once: nnU-Net never replaces the network's tensors after initialize()
            self._ema_pairs = pair_tensors(self.ema_model, self.network)
        ema_update_pairs_(self._ema_pairs, self.ema_current_momentum())
        self.ema_num_updates += 1

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        self.ema_update()
        return result

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        self.print_to_log_file(f"weight EMA: {self.ema_num_updates} updates, mu now {self.ema_current_momentum():.6f}")

    # ------------------------------------------------------------------ using the average
    def _set_ema_in_network(self, active: bool) -> None:
        if active != self._ema_in_network:
            swap_weights_(self.network, self.ema_model)
            self._ema_in_network = active

    @contextlib.contextmanager
    def ema_weights_in_network(self, active: bool = True) -> Iterator[None]:
        """Within the block ``self.network`` (wrappers and compiled graph included) holds the EMA weights."""
        self._set_ema_in_network(active)
        try:
            yield
        finally:
            self._set_ema_in_network(False)

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._set_ema_in_network(self.ema_select_best)

    def on_validation_epoch_end(self, val_outputs):
        try:
            super().on_validation_epoch_end(val_outputs)
        finally:
            self._set_ema_in_network(False)

    def perform_actual_validation(self, save_probabilities: bool = False):
        with self.ema_weights_in_network(self.ema_validate):
            super().perform_actual_validation(save_probabilities)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_extras(self) -> dict:
        """Further top-level checkpoint entries of a subclass (e.g. OHEM's schedule position), written in the
        same atomic save."""
        return {}

    def load_checkpoint_extras(self, checkpoint: dict) -> None:
        """Restore what :meth:`checkpoint_extras` wrote; called at the end of ``load_checkpoint`` with the
        loaded checkpoint (read once here)."""

    def ema_checkpoint_state(self) -> dict:
        """The ``weight_ema`` checkpoint entry."""
        return {"ema_weights": self.ema_model.state_dict(), "momentum": self.ema_momentum,
                "warmup": bool(self.ema_warmup), "num_updates": int(self.ema_num_updates),
                "exported": bool(self.ema_export)}

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus ``weight_ema``; written under a temp name and renamed, so a kill never
        leaves a checkpoint without the EMA state."""
        if self.local_rank != 0 or self.disable_checkpointing or self.ema_model is None:
            return super().save_checkpoint(filename)
        self._set_ema_in_network(False)  # never save swapped weights as the online ones
        with atomic_path(filename) as tmp:
            super().save_checkpoint(tmp)
            checkpoint = torch.load(tmp, map_location="cpu", weights_only=False)
            state = self.ema_checkpoint_state()
            if self.ema_export:
                state["online_weights"] = checkpoint["network_weights"]
                checkpoint["network_weights"] = state["ema_weights"]
            checkpoint[EMA_CHECKPOINT_KEY] = state
            checkpoint.update(self.checkpoint_extras())
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        """nnU-Net's load, then the online weights (if the checkpoint exported the EMA), the EMA weights and
        the update count. A checkpoint without EMA state (plain nnU-Net) starts the average at the online
        weights, with a warning."""
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        state = checkpoint.get(EMA_CHECKPOINT_KEY)
        if state is None and LEGACY_OHEM_KEY in checkpoint:
            legacy = checkpoint[LEGACY_OHEM_KEY]
            state = {"ema_weights": legacy["miner_weights"],
                     # the old format did not count updates: one per training step
                     "num_updates": int(checkpoint["current_epoch"]) * self.num_iterations_per_epoch,
                     **({"online_weights": legacy["online_weights"]} if "online_weights" in legacy else {})}
        online = unwrap_model(self.network)
        if state is None:
            name = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "checkpoint"
            warnings.warn(f"{name} has no weight-EMA state: starting the average from the online weights")
            self.print_to_log_file("WARNING: checkpoint without weight-EMA state; EMA := online network")
            self.ema_model.load_state_dict(online.state_dict())
            self.ema_num_updates = 0
        else:
            if "online_weights" in state:
                online.load_state_dict(state["online_weights"])
            self.ema_model.load_state_dict(state["ema_weights"])
            self.ema_num_updates = int(state.get("num_updates", 0))
        self._ema_in_network = False
        self.load_checkpoint_extras(checkpoint)


class nnUNetTrainerEMA(EMAMixin, LesionValidationMixin, nnUNetTrainer):
    """Plain nnU-Net with EMA weights (μ = 0.999, warm-up) for validation, ``checkpoint_best`` and prediction:
    the control that separates weight averaging from OHEM-EMA's mining."""


class nnUNetTrainerBlobLossEMA(EMAMixin, nnUNetTrainerBlobLoss):
    """Blob-loss training with EMA weights."""


class nnUNetTrainerBF16EMA(EMAMixin, precision.nnUNetTrainerBF16):
    """bf16 autocast training (fp32 master weights, so the average is kept in fp32) with EMA weights."""


nnUNetTrainerEMA_Debug = debug_variant(nnUNetTrainerEMA)
nnUNetTrainerBlobLossEMA_Debug = debug_variant(nnUNetTrainerBlobLossEMA)
nnUNetTrainerBF16EMA_Debug = debug_variant(nnUNetTrainerBF16EMA)
