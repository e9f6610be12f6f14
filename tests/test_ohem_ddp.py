"""The real nnUNetTrainerOHEMEMA under nnU-Net's own DDP code path: 2 ranks, gloo on CPU.

Each rank runs what ``nnUNetv2_train ... -num_gpus 2`` runs per GPU: the trainer's ``initialize`` (per-rank batch
and oversampling from ``_set_batch_size_and_oversample``, network wrapped in ``DistributedDataParallel``, Dice
loss with ``ddp=True``), ``on_train_start``, a few ``train_step``s, the epoch end (all-gathered losses and OHEM
diagnostics), one validation step, a checkpoint written by rank 0 and loaded by both ranks, and one more step
after the resume. Only the two CUDA-only lines of that path are patched (``tests/ddp_helpers.py``).
"""
import copy
import os

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from ddp_helpers import flat_state, run_ddp

pytestmark = pytest.mark.slow  # ~30 s on 2 cores: two ranks, each starting nnU-Net's loaders twice

GLOBAL_BATCH = 3  # split by nnU-Net as [2, 1]: uneven on purpose
N_STEPS = 3


def _worker(rank, world, preprocessed_folder, plans_identifier, results_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from nnunetv2_ohem.training.ohem import OHEM_LOG_KEYS, nnUNetTrainerOHEMEMA

    os.environ["nnUNet_results"] = results_dir
    plans = load_json(os.path.join(preprocessed_folder, plans_identifier + ".json"))
    plans["continue_training"] = False
    plans["configurations"]["3d_fullres"]["batch_size"] = GLOBAL_BATCH
    dj = load_json(os.path.join(preprocessed_folder, "dataset.json"))

    # the real trainer, mining from the first step with all B_r patches the hardest (the default schedule
    # starts with plain nnU-Net steps, which this short run would never leave)
    schedule = {k: v for k, v in {"ohem_warmup_fraction": 0.0, "ohem_end_fraction": 1.0,
                                  "ohem_hard_fraction": 1.0}.items() if hasattr(nnUNetTrainerOHEMEMA, k)}
    cls = type("nnUNetTrainerOHEMEMA", (nnUNetTrainerOHEMEMA,), schedule)

    def new_trainer():
        return cls(copy.deepcopy(plans), "3d_fullres", 0, dj, torch.device("cpu"))

    tr = new_trainer()
    tr.on_train_start()
    res = {"is_ddp": tr.is_ddp, "device": str(tr.device), "ddp_wrapped": isinstance(tr.network, DistributedDataParallel),
           "batch_size": tr.batch_size, "oversample": tr.oversample_foreground_percent,
           "num_candidates": tr.num_candidates, "miner_start": flat_state(tr.miner),
           "online_start": flat_state(tr.network)}
    tr.on_epoch_start()
    tr.on_train_epoch_start()
    outputs, steps = [], []
    for _ in range(N_STEPS):
        batch = next(tr.dataloader_train)
        outputs.append(tr.train_step(batch))
        steps.append({"shape": list(batch["data"].shape), "data": batch["data"].clone(),
                      "indices": tr.last_selection["indices"].tolist(),
                      "errors": tr.last_selection["errors"].clone(),
                      "trained": list(tr.last_selection["trained"]["data"].shape)
                      if "trained" in tr.last_selection else None})
    res.update(steps=steps, miner=flat_state(tr.miner), online=flat_state(tr.network),
               local={k: [float(o[k]) for o in outputs] for k in OHEM_LOG_KEYS},
               local_loss=[float(o["loss"]) for o in outputs])
    tr.on_train_epoch_end(outputs)
    res["logged"] = {k: tr.logger.get_value(k, step=-1) for k in (*OHEM_LOG_KEYS, "train_losses")}
    tr.on_validation_epoch_start()
    tr.on_validation_epoch_end([tr.validation_step(next(tr.dataloader_val))])
    tr.on_epoch_end()  # rank 0 writes ohem_diagnostics.json
    ckpt = os.path.join(tr.output_folder, "checkpoint_latest.pth")
    tr.save_checkpoint(ckpt)  # rank 0 only, as in nnU-Net
    res["epoch_at_save"] = tr.current_epoch
    dist.barrier()
    res["diagnostics_file"] = os.path.isfile(os.path.join(tr.output_folder, "ohem_diagnostics.json"))
    res["diagnostics"] = load_json(os.path.join(tr.output_folder, "ohem_diagnostics.json")) \
        if res["diagnostics_file"] else None
    for dl in (tr.dataloader_train, tr.dataloader_val):
        if hasattr(dl, "_finish"):
            dl._finish()

    # --c: a fresh trainer on every rank loads rank 0's checkpoint and keeps training
    tr2 = new_trainer()
    tr2.load_checkpoint(ckpt)
    res.update(loaded_miner=flat_state(tr2.miner), loaded_online=flat_state(tr2.network),
               loaded_epoch=tr2.current_epoch)
    tr2.on_train_start()
    tr2.on_train_epoch_start()
    tr2.train_step(next(tr2.dataloader_train))
    res.update(resumed_miner=flat_state(tr2.miner), resumed_online=flat_state(tr2.network))
    for dl in (tr2.dataloader_train, tr2.dataloader_val):
        if hasattr(dl, "_finish"):
            dl._finish()
    return res


@pytest.fixture(scope="module")
def ranks(tiny_dataset, tmp_path_factory):
    results = str(tmp_path_factory.mktemp("ddp_results"))
    return run_ddp(_worker, 2, (tiny_dataset.preprocessed_folder, tiny_dataset.plans_identifier, results))


def test_per_rank_batch_and_oversampling_as_nnunet_computes_them(ranks):
    r0, r1 = ranks
    assert r0["is_ddp"] and r1["is_ddp"] and r0["ddp_wrapped"] and r1["ddp_wrapped"]
    assert r0["device"] == r1["device"] == "cpu"
    # nnU-Net splits the global batch 3 as [2, 1]; with p = 0.33 the last round(3*0.67) = 2nd sample onwards is
    # foreground-forced, so rank 0 gets none of it and rank 1 all of it
    assert (r0["batch_size"], r1["batch_size"]) == (2, 1)
    assert (r0["oversample"], r1["oversample"]) == (0.0, 1.0)
    # B̄ = k·B per rank, and each rank's loader really delivers B̄ candidates
    assert (r0["num_candidates"], r1["num_candidates"]) == (8, 4)
    assert all(s["shape"][0] == 8 for s in r0["steps"]) and all(s["shape"][0] == 4 for s in r1["steps"])
    assert all(len(s["indices"]) == 2 for s in r0["steps"]) and all(len(s["indices"]) == 1 for s in r1["steps"])
    # the online net trains on B_r patches per rank (the winners, augmented when candidates are crops)
    for r, b in ((r0, 2), (r1, 1)):
        assert all(s["trained"] is None or s["trained"][0] == b for s in r["steps"])


def test_online_net_and_miner_stay_identical_across_ranks(ranks):
    r0, r1 = ranks
    # the ranks start from different seeds; DDP broadcasts rank 0's weights before the miner is copied
    assert torch.equal(r0["online_start"], r1["online_start"])
    assert torch.equal(r0["miner_start"], r1["miner_start"])
    assert torch.equal(r0["online"], r1["online"])
    assert torch.equal(r0["miner"], r1["miner"])
    assert not torch.equal(r0["miner"], r0["miner_start"])  # the EMA moved


def test_each_rank_mines_its_own_candidates(ranks):
    r0, r1 = ranks
    for s0, s1 in zip(r0["steps"], r1["steps"]):
        # different patches per rank (different shapes anyway here; compare the shared first candidates too)
        assert not torch.equal(s0["data"][:4], s1["data"][:4])
        for s in (s0, s1):
            k = len(s["indices"])
            top = torch.sort(torch.topk(s["errors"], k).indices).values.tolist()
            assert sorted(s["indices"]) == top  # each rank takes the top-B of its own errors


def test_diagnostics_are_gathered_over_ranks(ranks):
    r0, r1 = ranks
    from nnunetv2_ohem.training.ohem import OHEM_LOG_KEYS
    for key in OHEM_LOG_KEYS:
        both = np.asarray(r0["local"][key] + r1["local"][key], dtype=float)
        if not np.isfinite(both).any():
            continue
        want = float(np.nanmean(both))
        assert r0["logged"][key] == pytest.approx(want, rel=1e-9) and r1["logged"][key] == pytest.approx(want)
    assert r0["logged"]["train_losses"] == pytest.approx(np.mean(r0["local_loss"] + r1["local_loss"]))
    # the error of the selected patches is never below the candidates' mean, on every rank
    assert r0["logged"]["ohem_error_selected"] >= r0["logged"]["ohem_error_candidates"]
    assert r0["diagnostics_file"] and r0["diagnostics"]["batch_size"] == 2
    assert r0["diagnostics"]["ohem_error_selected"][0] == pytest.approx(r0["logged"]["ohem_error_selected"])


def test_checkpoint_from_rank0_resumes_every_rank_identically(ranks):
    r0, r1 = ranks
    for r in (r0, r1):
        assert torch.equal(r["loaded_miner"], r0["miner"]) and torch.equal(r["loaded_online"], r0["online"])
        assert r["loaded_epoch"] == r0["epoch_at_save"] + 1 == 2  # nnU-Net stores the next epoch to run
    assert torch.equal(r0["resumed_miner"], r1["resumed_miner"])
    assert torch.equal(r0["resumed_online"], r1["resumed_online"])
    assert not torch.equal(r0["resumed_miner"], r0["loaded_miner"])
