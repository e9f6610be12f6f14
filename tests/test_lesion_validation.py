"""Lesion-wise validation inside training: the metric family guessed from dataset.json, the pure folder ->
metrics function on a lesion-free fold, the trainer hook (written file == ``nnunetv2_ohem_evaluate`` on the
same folders, failures logged without touching nnU-Net's outputs), and one stock-CLI training run."""
import json
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_ohem.evaluation.cli import main as evaluate_main
from nnunetv2_ohem.evaluation.lesions import EvaluationError
from nnunetv2_ohem.evaluation.validation import LESIONWISE_FILE, guess_family, lesionwise_validation
from nnunetv2_ohem.training.lesion_validation import LesionValidationMixin

SPACING = (1.0, 1.0, 2.0)  # x, y, z in mm: voxel volume 2 mm³
BRATS_REGIONS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}


@pytest.mark.parametrize("labels,family", [
    ({"background": 0, "lesion": 1}, "msseg2"),                      # our phantoms
    ({"background": 0, "new_lesion": 1}, "msseg2"),                  # MSSEG-II converter
    ({"background": 0, "lacune": 1}, "valdo"),                       # VALDO converter
    (BRATS_REGIONS, "brats"),                                        # BraTS converter / Dataset137 regions
    ({"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}, "brats"),
    ({"background": 0, "NETC": 1, "SNFH": 2, "ET": 3}, "brats"),     # BraTS 2023 label names
    ({"background": 0, "RV": 1, "MYO": 2, "LV": 3}, "segmentation"),  # ACDC
    ({"background": 0, "liver": 1, "tumor": 2}, "segmentation"),     # LiTS: "tumor" alone is not BraTS
    ({"background": 0, "lacune": 1, "pvs": 2}, "segmentation"),
])
def test_guess_family_from_dataset_json(labels, family):
    got, why = guess_family({"labels": labels, "file_ending": ".nii.gz"})
    assert got == family
    assert why.startswith("guessed from dataset.json")


def test_guess_family_refuses_ignore_label_and_empty_labels():
    with pytest.raises(EvaluationError, match="ignore"):
        guess_family({"labels": {"background": 0, "lesion": 1, "ignore": 2}})
    with pytest.raises(EvaluationError, match="no foreground"):
        guess_family({"labels": {"background": 0}})


def _write(array: np.ndarray, path: str) -> None:
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.SetSpacing(SPACING)
    sitk.WriteImage(img, path)


def _blob(shape=(8, 10, 10), at=(2, 2, 2), size=3) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    a[at[0]:at[0] + size, at[1]:at[1] + size, at[2]:at[2] + size] = 1
    return a


def _fold(tmp_path, refs: dict, preds: dict, extra_refs: dict = ()):
    """gt_segmentations with ``refs`` (+ cases not in the fold), validation/ with ``preds``."""
    gt, val = tmp_path / "preprocessed" / "gt_segmentations", tmp_path / "fold_0" / "validation"
    gt.mkdir(parents=True)
    val.mkdir(parents=True)
    for case, a in {**refs, **dict(extra_refs)}.items():
        _write(a, str(gt / f"{case}.nii.gz"))
    for case, a in preds.items():
        _write(a, str(val / f"{case}.nii.gz"))
    (val / "summary.json").write_text('{"nnU-Net": "its own file"}')
    return gt, val


def _lesion_free_fold(tmp_path):
    empty = np.zeros((8, 10, 10), np.uint8)
    # one 27-voxel false positive (54 mm³) in case a, nothing in case b; case c is a training case
    return _fold(tmp_path, {"a": empty, "b": empty}, {"a": _blob(), "b": empty}, {"c": _blob()})


@pytest.mark.parametrize("family,fp_volume", [("msseg2", 54.0), ("valdo", 54.0)])
def test_lesion_free_fold_gives_fp_counts_and_explains_missing_f1(tmp_path, family, fp_volume):
    gt, val = _lesion_free_fold(tmp_path)
    out = lesionwise_validation(family, str(gt), str(val), ".nii.gz")
    m = out["metrics"]
    assert out["n_cases"] == 2 and [c["case"] for c in out["cases"]] == ["a", "b"]
    assert m["n_lesion_free"] == 2 and m["n_cases_with_lesions"] == 0
    assert m["fp_lesions_lesion_free"] == 0.5            # (1 + 0) / 2 lesion-free cases
    assert m["fp_volume_mm3_lesion_free"] == fp_volume / 2
    if family == "msseg2":
        assert m["lesion_f1"] is None and "lesion-free" in out["absent"]["lesion_f1"]
    else:  # VALDO's rule: F1 0 when exactly one side has lesions (case a), undefined when neither (case b)
        assert m["f1"] == 0.0 and [c["f1"] for c in out["cases"]] == [0.0, None]
    assert m["lesion_f1_pooled"] is None and "lesion_f1_pooled" in out["absent"]
    assert m["fp_lesions"] == 1 and m["n_ref_lesions"] == 0


class _FakeNNUNetTrainer:
    """The attributes of nnUNetTrainer that the hook reads; its final validation already wrote validation/."""

    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        self.fold, self.dataset_json, self.local_rank = fold, dataset_json, 0
        self.log = []

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.validated = True

    def print_to_log_file(self, *args, also_print_to_console=True, add_timestamp=True):
        self.log.append(" ".join(str(a) for a in args))


class _Trainer(LesionValidationMixin, _FakeNNUNetTrainer):
    pass


def _trainer(tmp_path, gt, labels=None, cls=_Trainer):
    tr = cls({}, "3d_fullres", 0, {"labels": labels or {"background": 0, "lesion": 1}, "file_ending": ".nii.gz"})
    tr.output_folder, tr.preprocessed_dataset_folder_base = str(tmp_path / "fold_0"), os.path.dirname(str(gt))
    return tr


def _cli_json(tmp_path, family, refs, val, *args):
    ref = tmp_path / "cli_ref"
    ref.mkdir()
    for case in refs:
        os.symlink(case, ref / os.path.basename(case))
    out = tmp_path / "cli.json"
    assert evaluate_main([family, "-ref", str(ref), "-pred", str(val), "-o", str(out), *args]) == 0
    return json.loads(out.read_text())


def test_hook_on_lesion_free_fold_writes_what_the_cli_computes(tmp_path):
    gt, val = _lesion_free_fold(tmp_path)
    tr = _trainer(tmp_path, gt)
    tr.perform_actual_validation()
    assert tr.validated
    written = json.loads((val / LESIONWISE_FILE).read_text())
    cli = _cli_json(tmp_path, "msseg2", [str(gt / "a.nii.gz"), str(gt / "b.nii.gz")], val)
    assert written["aggregate"] == cli["aggregate"] and written["cases"] == cli["cases"]
    assert (written["family"], written["fold"], written["trainer"]) == ("msseg2", 0, "_Trainer")
    assert written["family_source"].startswith("guessed from dataset.json")
    assert written["metrics"]["fp_lesions_lesion_free"] == \
        cli["aggregate"]["challenge"]["lesion_free_cases"]["fp_lesions"]["mean"] == 0.5
    assert (val / "summary.json").read_text() == '{"nnU-Net": "its own file"}'
    assert any("lesion-wise validation (msseg2" in line for line in tr.log)


def test_hook_metrics_equal_cli_on_a_fold_with_lesions(tmp_path):
    two = _blob() | _blob(at=(4, 6, 6), size=2)                      # two reference lesions (27 and 8 voxels)
    gt, val = _fold(tmp_path, {"a": two, "b": np.zeros_like(two)}, {"a": _blob(), "b": _blob(at=(0, 6, 0))})
    tr = _trainer(tmp_path, gt)
    tr.perform_actual_validation()
    written = json.loads((val / LESIONWISE_FILE).read_text())
    cli = _cli_json(tmp_path, "msseg2", [str(gt / "a.nii.gz"), str(gt / "b.nii.gz")], val)
    assert written["aggregate"] == cli["aggregate"] and written["cases"] == cli["cases"]
    rows = {r["case"]: r for r in cli["cases"]}
    m = written["metrics"]
    # case a: lesion 1 found, lesion 2 missed, the one predicted lesion correct: P 1, R 1/2, F1 2/3
    assert math.isclose(m["lesion_f1"], rows["a"]["lesion_f1"]) and math.isclose(m["lesion_f1"], 2 / 3)
    assert m["dice"] == rows["a"]["dice"] == 2 * 27 / (35 + 27)
    assert m["fp_lesions_lesion_free"] == rows["b"]["fp_lesions"] == 1
    assert m["fp_volume_mm3_lesion_free"] == 54.0
    assert written["absent"] == {}


class _SegTrainer(_Trainer):
    lesion_metric = "segmentation"


def test_explicit_family_and_dataset_class_count(tmp_path):
    a = _blob()
    gt, val = _fold(tmp_path, {"a": a}, {"a": a})
    tr = _trainer(tmp_path, gt, labels={"background": 0, "x": 1, "y": 2}, cls=_SegTrainer)
    tr.perform_actual_validation()
    written = json.loads((val / LESIONWISE_FILE).read_text())
    assert written["family"] == "segmentation" and written["family_source"] == "set by the trainer's lesion_metric"
    # class 2 of dataset.json counts though absent from the fold: the CLI equivalent is --num_classes 3
    cli = _cli_json(tmp_path, "segmentation", [str(gt / "a.nii.gz")], val, "--num_classes", "3")
    assert written["aggregate"] == cli["aggregate"] and written["aggregate"]["options"]["num_classes"] == 3
    assert written["metrics"]["mean_dice_fg"] == 1.0   # class 1 perfect; class 2 absent on both sides: NaN, skipped


def test_failure_is_one_log_line_and_removes_a_stale_file(tmp_path):
    bad = _blob() * 2                                                  # label 2: not a binary msseg2 mask
    gt, val = _fold(tmp_path, {"a": bad}, {"a": _blob()})
    (val / LESIONWISE_FILE).write_text('{"metrics": "of an earlier run"}')
    tr = _trainer(tmp_path, gt)
    tr.perform_actual_validation()                                     # no exception
    assert not (val / LESIONWISE_FILE).exists()
    assert (val / "summary.json").read_text() == '{"nnU-Net": "its own file"}'
    failed = [line for line in tr.log if "lesion-wise validation failed" in line]
    assert len(failed) == 1 and "\n" not in failed[0] and "a.nii.gz" in failed[0]
    tr = _trainer(tmp_path, gt, labels={"background": 0, "lesion": 1, "ignore": 2})
    tr.perform_actual_validation()
    assert "ignore" in tr.log[-1] and not (val / LESIONWISE_FILE).exists()


def test_unknown_family_fails_at_construction():
    class Typo(_Trainer):
        lesion_metric = "msseg"

    with pytest.raises(ValueError, match="lesion_metric"):
        Typo({}, "3d_fullres", 0, {})


def test_our_trainer_families_include_the_mixin():
    from nnunetv2_ohem.training import blob, deeplab, ema, ohem, ohem_blob, precision
    for cls in (blob.nnUNetTrainerBlobLoss, deeplab.nnUNetTrainerDeepLabV3, precision.PrecisionTrainer,
                ema.nnUNetTrainerEMA, ema.nnUNetTrainerBlobLossEMA, ema.nnUNetTrainerBF16EMA,
                ohem.nnUNetTrainerOHEMEMA, ohem.nnUNetTrainerOHEMEMA_Paper, ohem_blob.nnUNetTrainerOHEMEMA_BlobLoss):
        assert issubclass(cls, LesionValidationMixin), cls
        # the EMA swap wraps nnU-Net's validation, the lesion-wise scoring follows it, exactly once
        assert cls.__mro__.count(LesionValidationMixin) == 1


@pytest.mark.slow
def test_stock_training_writes_lesionwise_file_equal_to_cli(tiny_dataset, cli, nnunet_env, tmp_path):
    ds, name = tiny_dataset, "nnUNetTrainerEMA_Debug"
    cli(["nnUNetv2_train", str(ds.dataset_id), "3d_fullres", "0", "-tr", name, "-p", ds.plans_identifier,
         "-device", "cpu"])
    val = os.path.join(nnunet_env["nnUNet_results"], ds.name, f"{name}__{ds.plans_identifier}__3d_fullres",
                       "fold_0", "validation")
    written = json.load(open(os.path.join(val, LESIONWISE_FILE)))
    nnunet = json.load(open(os.path.join(val, "summary.json")))
    assert "foreground_mean" in nnunet and "lesion_f1" not in json.dumps(nnunet)   # nnU-Net's file as it wrote it
    gt = os.path.join(ds.preprocessed_folder, "gt_segmentations")
    cases = sorted(f for f in os.listdir(val) if f.endswith(".nii.gz"))
    assert written["family"] == "msseg2" and written["reference"] == gt and written["n_cases"] == len(cases) > 0
    ref = tmp_path / "ref"
    ref.mkdir()
    for c in cases:
        os.symlink(os.path.join(gt, c), ref / c)
    cli(["nnunetv2_ohem_evaluate", "msseg2", "-ref", str(ref), "-pred", val, "-o", str(tmp_path / "m.json")])
    expected = json.load(open(tmp_path / "m.json"))
    assert written["aggregate"] == expected["aggregate"] and written["cases"] == expected["cases"]
    with_lesions = [r for r in expected["cases"] if not r["lesion_free"]]
    free = [r for r in expected["cases"] if r["lesion_free"]]
    f1 = [r["lesion_f1"] for r in with_lesions]
    assert written["metrics"]["lesion_f1"] == (pytest.approx(sum(f1) / len(f1), rel=1e-12) if f1 else None)
    fp = [r["fp_lesions"] for r in free]
    assert written["metrics"]["fp_lesions_lesion_free"] == (pytest.approx(sum(fp) / len(fp)) if fp else None)
