"""OHEM-EMA mining + blob-loss training: the per-image blob error, the ranking it gives, and one real train step
on the tiny phantom dataset (selection by the per-patch blob objective, EMA, loss on the selected sub-batch)."""
import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunetv2_ohem.losses.blob import blob_loss, per_sample_blob_error
from nnunetv2_ohem.mining import per_sample_error, unwrap_model
from nnunetv2_ohem.mining.errors import blob_ranking_error
from nnunetv2_ohem.training import ohem_blob
from ohem_helpers import always_mining, make_trainer, train_step_capturing_subbatch


def loop_blob_error(logits, instances, activation, weight_dice=1.0, weight_bce=1.0, smooth=1e-5):
    """Plain per-image, per-class, per-blob loop over explicit masks (the paper's definition, 1 - Dice)."""
    logits = logits.double()
    probs = torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, 1)[:, 1:]
    out = []
    for b in range(logits.shape[0]):
        per_class = []
        for f in range(instances.shape[1]):
            inst = instances[b, f]
            ids = [int(i) for i in torch.unique(inst) if i != 0]
            if not ids:
                continue
            terms = []
            for k in ids:
                y = (inst == k).double()
                keep = ((inst == 0) | (inst == k)).double()
                p = probs[b, f] * keep
                dice = (2 * (p * y).sum() + smooth) / ((p + y).sum() + smooth)
                bce = torch.nn.functional.binary_cross_entropy(p, y)
                terms.append(weight_bce * bce + weight_dice * (1 - dice))
            per_class.append(sum(terms) / len(terms))
        out.append(float(sum(per_class) / len(per_class)) if per_class else 0.0)
    return np.asarray(out)


@pytest.mark.parametrize("activation,channels", [("softmax", 3), ("sigmoid", 2)])
def test_per_sample_blob_error_matches_per_blob_loop(activation, channels):
    g = torch.Generator().manual_seed(3)
    n_fg = channels - 1 if activation == "softmax" else channels
    logits = torch.randn(4, channels, 9, 8, 7, generator=g)
    instances = torch.randint(0, 5, (4, n_fg, 9, 8, 7), generator=g)
    instances[1] = 0  # image without blobs: error 0
    instances[2, 0] = 0  # one class without blobs: averaged over the other class only
    instances[3, 0, 0, 0, 0] = 40  # single-voxel blob with a non-consecutive id
    got = per_sample_blob_error(logits, instances, activation, weight_dice=0.7, weight_bce=1.3)
    want = loop_blob_error(logits, instances, activation, weight_dice=0.7, weight_bce=1.3)
    assert got.shape == (4,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert got[1] == 0 and (got[[0, 2, 3]] > 0).all()
    # one image alone: the batch blob loss (-Dice) shifted by w_dice
    for i in (0, 3):
        assert abs(float(blob_loss(logits[i:i + 1], instances[i:i + 1], activation, 0.7, 1.3)) + 0.7
                   - float(got[i])) < 1e-5


def test_blob_ranking_puts_a_missed_small_lesion_above_voxels_missed_on_a_large_one():
    """The point of the combination: DC+CE ranks the patch missing 27 voxels of a large lesion higher than the
    one missing a whole 8-voxel lesion; the blob objective ranks them the other way round."""
    shape = (1, 1, 20, 20, 20)
    seg = torch.zeros(shape, dtype=torch.long)
    seg[..., 2:12, 2:12, 2:12] = 1  # large lesion (1000 voxels) in both patches
    seg = seg.repeat(2, 1, 1, 1, 1)
    seg[0, 0, 16:18, 16:18, 16:18] = 1  # patch 0 also has a small lesion
    inst = torch.zeros_like(seg)
    inst[:, :, 2:12, 2:12, 2:12] = 1
    inst[0, 0, 16:18, 16:18, 16:18] = 2
    pred = seg.clone()
    pred[0, 0, 16:18, 16:18, 16:18] = 0  # patch 0 misses its small lesion entirely (8 voxels)
    pred[1, 0, 2:5, 2:5, 2:5] = 0  # patch 1 misses a corner of the large lesion (27 voxels)
    logits = torch.cat([-8.0 * (pred == 1).float() + 4, 8.0 * (pred == 1).float() - 4], 1)
    packed = torch.cat([seg, inst], 1)
    dc_ce = per_sample_error(logits, seg, "dc_ce")
    blob = blob_ranking_error(logits, packed, 1, alpha=2.0, beta=1.0)
    assert dc_ce[1] > dc_ce[0]
    assert blob[0] > 2 * blob[1]


@pytest.fixture(scope="module")
def trainer(tiny_dataset):
    torch.manual_seed(0)
    return make_trainer(tiny_dataset, always_mining(ohem_blob.nnUNetTrainerOHEMEMA_BlobLoss_Debug))


def nnunet_dc_ce(trainer):
    return DC_and_CE_loss({"batch_dice": trainer.configuration_manager.batch_dice, "smooth": 1e-5, "do_bg": False,
                           "ddp": False}, {}, weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)


def test_train_step_trains_top_b_by_blob_error_moves_ema_and_uses_blob_loss(trainer, monkeypatch):
    tr = trainer
    weights = list(tr.loss.weight_factors)
    miner_before = copy.deepcopy(tr.miner)
    online_before = copy.deepcopy(unwrap_model(tr.network))
    glob = nnunet_dc_ce(tr)

    def reference_errors(data, target):
        """Independent per-patch recomputation under the miner: nnU-Net's DC+CE (-Dice) and the batch blob loss
        on a batch of one, shifted to 1 - Dice (+1 per term; the blob shift only where the patch has a blob at
        that scale)."""
        ref = []
        with torch.no_grad():
            for i in range(data.shape[0]):
                outs = miner_before(data[i:i + 1])
                e = 0.0
                for w, o, t in zip(weights, outs, target):
                    if w == 0:
                        continue
                    seg, inst = t[i:i + 1, :1], t[i:i + 1, 1:]
                    has_blob = bool(inst.any())
                    e += w * (tr.blob_alpha * (float(glob(o, seg)) + 1)
                              + tr.blob_beta * ((float(blob_loss(o, inst.long())) + 1) if has_blob else 0.0))
                ref.append(e)
        return np.asarray(ref)

    # a batch whose candidates all have distinct errors, so that the top-B set is unambiguous (two identical
    # crops of a tiny case tie; the loader's draws depend on the tests that ran before)
    for _ in range(10):
        batch = next(tr.dataloader_train)
        data, target = batch["data"], batch["target"]
        ref = reference_errors(data, target)
        if len(np.unique(np.round(ref, 6))) == len(ref):
            break
    assert len(np.unique(np.round(ref, 6))) == len(ref), "10 candidate batches, each with tied errors"
    n_cand, b = data.shape[0], tr.batch_size
    assert n_cand == tr.candidate_factor * b and isinstance(target, list)
    assert all(t.shape[1] == 2 for t in target)  # label + instance channel at every deep-supervision scale

    result, trained = train_step_capturing_subbatch(tr, batch, monkeypatch)

    np.testing.assert_allclose(tr.last_selection["errors"].numpy(), ref, rtol=1e-4, atol=1e-5)
    expected = sorted(np.argsort(-ref, kind="stable")[:b].tolist())
    assert tr.last_selection["indices"].tolist() == expected
    assert ref[expected].min() > np.delete(ref, expected).max()
    # candidate mode "crops": the winners were re-cropped and augmented by the blob trainer's own training
    # transforms, so every scale's target carries label AND instance channels
    assert "bboxes" in batch and trained is tr.last_selection["trained"] and trained["data"].shape[0] == b
    assert len(trained["target"]) == len(target) and all(t.shape[1] == 2 for t in trained["target"])

    # the trained loss is alpha * DC+CE + beta * blob loss of the trained batch under the pre-step online net
    with torch.no_grad():
        outs = online_before(trained["data"])
        want = sum(w * (tr.blob_alpha * glob(o, t[:, :1]) + tr.blob_beta * blob_loss(o, t[:, 1:].long()))
                   for w, o, t in zip(weights, outs, trained["target"]) if w)
    assert abs(float(result["loss"]) - float(want)) < 1e-5 * max(1.0, abs(float(want)))

    mu = tr.ema_momentum
    online = unwrap_model(tr.network).state_dict()
    moved = False
    for k, v in tr.miner.state_dict().items():
        assert torch.allclose(v, mu * miner_before.state_dict()[k] + (1 - mu) * online[k], atol=1e-6, rtol=0), k
        moved |= not torch.equal(v, miner_before.state_dict()[k])
    assert moved
    assert result["ohem_error_selected"] > result["ohem_error_candidates"]


def test_nan_in_an_unselected_candidate_is_reported(trainer):
    batch = next(trainer.dataloader_train)
    batch["data"][-1, 0, 0, 0, 0] = float("nan")
    batch["keys"] = [f"case_{i}" for i in range(batch["data"].shape[0])]
    with pytest.raises(ValueError, match=f"case_{batch['data'].shape[0] - 1}"):
        trainer.train_step(batch)


def test_stock_lookup_finds_the_trainer_by_name():
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
            "import inspect; from nnunetv2_ohem.training.ohem import nnUNetTrainerOHEMEMA as O; "
            "from nnunetv2_ohem.training.blob import nnUNetTrainerBlobLoss as B; "
            "c = f('nnUNetTrainerOHEMEMA_BlobLoss_Debug'); "
            "print(c.__module__, c.__name__, issubclass(c, O) and issubclass(c, B), "
            "list(inspect.signature(c.__init__).parameters))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]  # nnU-Net prints its search first
    assert last.split()[:3] == ["nnunetv2_ohem.training.ohem_blob", "nnUNetTrainerOHEMEMA_BlobLoss_Debug", "True"]
    assert last.endswith("['self', 'plans', 'configuration', 'fold', 'dataset_json', 'device']")


def test_validation_scores_candidates_in_chunks_on_the_plain_label(trainer):
    """Validation batches are nnU-Net's own (B patches); a larger batch is validated in chunks of B through the
    blob trainer's validation: Dice counts from the label channel only."""
    trainer.on_validation_epoch_start()
    parts = [next(trainer.dataloader_val) for _ in range(2)]
    assert parts[0]["data"].shape[0] == trainer.batch_size
    vbatch = {"data": torch.cat([p["data"] for p in parts]),
              "target": [torch.cat(t) for t in zip(*[p["target"] for p in parts])]}
    seg = vbatch["target"][0][:, :1].clone()
    out = trainer.validation_step(vbatch)
    assert out["tp_hard"].shape == (1,)
    assert out["tp_hard"][0] + out["fn_hard"][0] == int((seg == 1).sum())
    assert np.isfinite(out["loss"])


@pytest.mark.parametrize("batch_dice,w_ce,w_dc", [(False, 1.0, 1.0), (True, 0.5, 2.0)])
def test_fused_dc_ce_and_blob_equals_nnunet_dc_ce_plus_blob_loss_values_and_gradients(batch_dice, w_ce, w_dc):
    """The fast path of BlobLoss (global DC+CE from the blob term's sums) against nnU-Net's own DC_and_CE_loss
    and the unfused blob loss; inconsistent label / instance maps fall back to the unfused computation."""
    import cc3d
    from nnunetv2_ohem.losses.blob import BlobLoss, fused_binary_dc_ce_and_blob
    g = torch.Generator().manual_seed(5)
    seg = (torch.rand(3, 1, 12, 11, 10, generator=g) > 0.8).long()
    seg[1] = 0  # image without foreground
    inst = torch.stack([torch.from_numpy(cc3d.connected_components(s[0].numpy() == 1, connectivity=26)
                                         .astype(np.int64))[None] for s in seg])
    logits = torch.randn(3, 2, 12, 11, 10, generator=g, dtype=torch.float64)
    dcce = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=w_ce, weight_dice=w_dc, dice_class=MemoryEfficientSoftDiceLoss)
    a = logits.clone().float().requires_grad_()
    r = logits.clone().float().requires_grad_()
    glob, blob = fused_binary_dc_ce_and_blob(a, seg, inst, dcce, 0.7, 1.3)
    want_glob, want_blob = dcce(r, seg), blob_loss(r, inst, "softmax", 0.7, 1.3)
    assert abs(glob.item() - want_glob.item()) < 1e-5 and abs(blob.item() - want_blob.item()) < 1e-5
    (2 * glob + blob).backward()
    (2 * want_glob + want_blob).backward()
    torch.testing.assert_close(a.grad, r.grad, atol=1e-7, rtol=1e-4)
    module = BlobLoss(dcce, 1, "softmax", alpha=2.0, beta=1.0, weight_dice=0.7, weight_bce=1.3)
    assert module._fused
    packed = torch.cat([seg, inst], 1)
    assert abs(float(module(logits.float(), packed)) - float(2 * want_glob + want_blob)) < 1e-5
    bad = packed.clone()
    bad[0, 1][bad[0, 0] == 1] = 0  # instance map not derived from the label
    want_bad = 2 * dcce(logits.float(), bad[:, :1]) + blob_loss(logits.float(), bad[:, 1:], "softmax", 0.7, 1.3)
    assert abs(float(module(logits.float(), bad)) - float(want_bad)) < 1e-6
    with pytest.raises(ValueError, match="foreground is exactly"):
        fused_binary_dc_ce_and_blob(logits, bad[:, :1], bad[:, 1:], dcce)
