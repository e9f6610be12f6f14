"""Mixed-precision / BTRSeg trainers: precision is real, GroupNorm resolves, region Dice loss, lr
schedule, BTRSeg normalisation, plans, and one stock-CLI train + predict on a BraTS-like region phantom."""
import glob
import os
import pickle
import pydoc

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_ohem.losses.region_dice import deep_supervision_weights, region_dice_loss, soft_region_dice
from nnunetv2_ohem.networks.norms import GROUPNORM_DOTTED_NAME, GroupNorm, resolve_num_groups
from nnunetv2_ohem.plans.btrseg import PRECISION_MEMORY_FACTOR, batch_size_for_memory
from nnunetv2_ohem.preprocessing.btrseg import (BTRSEG_SCHEME, BTRSegNormalization, ExtendedConfigurationManager,
                                                ExtendedPreprocessor, btrseg_normalize)
from nnunetv2_ohem.training import precision as P

from precision_fixtures import build_region_dataset


@pytest.fixture(scope="session")
def region_dataset(nnunet_env):
    return build_region_dataset(nnunet_env)


# ------------------------------------------------------------------------------------------- pure functions
def test_resolve_num_groups_matches_loop():
    def reference(c, g):
        best = 1
        for cand in range(1, min(g, c) + 1):
            if c % cand == 0:
                best = cand
        return best

    for c in range(1, 80):
        for g in (1, 2, 3, 4, 8, 16, 32):
            assert resolve_num_groups(c, g) == reference(c, g), (c, g)
    assert resolve_num_groups(64, channels_per_group=16) == 4
    assert resolve_num_groups(20, 8) == 5
    with pytest.raises(ValueError, match="num_channels"):
        resolve_num_groups(0, 8)


def test_groupnorm_resolvable_with_nnunet_signature():
    cls = pydoc.locate(GROUPNORM_DOTTED_NAME)
    assert cls is GroupNorm
    norm = cls(20, **{"num_groups": 8, "eps": 1e-5, "affine": True})
    assert (norm.num_groups, norm.num_channels) == (5, 20)
    x = torch.randn(2, 20, 3, 4, 5, dtype=torch.float64)
    norm = norm.double()
    ref = torch.nn.functional.group_norm(x, 5, norm.weight, norm.bias, 1e-5)
    torch.testing.assert_close(norm(x), ref)
    # by hand: each group of 4 channels has mean 0 / var 1 over (channels, space) before the affine part
    g = norm(x).reshape(2, 5, -1)
    torch.testing.assert_close(g.mean(-1), torch.zeros(2, 5, dtype=torch.float64), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="expects input"):
        norm(torch.randn(2, 8, 3, 3, 3, dtype=torch.float64))


def _dice_reference(logits, target, batch_dice, smooth=1e-5):
    p = torch.sigmoid(logits.double())
    b, r = logits.shape[:2]
    if batch_dice:
        out = []
        for j in range(r):
            inter = sum(float((p[i, j] * target[i, j]).sum()) for i in range(b))
            ps = sum(float(p[i, j].sum()) for i in range(b))
            ys = sum(float(target[i, j].sum()) for i in range(b))
            out.append((2 * inter + smooth) / (ps + ys + smooth))
        return np.array(out)
    out = np.zeros((b, r))
    for i in range(b):
        for j in range(r):
            inter = float((p[i, j] * target[i, j]).sum())
            out[i, j] = (2 * inter + smooth) / (float(p[i, j].sum()) + float(target[i, j].sum()) + smooth)
    return out


@pytest.mark.parametrize("batch_dice", [False, True])
def test_region_dice_matches_loop(batch_dice):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, 5, 6, 4, generator=g)
    target = (torch.rand(3, 3, 5, 6, 4, generator=g) > 0.6).float()
    target[1, 2] = 0  # an empty region
    got = soft_region_dice(logits, target, batch_dice)
    np.testing.assert_allclose(got.numpy(), _dice_reference(logits, target, batch_dice), rtol=1e-5)
    loss = region_dice_loss(logits, target, batch_dice)
    assert float(loss) == pytest.approx(1 - _dice_reference(logits, target, batch_dice).mean(), rel=1e-5)


def test_region_dice_loss_by_hand_with_gradient():
    # one sample, three regions (WT, TC, ET) on 4 voxels; logits 0 -> p = 0.5 everywhere
    logits = torch.zeros(1, 3, 4, requires_grad=True)
    target = torch.tensor([[[1., 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]])
    # Dice_r = 2 * 0.5 * |y_r| / (2 + |y_r|): WT 3/5, TC 2/4, ET 1/3
    expected = 1 - (3 / 5 + 2 / 4 + 1 / 3) / 3
    loss = region_dice_loss(logits, target, smooth=0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # dL/dz = -(1/3) dD/dp * p(1-p); dD/dp_v = (2 y_v (P+Y) - 2I) / (P+Y)^2
    p, grad = 0.5, torch.zeros(1, 3, 4)
    for r in range(3):
        y = target[0, r]
        P_, Y, I = 4 * p, float(y.sum()), float((p * y).sum())
        grad[0, r] = -(1 / 3) * (2 * y * (P_ + Y) - 2 * I) / (P_ + Y) ** 2 * p * (1 - p)
    torch.testing.assert_close(logits.grad, grad)


def test_region_dice_shape_errors():
    with pytest.raises(ValueError, match="target shape"):
        region_dice_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4))


def test_deep_supervision_weights_like_nnunet():
    np.testing.assert_allclose(deep_supervision_weights(4), np.array([1, .5, .25, 0]) / 1.75)
    np.testing.assert_allclose(deep_supervision_weights(1), [1.0])


def test_exponential_decay_on_optimizer_after_epochs():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    sched = P.ExponentialDecayLRScheduler(opt, 5e-4, 0.985)
    for epoch in range(11):  # nnU-Net calls step(current_epoch) at each epoch start
        sched.step(epoch)
    lr = 5e-4
    for _ in range(10):
        lr *= 0.985
    assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
    with pytest.raises(ValueError):
        P.exponential_decay_lr(1.0, 0.9, -1)


def test_btrseg_normalize_against_numpy_reference():
    rng = np.random.default_rng(1)
    img = np.zeros((20, 21, 22), np.float32)
    brain = np.zeros(img.shape, bool)
    brain[3:17, 4:18, 2:20] = True
    img[brain] = rng.gamma(2.0, 50.0, brain.sum())
    img[5, 5, 5] = 1e5  # outlier: lands beyond +5 sd and gets clipped
    out = btrseg_normalize(img, brain)
    # reference by the formula, in float64
    x = img.astype(np.float64)
    z = (x - x[brain].mean()) / x[brain].std()
    assert abs(z[brain].mean()) < 1e-9 and abs(z[brain].std() - 1) < 1e-9  # mean 0 / sd 1 in the brain
    assert z.max() > 5
    z = np.clip(z, -5, 5)
    ref = (z - z.min()) / (z.max() - z.min())
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert out.min() == 0 and out.max() == pytest.approx(1.0)
    assert out.dtype == np.float32 and img[5, 5, 5] == 1e5  # input untouched
    # default mask = non-zero voxels = the brain here
    np.testing.assert_allclose(btrseg_normalize(img), out, atol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        btrseg_normalize(img, brain[:-1])


def test_btrseg_scheme_uses_nnunet_mask():
    rng = np.random.default_rng(2)
    img = rng.normal(100, 10, (8, 9, 10)).astype(np.float32)
    seg = np.zeros(img.shape, np.int8)
    seg[:3] = -1  # nnU-Net marks outside-the-non-zero-region voxels with -1
    out = BTRSegNormalization(use_mask_for_norm=True, intensityproperties={}).run(img.copy(), seg)
    np.testing.assert_allclose(out, btrseg_normalize(img, seg >= 0), atol=1e-6)


def test_resolve_precision_table():
    r = P.resolve_precision
    assert r("fp32", "cuda").autocast_dtype is None and not r("fp32", "cuda").grad_scaler
    assert r("fp16", "cuda").autocast_dtype == torch.float16 and r("fp16", "cuda").grad_scaler
    assert r("bf16", "cpu").autocast_dtype == torch.bfloat16 and not r("bf16", "cpu").grad_scaler
    cpu16 = r("fp16", "cpu")
    assert (cpu16.effective, cpu16.autocast_dtype, cpu16.grad_scaler) == ("fp32", None, False)
    assert "fp16 requested on CPU" in cpu16.message and P.CPU_FP16_ENV in cpu16.message
    assert r("fp16", "cpu", cpu_fp16="fp16").grad_scaler
    assert r("fp16", "cpu", cpu_fp16="bf16").autocast_dtype == torch.bfloat16
    assert r("bf16", "cuda", bf16_supported=False).effective == "fp16"
    assert r("bf16", "mps").effective == "fp32"
    with pytest.raises(ValueError, match="precision"):
        r("fp8", "cpu")


def test_batch_size_for_memory():
    assert PRECISION_MEMORY_FACTOR["fp32"] == 0.5
    b16 = batch_size_for_memory(560e6 * 12 / 8, 100e6, 2, "fp16", 100)
    b32 = batch_size_for_memory(560e6 * 12 / 8, 100e6, 2, "fp32", 100)
    assert (b16, b32) == (round(2 * 840e6 / 100e6), round(2 * 840e6 * 0.5 / 100e6)) == (17, 8)
    assert batch_size_for_memory(1, 100, 2, "fp32", 100) == 2  # nnU-Net's minimum
    assert batch_size_for_memory(1e12, 1, 2, "fp16", 7) == 7  # 5 % dataset cap


def test_btrseg_planner_128_patch_and_precision_batch(region_dataset, monkeypatch):
    """BraTS-sized median shape: the plan gets a 128³ patch with nnU-Net's topology for it, GroupNorm, the
    BTRSeg scheme, and a batch for fp32 that is half the fp16 one (same memory budget)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    from nnunetv2_ohem.plans.btrseg import BTRSegPlanner

    monkeypatch.setenv("nnUNet_n_proc_DA", "1")  # nnU-Net's VRAM estimate sets torch threads from it
    base = load_json(os.path.join(region_dataset.preprocessed_folder, region_dataset.plans_identifier + ".json"))
    base = base["configurations"]["3d_fullres"]
    batches = {}
    for prec in ("fp16", "fp32"):
        planner = BTRSegPlanner(region_dataset.dataset_id, precision=prec, gpu_memory_target_in_gb=40)
        plan = planner._btrseg_patch_and_batch(dict(base), (1.0, 1.0, 1.0), (140, 170, 140), 1e12)
        assert plan["patch_size"] == [128, 128, 128]
        _, pool, conv, _, _ = get_pool_and_conv_props((1.0, 1.0, 1.0), [128] * 3,
                                                      planner.UNet_featuremap_min_edge_length, 999999)
        assert plan["architecture"]["arch_kwargs"]["strides"] == pool
        assert plan["architecture"]["arch_kwargs"]["n_stages"] == len(pool)
        batches[prec] = plan["batch_size"]
    assert batches["fp16"] > batches["fp32"] >= 2
    assert abs(batches["fp16"] - 2 * batches["fp32"]) <= 1
    normalised, _ = planner.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
    assert normalised == [BTRSEG_SCHEME] * 4


def test_precision_network_compiles_without_graph_breaks():
    """nnU-Net compiles the network on CUDA by default: our autocast forward must trace as one graph."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    net = PlainConvUNet(4, 3, [4, 8, 16], torch.nn.Conv3d, 3, [1, 2, 2], [2, 2, 2], 3, [2, 2], conv_bias=True,
                        norm_op=GroupNorm, norm_op_kwargs={"num_groups": 4}, nonlin=torch.nn.LeakyReLU,
                        deep_supervision=True)
    P.set_network_precision(net, "bf16")
    x = torch.randn(1, 4, 16, 16, 16)
    compiled = torch.compile(net, backend="eager", fullgraph=True)  # raises on any graph break
    with torch.no_grad():
        got, ref = compiled(x), net(x)
    assert [o.dtype for o in got] == [torch.float32, torch.float32]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


# the names the paper's Table 1 rows had before the trainers were generated from the table
TABLE1_NAMES = ("nnUNetTrainerBTRSeg_FP32_IN_Adam_bs2", "nnUNetTrainerBTRSeg_FP32_BN_Adam_bs2",
                "nnUNetTrainerBTRSeg_FP16_BN_Adam_bs6", "nnUNetTrainerBTRSeg_FP16_GN_Adam_bs3",
                "nnUNetTrainerBTRSeg_FP16_GN_RAdam_bs2", "nnUNetTrainerBTRSeg_FP16_GN_RAdam_bs3")


# what docs/mixed_precision.md shows for a combination that is not a named trainer
class nnUNetTrainerBTRSeg_BF16_GN_RAdam_bs3(P.BTRSegTrainer):
    precision, norm, optimizer_name, batch_size_override = "bf16", "group", "radam", 3


def test_trainer_names_cover_table1():
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    assert tuple(name for _, name in P.TABLE1) == TABLE1_NAMES
    for (_, name), (_, (prec, norm, opt, bs)) in zip(P.TABLE1, P.TABLE1_SETTINGS):
        cls = getattr(P, name)
        assert cls.__name__ == name and issubclass(cls, P.BTRSegTrainer)
        assert (cls.precision, cls.norm, cls.optimizer_name, cls.batch_size_override) == (prec, norm, opt, bs)
        assert getattr(P, name + "_Debug").__mro__[1] is cls
    # the named BTRSeg trainers are the default and the table's rows, each with its _Debug sibling
    named = {n for n in vars(P) if n.startswith("nnUNetTrainerBTRSeg")}
    assert named == {n + d for n in ("nnUNetTrainerBTRSeg",) + TABLE1_NAMES for d in ("", "_Debug")}
    assert P.btrseg_name("bf16", "group", "radam", 3) == nnUNetTrainerBTRSeg_BF16_GN_RAdam_bs3.__name__
    cls = recursive_find_trainer_class_by_name("nnUNetTrainerBTRSeg_FP16_BN_Adam_bs6")
    assert (cls.precision, cls.norm, cls.optimizer_name, cls.batch_size_override) == ("fp16", "batch", "adam", 6)
    dbg = recursive_find_trainer_class_by_name("nnUNetTrainerBF16_GN_Debug")
    assert dbg.precision == "bf16" and dbg.norm == "group"


# ------------------------------------------------------------------------------------------- trainers (in process)
def _trainer(name_or_class, ds, device="cpu"):
    from batchgenerators.utilities.file_and_folder_operations import load_json

    plans = load_json(os.path.join(ds.preprocessed_folder, ds.plans_identifier + ".json"))
    plans["continue_training"] = False  # nnU-Net 2.8.1's run_training sets this key before instantiating
    dataset_json = load_json(os.path.join(ds.preprocessed_folder, "dataset.json"))
    cls = getattr(P, name_or_class) if isinstance(name_or_class, str) else name_or_class
    t = cls(plans, "3d_fullres", 0, dataset_json, torch.device(device))
    t.initialize()
    return t


def _batch(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = t.configuration_manager.patch_size
    data = torch.randn(2, t.num_input_channels, *ps, generator=g)
    scales = t._get_deep_supervision_scales()
    heads = t.label_manager.num_segmentation_heads
    targets = []
    for s in scales:
        shape = [int(round(p * f)) for p, f in zip(ps, s)]
        targets.append((torch.rand(2, heads, *shape, generator=g) > 0.7).float())
    return {"data": data, "target": targets}


def _record_conv_dtypes(network, all_leaves: bool = False):
    """Forward hooks recording (output dtype, CPU autocast on?) of every Conv3d (or every leaf module)."""
    seen = []

    def hook(module, inputs, output):
        seen.append((output.dtype, torch.is_autocast_enabled("cpu")))

    wanted = [m for m in network.modules()
              if (not list(m.children()) if all_leaves else isinstance(m, torch.nn.Conv3d))]
    return seen, [m.register_forward_hook(hook) for m in wanted]


@pytest.mark.parametrize("name,expect_dtype,autocast", [
    ("nnUNetTrainerFP32_GN_Debug", torch.float32, False),
    ("nnUNetTrainerBF16_GN_Debug", torch.bfloat16, True),
    ("nnUNetTrainerFP16_Debug", torch.float32, False),  # CPU fallback to fp32 (documented)
])
def test_train_step_runs_in_requested_precision(region_dataset, name, expect_dtype, autocast):
    t = _trainer(name, region_dataset)
    assert t.grad_scaler is None
    seen, handles = _record_conv_dtypes(t.network)
    before = [p.detach().clone() for p in t.network.parameters()]
    out = t.train_step(_batch(t))
    for h in handles:
        h.remove()
    assert len(seen) > 5
    assert {d for d, _ in seen} == {expect_dtype}
    assert {a for _, a in seen} == {autocast}
    if expect_dtype == torch.float32:
        # no op of the network (convs, norms, nonlinearities) produced a reduced-precision tensor
        seen, handles = _record_conv_dtypes(t.network, all_leaves=True)
        t.train_step(_batch(t, 2))
        for h in handles:
            h.remove()
        assert len(seen) > 20 and {d for d, _ in seen} == {torch.float32}
    assert np.isfinite(out["loss"]) and out["loss"].dtype == np.float32
    # master weights stay fp32 and were updated
    assert all(p.dtype == torch.float32 for p in t.network.parameters())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, t.network.parameters()))
    # validation and the predictor path (no DS, like nnUNetv2_predict) use the same precision
    seen, handles = _record_conv_dtypes(t.network)
    t.network.eval()
    t.validation_step(_batch(t, 1))
    for h in handles:
        h.remove()
    assert {d for d, _ in seen} == {expect_dtype}
    if name.startswith("nnUNetTrainerFP16"):
        with open(t.log_file) as f:
            assert "fp16 requested on CPU" in f.read()


def test_fp16_scaler_state_saved_and_restored(region_dataset, monkeypatch, tmp_path):
    monkeypatch.setenv(P.CPU_FP16_ENV, "fp16")  # real fp16 autocast + GradScaler, on CPU
    t = _trainer("nnUNetTrainerFP16_Debug", region_dataset)
    assert t.grad_scaler is not None
    seen, handles = _record_conv_dtypes(t.network)
    t.train_step(_batch(t))
    for h in handles:
        h.remove()
    assert {d for d, _ in seen} == {torch.float16}
    t.grad_scaler.update(1234.0)  # a scale no fresh scaler has
    ckpt = str(tmp_path / "ckpt.pth")
    t.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["grad_scaler_state"]["scale"] == 1234.0
    t2 = _trainer("nnUNetTrainerFP16_Debug", region_dataset)
    assert t2.grad_scaler.get_scale() != 1234.0
    t2.load_checkpoint(ckpt)
    assert t2.grad_scaler.get_scale() == 1234.0


def test_btrseg_trainer_loss_optimizer_and_batch(region_dataset):
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    t = _trainer(nnUNetTrainerBTRSeg_BF16_GN_RAdam_bs3, region_dataset)
    assert t.precision_policy.autocast_dtype == torch.bfloat16
    assert t.batch_size == 3 and t.configuration_manager.batch_size == 3
    assert isinstance(t.optimizer, torch.optim.RAdam)
    assert t.optimizer.param_groups[0]["weight_decay"] == 1e-5 and t.initial_lr == 5e-4
    assert any(isinstance(m, GroupNorm) for m in t.network.modules())
    assert isinstance(t.loss, DeepSupervisionWrapper)
    t.lr_scheduler.step(4)
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * 0.985 ** 4)
    # the loss equals the weighted per-scale 1 - mean region Dice, computed by the loop reference
    batch = _batch(t, 3)
    with torch.no_grad():
        outputs = t.network(batch["data"])
        got = float(t.loss(outputs, batch["target"]))
    weights = deep_supervision_weights(len(outputs))
    ref = sum(w * (1 - _dice_reference(o, y, t.configuration_manager.batch_dice).mean())
              for o, y, w in zip(outputs, batch["target"], weights))
    assert got == pytest.approx(ref, rel=1e-5)
    assert len(outputs) == len(t._get_deep_supervision_scales())
    # nnU-Net's own weighting for the same network
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    np.testing.assert_allclose(t.loss.weight_factors, nnUNetTrainer._build_loss(t).weight_factors)


def test_btrseg_needs_region_labels(region_dataset):
    from batchgenerators.utilities.file_and_folder_operations import load_json

    plans = load_json(os.path.join(region_dataset.preprocessed_folder, region_dataset.plans_identifier + ".json"))
    plans["continue_training"] = False
    dj = load_json(os.path.join(region_dataset.preprocessed_folder, "dataset.json"))
    dj["labels"] = {"background": 0, "edema": 1, "necrosis": 2, "enhancing": 3}
    dj.pop("regions_class_order")
    t = P.nnUNetTrainerBTRSeg_Debug(plans, "3d_fullres", 0, dj, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="region dataset"):
        t.initialize()


def test_predictor_preprocessing_knows_btrseg_scheme(region_dataset):
    """What stock nnUNetv2_predict does: build the network through the trainer, pickle the configuration into a
    worker, preprocess there. The worker's preprocessor must apply the BTRSeg scheme."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(os.path.join(region_dataset.preprocessed_folder, region_dataset.plans_identifier + ".json"))
    cm = pm.get_configuration("3d_fullres")
    assert cm.normalization_schemes == [BTRSEG_SCHEME] * 4
    with pytest.raises(RuntimeError, match="Unable to locate class"):  # stock nnU-Net alone cannot
        files = sorted(glob.glob(os.path.join(region_dataset.raw_folder, "imagesTs", "*_000?.nii.gz")))
        import json
        dj = json.load(open(os.path.join(region_dataset.raw_folder, "dataset.json")))
        cm.preprocessor_class().run_case(files, None, pm, cm, dj)
    net = P.nnUNetTrainerBTRSeg.build_network_architecture(pm, cm, 4, 3, False)
    assert type(cm) is ExtendedConfigurationManager
    assert any(isinstance(m, GroupNorm) for m in net.modules())
    worker_cm = pickle.loads(pickle.dumps(cm))
    assert worker_cm.preprocessor_class is ExtendedPreprocessor
    data, _, _ = worker_cm.preprocessor_class().run_case(files, None, pm, worker_cm, dj)
    assert data.shape[0] == 4
    for c in range(4):
        assert data[c].min() == pytest.approx(0, abs=1e-6) and data[c].max() == pytest.approx(1, abs=1e-6)


def test_groupnorm_from_plans_file_and_rebuilt_like_predict(region_dataset):
    """Plans written with --norm group give GroupNorm to a trainer without its own norm; the network that
    nnUNetv2_predict rebuilds (static hook, no deep supervision) loads the training weights."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(os.path.join(region_dataset.preprocessed_folder, region_dataset.plans_identifier + ".json"))
    kwargs = pm.get_configuration("3d_fullres").network_arch_init_kwargs
    assert kwargs["norm_op"] == GROUPNORM_DOTTED_NAME and kwargs["norm_op_kwargs"]["num_groups"] == 4
    cls = P.nnUNetTrainerFP32  # norm None: the plans decide
    train_net = cls.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 4, 3, True)
    norms = [m for m in train_net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(isinstance(m, GroupNorm) for m in norms)
    assert {(m.num_channels, m.num_groups) for m in norms} == {(4, 4), (8, 4), (16, 4)}
    pred_net = cls.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 4, 3, False)
    pred_net.load_state_dict(train_net.state_dict())
    x = torch.randn(1, 4, 32, 32, 32)
    train_net.eval()
    pred_net.eval()
    with torch.no_grad():
        torch.testing.assert_close(pred_net(x), train_net(x)[0])


def test_nnunet_predictor_runs_network_in_trainer_precision(region_dataset):
    """nnU-Net's predictor (used by nnUNetv2_predict and the final validation) applies no autocast on CPU;
    a BF16 trainer's network still runs its convolutions in bf16 there and returns fp32 logits."""
    import json

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(os.path.join(region_dataset.preprocessed_folder, region_dataset.plans_identifier + ".json"))
    cm = pm.get_configuration("3d_fullres")
    dj = json.load(open(os.path.join(region_dataset.preprocessed_folder, "dataset.json")))
    for trainer, expected in (("nnUNetTrainerBF16", torch.bfloat16), ("nnUNetTrainerFP32", torch.float32)):
        net = getattr(P, trainer).build_network_architecture(pm, cm, 4, 3, False)
        predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, perform_everything_on_device=False,
                                    device=torch.device("cpu"), verbose=False, allow_tqdm=False)
        predictor.manual_initialization(net, pm, cm, None, dj, trainer, None)
        seen, handles = _record_conv_dtypes(net)
        logits = predictor.predict_sliding_window_return_logits(torch.randn(4, 40, 36, 36))
        for h in handles:
            h.remove()
        assert {d for d, _ in seen} == {expected}, trainer
        assert logits.shape == (3, 40, 36, 36) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------- stock CLIs
@pytest.mark.slow
def test_btrseg_bf16_groupnorm_stock_train_and_predict(region_dataset, cli, nnunet_env, tmp_path):
    # a combination without a named trainer, written as docs/mixed_precision.md tells users to, in a user folder
    # of nnU-Net's trainer search path: stock train and predict must find it and its settings
    tr = "nnUNetTrainerBTRSeg_BF16_GN_Adam_Debug"
    ext = tmp_path / "my_trainers"
    ext.mkdir()
    (ext / "my_btrseg.py").write_text(
        "from nnunetv2_ohem.training.common import with_training_length\n"
        "from nnunetv2_ohem.training.precision import BTRSegTrainer\n\n\n"
        "class nnUNetTrainerBTRSeg_BF16_GN_Adam(BTRSegTrainer):\n"
        "    precision, norm, optimizer_name = 'bf16', 'group', 'adam'\n\n\n"
        f"{tr} = with_training_length(nnUNetTrainerBTRSeg_BF16_GN_Adam, '{tr}', 2, 5, 2)\n")
    ds = region_dataset
    # one export worker instead of nnU-Net's default 8 spawned processes for the final validation
    env = {**os.environ, "nnUNet_def_n_proc": "1",
           "nnUNet_extTrainer": os.pathsep.join(p for p in (str(ext), os.environ.get("nnUNet_extTrainer")) if p)}
    cli(["nnUNetv2_train", str(ds.dataset_id), "3d_fullres", "0", "-p", ds.plans_identifier, "-tr", tr,
         "-device", "cpu"], env=env)
    model = os.path.join(nnunet_env["nnUNet_results"], ds.name, f"{tr}__{ds.plans_identifier}__3d_fullres")
    ckpt = torch.load(os.path.join(model, "fold_0", "checkpoint_final.pth"), weights_only=False)
    assert ckpt["trainer_name"] == tr
    assert any(k.endswith("norm.weight") for k in ckpt["network_weights"])
    with open(glob.glob(os.path.join(model, "fold_0", "training_log_*.txt"))[0]) as f:
        log = f.read()
    assert "Precision bf16" in log and "autocast dtype torch.bfloat16" in log
    out = tmp_path / "pred"
    cli(["nnUNetv2_predict", "-i", os.path.join(ds.raw_folder, "imagesTs"), "-o", str(out), "-d",
         str(ds.dataset_id), "-c", "3d_fullres", "-f", "0", "-p", ds.plans_identifier, "-tr", tr, "-device", "cpu",
         "--disable_tta", "-npp", "1", "-nps", "1"], env=env)
    preds = sorted(glob.glob(str(out / "*.nii.gz")))
    assert len(preds) == 1
    ref = sitk.ReadImage(os.path.join(ds.raw_folder, "labelsTs", os.path.basename(preds[0])))
    pred = sitk.GetArrayFromImage(sitk.ReadImage(preds[0]))
    assert pred.shape == sitk.GetArrayFromImage(ref).shape
    assert set(np.unique(pred)) <= {0, 1, 2, 3}
