"""Weight EMA (EMAMixin, nnUNetTrainerEMA): the average against a reference loop, the weight swap for
validation, checkpoints and exact resume, stock prediction with the EMA weights, composition, DDP."""
import copy
import os

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_ohem.mining import ema_momentum_at, ema_update_, swap_weights_, unwrap_model
from nnunetv2_ohem.training import ema, precision
from nnunetv2_ohem.training.blob import nnUNetTrainerBlobLoss
from ohem_helpers import make_trainer


def state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in unwrap_model(module).state_dict().items()}


def reference_ema(ema_state: dict, online_state: dict, t: int, mu: float, warmup: bool) -> dict:
    """The EMA step written out per tensor: μ_t = min(μ, (1+t)/(10+t)); floats averaged, integers copied."""
    m = min(mu, (1 + t) / (10 + t)) if warmup else mu
    return {k: (m * e + (1 - m) * online_state[k]) if e.is_floating_point() else online_state[k].clone()
            for k, e in ema_state.items()}


def assert_states_close(a: dict, b: dict, exact: bool = False):
    assert a.keys() == b.keys()
    for k in a:
        if exact or not a[k].is_floating_point():
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


class _Net(nn.Module):
    """Parameters, floating buffers (BatchNorm running stats) and an integer buffer (num_batches_tracked)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3)
        self.bn = nn.BatchNorm3d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3, 4)))


# ----------------------------------------------------------------------------------------- pure functions
def test_momentum_schedule():
    assert ema_momentum_at(0, 0.999) == pytest.approx(0.1)
    assert ema_momentum_at(90, 0.999) == pytest.approx(91 / 100)
    assert ema_momentum_at(10 ** 6, 0.999) == 0.999 and ema_momentum_at(0, 0.999, warmup=False) == 0.999
    assert ema_momentum_at(5, 0.0) == 0.0  # μ = 0 (classic OHEM) stays an exact copy
    with pytest.raises(ValueError):
        ema_momentum_at(0, 1.5)
    with pytest.raises(ValueError):
        ema_momentum_at(-1, 0.9)


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_update_equals_reference_loop_over_steps(warmup):
    torch.manual_seed(0)
    online, opt = _Net(), None
    opt = torch.optim.SGD(online.parameters(), lr=0.1)
    avg = copy.deepcopy(online).requires_grad_(False)
    ref = state(avg)
    for t in range(12):
        online.train()
        loss = online(torch.randn(3, 2, 5, 5, 5)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update_(avg, online, ema_momentum_at(t, 0.9, warmup))
        ref = reference_ema(ref, state(online), t, 0.9, warmup)
        assert_states_close(state(avg), ref)
    assert int(avg.bn.num_batches_tracked) == 12  # integer buffer copied, not averaged
    assert not torch.equal(avg.bn.running_mean, online.bn.running_mean)  # floating buffer averaged
    assert not torch.equal(avg.conv.weight, online.conv.weight)


def test_swap_weights_exchanges_values_and_keeps_tensors():
    a, b = _Net(), _Net()
    with torch.no_grad():
        b.bn.running_var.mul_(3)
        b.bn.num_batches_tracked.fill_(7)
    sa, sb = state(a), state(b)
    ptrs = [p.data_ptr() for p in a.parameters()]
    swap_weights_(a, b)
    assert_states_close(state(a), sb, exact=True)
    assert_states_close(state(b), sa, exact=True)
    assert [p.data_ptr() for p in a.parameters()] == ptrs and all(p.requires_grad for p in a.parameters())


# ----------------------------------------------------------------------------------------- trainers
class _BatchNormEMA(ema.EMAMixin, precision.nnUNetTrainerFP32_BN_Debug):
    """The documented composition, with a BatchNorm network so buffers are averaged too."""


@pytest.fixture(scope="module")
def ema_trainer(tiny_dataset):
    return make_trainer(tiny_dataset, ema.nnUNetTrainerEMA_Debug, configuration="2d")


def test_trainer_ema_equals_reference_over_real_steps_with_buffers(tiny_dataset):
    tr = make_trainer(tiny_dataset, _BatchNormEMA, configuration="2d")
    assert isinstance(tr, precision.PrecisionTrainer) and tr.ema_momentum == 0.999 and tr.ema_num_updates == 0
    assert any(isinstance(m, nn.BatchNorm2d) for m in tr.network.modules())
    ref = state(tr.ema_model)
    assert_states_close(ref, state(tr.network), exact=True)  # w̄_0 = w_0
    tr.on_train_epoch_start()
    for t in range(4):
        tr.train_step(next(tr.dataloader_train))
        ref = reference_ema(ref, state(tr.network), t, tr.ema_momentum, True)
        assert_states_close(state(tr.ema_model), ref)
    assert tr.ema_num_updates == 4
    nbt = [k for k in ref if k.endswith("num_batches_tracked")]
    assert nbt and all(int(state(tr.ema_model)[k]) == 4 for k in nbt)


def test_blob_loss_composition_trains_and_averages(tiny_dataset):
    tr = make_trainer(tiny_dataset, ema.nnUNetTrainerBlobLossEMA_Debug, configuration="2d")
    assert isinstance(tr, nnUNetTrainerBlobLoss) and type(tr.loss.loss).__name__ == "BlobLoss"
    before = state(tr.network)
    tr.on_train_epoch_start()
    tr.train_step(next(tr.dataloader_train))
    # μ_0 = 0.1: w̄_1 = 0.1 w_0 + 0.9 w_1
    assert_states_close(state(tr.ema_model), reference_ema(before, state(tr.network), 0, 0.999, True))


def _make_ema_differ(tr, n_steps=3):
    tr.on_train_epoch_start()
    for _ in range(n_steps):
        tr.train_step(next(tr.dataloader_train))
    diff = max(float((a - b).abs().max()) for a, b in zip(state(tr.ema_model).values(), state(tr.network).values()))
    assert diff > 1e-4


def _val_loss(tr, module, batch):
    with torch.no_grad():
        out = module(batch["data"])
        return float(tr.loss(out, batch["target"]))


@pytest.mark.parametrize("select_best", [True, False])
def test_epoch_validation_uses_ema_weights(ema_trainer, select_best, monkeypatch):
    tr = ema_trainer
    _make_ema_differ(tr)
    monkeypatch.setattr(tr, "ema_select_best", select_best)
    batch = next(tr.dataloader_val)
    online_before = state(tr.network)
    ema_net = copy.deepcopy(tr.ema_model).eval()
    online_net = copy.deepcopy(unwrap_model(tr.network)).eval()
    want_ema, want_online = _val_loss(tr, ema_net, batch), _val_loss(tr, online_net, batch)
    assert abs(want_ema - want_online) > 1e-5
    with torch.no_grad():
        tr.on_validation_epoch_start()
        out = tr.validation_step({"data": batch["data"], "target": [t.clone() for t in batch["target"]]})
        tr.on_validation_epoch_end([out])
    logged = tr.logger.get_value("val_losses", step=-1)
    assert logged == pytest.approx(want_ema if select_best else want_online, rel=1e-5)
    assert_states_close(state(tr.network), online_before, exact=True)  # swapped back


def test_final_validation_runs_on_ema_weights(ema_trainer, monkeypatch):
    tr = ema_trainer
    seen = {}
    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation",
                        lambda self, save_probabilities=False: seen.update(weights=state(self.network)))
    online, avg = state(tr.network), state(tr.ema_model)
    tr.perform_actual_validation()
    assert_states_close(seen["weights"], avg, exact=True)
    assert_states_close(state(tr.network), online, exact=True)
    monkeypatch.setattr(tr, "ema_validate", False)
    tr.perform_actual_validation()
    assert_states_close(seen["weights"], online, exact=True)


class _WithExtras(ema.nnUNetTrainerEMA_Debug):
    """A subclass with its own checkpoint entry, as OHEM-EMA keeps its schedule position."""

    def checkpoint_extras(self):
        return {"my_extra": {"updates_at_save": self.ema_num_updates}}

    def load_checkpoint_extras(self, checkpoint):
        self.loaded_extra = checkpoint["my_extra"]


def test_checkpoint_holds_both_weight_sets_and_resume_is_bit_identical(tiny_dataset, tmp_path):
    tr = make_trainer(tiny_dataset, _WithExtras, configuration="2d")
    tr.on_train_epoch_start()
    batches = [copy.deepcopy(next(tr.dataloader_train)) for _ in range(5)]
    for b in batches[:2]:
        tr.train_step(b)
    path = str(tmp_path / "ck.pth")
    tr.save_checkpoint(path)
    assert os.listdir(tmp_path) == ["ck.pth"]   # no temporary file left
    ck = torch.load(path, weights_only=False)
    assert_states_close(ck["network_weights"], state(tr.ema_model), exact=True)  # for stock nnUNetv2_predict
    assert_states_close(ck["weight_ema"]["online_weights"], state(tr.network), exact=True)  # for --c
    assert ck["weight_ema"]["num_updates"] == 2 and ck["weight_ema"]["momentum"] == 0.999

    resumed = make_trainer(tiny_dataset, _WithExtras, configuration="2d", start=False)
    resumed.load_checkpoint(path)
    assert resumed.ema_num_updates == 2 and resumed.loaded_extra == {"updates_at_save": 2}
    for b in batches[2:]:
        tr.train_step(b)
        resumed.train_step(copy.deepcopy(b))
    assert_states_close(state(resumed.network), state(tr.network), exact=True)
    assert_states_close(state(resumed.ema_model), state(tr.ema_model), exact=True)

    # a plain nnU-Net checkpoint: warn, start the average at the online weights
    del ck["weight_ema"]
    torch.save(ck, path)
    plain = make_trainer(tiny_dataset, ema.nnUNetTrainerEMA_Debug, configuration="2d", start=False)
    with pytest.warns(UserWarning, match="no weight-EMA state"):
        plain.load_checkpoint(path)
    assert plain.ema_num_updates == 0
    assert_states_close(state(plain.ema_model), state(plain.network), exact=True)


def test_stock_predictor_uses_the_ema_network(ema_trainer):
    """nnU-Net's predictor, loading the trained-model folder like nnUNetv2_predict, gives the EMA network's
    logits (one patch-sized tile, constant tile weighting), not the online network's."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    tr = ema_trainer
    _make_ema_differ(tr)
    with torch.no_grad():  # a few steps move the average little; make the two nets clearly distinguishable
        for p in tr.ema_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tr.save_checkpoint(join(tr.output_folder, "checkpoint_final.pth"))
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=False, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(tr.output_folder_base, (0,), "checkpoint_final.pth")
    assert type(predictor.network).__name__ == type(unwrap_model(tr.network)).__name__
    patch = tr.configuration_manager.patch_size
    x = torch.randn(tr.num_input_channels, 1, *patch, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = predictor.predict_sliding_window_return_logits(x)[:, 0]
        nets = {}
        for name, module in (("ema", tr.ema_model), ("online", unwrap_model(tr.network))):
            net = copy.deepcopy(module).eval()
            net.decoder.deep_supervision = False
            nets[name] = net(x[:, 0][None])[0]
    # the predictor accumulates the logits in fp16 (relative rounding ~1e-3)
    err = float((got.float() - nets["ema"]).abs().max())
    gap = float((nets["ema"] - nets["online"]).abs().max())
    scale = float(nets["ema"].abs().max())
    assert err <= 2e-3 * scale and gap > 10 * err, (err, gap, scale)


# ----------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, preprocessed_folder, plans_identifier, results_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ddp_helpers import flat_state

    os.environ["nnUNet_results"] = results_dir
    plans = load_json(os.path.join(preprocessed_folder, plans_identifier + ".json"))
    plans["continue_training"] = False
    dj = load_json(os.path.join(preprocessed_folder, "dataset.json"))
    tr = ema.nnUNetTrainerEMA_Debug(copy.deepcopy(plans), "2d", 0, dj, torch.device("cpu"))
    tr.on_train_start()
    res = {"ddp": isinstance(tr.network, DistributedDataParallel), "batch_size": tr.batch_size}
    tr.on_train_epoch_start()
    for _ in range(3):
        tr.train_step(next(tr.dataloader_train))
    res.update(ema=flat_state(tr.ema_model), online=flat_state(tr.network))
    with torch.no_grad():  # the per-epoch validation with the EMA swapped in (gathers tp/fp/fn over ranks)
        tr.on_validation_epoch_start()
        tr.on_validation_epoch_end([tr.validation_step(next(tr.dataloader_val))])
    res["online_after_validation"] = flat_state(tr.network)
    ckpt = os.path.join(tr.output_folder, "checkpoint_latest.pth")
    tr.save_checkpoint(ckpt)  # rank 0 only
    dist.barrier()
    tr2 = ema.nnUNetTrainerEMA_Debug(copy.deepcopy(plans), "2d", 0, dj, torch.device("cpu"))
    tr2.load_checkpoint(ckpt)
    res.update(loaded_ema=flat_state(tr2.ema_model), loaded_online=flat_state(tr2.network))
    for dl in (tr.dataloader_train, tr.dataloader_val):
        if hasattr(dl, "_finish"):
            dl._finish()
    return res


@pytest.mark.slow
def test_ema_identical_across_ddp_ranks(tiny_dataset, tmp_path):
    from ddp_helpers import run_ddp

    r0, r1 = run_ddp(_ddp_worker, 2, (tiny_dataset.preprocessed_folder, tiny_dataset.plans_identifier,
                                      str(tmp_path)))
    assert r0["ddp"] and r1["ddp"] and (r0["batch_size"], r1["batch_size"]) == (1, 1)
    # each rank trains on its own patches; the gradients are all-reduced, so online and EMA agree bit for bit
    assert torch.equal(r0["online"], r1["online"]) and torch.equal(r0["ema"], r1["ema"])
    assert not torch.equal(r0["ema"], r0["online"])
    for r in (r0, r1):
        assert torch.equal(r["online_after_validation"], r["online"])
        assert torch.equal(r["loaded_ema"], r0["ema"]) and torch.equal(r["loaded_online"], r0["online"])


# ----------------------------------------------------------------------------------------- stock CLIs
@pytest.mark.slow
def test_stock_cli_train_resume_predict(tiny_dataset, cli, tmp_path):
    """``-tr nnUNetTrainerEMA_Debug`` through nnUNetv2_train (training, final validation), ``--c`` and
    nnUNetv2_predict."""
    import shutil

    ds, name = tiny_dataset, "nnUNetTrainerEMA_Debug"
    train = ["nnUNetv2_train", str(ds.dataset_id), "2d", "0", "-tr", name, "-p", ds.plans_identifier, "-device", "cpu"]
    cli(train)
    out = join(os.environ["nnUNet_results"], ds.name, f"{name}__{ds.plans_identifier}__2d", "fold_0")
    final = torch.load(join(out, "checkpoint_final.pth"), weights_only=False)
    st = final["weight_ema"]
    assert st["num_updates"] == 10 and st["exported"]  # 2 epochs x 5 steps
    assert_states_close(final["network_weights"], st["ema_weights"], exact=True)
    assert any(not torch.equal(v, st["online_weights"][k]) for k, v in st["ema_weights"].items())
    assert "weight_ema" in torch.load(join(out, "checkpoint_best.pth"), weights_only=False)
    assert os.path.isfile(join(out, "validation", "summary.json"))
    log_text = "".join(open(join(out, f)).read() for f in os.listdir(out) if f.startswith("training_log"))
    assert "weight EMA: 10 updates" in log_text

    # --c on a finished run: nnU-Net loads through our load_checkpoint and saves the final checkpoint again
    cli(train + ["--c"])
    again = torch.load(join(out, "checkpoint_final.pth"), weights_only=False)["weight_ema"]
    assert again["num_updates"] == 10
    assert_states_close(again["ema_weights"], st["ema_weights"], exact=True)
    assert_states_close(again["online_weights"], st["online_weights"], exact=True)

    case = sorted(f for f in os.listdir(join(ds.raw_folder, "labelsTs")) if f.endswith(".nii.gz"))[0]
    inp, pred = tmp_path / "in", tmp_path / "pred"
    inp.mkdir()
    for f in os.listdir(join(ds.raw_folder, "imagesTs")):
        if f.startswith(case[:-len(".nii.gz")] + "_"):
            shutil.copy(join(ds.raw_folder, "imagesTs", f), inp / f)
    cli(["nnUNetv2_predict", "-i", str(inp), "-o", str(pred), "-d", str(ds.dataset_id), "-c", "2d", "-f", "0",
         "-tr", name, "-p", ds.plans_identifier, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"])
    assert os.path.isfile(pred / case)
