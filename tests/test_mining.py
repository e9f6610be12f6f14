"""Pure OHEM-EMA building blocks against plain reference loops and nnU-Net's own losses, patch by patch."""
import math
import os
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1

from nnunetv2_ohem.mining import (ema_update_, has_foreground, per_sample_ce, per_sample_dc_ce,
                                  per_sample_dice_loss, per_sample_error, select_top_b, unwrap_model)

SMOOTH = 1e-5


# ---------------------------------------------------------------- plain reference loops (one voxel at a time)
def ref_dice_error(logits, target, regions, do_bg, ignore_label=None, ignore_channel=False):
    """1 - mean_c Dice of one patch, voxel loop (logits (C, *sp), target (1 or R(+1), *sp))."""
    c = logits.shape[0]
    probs = torch.sigmoid(logits) if regions else torch.softmax(logits, 0)
    flat_p = probs.reshape(c, -1)
    flat_t = target.reshape(target.shape[0], -1)
    classes = range(c) if do_bg else range(1, c)
    dices = []
    for k in classes:
        inter = sp = sg = 0.0
        for v in range(flat_p.shape[1]):
            if regions:
                if ignore_channel and flat_t[-1, v] > 0:
                    continue
                y = float(flat_t[k, v] > 0)
            else:
                lab = int(flat_t[0, v])
                if ignore_label is not None and lab == ignore_label:
                    continue
                y = float(lab == k)
            p = float(flat_p[k, v])
            inter += p * y
            sp += p
            sg += y
        dices.append((2 * inter + SMOOTH) / max(sp + sg + SMOOTH, 1e-8))
    return 1.0 - sum(dices) / len(dices)


def ref_ce(logits, target, regions, ignore_label=None, ignore_channel=False):
    c = logits.shape[0]
    flat_z = logits.reshape(c, -1).double()
    flat_t = target.reshape(target.shape[0], -1)
    total, count = 0.0, 0
    for v in range(flat_z.shape[1]):
        if regions:
            if ignore_channel and flat_t[-1, v] > 0:
                continue
            for k in range(c):
                z, y = float(flat_z[k, v]), float(flat_t[k, v] > 0)
                total += max(z, 0) - z * y + math.log1p(math.exp(-abs(z)))
                count += 1
        else:
            lab = int(flat_t[0, v])
            if ignore_label is not None and lab == ignore_label:
                continue
            total += -float(torch.log_softmax(flat_z[:, v], 0)[lab])
            count += 1
    return total / max(count, 1)


def random_case(n, c, spatial, regions=False, ignore_label=None, ignore_channel=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, *spatial, generator=g) * 2
    if regions:
        target = (torch.rand(n, c + int(ignore_channel), *spatial, generator=g) < 0.3).float()
    else:
        hi = c + (1 if ignore_label is not None else 0)
        target = torch.randint(0, hi, (n, 1, *spatial), generator=g).float()
    return logits, target


# ---------------------------------------------------------------- per-sample errors
@pytest.mark.parametrize("regions,ignore", [(False, None), (False, 3), (True, False), (True, True)])
def test_per_sample_errors_match_reference_loops(regions, ignore):
    ignore_label = ignore if not regions else None
    ignore_channel = bool(ignore) if regions else False
    logits, target = random_case(3, 3, (4, 5, 3), regions, ignore_label, ignore_channel, seed=1)
    kw = dict(regions=regions, ignore_label=ignore_label, has_ignore_channel=ignore_channel)
    dice = per_sample_dice_loss(logits, target, **kw)
    ce = per_sample_ce(logits, target, **kw)
    dcce = per_sample_dc_ce(logits, target, weight_ce=0.7, weight_dice=1.3, **kw)
    for i in range(3):
        rd = ref_dice_error(logits[i], target[i], regions, do_bg=regions, ignore_label=ignore_label,
                            ignore_channel=ignore_channel)
        rc = ref_ce(logits[i], target[i], regions, ignore_label, ignore_channel)
        assert dice[i].item() == pytest.approx(rd, rel=1e-5, abs=1e-6)
        assert ce[i].item() == pytest.approx(rc, rel=1e-5, abs=1e-6)
        assert dcce[i].item() == pytest.approx(0.7 * rc + 1.3 * rd, rel=1e-5, abs=1e-6)


def test_dc_ce_equals_nnunet_loss_one_patch_at_a_time_with_deep_supervision():
    """Σ_j w_j·e_i(scale j) equals nnU-Net's DeepSupervisionWrapper(DC_and_CE_loss) on patch i alone + Σ w_j."""
    g = torch.Generator().manual_seed(2)
    outs = [torch.randn(4, 3, 8, 8, 8, generator=g), torch.randn(4, 3, 4, 4, 4, generator=g),
            torch.randn(4, 3, 2, 2, 2, generator=g)]
    tgts = [torch.randint(0, 3, (4, 1, *o.shape[2:]), generator=g).float() for o in outs]
    weights = [4 / 6, 2 / 6, 0.0]
    nn_loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": False, "smooth": SMOOTH, "do_bg": False,
                                                     "ddp": False}, {}, weight_ce=1, weight_dice=1,
                                                    dice_class=MemoryEfficientSoftDiceLoss), weights)
    errors = per_sample_error(outs, tgts, "dc_ce", ds_weights=weights)
    for i in range(4):
        expected = nn_loss([o[i:i + 1] for o in outs], [t[i:i + 1] for t in tgts]).item() + sum(weights)
        assert errors[i].item() == pytest.approx(expected, rel=1e-5)
    # a scale with weight 0 must not matter, even if it is garbage
    outs[2] = torch.full_like(outs[2], float("nan"))
    assert torch.allclose(per_sample_error(outs, tgts, "dc_ce", ds_weights=weights), errors)


def test_regions_equal_nnunet_dc_bce_one_patch_at_a_time():
    logits, target = random_case(3, 3, (6, 6, 6), regions=True, seed=3)
    nn_loss = DC_and_BCE_loss({}, {"batch_dice": False, "do_bg": True, "smooth": SMOOTH, "ddp": False},
                              dice_class=MemoryEfficientSoftDiceLoss)
    dice_only = MemoryEfficientSoftDiceLoss(apply_nonlin=torch.sigmoid, batch_dice=False, do_bg=True,
                                            smooth=SMOOTH)
    err = per_sample_error([logits], [target], "dc_ce", regions=True)
    err_dice = per_sample_error(logits, target, "dice", regions=True)
    for i in range(3):
        assert err[i].item() == pytest.approx(nn_loss(logits[i:i + 1], target[i:i + 1]).item() + 1, rel=1e-5)
        assert err_dice[i].item() == pytest.approx(dice_only(logits[i:i + 1], target[i:i + 1]).item() + 1,
                                                   rel=1e-5)


def test_dice_labels_equal_nnunet_dice_2d():
    logits, target = random_case(5, 4, (7, 9), seed=4)
    dl = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=False, do_bg=False,
                                     smooth=SMOOTH)
    err = per_sample_error(logits, target, "dice")
    for i in range(5):
        assert err[i].item() == pytest.approx(dl(logits[i:i + 1], target[i:i + 1]).item() + 1, rel=1e-5)


def test_errors_reject_bad_shapes_and_labels():
    logits, target = random_case(2, 3, (4, 4, 4))
    with pytest.raises(ValueError, match="does not match"):
        per_sample_dice_loss(logits, target[:, :, :3])
    with pytest.raises(ValueError, match=r"label ids must lie in \[0, 2\]"):
        per_sample_ce(logits, target + 3)
    with pytest.raises(ValueError, match="region target needs 4 channels"):
        per_sample_ce(logits, target, regions=True, has_ignore_channel=True)
    with pytest.raises(ValueError, match="unknown ranking error"):
        per_sample_error(logits, target, "focal")


def test_has_foreground():
    t = torch.zeros(3, 1, 4, 4)
    t[1, 0, 2, 2] = 1
    t[2, 0, 0, 0] = 5  # ignore label only
    assert has_foreground(t, ignore_label=5).tolist() == [False, True, False]
    r = torch.zeros(2, 3, 4, 4)
    r[0, 2] = 1  # only the ignore channel set
    r[1, 0, 1, 1] = 1
    assert has_foreground(r, regions=True, has_ignore_channel=True).tolist() == [False, True]


# ---------------------------------------------------------------- top-B selection
def test_select_top_b_matches_sorting_reference_on_random_inputs():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        n = int(torch.randint(1, 40, (1,), generator=g))
        b = int(torch.randint(1, n + 1, (1,), generator=g))
        # few distinct values -> many ties
        e = torch.randint(0, 5, (n,), generator=g).float()
        ref = sorted(sorted(range(n), key=lambda i: (-float(e[i]), i))[:b])
        assert select_top_b(e, b).tolist() == ref


def test_select_top_b_ties_nan_and_identity():
    assert select_top_b(torch.tensor([1.0, 3.0, 3.0, 3.0, 2.0]), 2).tolist() == [1, 2]
    assert select_top_b(torch.tensor([float("nan"), 0.5, 0.1]), 2).tolist() == [1, 2]
    e = torch.rand(7)
    assert select_top_b(e, 7).tolist() == list(range(7))  # k = 1: the batch is unchanged
    with pytest.raises(ValueError, match="cannot select b=8 of 7"):
        select_top_b(e, 8)
    with pytest.raises(ValueError, match="1-D"):
        select_top_b(e[None], 1)


# ---------------------------------------------------------------- EMA
def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 1, 1))


def test_ema_update_matches_formula_for_parameters_and_buffers():
    ema, online = _net(0), _net(1)
    online.train()
    online(torch.randn(2, 2, 5, 5, 5))  # gives BatchNorm running stats and num_batches_tracked
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    mu = 0.9
    ema_update_(ema, online, mu)
    for k, v in ema.state_dict().items():
        o = online.state_dict()[k]
        if v.is_floating_point():
            expected = torch.tensor([mu * float(a) + (1 - mu) * float(b)
                                     for a, b in zip(before[k].flatten(), o.flatten())]).reshape(v.shape)
            assert torch.allclose(v, expected, atol=1e-6), k
        else:
            assert torch.equal(v, o), k


def test_ema_mu_zero_copies_and_mu_one_freezes_through_wrappers():
    ema, online = _net(0), _net(1)
    frozen = {k: v.clone() for k, v in ema.state_dict().items()}
    ema_update_(ema, online, 1.0)
    assert all(torch.equal(frozen[k], v) for k, v in ema.state_dict().items())
    wrapped = nn.DataParallel(online)  # unwrap_model must see through .module
    assert unwrap_model(wrapped) is online
    ema_update_(ema, wrapped, 0.0)
    assert all(torch.equal(online.state_dict()[k], v) for k, v in ema.state_dict().items())


def test_ema_rejects_mismatched_networks():
    with pytest.raises(ValueError, match="differ"):
        ema_update_(_net(0), nn.Sequential(nn.Conv3d(2, 4, 3)), 0.5)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(_net(0), _net(1), 1.5)


# ---------------------------------------------------------------- DDP: miner identical on every rank
def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    # a forked child must not enter the parent's OpenMP pool (libgomp is not fork-safe: it hangs)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
    net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.ReLU(),
                        nn.Conv3d(4, 3, 1))
    import copy
    miner = copy.deepcopy(net).requires_grad_(False)
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # each rank mines from its own candidates
    for _ in range(3):
        x = torch.randn(8, 2, 6, 6, 6, generator=g)
        y = torch.randint(0, 3, (8, 1, 6, 6, 6), generator=g).float()
        with torch.no_grad():
            e = per_sample_error(miner(x), y, "dc_ce")
        idx = select_top_b(e, 2)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x[idx]), y[idx, 0].long())
        loss.backward()
        opt.step()
        ema_update_(miner, ddp, 0.5)
    flat = torch.cat([p.flatten() for p in miner.state_dict().values()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save({"gathered": gathered, "idx_rank0": idx}, os.path.join(out_dir, "res.pt"))
    dist.destroy_process_group()


def test_ema_and_selection_under_two_process_gloo_ddp(tmp_path):
    """Ranks select different patches, but gradients are all-reduced, so the online weights and hence the
    EMA miner stay bit-identical on every rank without any miner communication."""
    import torch.multiprocessing as mp
    init_file = str(tmp_path / "init")
    # fork: the workers need nothing re-imported (spawn would re-import nnU-Net, ~10 s per process)
    mp.start_processes(_ddp_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    res = torch.load(tmp_path / "res.pt")
    a, b = res["gathered"]
    assert torch.equal(a, b)
    torch.manual_seed(0)
    init = torch.cat([p.flatten() for p in nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.ReLU(),
        nn.Conv3d(4, 3, 1)).state_dict().values()])
    assert not torch.allclose(a, init)  # the miner did move


# ---------------------------------------------------------------- hard/random mix, recall, schedule, scoring
from nnunetv2_ohem.mining.schedule import is_mining_step, mining_window  # noqa: E402
from nnunetv2_ohem.mining.scoring import (crop_outputs, downsample_images, pad_to_multiple,  # noqa: E402
                                          resize_target_nearest, total_stride)
from nnunetv2_ohem.mining.selection import hard_count, select_hard_and_random, selection_recall  # noqa: E402


def test_hard_and_random_selection_keeps_the_hardest_and_draws_the_rest_uniformly():
    g = torch.Generator().manual_seed(0)
    errors = torch.randn(12, generator=g)
    order = np.argsort(-errors.numpy(), kind="stable")
    counts = np.zeros(12)
    for trial in range(400):
        idx = select_hard_and_random(errors, 4, 2, torch.Generator().manual_seed(trial)).tolist()
        assert idx == sorted(idx) and len(set(idx)) == 4
        assert set(order[:2]) <= set(idx)
        counts[idx] += 1
    # the 10 other candidates share the 2 random places evenly: expected 400·2/10 = 80 each
    rest = counts[order[2:]]
    assert rest.min() > 50 and rest.max() < 115
    assert torch.equal(select_hard_and_random(errors, 4, 4), select_top_b(errors, 4))
    same = [select_hard_and_random(errors, 4, 1, torch.Generator().manual_seed(7)).tolist() for _ in range(2)]
    assert same[0] == same[1]
    assert [hard_count(2, f) for f in (0.0, 0.25, 0.5, 1.0)] == [0, 0, 1, 2] and hard_count(32, 0.75) == 24
    with pytest.raises(ValueError):
        select_hard_and_random(errors, 4, 5)
    with pytest.raises(ValueError):
        hard_count(4, 1.5)


def test_selection_recall_is_the_overlap_of_two_top_b_sets():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n, b = int(rng.integers(2, 30)), None
        b = int(rng.integers(1, n + 1))
        a_err, r_err = torch.tensor(rng.normal(size=n)), torch.tensor(rng.normal(size=n))
        sel, ref = select_top_b(a_err, b), select_top_b(r_err, b)
        overlap = sum(1 for i in sel.tolist() if i in ref.tolist())
        assert selection_recall(sel, ref) == pytest.approx(overlap / b)
    assert selection_recall([3, 1], [1, 3]) == 1.0 and selection_recall([0, 2], [1, 3]) == 0.0
    with pytest.raises(ValueError):
        selection_recall([1, 2], [1])
    with pytest.raises(ValueError):
        selection_recall([1, 1], [1, 2])


def test_mining_window_and_steps():
    assert mining_window(1000, 0.0, 1.0) == (0, 1000)
    assert mining_window(1000, 0.5, 0.9) == (500, 900)
    w = mining_window(10, 0.25, 0.75)  # round(2.5) = 2 (banker's), round(7.5) = 8
    assert w == (round(2.5), round(7.5))
    assert [is_mining_step(s, w) for s in range(10)] == [w[0] <= s < w[1] for s in range(10)]
    for bad in ((0.5, 0.4), (-0.1, 1.0), (0.0, 1.1)):
        with pytest.raises(ValueError):
            mining_window(10, *bad)


def test_reduced_resolution_helpers_match_plain_references():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 6, 4, generator=g)
    ref = x.reshape(2, 3, 4, 2, 3, 2, 2, 2).mean((3, 5, 7))
    torch.testing.assert_close(downsample_images(x, 2), ref)
    assert downsample_images(x, 1) is x
    p = pad_to_multiple(x[:, :, :, :5, :3], (4, 4, 4))
    assert p.shape[2:] == (8, 8, 4) and torch.equal(p[:, :, :, :5, :3], x[:, :, :, :5, :3])
    assert float(p[:, :, :, 5:].abs().sum()) == 0
    outs = [torch.zeros(1, 1, 8, 8, 4), torch.zeros(1, 1, 4, 4, 2)]
    assert [tuple(o.shape[2:]) for o in crop_outputs(outs, (8, 5, 3), (8, 8, 4))] == [(8, 5, 3), (4, 3, 2)]
    # nearest-exact resizing = nnU-Net's deep-supervision rule: for a factor 2 it picks every second voxel
    # starting at index 0 (centre of [2i, 2i+2) rounded down in nearest-exact's half-pixel rule)
    seg = torch.randint(0, 3, (2, 1, 8, 6, 4), generator=g).to(torch.int16)
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    ds = DownsampleSegForDSTransform([[1, 1, 1], [0.5, 0.5, 0.5]])
    for i in range(2):
        want = ds(segmentation=seg[i])["segmentation"][1]
        assert torch.equal(resize_target_nearest(seg, (4, 3, 2))[i], want)
    assert total_stride([[1, 1, 1], [2, 2, 2], [2, 2, 1]], 3) == (4, 4, 2)
