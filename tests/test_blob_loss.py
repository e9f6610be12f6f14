"""Blob loss (vectorised) against a per-blob Python loop that masks the other blobs as the paper does, plus the
cc3d instance-map transform."""
import cc3d
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunetv2_ohem.losses.blob import BlobLoss, blob_loss, blob_terms, split_packed_target
from nnunetv2_ohem.transforms.instances import InstanceMapTransform, default_connectivity, instance_maps


def reference_blob_loss(logits, instances, activation, weight_dice=1.0, weight_bce=1.0, smooth=1e-5):
    """Straightforward loop: for every blob, zero the probability of all other blobs of its class (paper) and
    score BCE + (-Dice) on the masked probabilities; mean per (image, class), then over non-empty pairs."""
    probs = torch.softmax(logits, 1)[:, 1:] if activation == "softmax" else torch.sigmoid(logits)
    group_means = []
    for b in range(instances.shape[0]):
        for c in range(instances.shape[1]):
            inst, p = instances[b, c], probs[b, c]
            losses = []
            for k in torch.unique(inst).tolist():
                if k == 0:
                    continue
                y = (inst == k).to(p.dtype)
                keep = (inst == 0) | (inst == k)
                pm = p * keep
                tp, fp, fn = (pm * y).sum(), (pm * (1 - y)).sum(), ((1 - pm) * y).sum()
                dice = (2 * tp + smooth) / (2 * tp + fp + fn + smooth)
                bce = F.binary_cross_entropy(pm, y)
                losses.append(weight_bce * bce - weight_dice * dice)
            if losses:
                group_means.append(sum(losses) / len(losses))
    if not group_means:
        return torch.zeros((), dtype=logits.dtype)
    return sum(group_means) / len(group_means)


def random_instances(gen, shape, n_ids, density):
    """Random ids (non-consecutive, many single voxels and touching blobs of different ids)."""
    ids = torch.randint(1, n_ids + 1, shape, generator=gen)
    return torch.where(torch.rand(shape, generator=gen) < density, ids, torch.zeros_like(ids))


def compare(logits, instances, activation, **kw):
    a = logits.clone().requires_grad_(True)
    r = logits.clone().requires_grad_(True)
    got = blob_loss(a, instances, activation, **kw)
    want = reference_blob_loss(r, instances, activation, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-7)
    return got


@pytest.mark.parametrize("activation,channels,fg", [("softmax", 2, 1), ("softmax", 4, 3), ("sigmoid", 3, 3)])
def test_matches_reference_loop_random_ids(activation, channels, fg):
    gen = torch.Generator().manual_seed(channels)
    logits = 2 * torch.randn(2, channels, 9, 8, 7, generator=gen, dtype=torch.float64)
    instances = random_instances(gen, (2, fg, 9, 8, 7), n_ids=40, density=0.15)
    compare(logits, instances, activation, weight_dice=0.7, weight_bce=1.3)


def test_matches_reference_loop_cc3d_multiclass_2d():
    gen = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 4, (3, 24, 24), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.6] = 0
    inst = torch.stack([torch.from_numpy(instance_maps(np.stack([(lab == c).numpy() for c in (1, 2, 3)])))
                        for lab in labels])
    assert int(inst.amax()) > 20  # many blobs, many of them single pixels
    logits = 2 * torch.randn(3, 4, 24, 24, generator=gen, dtype=torch.float64)
    compare(logits, inst, "softmax")


def test_hundreds_of_blobs_fp32_against_fp64_loop():
    gen = torch.Generator().manual_seed(1)
    instances = random_instances(gen, (1, 1, 16, 16, 16), n_ids=600, density=0.3)
    assert len(torch.unique(instances)) > 400
    logits = torch.randn(1, 2, 16, 16, 16, generator=gen)
    got = blob_loss(logits, instances, "softmax")
    want = reference_blob_loss(logits.double(), instances, "softmax")
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) < 1e-5


def test_single_voxel_and_touching_blobs_exact_values():
    # two touching blobs of one class (ids 1, 2) and one single voxel (id 3), computed by hand
    logits = torch.zeros(1, 1, 1, 1, 6, dtype=torch.float64)  # sigmoid: p = 0.5 everywhere
    inst = torch.tensor([0, 1, 2, 2, 0, 3]).reshape(1, 1, 1, 1, 6)
    dice, bce, group = blob_terms(logits, inst, "sigmoid", smooth=0.0)
    # blob 1: tp 0.5, fp = background (2 voxels) * 0.5 = 1, size 1 -> 2*0.5/(0.5+1+1); blob 2: 2/(1+1+2)
    torch.testing.assert_close(dice, torch.tensor([1 / 2.5, 2 / 4.0, 1 / 2.5], dtype=torch.float64))
    # BCE: every voxel that is not masked costs log 2; blob 1 sees 2 bg + 1 own voxels out of 6
    torch.testing.assert_close(bce, torch.tensor([3, 4, 3], dtype=torch.float64) * np.log(2) / 6)
    assert group.tolist() == [0, 0, 0]


def test_no_blobs_gives_zero_and_empty_images_are_skipped():
    logits = torch.randn(2, 2, 6, 6, 6, dtype=torch.float64, requires_grad=True)
    empty = torch.zeros(2, 1, 6, 6, 6, dtype=torch.long)
    value = blob_loss(logits, empty, "softmax")
    assert value.item() == 0.0 and torch.isfinite(value)
    # one image without blobs must not dilute the mean: equals the loss of the other image alone
    inst = empty.clone()
    inst[1, 0, 2:4, 2:4, 2:4] = 1
    inst[1, 0, 0, 0, 0] = 7
    both = compare(logits.detach(), inst, "softmax")
    alone = blob_loss(logits.detach()[1:], inst[1:], "softmax")
    torch.testing.assert_close(both, alone)


def test_blob_loss_module_alpha1_beta0_is_exactly_global_and_weights_combine():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 8, 8, 8, generator=gen)
    seg = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=gen)
    inst = torch.cat([torch.from_numpy(instance_maps(np.stack([(s[0] == c).numpy() for c in (1, 2)])))[None]
                      for s in seg]).to(torch.int32)
    packed = torch.cat([seg.to(torch.int32), inst], 1)
    glob = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          dice_class=MemoryEfficientSoftDiceLoss)
    only_global = BlobLoss(glob, 2, "softmax", alpha=1.0, beta=0.0)(logits, packed)
    assert torch.equal(only_global, glob(logits, seg))
    mixed = BlobLoss(glob, 2, "softmax", alpha=0.66, beta=0.33)(logits, packed)
    expected = 0.66 * glob(logits, seg) + 0.33 * reference_blob_loss(logits.double(), inst, "softmax")
    assert abs(mixed.item() - expected.item()) < 1e-5


def test_regions_module_with_nnunet_dc_and_bce():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 8, 8, 8, generator=gen)
    labels = torch.randint(0, 4, (2, 8, 8, 8), generator=gen)
    regions = torch.stack([labels > 0, labels > 1, labels == 3], 1)  # WT/TC/ET-like nested regions
    inst = torch.from_numpy(np.stack([instance_maps(r.numpy()) for r in regions]))
    packed = torch.cat([regions.to(torch.int32), inst], 1)
    glob = DC_and_BCE_loss({}, {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": False},
                           dice_class=MemoryEfficientSoftDiceLoss)
    got = BlobLoss(glob, 3, "sigmoid", alpha=2.0, beta=1.0)(logits, packed)
    want = 2 * glob(logits, regions) + reference_blob_loss(logits.double(), inst, "sigmoid")
    assert abs(got.item() - want.item()) < 1e-5


def test_deep_supervision_wrapper_sums_scales_like_nnunet():
    gen = torch.Generator().manual_seed(6)
    seg = torch.zeros(1, 1, 16, 16, 16, dtype=torch.int32)
    seg[0, 0, 2:8, 2:8, 2:8] = 1
    seg[0, 0, 11:13, 11:13, 11:13] = 1
    packed = torch.cat([seg, torch.from_numpy(instance_maps(seg[0].numpy() == 1))[None]], 1)
    targets = [packed, F.interpolate(packed.float(), scale_factor=0.5, mode="nearest-exact").to(torch.int32)]
    outputs = [torch.randn(1, 2, 16, 16, 16, generator=gen), torch.randn(1, 2, 8, 8, 8, generator=gen)]
    glob = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {})
    blob = BlobLoss(glob, 1, "softmax")
    got = DeepSupervisionWrapper(blob, [0.75, 0.25])(outputs, targets)
    want = 0.75 * blob(outputs[0], targets[0]) + 0.25 * blob(outputs[1], targets[1])
    torch.testing.assert_close(got, want)


def test_missed_small_blob_costs_far_more_than_same_voxels_of_large_lesion():
    seg = torch.zeros(1, 1, 20, 20, 20, dtype=torch.int32)
    seg[0, 0, 2:10, 2:10, 2:10] = 1  # 512 voxels
    seg[0, 0, 15:17, 15:17, 15:17] = 1  # 8 voxels
    inst = torch.from_numpy(instance_maps(seg[0].numpy() == 1))[None]
    packed = torch.cat([seg, inst], 1)
    perfect = torch.where(seg.bool(), 8.0, -8.0).repeat(1, 2, 1, 1, 1)
    perfect[:, 0] *= -1
    miss_small, miss_edge = perfect.clone(), perfect.clone()
    miss_small[:, :, 15:17, 15:17, 15:17] *= -1
    miss_edge[:, :, 2:4, 2:4, 2:4] *= -1  # 8 voxels of the large lesion
    glob = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {})
    g_small, g_edge = glob(miss_small, seg).item(), glob(miss_edge, seg).item()
    b_small, b_edge = blob_loss(miss_small, inst, "softmax").item(), blob_loss(miss_edge, inst, "softmax").item()
    assert abs(g_small - g_edge) < 1e-3  # the global loss cannot tell the two errors apart
    assert b_small - b_edge > 0.4  # the blob loss sees a whole lesion gone (its Dice 1 -> 0, halved by K=2)
    full = BlobLoss(glob, 1, "softmax", alpha=2.0, beta=1.0)
    assert full(miss_small, packed).item() - full(miss_edge, packed).item() > 100 * abs(g_small - g_edge)


def test_bf16_autocast_on_cpu_accumulates_in_fp32():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 2, 16, 16, 16, generator=gen)
    inst = random_instances(gen, (2, 1, 16, 16, 16), n_ids=50, density=0.2)
    ref = blob_loss(logits, inst, "softmax")
    low = logits.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = blob_loss(low, inst, "softmax")
    got.backward()
    assert got.dtype == torch.float32 and torch.isfinite(low.grad.float()).all()
    # only the bf16 rounding of the logits (8 bits of mantissa) differs
    assert abs(got.item() - ref.item()) < 2e-3
    torch.testing.assert_close(got, blob_loss(low.detach().float(), inst, "softmax"))


def test_shape_and_value_errors_are_clear():
    with pytest.raises(ValueError, match="instances must have shape"):
        blob_loss(torch.randn(1, 3, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4, dtype=torch.long), "softmax")
    with pytest.raises(ValueError, match="activation"):
        blob_loss(torch.randn(1, 2, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4, dtype=torch.long), "relu")
    with pytest.raises(ValueError, match="integer ids"):
        blob_loss(torch.randn(1, 2, 4, 4, 4), torch.full((1, 1, 4, 4, 4), 0.5), "softmax")
    with pytest.raises(ValueError, match="instance channels"):
        split_packed_target(torch.zeros(1, 1, 4, 4), 1)


# ---- instance maps in the data pipeline ----

@pytest.mark.parametrize("shape,connectivity", [((20, 18, 16), None), ((20, 18, 16), 6), ((30, 28), None),
                                                ((30, 28), 4)])
def test_instance_transform_equals_cc3d(shape, connectivity):
    rng = np.random.default_rng(len(shape) + (connectivity or 0))
    seg = rng.integers(0, 3, size=(1, *shape)).astype(np.int16)
    seg[rng.random(seg.shape) < 0.5] = 0
    out = InstanceMapTransform(labels=[1, 2], connectivity=connectivity)(segmentation=torch.from_numpy(seg.copy()))
    out = out["segmentation"].numpy()
    conn = connectivity or default_connectivity(len(shape))
    assert out.shape == (3, *shape)
    np.testing.assert_array_equal(out[0], seg[0])
    for ch, lab in ((1, 1), (2, 2)):
        np.testing.assert_array_equal(out[ch], cc3d.connected_components(seg[0] == lab, connectivity=conn))


def test_instance_transform_regions_mode_and_bad_connectivity():
    rng = np.random.default_rng(0)
    regions = torch.from_numpy(rng.random((2, 12, 12, 12)) < 0.3)
    out = InstanceMapTransform(num_regions=2)(segmentation=regions.clone())["segmentation"]
    assert out.dtype == torch.int32 and out.shape[0] == 4
    for r in range(2):
        np.testing.assert_array_equal(out[2 + r].numpy(), cc3d.connected_components(regions[r].numpy(),
                                                                                    connectivity=26))
    with pytest.raises(ValueError, match="connectivity 8 is invalid for 3D"):
        instance_maps(regions.numpy(), connectivity=8)
    with pytest.raises(ValueError, match="exactly one"):
        InstanceMapTransform()
