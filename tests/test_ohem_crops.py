"""Candidate mode "crops": the miner scores un-augmented centre crops, only the B winners go through nnU-Net's
training transforms; and the scoring options with their selection recall, on a fixed miner and fixed
candidates."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_ohem.mining.selection import select_top_b
from nnunetv2_ohem.training import ohem
from ohem_helpers import always_mining, make_trainer, train_step_capturing_subbatch


CropsRecall_Debug = always_mining(ohem.nnUNetTrainerOHEMEMA_Debug, ohem_candidates="crops", ohem_measure_recall=True)


@pytest.fixture(scope="module")
def crops_trainer(tiny_dataset):
    return make_trainer(tiny_dataset, CropsRecall_Debug)


def _reference_crop(dataset, key, box):
    """Plain numpy crop with nnU-Net's padding values (image 0, segmentation −1)."""
    data, seg, _, _ = dataset.load_case(key)
    out = []
    for arr, fill in ((np.asarray(data), 0), (np.asarray(seg), -1)):
        pads = [(0, 0)] + [(max(0, -lb), max(0, ub - s)) for (lb, ub), s in zip(box, arr.shape[1:])]
        padded = np.pad(arr, pads, constant_values=fill)
        sl = tuple([slice(None)] + [slice(lb + p[0], ub + p[0]) for (lb, ub), p in zip(box, pads[1:])])
        out.append(padded[sl])
    return out


class _Spy:
    def __init__(self, transforms):
        self.transforms, self.calls = transforms, []

    def __call__(self, **kwargs):
        inputs = {k: v.clone() for k, v in kwargs.items()}
        out = self.transforms(**kwargs)
        self.calls.append((inputs, out))
        return out


def test_candidates_are_raw_centre_crops_and_only_winners_get_nnunet_augmentation(crops_trainer, monkeypatch):
    tr = crops_trainer
    loader = tr.dataloader_train.data_loader
    assert loader.batch_size == tr.num_candidates == 8
    # candidates: nnU-Net's validation transforms only (target formatting), no spatial/intensity augmentation
    names = [type(t).__name__ for t in loader.transforms.transforms]
    assert names == [type(t).__name__ for t in nnUNetTrainer.get_validation_transforms(
        tr._get_deep_supervision_scales()).transforms]
    # winners: exactly the transforms nnU-Net builds for this configuration and plans
    rot, dummy, init_patch, mirror = tr.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    plain = nnUNetTrainer.get_training_transforms(tr.configuration_manager.patch_size, rot,
                                                  tr._get_deep_supervision_scales(), mirror, dummy)
    assert [type(t).__name__ for t in tr.winner_augmenter.transforms.transforms] == \
        [type(t).__name__ for t in plain.transforms]
    assert any(isinstance(t, SpatialTransform) for t in tr.winner_augmenter.transforms.transforms)

    batch = next(tr.dataloader_train)
    ds = loader._data
    assert batch["data"].shape == (8, 2, 32, 32, 32) and len(batch["target"]) == len(tr.loss.weight_factors)
    for i, (key, box) in enumerate(zip(batch["keys"], batch["bboxes"])):
        assert [ub - lb for lb, ub in box] == list(init_patch)
        centre = [[lb + (ub - lb - 32) // 2, lb + (ub - lb - 32) // 2 + 32] for lb, ub in box]
        img, seg = _reference_crop(ds, key, centre)
        np.testing.assert_array_equal(batch["data"][i].numpy(), img.astype(np.float32))
        np.testing.assert_array_equal(batch["target"][0][i].numpy(), np.where(seg < 0, 0, seg))

    spy = _Spy(tr.winner_augmenter.transforms)
    monkeypatch.setattr(tr.winner_augmenter, "transforms", spy)
    result, trained = train_step_capturing_subbatch(tr, batch, monkeypatch)
    idx = tr.last_selection["indices"].tolist()
    assert len(spy.calls) == tr.batch_size == len(idx)  # B augmentations, not B̄
    for j, (inputs, out) in enumerate(spy.calls):
        key, box = batch["keys"][idx[j]], batch["bboxes"][idx[j]]
        img, seg = _reference_crop(ds, key, box)  # the winner's whole initial-size box, un-augmented
        np.testing.assert_array_equal(inputs["image"].numpy(), img.astype(np.float32))
        np.testing.assert_array_equal(inputs["segmentation"].numpy(), seg)
        assert torch.equal(trained["data"][j], out["image"])
        for t_scale, o_scale in zip(trained["target"], out["segmentation"]):
            assert torch.equal(t_scale[j], o_scale)
    assert [t.shape[2:] for t in trained["target"]] == [t.shape[2:] for t in batch["target"]]
    assert np.isfinite(result["ohem_selection_recall"])


def test_selection_recall_and_reduced_resolution_scoring_on_a_fixed_miner(crops_trainer, monkeypatch):
    tr = crops_trainer
    batch = next(tr.dataloader_train)
    data, target = batch["data"], batch["target"]
    miner = copy.deepcopy(tr.miner)
    weights = tr.loss.weight_factors

    def reference(x, targets, full_only=None):  # nnU-Net's own loss, one candidate at a time, fp32
        errors = []
        with torch.no_grad():
            for i in range(x.shape[0]):
                out = miner(x[i:i + 1])
                errors.append(float(tr.loss(out, [t[i:i + 1] for t in targets])) + sum(weights))
                if full_only is not None:  # the full-resolution head alone
                    full_only.append(float(tr.loss.loss(out[0], targets[0][i:i + 1])) + 1)
        return np.asarray(errors)

    ref_full = []
    exact = reference(data, target, ref_full)
    # option: half resolution; reference targets from nnU-Net's own DS downsampling of the full-res target
    ds = DownsampleSegForDSTransform([[0.5 * f for f in s] for s in tr._get_deep_supervision_scales()])
    half_targets = [torch.stack(s) for s in zip(*[ds(segmentation=t)["segmentation"] for t in target[0]])]
    half = reference(F.avg_pool3d(data, 2), half_targets)
    monkeypatch.setattr(tr, "ohem_score_downsample", 2)
    errors = tr.score_candidates(data, target).numpy()
    np.testing.assert_allclose(errors, half, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tr.score_candidates(data, target, ohem.EXACT_SCORING).numpy(), exact,
                               rtol=1e-4, atol=1e-5)

    # bf16 and channels-last miners rank (nearly) like the exact one; same numbers up to bf16 rounding
    bf16 = tr.score_candidates(data, target, ohem.ScoringOptions(dtype="bf16", channels_last=True)).numpy()
    np.testing.assert_allclose(bf16, exact, rtol=0.05, atol=0.02)
    full_only = tr.score_candidates(data, target, ohem.ScoringOptions(dtype="fp32", deep_supervision=False))
    np.testing.assert_allclose(full_only.numpy(), ref_full, rtol=1e-4, atol=1e-5)

    # the online recall of a real step = |top-B(option) ∩ top-B(exact)| / B on these candidates and this miner
    b = tr.batch_size
    result, _ = train_step_capturing_subbatch(tr, batch, monkeypatch)
    want = len(set(np.argsort(-half, kind="stable")[:b]) & set(np.argsort(-exact, kind="stable")[:b])) / b
    assert result["ohem_selection_recall"] == pytest.approx(want)
    assert tr.last_selection["indices"].tolist() == select_top_b(torch.tensor(half), b).tolist()


def test_winner_augmenter_worker_pool_returns_the_in_process_result(crops_trainer):
    """The pool (nnUNet_n_proc_DA > 0) only moves where the work runs: with the transforms left out the
    re-cropped winners are deterministic and must equal the in-process ones."""
    from nnunetv2_ohem.training.ohem_crops import WinnerAugmenter
    aug = crops_trainer.winner_augmenter
    batch = next(crops_trainer.dataloader_train)
    keys, boxes = batch["keys"][:2], batch["bboxes"][:2]
    local = WinnerAugmenter(aug.dataset, None, aug.patch_size_was_2d, 0)(keys, boxes)
    pool = WinnerAugmenter(aug.dataset, None, aug.patch_size_was_2d, 2)
    try:
        remote = pool(keys, boxes)
        assert pool._pool is not None
    finally:
        pool.close()
    assert pool._pool is None
    assert torch.equal(local["data"], remote["data"]) and torch.equal(local["target"], remote["target"])
    assert local["data"].shape[2:] == tuple(int(b[1] - b[0]) for b in boxes[0])


def test_auto_score_dtype_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch):
    assert ohem.resolve_score_dtype("auto", "cuda") is None and ohem.resolve_score_dtype("fp16", "cuda") == "fp16"
    for native in (True, False):
        monkeypatch.setattr(ohem, "native_cpu_bf16", lambda: native)
        assert ohem.resolve_score_dtype("auto", "cpu") == ("bf16" if native else None)
        assert ohem.resolve_score_dtype(None, "cpu") is None


def test_prefetch_trains_the_winners_selected_one_step_earlier(tiny_dataset, monkeypatch):
    """``ohem_crops_prefetch``: the first mining step trains its own winners and selects the next ones from one
    more candidate batch; from then on each step trains the winners the previous step selected."""
    tr = make_trainer(tiny_dataset, always_mining(ohem.nnUNetTrainerOHEMEMA_Debug, ohem_crops_prefetch=True))
    submitted, trained = [], []
    real_submit = tr.winner_augmenter.submit

    def submit(keys, boxes):
        handle = real_submit(keys, boxes)
        submitted.append((list(keys), [b.tolist() for b in boxes], handle.result()))
        return handle

    monkeypatch.setattr(tr.winner_augmenter, "submit", submit)
    parent = nnUNetTrainer.train_step
    monkeypatch.setattr(nnUNetTrainer, "train_step", lambda self, sub: trained.append(sub) or parent(self, sub))
    tr.on_train_epoch_start()
    batches = []
    for _ in range(3):
        batches.append(next(tr.dataloader_train))
        tr.train_step(batches[-1])
    assert len(submitted) == 4 and len(trained) == 3  # step 1 selects twice
    for step, sub in zip((0, 1, 2), (0, 1, 2)):
        assert torch.equal(trained[step]["data"], submitted[sub][2]["data"])
    # the winners of step 2 (submitted[2]) are those selected from step 2's own batch
    idx = tr.last_selection["indices"].tolist()
    assert submitted[3][0] == [batches[2]["keys"][i] for i in idx]
    tr.dataloader_train._finish()
