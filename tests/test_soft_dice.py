"""The one soft-Dice function: against a per-sample, per-channel loop on random inputs, its reductions, and
the identity the OHEM ranking relies on (the per-patch error is the training loss without batch reduction)."""
import pytest
import torch

from nnunetv2_ohem.losses.dice import soft_dice, soft_dice_from_sums
from nnunetv2_ohem.losses.region_dice import region_dice_loss, soft_region_dice
from nnunetv2_ohem.mining.errors import per_sample_dice_loss


def _loop_dice(p, y, m, batch_dice, smooth=1e-5, eps=1e-8):
    """Straight from the formula, one (sample, channel) at a time: (2 Σ p y m + s) / max(Σ p m + Σ y m + s, eps)."""
    n, c = p.shape[:2]
    out = torch.empty(c if batch_dice else (n, c), dtype=torch.float64)
    for j in range(c):
        for i in ([slice(None)] if batch_dice else range(n)):
            pi, yi, mi = p[i, j].double(), y[i, j].double(), m[i, 0].double()
            den = (pi * mi).sum() + (yi * mi).sum() + smooth
            val = (2 * (pi * yi * mi).sum() + smooth) / (den if eps is None else max(den, eps))
            out[j if batch_dice else (i, j)] = val
    return out


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_the_loop_on_random_inputs(batch_dice, masked):
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        p = torch.rand(3, 4, 6, 5, 4, generator=g)
        y = (torch.rand(p.shape, generator=g) > 0.8).float()
        y[1, 2] = 0  # an empty channel
        m = (torch.rand(3, 1, 6, 5, 4, generator=g) > 0.3).float()
        got = soft_dice(p, y, m if masked else None, batch_dice=batch_dice)
        ref = _loop_dice(p, y, m if masked else torch.ones_like(m), batch_dice)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
        if not batch_dice:
            torch.testing.assert_close(soft_dice(p, y, reduction="per_sample"), soft_dice(p, y).mean(1))
        torch.testing.assert_close(soft_dice(p, y, batch_dice=batch_dice, reduction="mean"),
                                   soft_dice(p, y, batch_dice=batch_dice).mean())


def test_empty_target_and_prediction_and_the_clamp():
    zero = torch.zeros(2, 1, 3, 3)
    assert torch.equal(soft_dice(zero, zero), torch.ones(2, 1))  # s / s
    z = torch.zeros(1)
    assert soft_dice_from_sums(z, z, z, smooth=0.0).item() == 0.0  # 0 / max(0, eps)
    assert torch.isnan(soft_dice_from_sums(z, z, z, smooth=0.0, eps=None)).all()
    assert soft_dice_from_sums(torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([5.0]), 0.0).item() == 0.5
    with pytest.raises(ValueError, match="reduction"):
        soft_dice(zero, zero, reduction="sum")
    with pytest.raises(ValueError, match="per-sample"):
        soft_dice(zero, zero, batch_dice=True, reduction="per_sample")


def test_callers_equal_their_former_formulas():
    """The formulas the OHEM ranking error and the BTRSeg loss had before they shared this function."""
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 3, 7, 6, 5, generator=g)
    labels = torch.randint(0, 3, (4, 1, 7, 6, 5), generator=g)
    probs = torch.softmax(logits, 1)
    onehot = torch.zeros_like(logits).scatter_(1, labels, 1.0)
    for ignore in (None, 2):
        mask = torch.ones_like(labels, dtype=torch.float32) if ignore is None else (labels != ignore).float()
        oh = onehot if ignore is None else torch.zeros_like(logits).scatter_(1, torch.where(labels == ignore, 0,
                                                                                            labels), 1.0)
        pr, o = probs[:, 1:], oh[:, 1:]
        axes = (2, 3, 4)
        old = 1 - ((2 * (pr * o * mask).sum(axes) + 1e-5) /
                   ((pr * mask).sum(axes) + (o * mask).sum(axes) + 1e-5).clamp_min(1e-8)).mean(1)
        torch.testing.assert_close(per_sample_dice_loss(logits, labels, ignore_label=ignore), old)
    regions = (torch.rand(logits.shape, generator=g) > 0.6).float()
    p = torch.sigmoid(logits)
    for batch_dice, axes in ((False, (2, 3, 4)), (True, (0, 2, 3, 4))):
        old = (2 * (p * regions).sum(axes) + 1e-5) / (p.sum(axes) + regions.sum(axes) + 1e-5)
        torch.testing.assert_close(soft_region_dice(logits, regions, batch_dice), old)
        torch.testing.assert_close(region_dice_loss(logits, regions, batch_dice), 1 - old.mean())


def test_ranking_error_is_the_training_loss_of_each_patch():
    """nnU-Net's soft Dice (batch_dice off, no background) on patch i alone is -(1 - e_i)."""
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.helpers import softmax_helper_dim1

    g = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(3, 3, 8, 8, 8, generator=g)
    labels = torch.randint(0, 3, (3, 1, 8, 8, 8), generator=g)
    nnunet = MemoryEfficientSoftDiceLoss(softmax_helper_dim1, batch_dice=False, do_bg=False, smooth=1e-5)
    per_patch = per_sample_dice_loss(logits, labels)
    for i in range(3):
        torch.testing.assert_close(per_patch[i], 1 + nnunet(logits[i:i + 1], labels[i:i + 1]))
