"""DeepLabv2/v3 network (pure torch) and its nnU-Net trainers.

Network tests use small widths so they run in a fraction of a second each; trainer tests reuse the session's
tiny phantom dataset (``tiny_dataset``); one slow test goes through the stock CLIs.
"""
import inspect
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_ohem.networks.deeplab import (ASPPv2, ASPPv3, AtrousConv, DeepLab, ImagePooling, atrous_conv,
                                            dilation_schedule, group_norm_groups, scale_atrous_rates)
from nnunetv2_ohem.training.deeplab import (ConstantThenPolyLRScheduler, constant_then_poly_lr,
                                            deeplab_kwargs_from_plans, nnUNetTrainerDeepLabV2,
                                            nnUNetTrainerDeepLabV3, nnUNetTrainerDeepLabV3_OS8,
                                            nnUNetTrainerDeepLabV3_SlidesSchedule)

torch.set_num_threads(1)

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
INORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
BNORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def small_net(ndim=2, version="v3", output_stride=16, norm="instance", nonlin=nn.LeakyReLU, **kw):
    """Six stages (nominal stride 32), so output strides 8 and 16 both dilate at least one stage."""
    norm_op = {"instance": INORM[ndim], "batch": BNORM[ndim], None: None}[norm]
    defaults = dict(features_per_stage=[4, 6, 8, 8, 8, 8], strides=[1, 2, 2, 2, 2, 2], output_stride=output_stride,
                    aspp_version=version, norm_op=norm_op, norm_op_kwargs={"affine": True} if norm else None,
                    nonlin=nonlin, nonlin_kwargs={"negative_slope": 1e-2} if nonlin is nn.LeakyReLU else None)
    if version == "v3":
        defaults["aspp_channels"] = 16
    defaults.update(kw)
    return DeepLab(2, 3, CONV[ndim], **defaults)


# ---------------------------------------------------------------- pure functions

def test_dilation_schedule_replaces_stride_by_dilation_per_axis():
    # 2D, OS 8 on nominal 32: the last two stages lose their stride and dilate by 2, then 4
    s, d = dilation_schedule([1, 2, 2, 2, 2, 2], 8, 2)
    assert s == [(1, 1), (2, 2), (2, 2), (2, 2), (1, 1), (1, 1)]
    assert d == [(1, 1), (1, 1), (1, 1), (1, 1), (2, 2), (4, 4)]
    # anisotropic 3D plans: z is down-sampled only twice, so at OS 4 only x/y are dilated
    s, d = dilation_schedule([[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]], 4, 3)
    assert s == [(1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 1, 1)]
    assert d == [(1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 2, 2)]
    # the product of kept strides times the dilation always equals the nominal cumulative stride
    rng = np.random.default_rng(0)
    for _ in range(50):
        strides = rng.choice([1, 2, 4], size=(rng.integers(1, 7), 3)).tolist()
        os_ = int(2 ** rng.integers(0, 6))
        s, d = dilation_schedule(strides, os_, 3)
        for i in range(len(strides)):
            for a in range(3):
                nominal = math.prod(strides[j][a] for j in range(i + 1))
                kept = math.prod(s[j][a] for j in range(i + 1))
                assert kept * d[i][a] == nominal and kept <= max(os_, 1)
                assert kept == min(nominal, os_)
    with pytest.raises(ValueError, match="power of two"):
        dilation_schedule([1, 2], 12, 2)


def test_scale_atrous_rates_doubles_at_output_stride_8():
    assert scale_atrous_rates((6, 12, 18), 16) == (6, 12, 18)
    assert scale_atrous_rates((6, 12, 18), 8) == (12, 24, 36)
    assert scale_atrous_rates((6, 12, 18), 32) == (3, 6, 9)
    assert scale_atrous_rates((6, 12, 18, 24), 8, reference_output_stride=8) == (6, 12, 18, 24)
    assert scale_atrous_rates((1,), 64) == (1,)


@pytest.mark.parametrize("ndim", [2, 3])
def test_atrous_conv_equals_plain_dilated_conv(ndim):
    """The cheap path (central slice where dilation ≥ size) must equal the plainly padded convolution."""
    g = torch.Generator().manual_seed(ndim)
    conv = (None, None, F.conv2d, F.conv3d)[ndim]
    for shape in ([5, 7], [3, 12], [9, 2]) if ndim == 2 else ([3, 5, 6], [7, 2, 9]):
        for d in (1, 2, 4, 6, 13):
            dil = (d,) * ndim if d != 4 else tuple([4, 1, 2][:ndim])
            x = torch.randn(2, 3, *shape, generator=g, requires_grad=True)
            w = torch.randn(4, 3, *([3] * ndim), generator=g, requires_grad=True)
            b = torch.randn(4, generator=g)
            ref = conv(x, w, b, 1, dil, dil)
            out = atrous_conv(x, w, b, dil)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            gx, gw = torch.autograd.grad(out.square().sum(), (x, w))
            rx, rw = torch.autograd.grad(ref.square().sum(), (x, w))
            torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)


def test_group_norm_groups_keeps_groups_wide():
    for c in range(1, 600):
        g = group_norm_groups(c)
        assert c % g == 0
        assert g == 1 or c // g >= 16
        # as many groups as the width allows
        assert not any(c % h == 0 and c // h >= 16 for h in range(g + 1, c // 16 + 1))
    assert group_norm_groups(256) == 16


# ---------------------------------------------------------------- network shapes and structure

@pytest.mark.parametrize("version", ["v2", "v3"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_shape_equals_input_shape_2d(version, output_stride):
    net = small_net(2, version, output_stride)
    for train in (True, False):
        net.train(train)
        for b in (1, 2):
            for shape in ((33, 47), (65, 31), (40, 40), (37, 53)):
                y = net(torch.randn(b, 2, *shape))
                assert y.shape == (b, 3, *shape)
                assert torch.isfinite(y).all()


@pytest.mark.parametrize("version", ["v2", "v3"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_shape_equals_input_shape_3d(version, output_stride):
    net = small_net(3, version, output_stride, features_per_stage=[2, 3, 4, 4, 4, 4])
    for train in (True, False):
        net.train(train)
        for b in (1, 2):
            for shape in ((33, 19, 35), (20, 41, 17)):
                y = net(torch.randn(b, 2, *shape))
                assert y.shape == (b, 3, *shape)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("output_stride", [4, 8, 16])
def test_encoder_feature_map_has_configured_output_stride(ndim, output_stride):
    net = small_net(ndim, "v3", output_stride, features_per_stage=[2, 2, 3, 3, 3, 3])
    shape = (45, 50) if ndim == 2 else (45, 33, 50)
    f = net.encoder(torch.randn(1, 2, *shape))
    # each stride-2, padding-1, kernel-3 conv maps n to ceil(n / 2)
    assert tuple(f.shape[2:]) == tuple(math.ceil(n / output_stride) for n in shape)
    assert net.encoder.output_stride == (output_stride,) * ndim
    # convs of the stages past the output stride are dilated by the stride they lost; earlier ones are not
    for i, stage in enumerate(net.encoder.stages):
        expected = 2 ** max(0, i - int(math.log2(output_stride)))
        convs = [m for m in stage.modules() if isinstance(m, CONV[ndim]) and m.kernel_size[0] == 3]
        assert convs and all(m.dilation == (expected,) * ndim for m in convs)


@pytest.mark.parametrize("output_stride,rates", [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_v3_atrous_rates_are_applied(output_stride, rates):
    net = small_net(2, "v3", output_stride)
    dil = [m.conv.dilation for m in net.aspp.modules() if isinstance(m, AtrousConv)]
    assert dil == [(r, r) for r in rates]
    custom = small_net(3, "v3", 8, atrous_rates=(2, 3), rates_output_stride=16)
    assert [m.conv.dilation for m in custom.aspp.modules() if isinstance(m, AtrousConv)] == [(4, 4, 4), (6, 6, 6)]


def test_v2_atrous_rates_are_applied():
    assert [m.conv.dilation for m in small_net(2, "v2", 8).aspp.modules() if isinstance(m, AtrousConv)] == \
           [(r, r) for r in (6, 12, 18, 24)]
    assert [m.conv.dilation for m in small_net(2, "v2", 16).aspp.modules() if isinstance(m, AtrousConv)] == \
           [(r, r) for r in (3, 6, 9, 12)]


def test_v2_and_v3_heads_differ_as_in_the_papers():
    v2, v3 = small_net(2, "v2"), small_net(2, "v3")
    assert isinstance(v2.aspp, ASPPv2) and isinstance(v3.aspp, ASPPv3)
    # v2: four atrous classifiers straight to the classes, summed; no pooling, no 1×1 branch, no projection
    assert len(v2.aspp.branches) == 4 and all(isinstance(b, AtrousConv) for b in v2.aspp.branches)
    assert all(b.conv.out_channels == 3 for b in v2.aspp.branches)
    assert not any(isinstance(m, ImagePooling) for m in v2.modules())
    x = torch.randn(1, 8, 5, 6)
    torch.testing.assert_close(v2.aspp(x), sum(b(x) for b in v2.aspp.branches))
    # v3: 1×1 + three atrous + image pooling, 16 channels each, concatenated then projected back to 16
    kinds = [type(b[0]).__name__ if isinstance(b, nn.Sequential) else type(b).__name__ for b in v3.aspp.branches]
    assert kinds == ["Conv2d", "AtrousConv", "AtrousConv", "AtrousConv", "ImagePooling"]
    assert v3.aspp.branches[0][0].kernel_size == (1, 1)
    assert v3.aspp.project[0].in_channels == 5 * 16 and v3.aspp.project[0].out_channels == 16
    assert len([b for b in small_net(2, "v3", image_pooling=False).aspp.branches]) == 4


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_pooling_branch_has_no_instance_or_batch_norm_and_trains_at_batch_1(ndim, norm):
    net = small_net(ndim, "v3", 16, norm=norm, features_per_stage=[2, 3, 4, 4, 4, 40], aspp_channels=48)
    pools = [m for m in net.modules() if isinstance(m, ImagePooling)]
    assert len(pools) == 1
    bad = (nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm)
    assert not any(isinstance(m, bad) for m in pools[0].modules())
    assert isinstance(pools[0].norm, nn.GroupNorm) and pools[0].norm.num_groups == 3
    # the other branches do use the plans' norm
    assert any(isinstance(m, bad) for m in net.aspp.branches[0].modules())
    net.train()
    x = torch.randn(1, 2, *([33] * ndim))
    y = net(x)
    y.mean().backward()
    assert pools[0].conv.weight.grad is not None and pools[0].conv.weight.grad.abs().sum() > 0
    none = small_net(ndim, "v3", 16, pooling_norm="none")
    p = [m for m in none.modules() if isinstance(m, ImagePooling)][0]
    assert isinstance(p.norm, nn.Identity) and p.conv.bias is not None


def test_v3_pooling_branch_sees_the_whole_field_v2_does_not():
    """Without norm layers (InstanceNorm's statistics are global too) the only global path is image pooling."""
    kw = dict(features_per_stage=[4, 8, 8], strides=[1, 2, 2], output_stride=4, norm=None, atrous_rates=(1, 2),
              rates_output_stride=4)
    torch.manual_seed(0)
    x = torch.randn(1, 2, 96, 96)
    x2 = x.clone()
    x2[..., 0, 0] += 100.0  # one voxel in the far corner
    with torch.no_grad():
        for version, pooling, global_ in (("v3", True, True), ("v3", False, False), ("v2", True, False)):
            extra = {"image_pooling": pooling} if version == "v3" else {}
            net = small_net(2, version, **extra, **kw).eval()
            diff = (net(x2) - net(x)).abs()
            if global_:
                assert (diff > 0).all(), "image pooling must carry the corner voxel to every location"
            else:
                assert diff[..., 60:, 60:].max() == 0 and diff[..., :4, :4].max() > 0
    # gradient check of v2's bounded receptive field: stem 1 + stage0 2 + stage1 1+2 + stage2 2+4 + ASPP 2·4
    # = 20 voxels, plus ≤ 4 from the up-sampling; nothing beyond 24 voxels from the centre may matter
    net = small_net(2, "v2", **kw).eval()
    xg = x.clone().requires_grad_(True)
    net(xg)[0, 1, 48, 48].backward()
    g = xg.grad[0].abs().sum(0)
    assert g[48, 48] > 0
    far = torch.ones_like(g, dtype=torch.bool)
    far[48 - 24:48 + 25, 48 - 24:48 + 25] = False
    assert g[far].max() == 0
    assert g[48 - 24:48 + 25, 48 - 24:48 + 25].count_nonzero() > 200


def test_parameter_counts_match_closed_form():
    c_in, c, k, ndim = 8, 16, 3, 2
    net = small_net(ndim, "v3", 16, norm="instance")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # 1×1 branch (no bias under a norm) + affine norm; 3 atrous 3×3 branches; pooling 1×1 + GroupNorm;
    # projection 5c → c + norm
    aspp = (c_in * c + 2 * c) + 3 * (c_in * c * 9 + 2 * c) + (c_in * c + 2 * c) + (5 * c * c + 2 * c)
    assert n(net.aspp) == aspp
    head = (c * c * 9 + 2 * c) + (c * k + k)
    assert n(net.head) == head
    v2 = small_net(ndim, "v2", 8)
    assert n(v2.aspp) == 4 * (c_in * k * 9 + k)
    # the same parameters at every output stride: DeepLabv3 trains at 16 and may evaluate at 8
    for version in ("v2", "v3"):
        a, b = small_net(3, version, 16), small_net(3, version, 8)
        assert {k_: v.shape for k_, v in a.state_dict().items()} == {k_: v.shape for k_, v in b.state_dict().items()}
        b.load_state_dict(a.state_dict())


def test_bad_arguments_and_inputs_raise_clear_errors():
    net = small_net(2)
    with pytest.raises(ValueError, match=r"expects \(B, 2, H, W\)"):
        net(torch.randn(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match=r"expects \(B, 2"):
        net(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="single output"):
        small_net(2, deep_supervision=True)
    with pytest.raises(ValueError, match="power of two"):
        small_net(2, output_stride=12)
    with pytest.raises(ValueError, match="aspp_version"):
        small_net(2, version="v4")
    with pytest.raises(ValueError, match="pooling_norm"):
        small_net(2, pooling_norm="instance")
    with pytest.raises(ValueError, match="strides has 2 stages"):
        DeepLab(1, 2, nn.Conv2d, [4, 8, 8], [1, 2])


# ---------------------------------------------------------------- schedule

def test_constant_then_poly_lr_matches_reference_loop():
    lr0, T, c = 2.5e-4, 50, 30
    lrs = [constant_then_poly_lr(t, T, lr0, c) for t in range(T)]
    ref = []
    for t in range(T):
        if t < c:
            ref.append(lr0)
        else:
            ref.append(lr0 * (1 - (t - c) / (T - c)) ** 0.9)
    np.testing.assert_allclose(lrs, ref, rtol=1e-12)
    assert lrs[c] == lr0 and lrs[c + 1] < lr0 and all(a >= b for a, b in zip(lrs, lrs[1:]))
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr0)
    sched = ConstantThenPolyLRScheduler(opt, lr0, T, c)
    for t in range(T):
        sched.step(t)
        assert opt.param_groups[0]["lr"] == pytest.approx(ref[t], rel=1e-12)
    with pytest.raises(ValueError):
        constant_then_poly_lr(0, 10, 1.0, 10)


# ---------------------------------------------------------------- nnU-Net integration

def _load_plans(tiny_dataset):
    with open(os.path.join(tiny_dataset.preprocessed_folder, tiny_dataset.plans_identifier + ".json")) as f:
        plans = json.load(f)
    with open(os.path.join(tiny_dataset.preprocessed_folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    plans["continue_training"] = False  # run_training sets it; the trainer pops it from the dict
    return plans, dataset_json


def test_plans_kwargs_translation():
    arch = {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
            "n_conv_per_stage": [2, 4, 2], "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5},
            "dropout_op": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    kw = deeplab_kwargs_from_plans(arch, ["conv_op", "norm_op", "dropout_op", "nonlin"], "v3", 16)
    assert kw["conv_op"] is nn.Conv3d and kw["norm_op"] is nn.InstanceNorm3d and kw["nonlin"] is nn.LeakyReLU
    assert kw["n_blocks_per_stage"] == [1, 2, 1] and kw["kernel_sizes"][0] == [1, 3, 3]
    assert deeplab_kwargs_from_plans(dict(arch, n_blocks_per_stage=[1, 3, 4]), [], "v3", 16)[
        "n_blocks_per_stage"] == [1, 3, 4]
    with pytest.raises(ImportError, match="no.such.Op"):
        deeplab_kwargs_from_plans(dict(arch, norm_op="no.such.Op"), ["norm_op"], "v3", 16)


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_builders_called_on_the_class_build_from_tiny_plans(tiny_dataset, configuration):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans, dataset_json = _load_plans(tiny_dataset)
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    for trainer, version in ((nnUNetTrainerDeepLabV3, "v3"), (nnUNetTrainerDeepLabV2, "v2"),
                             (nnUNetTrainerDeepLabV3_OS8, "v3")):
        # nnUNetPredictor picks the 2.8.1 call by this test
        assert "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters
        net = trainer.build_network_architecture(pm, cm, 2, n_out, enable_deep_supervision=False)
        assert isinstance(net, DeepLab) and net.aspp_version == version and net.ndim == len(cm.patch_size)
        assert net.encoder.stages[-1][0].conv1.out_channels == cm.network_arch_init_kwargs["features_per_stage"][-1]
        net.eval()
        with torch.no_grad():
            y = net(torch.randn(1, 2, *cm.patch_size))
        assert y.shape == (1, n_out, *cm.patch_size)
        assert net.atrous_rates == ((12, 24, 36) if trainer is nnUNetTrainerDeepLabV3_OS8 else
                                    (6, 12, 18) if version == "v3" else (6, 12, 18, 24))


def test_nnunet_finds_every_deeplab_trainer_by_name():
    """Stock nnUNetv2_train/predict resolve -tr NAME with this function (our discovery hook adds our folder)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    import nnunetv2_ohem.training.deeplab as mod
    names = [n for n in dir(mod) if n.startswith("nnUNetTrainer") and getattr(mod, n).__module__ == mod.__name__]
    assert sorted(names) == sorted(["nnUNetTrainerDeepLabV3", "nnUNetTrainerDeepLabV2",
                                    "nnUNetTrainerDeepLabV3_SlidesSchedule", "nnUNetTrainerDeepLabV3_Debug",
                                    "nnUNetTrainerDeepLabV3_OS8", "nnUNetTrainerDeepLabV3_OS8_Debug",
                                    "nnUNetTrainerDeepLabV2_Debug", "nnUNetTrainerDeepLabV3_SlidesSchedule_Debug"])
    for name in names:
        cls = recursive_find_trainer_class_by_name(name)
        assert cls is not None and cls.__name__ == name and issubclass(cls, nnUNetTrainerDeepLabV3)
        assert list(inspect.signature(cls.__init__).parameters) == [
            "self", "plans", "configuration", "fold", "dataset_json", "device"]
    assert nnUNetTrainerDeepLabV3_SlidesSchedule.__mro__[1] is nnUNetTrainerDeepLabV3
    assert mod.nnUNetTrainerDeepLabV2_Debug.__mro__[1] is nnUNetTrainerDeepLabV2


def _fixed_batch(trainer, n=2):
    """Two foreground-containing 32² slices of the first preprocessed case (deterministic)."""
    ids = trainer.dataset_class.get_identifiers(trainer.preprocessed_dataset_folder)
    ds = trainer.dataset_class(trainer.preprocessed_dataset_folder, ids[:1])
    data, seg, _, _ = ds.load_case(ids[0])
    data, seg = np.asarray(data), np.asarray(seg)
    z = np.argsort(-(seg > 0).sum(axis=(0, 2, 3)))[:n]
    ps = trainer.configuration_manager.patch_size
    x = torch.from_numpy(np.stack([data[:, i, :ps[0], :ps[1]] for i in z])).float()
    y = torch.from_numpy(np.stack([seg[:, i, :ps[0], :ps[1]] for i in z])).float()
    assert (y > 0).any()
    return {"data": x, "target": y}


def test_trainer_initialises_without_deep_supervision_and_learns(tiny_dataset):
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    plans, dataset_json = _load_plans(tiny_dataset)
    torch.manual_seed(0)
    trainer = nnUNetTrainerDeepLabV3(plans, "2d", 0, dataset_json, device=torch.device("cpu"))
    trainer.initialize()
    assert isinstance(trainer.network, DeepLab) and trainer.network.aspp_version == "v3"
    assert not trainer.enable_deep_supervision and not isinstance(trainer.loss, DeepSupervisionWrapper)
    assert trainer._get_deep_supervision_scales() is None
    trainer.set_deep_supervision_enabled(False)  # what validation does before and after predicting
    trainer.set_deep_supervision_enabled(True)
    trainer.network.train()
    batch = _fixed_batch(trainer)
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(6)]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.05, losses


def test_slides_schedule_trainer_uses_constant_then_poly(tiny_dataset):
    plans, dataset_json = _load_plans(tiny_dataset)
    trainer = nnUNetTrainerDeepLabV3_SlidesSchedule(plans, "2d", 0, dataset_json, device=torch.device("cpu"))
    trainer.num_epochs = 10
    trainer.network = nnUNetTrainerDeepLabV3.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 2, 2, False)
    opt, sched = trainer.configure_optimizers()
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 5e-4
    seen = []
    for epoch in range(10):
        sched.step(epoch)
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([constant_then_poly_lr(e, 10, 2.5e-4, 6) for e in range(10)])
    assert seen[:7] == [2.5e-4] * 7 and seen[-1] < 2.5e-4 / 2


def test_v2_3d_checkpoint_is_rebuilt_by_stock_predictor(tiny_dataset, tmp_path):
    """nnUNetPredictor finds the trainer by name, calls its static builder and loads the weights: the
    rebuilt network gives bit-identical logits."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    plans, dataset_json = _load_plans(tiny_dataset)
    torch.manual_seed(1)
    trainer = nnUNetTrainerDeepLabV2(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    trainer.initialize()
    trainer.inference_allowed_mirroring_axes = (0, 1, 2)
    model_dir = tmp_path / "model"
    (model_dir / "fold_0").mkdir(parents=True)
    trainer.save_checkpoint(str(model_dir / "fold_0" / "checkpoint_final.pth"))
    with open(model_dir / "plans.json", "w") as f:
        json.dump(plans, f)
    with open(model_dir / "dataset.json", "w") as f:
        json.dump(dataset_json, f)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), (0,), "checkpoint_final.pth")
    assert isinstance(predictor.network, DeepLab) and predictor.network.aspp_version == "v2"
    x = torch.randn(1, 2, 32, 32, 32)
    trainer.network.eval()
    predictor.network.eval()
    with torch.no_grad():
        torch.testing.assert_close(predictor.network(x), trainer.network(x), rtol=0, atol=0)
    logits = predictor.predict_logits_from_preprocessed_data(torch.randn(2, 40, 36, 38))
    assert logits.shape == (2, 40, 36, 38)


@pytest.mark.slow
@pytest.mark.parametrize("trainer,configuration", [("nnUNetTrainerDeepLabV3_Debug", "2d"),
                                                   ("nnUNetTrainerDeepLabV2_Debug", "3d_fullres")])
def test_stock_cli_train_and_predict(tiny_dataset, cli, tmp_path, trainer, configuration):
    import SimpleITK as sitk
    # one export worker instead of 8 spawned processes; nnU-Net sets torch's threads to cpu_count() on CPU, and
    # on a busy machine spinning OpenMP workers made the 2d validation ~20x slower (96 s vs 5 s per case)
    env = dict(os.environ, nnUNet_def_n_proc="1", OMP_WAIT_POLICY="PASSIVE")
    cli(["nnUNetv2_train", str(tiny_dataset.dataset_id), configuration, "0", "-tr", trainer,
         "-p", tiny_dataset.plans_identifier, "-device", "cpu"], env=env)
    ckpt = torch.load(os.path.join(os.environ["nnUNet_results"], tiny_dataset.name,
                                   f"{trainer}__{tiny_dataset.plans_identifier}__{configuration}", "fold_0",
                                   "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == trainer
    # the trained weights are a DeepLab's (ASPP present, no U-Net decoder), v3 with its pooling branch
    keys = ckpt["network_weights"].keys()
    assert any(k.startswith("aspp.branches.") for k in keys) and not any(k.startswith("decoder.") for k in keys)
    assert any(".norm.weight" in k and k.startswith("aspp.branches.4.") for k in keys) == ("V3" in trainer)
    out = tmp_path / "pred"
    images = os.path.join(tiny_dataset.raw_folder, "imagesTs")
    cli(["nnUNetv2_predict", "-i", images, "-o", str(out), "-d", str(tiny_dataset.dataset_id), "-c", configuration,
         "-f", "0", "-tr", trainer, "-p", tiny_dataset.plans_identifier, "-device", "cpu",
         "--disable_tta", "-npp", "1", "-nps", "1"], env=env)
    cases = sorted({f[:-len("_0000.nii.gz")] for f in os.listdir(images) if f.endswith("_0000.nii.gz")})
    assert cases
    for case in cases:
        ref = sitk.ReadImage(os.path.join(images, case + "_0000.nii.gz"))
        pred = sitk.ReadImage(str(out / (case + ".nii.gz")))
        assert pred.GetSize() == ref.GetSize()
        np.testing.assert_allclose(pred.GetSpacing(), ref.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1}
