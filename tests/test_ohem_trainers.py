"""OHEM-EMA trainers on the tiny phantom dataset: real steps, selection, EMA, checkpoints, stock CLIs."""
import copy
import json
import os

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_ohem.mining import unwrap_model
from nnunetv2_ohem.networks.paper_unet import PAPER_UNET_CLASS, PaperUNet, paper_arch_kwargs
from nnunetv2_ohem.networks.norms import GroupNorm
from nnunetv2_ohem.training import ohem
from ohem_helpers import always_mining, make_trainer, train_step_capturing_subbatch

PAPER_DATASET_ID = 901


# candidates = B̄ nnU-Net-augmented patches: the trained batch is a sub-batch of the candidate batch
OHEMEMAAugmented_Debug = always_mining(ohem.nnUNetTrainerOHEMEMA_Debug, ohem_candidates="augmented")


def one_checked_step(tr, monkeypatch):
    """Run one real train_step and return (candidate batch, batch the parent trained on, miner before,
    online after, reference errors computed patch by patch with nnU-Net's own loss)."""
    batch = next(tr.dataloader_train)
    data, target = batch["data"], batch["target"]
    miner_before = copy.deepcopy(tr.miner)
    # independent reference: nnU-Net's training loss on one candidate at a time under the miner
    ref = []
    with torch.no_grad():
        for i in range(data.shape[0]):
            out = miner_before(data[i:i + 1])
            tgt = [t[i:i + 1] for t in target] if isinstance(target, list) else target[i:i + 1]
            ref.append(float(tr.loss(out, tgt)))
    result, trained = train_step_capturing_subbatch(tr, batch, monkeypatch)
    return batch, trained, miner_before, result, np.asarray(ref)


def assert_trained_on_top_b_and_ema(tr, batch, trained, miner_before, ref):
    b = tr.batch_size
    assert batch["data"].shape[0] == tr.candidate_factor * b
    expected = sorted(np.argsort(-ref, kind="stable")[:b].tolist())
    assert tr.last_selection["indices"].tolist() == expected
    if "bboxes" in batch:  # crops: the winners, re-cropped and augmented, are what nnU-Net trained on
        assert trained is tr.last_selection["trained"] and trained["data"].shape[0] == b
        assert trained["data"].shape[1:] == batch["data"].shape[1:]
        return _assert_ema(tr, miner_before)
    assert torch.equal(trained["data"], batch["data"][expected])
    tgts = batch["target"] if isinstance(batch["target"], list) else [batch["target"]]
    tr_tgts = trained["target"] if isinstance(trained["target"], list) else [trained["target"]]
    assert len(tr_tgts) == len(tgts)
    for t_sel, t_all in zip(tr_tgts, tgts):
        assert torch.equal(t_sel, t_all[expected])
    # the selected errors are the highest of all candidates
    assert ref[expected].min() >= np.delete(ref, expected).max()
    _assert_ema(tr, miner_before)


def _assert_ema(tr, miner_before):
    mu = tr.ema_momentum
    online = unwrap_model(tr.network).state_dict()
    for k, v in tr.miner.state_dict().items():
        want = mu * miner_before.state_dict()[k] + (1 - mu) * online[k]
        assert torch.allclose(v, want, atol=1e-6, rtol=0), k
    assert any(not torch.equal(v, miner_before.state_dict()[k]) for k, v in tr.miner.state_dict().items())


@pytest.fixture(scope="module")
def trainer3d(tiny_dataset):
    return make_trainer(tiny_dataset, OHEMEMAAugmented_Debug)


def test_train_step_trains_exactly_the_top_b_candidates_and_updates_ema(trainer3d, monkeypatch):
    tr = trainer3d
    batch, trained, miner_before, result, ref = one_checked_step(tr, monkeypatch)
    assert_trained_on_top_b_and_ema(tr, batch, trained, miner_before, ref)
    # the logged errors are the ranking errors: nnU-Net's loss + Σ DS weights (1 - Dice instead of -Dice)
    errs = tr.last_selection["errors"].numpy()
    np.testing.assert_allclose(errs, ref + sum(tr.loss.weight_factors), rtol=1e-4, atol=1e-5)
    assert result["ohem_error_selected"] >= result["ohem_error_candidates"]
    assert result["ohem_miner_online_disagreement"] == 0.0  # first step: w̄_0 = w_0
    assert tr.network.training  # the disagreement probe put the online net back into train mode


def test_candidate_batch_has_requested_foreground_fraction(trainer3d):
    """nnU-Net's loader, asked once for B̄ candidates, forces the last B̄ − round(B̄·(1 − p)) patches onto a
    foreground voxel. Measured on its output crops (before augmentation, which may rotate a voxel near
    the border out of the patch): every forced patch of a case with lesions contains lesion."""
    tr = trainer3d
    dl = tr.dataloader_train.data_loader
    assert tr.dataloader_train.plain is None  # the default schedule mines every step: no plain loader kept
    n = tr.num_candidates
    assert dl.batch_size == n == 8 and dl.oversample_foreground_percent == tr.candidate_foreground_percent
    n_forced = n - round(n * (1 - tr.candidate_foreground_percent))
    assert n_forced == 2
    transforms, dl.transforms = dl.transforms, None
    try:
        forced_hits, uniform_hits = [], []
        for _ in range(4):
            batch = dl.generate_train_batch()
            fg = (batch["target"] > 0).flatten(1).any(1)
            for j, key in enumerate(batch["keys"]):
                locations = dl._data.load_case(key)[3]["class_locations"]
                if not any(len(v) for v in locations.values()):
                    continue  # lesion-free case: nothing to centre on
                (forced_hits if j >= n - n_forced else uniform_hits).append(bool(fg[j]))
    finally:
        dl.transforms = transforms
    assert forced_hits and all(forced_hits)
    # the loader's real (augmented) output has B̄ candidates and DS targets for each of them
    out = next(tr.dataloader_train)
    assert out["data"].shape[0] == n and all(t.shape[0] == n for t in out["target"])


def test_checkpoint_roundtrip_restores_miner_and_online_exactly(tiny_dataset, trainer3d, tmp_path):
    tr = trainer3d
    with torch.no_grad():  # make miner and online clearly different
        for p in tr.miner.parameters():
            p.add_(0.123)
    path = str(tmp_path / "ck.pth")
    tr.save_checkpoint(path)
    assert os.listdir(tmp_path) == ["ck.pth"]   # no temporary file left
    ck = torch.load(path, weights_only=False)
    assert ck["ohem_ema"]["ema_momentum"] == tr.ema_momentum and ck["ohem_ema"]["candidate_factor"] == 4
    new = make_trainer(tiny_dataset, ohem.nnUNetTrainerOHEMEMA_Debug, start=False)
    new.load_checkpoint(path)
    for a, b in zip(new.miner.state_dict().values(), tr.miner.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(unwrap_model(new.network).state_dict().values(), unwrap_model(tr.network).state_dict().values()):
        assert torch.equal(a, b)

    # export variant: stock predict reads network_weights = EMA; --c still restores the online net
    exp = make_trainer(tiny_dataset, ohem.nnUNetTrainerOHEMEMA_ExportEMA_Debug, start=False)
    exp.miner.load_state_dict(tr.miner.state_dict())
    exp.save_checkpoint(path)
    ck = torch.load(path, weights_only=False)
    for k, v in ck["network_weights"].items():
        assert torch.equal(v, tr.miner.state_dict()[k])
    exp2 = make_trainer(tiny_dataset, ohem.nnUNetTrainerOHEMEMA_ExportEMA_Debug, start=False)
    exp2.load_checkpoint(path)
    for k, v in unwrap_model(exp2.network).state_dict().items():
        assert torch.equal(v, unwrap_model(exp.network).state_dict()[k])

    # a kill while a new checkpoint is being written leaves the previous complete one (miner included)
    good = open(path, "rb").read()
    real_save = torch.save
    calls = []

    def dying_save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:  # nnU-Net's part is written; die before the miner state is added
            raise KeyboardInterrupt("killed")
        return real_save(obj, f, *a, **kw)

    torch.save = dying_save
    try:
        with pytest.raises(KeyboardInterrupt):
            exp.save_checkpoint(path)
    finally:
        torch.save = real_save
    assert os.path.dirname(calls[0]) == str(tmp_path) and calls[0] != path   # written under a temporary name
    assert open(path, "rb").read() == good and os.listdir(tmp_path) == ["ck.pth"]

    # the format before the weight-EMA mixin: miner (and exported online) weights inside ``ohem_ema``
    legacy = dict(ck)
    online_w = legacy["weight_ema"]["online_weights"]
    del legacy["weight_ema"]
    legacy["ohem_ema"] = {**ck["ohem_ema"], "ohem_step": 7, "miner_weights": ck["network_weights"],
                          "online_weights": online_w, "weights_exported": True}
    torch.save(legacy, path)
    leg = make_trainer(tiny_dataset, ohem.nnUNetTrainerOHEMEMA_ExportEMA_Debug, start=False)
    leg.load_checkpoint(path)
    assert leg.ohem_step == 7
    for k, v in leg.miner.state_dict().items():
        assert torch.equal(v, tr.miner.state_dict()[k])
    for k, v in unwrap_model(leg.network).state_dict().items():
        assert torch.equal(v, online_w[k])

    # a plain nnU-Net checkpoint: warn, miner := online, schedule position = the epoch's first step
    del ck["ohem_ema"], ck["weight_ema"]
    ck["current_epoch"] = 1
    torch.save(ck, path)
    old = make_trainer(tiny_dataset, ohem.nnUNetTrainerOHEMEMA_Debug, start=False)
    with pytest.warns(UserWarning, match="no weight-EMA state"):
        old.load_checkpoint(path)
    assert old.ohem_step == old.num_iterations_per_epoch
    for k, v in old.miner.state_dict().items():
        assert torch.equal(v, unwrap_model(old.network).state_dict()[k])


def test_miner_is_the_weight_ema_with_ohem_defaults():
    from nnunetv2_ohem.training.blob import nnUNetTrainerBlobLoss
    from nnunetv2_ohem.training.ema import EMAMixin
    from nnunetv2_ohem.training.lesion_validation import LesionValidationMixin
    from nnunetv2_ohem.training.ohem_blob import nnUNetTrainerOHEMEMA_BlobLoss
    base = ohem.nnUNetTrainerOHEMEMA
    assert (base.ema_momentum, base.ema_warmup, base.ema_validate, base.ema_select_best, base.ema_export) == \
        (0.99, False, False, False, False)
    assert ohem.nnUNetTrainerOHEM.ema_momentum == 0.0
    exp = ohem.nnUNetTrainerOHEMEMA_ExportEMA
    assert exp.ema_export and exp.ema_validate and not exp.ema_select_best
    assert not hasattr(base, "export_ema_weights")
    mro = nnUNetTrainerOHEMEMA_BlobLoss.__mro__
    for mixin in (EMAMixin, LesionValidationMixin):
        assert mro.count(mixin) == 1
    # OHEM's train_step wraps the EMA update, which wraps the blob trainer's and nnU-Net's step
    assert mro.index(base) < mro.index(EMAMixin) < mro.index(nnUNetTrainerBlobLoss) < mro.index(LesionValidationMixin)


def test_ohem_mu_zero_miner_equals_online_after_step(tiny_dataset, monkeypatch):
    tr = make_trainer(tiny_dataset, always_mining(ohem.nnUNetTrainerOHEM_Debug), configuration="2d")
    batch, trained, miner_before, _, ref = one_checked_step(tr, monkeypatch)
    assert_trained_on_top_b_and_ema(tr, batch, trained, miner_before, ref)
    for k, v in tr.miner.state_dict().items():
        assert torch.equal(v, unwrap_model(tr.network).state_dict()[k])


def test_regions_2d_ce_ranking(tiny_dataset, monkeypatch):
    """BraTS-style region training (sigmoid heads) on 2d: same preprocessed data, labels declared as a region."""
    dj = load_json(os.path.join(tiny_dataset.preprocessed_folder, "dataset.json"))
    # nested regions like BraTS' WT ⊃ TC (the phantom has no label 2, so "core" is always empty)
    dj["labels"] = {"background": 0, "lesion": [1, 2], "core": [2]}
    dj["regions_class_order"] = [1, 2]
    tr = make_trainer(tiny_dataset, always_mining(ohem.nnUNetTrainerOHEMEMA_CE_Debug), configuration="2d",
                      dataset_json=dj)
    assert tr.label_manager.has_regions and tr.ranking_error == "ce"
    batch, trained, miner_before, _, _ = one_checked_step(tr, monkeypatch)
    # reference: mean BCE per candidate, weighted over deep-supervision scales, one patch at a time
    ref = []
    with torch.no_grad():
        for i in range(batch["data"].shape[0]):
            outs = miner_before(batch["data"][i:i + 1])
            ref.append(sum(w * float(torch.nn.functional.binary_cross_entropy_with_logits(o, t[i:i + 1].float()))
                           for w, o, t in zip(tr.loss.weight_factors, outs, batch["target"]) if w))
    assert batch["target"][0].shape[1] == 2 and tr.network.decoder.seg_layers[-1].out_channels == 2
    np.testing.assert_allclose(tr.last_selection["errors"].numpy(), ref, rtol=1e-4, atol=1e-6)
    assert_trained_on_top_b_and_ema(tr, batch, trained, miner_before, np.asarray(ref))


def test_paper_unet_structure_and_static_rebuild(tiny_dataset):
    net = PaperUNet(2, 1, deep_supervision=False, **paper_arch_kwargs(3))
    assert net(torch.randn(2, 2, 32, 32, 32)).shape == (2, 1, 32, 32, 32)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.normalization.GroupNorm)]
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(norms) == 10 and all(isinstance(m, GroupNorm) for m in norms)  # 5 blocks × 2 convs
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64, 32, 32, 16, 16, 1, 1][:len(convs)]
    assert net.decoder.upsample.mode == "trilinear" and not any(
        isinstance(m, (torch.nn.InstanceNorm3d, torch.nn.BatchNorm3d, torch.nn.ConvTranspose3d))
        for m in net.modules())
    net.decoder.deep_supervision = True
    assert [o.shape[2] for o in net(torch.randn(1, 2, 32, 32, 32))] == [32, 16]
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 2, 30, 32, 32))
    with pytest.raises(ValueError, match="pools by 2"):
        PaperUNet(2, 1, strides=[[1, 1, 1], [2, 2, 2], [1, 1, 1]])

    # stock nnU-Net builds it from a plans entry (what nnUNetv2_predict does with the paper plans) ...
    stock = get_network_from_plans(PAPER_UNET_CLASS, paper_arch_kwargs(3), [], 2, 2, deep_supervision=False)
    assert isinstance(stock, PaperUNet)
    # ... and the _Paper trainer's static build gives the paper net on any plans (here tiny 2d plans)
    pm = PlansManager(os.path.join(tiny_dataset.preprocessed_folder, tiny_dataset.plans_identifier + ".json"))
    built = ohem.nnUNetTrainerOHEMEMA_Paper.build_network_architecture(pm, pm.get_configuration("2d"), 2, 2, False)
    assert isinstance(built, PaperUNet) and built.dim == 2 and built.decoder.upsample.mode == "bilinear"
    assert built(torch.randn(1, 2, 32, 32)).shape == (1, 2, 32, 32)


def test_paper_trainer_config(tiny_dataset, monkeypatch):
    tr = make_trainer(tiny_dataset, ohem.nnUNetTrainerOHEMEMA_Paper, start=False)
    assert isinstance(tr.optimizer, torch.optim.Adam) and not tr.enable_deep_supervision
    assert (tr.ranking_error, tr.candidate_factor, tr.candidate_foreground_percent) == ("dice", 4, 0.3)
    assert isinstance(tr.network, PaperUNet)
    lrs = []
    for epoch in range(tr.num_epochs):
        tr.lr_scheduler.step(epoch)
        lrs.append(tr.optimizer.param_groups[0]["lr"])
    assert tr.num_epochs == 120
    assert lrs[0] == lrs[59] == 1e-3 and lrs[60] == lrs[95] == pytest.approx(1e-4)
    assert lrs[96] == lrs[-1] == pytest.approx(1e-5)
    # training loss is nnU-Net's soft Dice (1 output scale), equal to -Dice
    logits, t = torch.randn(2, 2, 8, 8, 8), torch.randint(0, 2, (2, 1, 8, 8, 8)).float()
    p = torch.softmax(logits, 1)[:, 1]
    y = (t[:, 0] == 1).float()
    dice = ((2 * (p * y).sum((1, 2, 3)) + 1e-5) / (p.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1e-5)).mean()
    assert float(tr.loss(logits, t)) == pytest.approx(-float(dice), rel=1e-5)


@pytest.fixture(scope="module")
def paper_plans(nnunet_env):
    from nnunetv2_ohem.phantoms.simple import write_simple_lesion_dataset
    import argparse
    from nnunetv2_ohem.plans.paper import add_paper_arguments, run_paper

    write_simple_lesion_dataset(nnunet_env["nnUNet_raw"], PAPER_DATASET_ID, "OhemPaper", n_train=3, n_test=0,
                                shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0), seed=3)
    parser = argparse.ArgumentParser()
    add_paper_arguments(parser)  # the `nnunetv2_ohem_plan paper` subcommand
    run_paper(parser.parse_args(["-d", str(PAPER_DATASET_ID), "-np", "1", "--fast_fingerprint"]))
    folder = os.path.join(nnunet_env["nnUNet_preprocessed"], f"Dataset{PAPER_DATASET_ID}_OhemPaper")
    return folder, load_json(os.path.join(folder, "nnUNetPaperPlans.json"))


def test_paper_plans_file(paper_plans):
    folder, plans = paper_plans
    assert list(plans["configurations"]) == ["3d_fullres"]
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["spacing"] == [0.5, 0.5, 0.5] and cfg["patch_size"] == [32, 32, 32] and cfg["batch_size"] == 32
    assert cfg["normalization_schemes"] == ["ZScoreNormalization"] * 2 and cfg["use_mask_for_norm"] == [False] * 2
    assert cfg["architecture"]["network_class_name"] == PAPER_UNET_CLASS
    # preprocessed at 0.5 mm: a 16³ image at 1 mm becomes 32³, each channel z-normalised on its own
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    data_folder = os.path.join(folder, "nnUNetPaperPlans_3d_fullres")
    ds_cls = infer_dataset_class(data_folder)
    ds = ds_cls(data_folder)
    data, seg, *_ = ds.load_case(ds.identifiers[0])
    data = np.asarray(data)
    assert data.shape[0] == 2 and tuple(data.shape[1:]) == (32, 32, 32)
    # raw channel means are ~1.0 and ~2.2; nnU-Net z-scores before resampling (cubic), which shrinks std a bit
    np.testing.assert_allclose(data.reshape(2, -1).mean(1), 0, atol=0.05)
    assert np.all(np.abs(data.reshape(2, -1).std(1) - 1) < 0.1)


@pytest.mark.slow
def test_stock_cli_train_resume_predict(tiny_dataset, cli, tmp_path):
    ds = tiny_dataset
    name = "nnUNetTrainerOHEMEMA_Debug"
    cli(["nnUNetv2_train", str(ds.dataset_id), "3d_fullres", "0", "-tr", name, "-p", ds.plans_identifier,
         "-device", "cpu"])
    out = os.path.join(os.environ["nnUNet_results"], ds.name, f"{name}__{ds.plans_identifier}__3d_fullres",
                       "fold_0")
    final = os.path.join(out, "checkpoint_final.pth")
    ck = torch.load(final, weights_only=False)
    assert set(ck["weight_ema"]["ema_weights"]) == set(ck["network_weights"])
    # one EMA update per optimiser step: 5 warm-up, 4 mining, 1 plain
    assert ck["weight_ema"]["num_updates"] == 10 and ck["weight_ema"]["momentum"] == 0.99
    assert "miner_weights" not in ck["ohem_ema"]
    lesionwise = json.load(open(os.path.join(out, "validation", "summary_lesionwise.json")))
    assert lesionwise["trainer"] == name and lesionwise["family"] == "msseg2"
    logging = ck["logging"]
    assert len(logging["ohem_error_selected"]) == 2
    # the default schedule over 2 x 5 steps: warm-up = steps 0-4 (plain nnU-Net), mining = steps 5-8, step 9 plain
    state = ck["ohem_ema"]
    assert (state["mining_start_step"], state["mining_end_step"], state["ohem_step"]) == (5, 9, 10)
    assert logging["ohem_mining_fraction"] == [0.0, pytest.approx(0.8)]
    assert np.isnan(logging["ohem_error_selected"][0]) and np.isfinite(logging["ohem_error_selected"][1])
    assert logging["train_losses"][1] < logging["train_losses"][0]
    diag = json.load(open(os.path.join(out, "ohem_diagnostics.json")))
    assert diag["ohem_error_selected"][1] == pytest.approx(logging["ohem_error_selected"][1])
    assert diag["ohem_error_selected"][0] is None and diag["mining_start_step"] == 5
    assert os.path.getsize(os.path.join(out, "ohem_progress.png")) > 1000
    log_text = "".join(open(os.path.join(out, f)).read() for f in os.listdir(out) if f.startswith("training_log"))
    assert "OHEM error candidates/selected" in log_text

    # --c: nnU-Net reloads through our load_checkpoint; the re-saved final holds the same miner, bit for bit
    cli(["nnUNetv2_train", str(ds.dataset_id), "3d_fullres", "0", "-tr", name, "-p", ds.plans_identifier,
         "-device", "cpu", "--c"])
    ck2 = torch.load(final, weights_only=False)
    assert ck2["ohem_ema"]["ohem_step"] == 10
    for k, v in ck["weight_ema"]["ema_weights"].items():
        assert torch.equal(v, ck2["weight_ema"]["ema_weights"][k])

    # one test case is enough to prove stock predict rebuilds the net and loads the weights
    import shutil
    cases = sorted(f for f in os.listdir(os.path.join(ds.raw_folder, "labelsTs")) if f.endswith(".nii.gz"))[:1]
    inp = tmp_path / "in"
    inp.mkdir()
    for f in os.listdir(os.path.join(ds.raw_folder, "imagesTs")):
        if f.startswith(cases[0][:-len(".nii.gz")] + "_"):
            shutil.copy(os.path.join(ds.raw_folder, "imagesTs", f), inp / f)
    pred = tmp_path / "pred"
    cli(["nnUNetv2_predict", "-i", str(inp), "-o", str(pred), "-d",
         str(ds.dataset_id), "-c", "3d_fullres", "-f", "0", "-tr", name, "-p", ds.plans_identifier,
         "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"])
    import SimpleITK as sitk
    assert len(os.listdir(inp)) == 2 and sorted(f for f in os.listdir(pred) if f.endswith(".nii.gz")) == cases
    for c in cases:
        # what a user checks: the prediction lies on the input image's grid, with binary labels
        pred_img = sitk.ReadImage(str(pred / c))
        image = sitk.ReadImage(str(inp / (c[:-len(".nii.gz")] + "_0000.nii.gz")))
        assert pred_img.GetSize() == image.GetSize()
        np.testing.assert_allclose(pred_img.GetSpacing(), image.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(pred_img.GetOrigin(), image.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(pred_img.GetDirection(), image.GetDirection(), atol=1e-5)
        p = sitk.GetArrayFromImage(pred_img)
        ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(ds.raw_folder, "labelsTs", c)))
        assert p.shape == ref.shape and set(np.unique(p)) <= {0, 1}
