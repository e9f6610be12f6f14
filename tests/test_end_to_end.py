"""The smallest honest end-to-end run through nnU-Net's stock CLIs: train one of our trainers on tiny
plans, predict held-out phantoms, and check what a user would check."""
import glob
import os

import numpy as np
import pytest
import SimpleITK as sitk


@pytest.mark.slow
def test_stock_train_then_predict(tiny_dataset, cli, tmp_path, nnunet_env):
    ds = tiny_dataset
    cli(["nnUNetv2_train", str(ds.dataset_id), "3d_fullres", "0", "-tr", "nnUNetTrainer_Debug",
         "-p", ds.plans_identifier, "-device", "cpu"])
    model_dir = os.path.join(nnunet_env["nnUNet_results"], ds.name,
                             f"nnUNetTrainer_Debug__{ds.plans_identifier}__3d_fullres")
    assert os.path.isfile(os.path.join(model_dir, "fold_0", "checkpoint_final.pth"))

    out = tmp_path / "pred"
    cli(["nnUNetv2_predict", "-i", os.path.join(ds.raw_folder, "imagesTs"), "-o", str(out),
         "-d", str(ds.dataset_id), "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainer_Debug",
         "-p", ds.plans_identifier, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"])

    inputs = sorted(glob.glob(os.path.join(ds.raw_folder, "imagesTs", "*_0000.nii.gz")))
    assert len(inputs) == 2
    for image_file in inputs:
        case = os.path.basename(image_file)[: -len("_0000.nii.gz")]
        pred_file = out / f"{case}.nii.gz"
        assert pred_file.is_file(), f"no prediction for {case}"
        image, pred = sitk.ReadImage(image_file), sitk.ReadImage(str(pred_file))
        assert pred.GetSize() == image.GetSize()
        np.testing.assert_allclose(pred.GetSpacing(), image.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(pred.GetOrigin(), image.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(pred.GetDirection(), image.GetDirection(), atol=1e-5)
        values = set(np.unique(sitk.GetArrayViewFromImage(pred)).tolist())
        assert values <= {0, 1}, values
