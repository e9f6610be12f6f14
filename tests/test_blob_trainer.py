"""Blob-loss trainers on the tiny phantom dataset: instance maps in nnU-Net's pipeline, the loss the trainer
computes, the VALDO configuration, input checks, and one stock-CLI run per trainer (the VALDO trainer's on
VALDO-like MNI152 phantoms: T1/T2/FLAIR, tiny lacunes and unlabelled perivascular spaces, converted by our
VALDO converter as real data would be)."""
import glob
import os

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from torch.nn import functional as F

from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunetv2_ohem.losses.blob import blob_loss

from conftest import TinyDataset

VALDO_PHANTOM_ID = 945


@pytest.fixture(scope="module")
def valdo_dataset(nnunet_env, tmp_path_factory) -> TinyDataset:
    """Five labelled VALDO-like phantoms at 3 mm (+1 without rater mask -> imagesTs), converted with
    ``convert_valdo`` and planned with the tiny plans."""
    from nnunetv2_ohem.dataset_conversion.valdo import convert_valdo
    from nnunetv2_ohem.phantoms.valdo import VALDOPhantomConfig, write_valdo_phantoms
    from nnunetv2_ohem.plans.tiny import plan_and_preprocess_tiny

    source = write_valdo_phantoms(str(tmp_path_factory.mktemp("valdo") / "VALDO_Task3"), n_subjects=5, seed=0,
                                  config=VALDOPhantomConfig(voxel_size=3.0), n_unlabelled=1)
    raw = convert_valdo(source, VALDO_PHANTOM_ID, name="VALDOPhantom", raw_dir=nnunet_env["nnUNet_raw"])
    plans = plan_and_preprocess_tiny(VALDO_PHANTOM_ID, configurations=("3d_fullres",), num_processes=1,
                                     fast_fingerprint_if_missing=True)
    name = os.path.basename(raw)
    return TinyDataset(VALDO_PHANTOM_ID, name, raw, plans, os.path.join(nnunet_env["nnUNet_preprocessed"], name))


def make_trainer(ds, cls_name, configuration="3d_fullres"):
    from nnunetv2_ohem.training import blob
    plans = load_json(os.path.join(ds.preprocessed_folder, ds.plans_identifier + ".json"))
    plans["continue_training"] = False  # nnU-Net's run_training adds this key before creating a trainer
    dataset_json = load_json(os.path.join(ds.preprocessed_folder, "dataset.json"))
    return getattr(blob, cls_name)(plans, configuration, 0, dataset_json, torch.device("cpu"))


def transforms_of(trainer):
    rot, dummy_2d, _, mirror = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    lm = trainer.label_manager
    return trainer.get_training_transforms(
        trainer.configuration_manager.patch_size, rot, trainer._get_deep_supervision_scales(), mirror, dummy_2d,
        use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm, is_cascaded=False,
        foreground_labels=lm.foreground_labels, regions=None, ignore_label=None)


def test_instance_maps_follow_augmented_label_and_deep_supervision(tiny_dataset):
    trainer = make_trainer(tiny_dataset, "nnUNetTrainerBlobLoss_Debug")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    shape = tuple(int(i) for i in trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[2])
    seg = np.zeros((1, *shape), np.int16)
    for _ in range(25):  # small blobs, some touching diagonally
        c = [rng.integers(2, s - 4) for s in shape]
        r = rng.integers(1, 3)
        seg[0, c[0]:c[0] + r, c[1]:c[1] + r, c[2]:c[2] + r] = 1
    sample = transforms_of(trainer)(image=torch.from_numpy(rng.random((2, *shape), dtype=np.float32)),
                                    segmentation=torch.from_numpy(seg))
    targets = sample["segmentation"]
    scales = trainer._get_deep_supervision_scales()
    assert isinstance(targets, list) and len(targets) == len(scales)
    full = targets[0]
    assert full.shape[0] == 2 and full[1].max() > 3
    # the instance channel is cc3d (26-connectivity) of the augmented label the network trains on
    np.testing.assert_array_equal(full[1].numpy(), cc3d.connected_components(full[0].numpy() == 1,
                                                                             connectivity=26))
    for t in targets[1:]:
        # same nearest-neighbour call as nnU-Net's segmentation targets: blobs sit exactly on the label
        np.testing.assert_array_equal(t[1].numpy() > 0, t[0].numpy() == 1)
        down = F.interpolate(full[None, 1:].float(), t.shape[1:], mode="nearest-exact")[0, 0]
        np.testing.assert_array_equal(t[1].numpy(), down.numpy())


def expected_loss(trainer, output, target):
    """Independent recomputation: nnU-Net's DC+CE and the blob loss on instance maps made here with cc3d from
    the full-resolution label and downsampled like nnU-Net's targets."""
    glob_loss = DC_and_CE_loss({"batch_dice": trainer.configuration_manager.batch_dice, "smooth": 1e-5,
                                "do_bg": False, "ddp": False}, {}, weight_ce=1, weight_dice=1,
                               dice_class=MemoryEfficientSoftDiceLoss)
    inst0 = torch.stack([torch.from_numpy(cc3d.connected_components(t[0].numpy() == 1, connectivity=26)
                                          .astype(np.int64))[None] for t in target[0]])
    weights = np.array([1 / 2 ** i for i in range(len(output))])
    weights[-1] = 0
    weights /= weights.sum()
    total = 0.0
    for w, out, tgt in zip(weights, output, target):
        if w == 0:
            continue
        inst = F.interpolate(inst0.float(), tgt.shape[2:], mode="nearest-exact").long()
        seg = tgt[:, :1]
        total += w * (trainer.blob_alpha * glob_loss(out, seg) + trainer.blob_beta * blob_loss(out, inst))
    return float(total)


def test_train_step_loss_equals_loss_module_and_validation_sees_plain_labels(tiny_dataset):
    torch.manual_seed(0)
    trainer = make_trainer(tiny_dataset, "nnUNetTrainerBlobLoss_Debug")
    trainer.initialize()
    dl_tr, dl_val = trainer.get_dataloaders()
    batch = next(dl_tr)
    assert batch["target"][0].shape[1] == 2  # label + one instance channel (one foreground class)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    with torch.no_grad():
        want = expected_loss(trainer, trainer.network(batch["data"]), batch["target"])
    got = float(trainer.train_step(batch)["loss"])
    assert abs(got - want) < 1e-5 * max(1.0, abs(want))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.network.parameters()))

    trainer.on_validation_epoch_start()
    vbatch = next(dl_val)
    seg = vbatch["target"][0][:, :1].clone()
    out = trainer.validation_step(vbatch)
    # online Dice counts come from the label channel only: tp + fn = foreground voxels of the label
    assert out["tp_hard"].shape == (1,)
    assert out["tp_hard"][0] + out["fn_hard"][0] == int((seg == 1).sum())
    with torch.no_grad():
        assert abs(float(out["loss"]) - expected_loss(trainer, trainer.network(vbatch["data"]),
                                                      vbatch["target"])) < 1e-5 * max(1.0, abs(float(out["loss"])))


def test_nan_in_a_training_case_is_reported_with_its_name(tiny_dataset):
    trainer = make_trainer(tiny_dataset, "nnUNetTrainerBlobLoss_Debug")
    data = torch.zeros(2, 2, 8, 8, 8)
    data[1, 0, 3, 3, 3] = float("inf")
    batch = {"data": data, "target": [torch.zeros(2, 2, 8, 8, 8)], "keys": ["case_a", "case_b"]}
    with pytest.raises(ValueError, match=r"image of training case\(s\) \['case_b'\]"):
        trainer.train_step(batch)


def test_valdo_configuration(tiny_dataset, monkeypatch):
    from ranger21 import Ranger21
    from nnunetv2_ohem.training.blob import nnUNetTrainerBlobLoss_VALDO

    torch.manual_seed(0)
    trainer = make_trainer(tiny_dataset, "nnUNetTrainerBlobLoss_VALDO_Debug")
    trainer.initialize()
    assert (trainer.blob_alpha, trainer.blob_beta) == (0.66, 0.33)
    assert trainer.oversample_foreground_percent == 0.95 and isinstance(trainer.optimizer, Ranger21)
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-3
    # the static builder (the one nnUNetv2_predict calls) gives Mish + dropout 0.1
    net = nnUNetTrainerBlobLoss_VALDO.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 2, 2, enable_deep_supervision=False)
    kinds = {type(m) for m in net.modules()}
    assert torch.nn.Mish in kinds and torch.nn.LeakyReLU not in kinds
    assert {m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    assert trainer.network.decoder.deep_supervision  # training network keeps nnU-Net's deep supervision
    dl_tr, _ = trainer.get_dataloaders()
    batch = next(dl_tr)
    trainer.network.eval()  # no dropout, so the expected value is reproducible
    with torch.no_grad():
        want = expected_loss(trainer, trainer.network(batch["data"]), batch["target"])
    got = float(trainer.train_step(batch)["loss"])
    assert abs(got - want) < 1e-5 * max(1.0, abs(want))
    # env options reach the loss
    monkeypatch.setenv("nnUNet_ohem_blob_alpha", "1.5")
    monkeypatch.setenv("nnUNet_ohem_blob_beta", "0")
    assert (make_trainer(tiny_dataset, "nnUNetTrainerBlobLoss_Debug").blob_alpha,
            make_trainer(tiny_dataset, "nnUNetTrainerBlobLoss_Debug").blob_beta) == (1.5, 0.0)
    monkeypatch.setenv("nnUNet_blob_connectivity", "6")  # the name before the common prefix still works
    assert make_trainer(tiny_dataset, "nnUNetTrainerBlobLoss_Debug").blob_connectivity == 6


@pytest.mark.slow
# nnUNetTrainerBlobLoss keeps nnU-Net's network, so its predict path is the one the stock OHEM and EMA CLI tests cover; only
# the VALDO trainer (Mish + dropout built statically at predict time) is also predicted here, to save ~30 s
@pytest.mark.parametrize("trainer_name,predict", [("nnUNetTrainerBlobLoss_Debug", False),
                                                  ("nnUNetTrainerBlobLoss_VALDO_Debug", True)])
def test_stock_cli_train_and_predict(request, cli, tmp_path, nnunet_env, trainer_name, predict):
    ds = request.getfixturevalue("valdo_dataset" if "VALDO" in trainer_name else "tiny_dataset")
    cli(["nnUNetv2_train", str(ds.dataset_id), "3d_fullres", "0", "-tr", trainer_name,
         "-p", ds.plans_identifier, "-device", "cpu"])
    fold = os.path.join(nnunet_env["nnUNet_results"], ds.name, f"{trainer_name}__{ds.plans_identifier}__3d_fullres",
                        "fold_0")
    log = open(sorted(glob.glob(os.path.join(fold, "training_log_*.txt")))[-1]).read()
    assert "blob loss: alpha=" in log
    losses = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu",
                        weights_only=False)["logging"]["train_losses"]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    if not predict:
        return
    out = tmp_path / "pred"
    cli(["nnUNetv2_predict", "-i", os.path.join(ds.raw_folder, "imagesTs"), "-o", str(out), "-d", str(ds.dataset_id),
         "-c", "3d_fullres", "-f", "0", "-tr", trainer_name, "-p", ds.plans_identifier, "-device", "cpu",
         "--disable_tta", "-npp", "1", "-nps", "1", "-step_size", "0.3"])
    for image_file in sorted(glob.glob(os.path.join(ds.raw_folder, "imagesTs", "*_0000.nii.gz"))):
        pred = sitk.ReadImage(str(out / os.path.basename(image_file).replace("_0000.nii.gz", ".nii.gz")))
        assert pred.GetSize() == sitk.ReadImage(image_file).GetSize()
        assert set(np.unique(sitk.GetArrayViewFromImage(pred)).tolist()) <= {0, 1}
