"""Pure building blocks of online hard example mining with an EMA miner (Schmidt-Mengin et al., MSSEG-II 2021).

Nothing here imports a trainer: per-patch errors (:mod:`.errors`), top-B selection (:mod:`.selection`) and
the momentum update of the miner (:mod:`.ema`) are plain tensor functions, tested on their own.
"""
from nnunetv2_ohem.mining.ema import ema_update_, unwrap_model
from nnunetv2_ohem.mining.errors import (RANKING_ERRORS, has_foreground, per_sample_ce, per_sample_dc_ce,
                                         per_sample_dice_loss, per_sample_error)
from nnunetv2_ohem.mining.selection import select_top_b

__all__ = ["RANKING_ERRORS", "ema_update_", "has_foreground", "per_sample_ce", "per_sample_dc_ce",
           "per_sample_dice_loss", "per_sample_error", "select_top_b", "unwrap_model"]
