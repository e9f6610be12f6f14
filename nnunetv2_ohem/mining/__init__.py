"""Pure building blocks of online hard example mining with an EMA miner (Schmidt-Mengin et al., MSSEG-II 2021).

Nothing here imports a trainer: per-patch errors (:mod:`.errors`), top-B selection and selection recall
(:mod:`.selection`), the mining schedule (:mod:`.schedule`), reduced-resolution scoring (:mod:`.scoring`) and
the momentum update of the miner (:mod:`.ema`) are plain tensor functions, tested on their own.
"""
from nnunetv2_ohem.mining.ema import (PairedTensors, ema_momentum_at, ema_update_, ema_update_pairs_, pair_tensors,
                                      swap_weights_, unwrap_model)
from nnunetv2_ohem.mining.errors import (RANKING_ERRORS, blob_ranking_error, has_foreground, per_sample_ce,
                                         per_sample_dc_ce, per_sample_dice_loss, per_sample_error)
from nnunetv2_ohem.mining.schedule import is_mining_step, mining_window
from nnunetv2_ohem.mining.selection import hard_count, select_hard_and_random, select_top_b, selection_recall

__all__ = ["PairedTensors", "RANKING_ERRORS", "ema_momentum_at", "ema_update_", "ema_update_pairs_", "has_foreground",
           "pair_tensors", "per_sample_ce",
           "per_sample_dc_ce", "per_sample_dice_loss", "per_sample_error", "select_top_b", "swap_weights_", "unwrap_model",
           "blob_ranking_error", "is_mining_step", "mining_window", "hard_count", "select_hard_and_random",
           "selection_recall"]
