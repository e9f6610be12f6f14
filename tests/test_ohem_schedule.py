"""Mining schedule: warm-up steps are nnU-Net's plain batches (its loader, size B, its foreground oversampling,
no miner forward), mining starts and stops at the planned steps, the mined fraction is logged per epoch, and a
checkpoint taken in the middle of warm-up or of mining resumes bit-identically."""
import os

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_ohem.mining.ema import unwrap_model
from nnunetv2_ohem.training import ohem


class Scheduled_Debug(ohem.nnUNetTrainerOHEMEMA_Debug):
    """2 epochs × 3 steps = 6 steps; mining in [round(0.5·6), round(0.84·6)) = steps 3 and 4; 1 of B=2 hardest."""
    ohem_candidates = "crops"
    ohem_warmup_fraction = 0.5
    ohem_end_fraction = 0.84
    ohem_hard_fraction = 0.5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = EPOCH


EPOCH, START, END = 3, 3, 5


def _make(ds, start):
    plans = load_json(os.path.join(ds.preprocessed_folder, ds.plans_identifier + ".json"))
    plans["continue_training"] = False
    dj = load_json(os.path.join(ds.preprocessed_folder, "dataset.json"))
    tr = Scheduled_Debug(plans, "3d_fullres", 0, dj, torch.device("cpu"))
    tr.on_train_start() if start else tr.initialize()
    return tr


def _state(tr):
    return [t.detach().clone() for t in unwrap_model(tr.network).state_dict().values()] + \
        [t.detach().clone() for t in tr.miner.state_dict().values()]


def _seed(step):
    torch.manual_seed(1000 + step)
    np.random.seed(1000 + step)


def test_warmup_mining_window_logging_and_bit_identical_resume(tiny_dataset, tmp_path, monkeypatch):
    tr = _make(tiny_dataset, start=True)
    assert tr.mining_window == (START, END) and tr.num_hard == 1

    # warm-up loader = nnU-Net's own: batch B, its oversampling, its training transforms
    plain = tr.dataloader_train.plain.data_loader
    assert type(plain) is nnUNetDataLoader and plain.batch_size == tr.batch_size == 2
    assert plain.oversample_foreground_percent == tr.oversample_foreground_percent == pytest.approx(0.33)
    transforms, plain.transforms = plain.transforms, None
    try:  # nnU-Net forces the last B − round(B·(1 − p)) = 1 patch of each batch onto foreground
        for _ in range(3):
            raw = plain.generate_train_batch()
            locations = plain._data.load_case(raw["keys"][1])[3]["class_locations"]
            if any(len(v) for v in locations.values()):
                assert bool((raw["target"][1] > 0).any())
    finally:
        plain.transforms = transforms

    parent, seen, scored = nnUNetTrainer.train_step, {}, []

    def spy(self, sub):
        seen[self] = sub
        return parent(self, sub)

    monkeypatch.setattr(nnUNetTrainer, "train_step", spy)
    real_score = tr.score_candidates
    tr.score_candidates = lambda *a, **k: scored.append(1) or real_score(*a, **k)

    checkpoints, batches, after, outputs = {}, {}, {}, []
    tr.on_train_epoch_start()
    for step in range(2 * EPOCH):
        if step == EPOCH:
            tr.on_train_epoch_end(outputs[:EPOCH])
            tr.current_epoch += 1
            tr.on_train_epoch_start()
        if step in (1, 4):
            checkpoints[step] = str(tmp_path / f"step{step}.pth")
            tr.save_checkpoint(checkpoints[step])
        batch = next(tr.dataloader_train)
        batches[step] = batch
        n_scored = len(scored)
        _seed(step)
        outputs.append(tr.train_step(batch))
        mining = START <= step < END
        assert ("bboxes" in batch) == mining and len(scored) - n_scored == int(mining), step
        assert batch["data"].shape[0] == (8 if mining else 2)
        if not mining:  # a plain step trains on nnU-Net's batch as it came from nnU-Net's loader
            assert seen[tr] is batch and np.isnan(outputs[-1]["ohem_error_selected"])
        else:
            assert seen[tr]["data"].shape[0] == 2
        after[step] = (_state(tr), tr.ohem_step, tr.last_selection["indices"].tolist() if mining else None)
    tr.on_train_epoch_end(outputs[EPOCH:])
    logging = tr.logger.local_logger.my_fantastic_logging
    assert logging["ohem_mining_fraction"] == [0.0, pytest.approx(2 / 3)]
    assert np.isnan(logging["ohem_error_selected"][0]) and np.isfinite(logging["ohem_error_selected"][1])

    # resume in the middle of warm-up (step 1, runs into mining across the epoch boundary) and of mining
    # (step 4, runs out of it)
    tr.score_candidates = real_score
    for start, stop in ((1, 4), (4, 6)):
        new = _make(tiny_dataset, start=False)
        new.load_checkpoint(checkpoints[start])
        assert new.ohem_step == start and new.mining_window == (START, END)
        new.winner_augmenter = tr.winner_augmenter  # same dataset and transforms; its loaders are not needed
        for step in range(start, stop):
            if step == EPOCH:
                new.current_epoch = 1
                new.on_train_epoch_start()
            _seed(step)
            new.train_step(batches[step])
            state, n_steps, idx = after[step]
            assert new.ohem_step == n_steps and all(torch.equal(a, b) for a, b in zip(_state(new), state)), step
            if idx is not None:
                assert new.last_selection["indices"].tolist() == idx
    tr.dataloader_train._finish()
