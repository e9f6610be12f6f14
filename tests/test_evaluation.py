"""Evaluation tool: hand-built cases with known answers, cross-checks against MedPy and plain reference loops
on random masks, folder/CLI errors, and one CLI run in a subprocess."""
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from medpy.metric.binary import dc as medpy_dc
from medpy.metric.binary import hd95 as medpy_hd95
from scipy import ndimage

from nnunetv2_ohem.evaluation import brats, lesions
from nnunetv2_ohem.evaluation.api import evaluate_case, evaluate_folders
from nnunetv2_ohem.evaluation.cli import main as cli_main
from nnunetv2_ohem.evaluation.distances import dice, hd95
from nnunetv2_ohem.evaluation.msseg2 import evaluate_msseg2_arrays
from nnunetv2_ohem.evaluation.segmentation import confusion_matrix, metrics_from_confusion
from nnunetv2_ohem.evaluation.valdo import evaluate_valdo_arrays


# ----------------------------------------------------------------------------------------------- helpers
def write(path, arr, spacing_zyx=(1.0, 1.0, 1.0), origin=None):
    img = sitk.GetImageFromArray(np.asarray(arr, dtype=np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    if origin is not None:
        img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))


def random_lesion_map(rng, shape=(24, 24, 24), n=12, max_r=3):
    """Random union of small boxes (touching boxes merge, some are tiny)."""
    m = np.zeros(shape, dtype=np.uint8)
    for _ in range(n):
        c = rng.integers(0, shape)
        r = rng.integers(0, max_r + 1, size=3)
        m[tuple(slice(max(ci - ri, 0), ci + ri + 1) for ci, ri in zip(c, r))] = 1
    return m


def reference_anima(ref, pred, spacing, alpha=0.1, beta=0.7, gamma=0.65, min_volume=3.0, loop_bound=False):
    """Plain transcription of animaSegPerfAnalyzer's detection (dense table, Python loops), components by
    scipy.ndimage.label (face connectivity), independent of cc3d and of our sparse/vectorised code."""
    vv = float(np.prod(spacing))
    min_vox = math.floor(min_volume / vv) + 1

    def comps(m):
        lab, n = ndimage.label(m)
        out = np.zeros_like(lab)
        k = 0
        for i in range(1, n + 1):
            if (lab == i).sum() >= min_vox:
                k += 1
                out[lab == i] = k
        return out, k

    rl, nr = comps(ref)
    pl, npred = comps(pred)
    table = np.zeros((nr + 1, npred + 1), dtype=np.int64)
    for i in range(nr + 1):
        for j in range(npred + 1):
            table[i, j] = np.sum((rl == i) & (pl == j))

    def true_positives(t, n_ref, n_test):
        col = t.sum(axis=0)
        count = 0
        for i in range(1, n_ref + 1):
            tp = t[i, 1:].sum()
            if tp / (tp + t[i, 0]) <= alpha:
                continue
            order = sorted(range(1, n_test + 1), key=lambda j: (-t[i, j], j))
            weight, k, ok = 0.0, 0, True
            while weight < gamma and k < len(order) and (not loop_bound or k < n_ref + 1):
                j = order[k]
                if t[0, j] / col[j] > beta:
                    ok = False
                    break
                weight += t[i, j] / tp
                k += 1
            count += ok
        return count

    if nr == 0 or npred == 0:
        return nr, npred, 0, 0
    return nr, npred, true_positives(table, nr, npred), true_positives(table.T, npred, nr)


# ------------------------------------------------------------------------------------------- lesions
def test_min_lesion_size_rule_isotropic_and_anisotropic():
    m = np.zeros((10, 10, 10), np.uint8)
    m[1, 1, 1:4] = 1        # 3 voxels
    m[5, 5, 1:5] = 1        # 4 voxels
    m[8, 1:3, 8] = 1        # 2 voxels
    assert lesions.min_lesion_voxels(3.0, 1.0) == 4       # 3 mm³ exactly is not > 3 mm³
    lab, n = lesions.label_lesions(m, 6, lesions.min_lesion_voxels(3.0, 1.0))
    assert n == 1 and lab[5, 5, 1] == 1 and lab[1, 1, 1] == 0
    # 1 x 1 x 1.5 mm: 2 voxels = 3 mm³ (dropped), 3 voxels = 4.5 mm³ (kept)
    assert lesions.min_lesion_voxels(3.0, 1.5) == 3
    lab, n = lesions.label_lesions(m, 6, 3)
    assert n == 2 and lab[8, 1, 8] == 0 and lab[1, 1, 1] > 0


def test_connectivity_six_splits_diagonal_voxels():
    m = np.zeros((4, 4, 4), np.uint8)
    m[1, 1, 1] = m[2, 2, 2] = 1
    assert lesions.label_lesions(m, 6)[1] == 2
    assert lesions.label_lesions(m, 26)[1] == 1
    with pytest.raises(lesions.EvaluationError, match="connectivity 5"):
        lesions.label_lesions(m, 5)


def _one_case(ref, pred, spacing=(1, 1, 1), **kw):
    return evaluate_msseg2_arrays(np.asarray(ref, np.uint8), np.asarray(pred, np.uint8), spacing, **kw)


def test_alpha_rule_missed_lesion_with_small_coverage():
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[1:11, 1:11, 5] = 1                        # 100 voxels
    pred = np.zeros_like(ref)
    pred[1, 1:11, 5] = 1                          # covers 10 voxels: sensitivity 0.10, not > alpha
    r = _one_case(ref, pred)
    assert (r["tp_ref_lesions"], r["lesion_sensitivity"]) == (0, 0.0)
    pred[2, 1, 5] = 1                             # 11 voxels: 0.11 > 0.10
    assert _one_case(ref, pred)["tp_ref_lesions"] == 1


def test_beta_rule_prediction_too_far_outside():
    ref = np.zeros((8, 8, 20), np.uint8)
    ref[2, 2, 0:10] = 1                           # 10 voxels
    pred = np.zeros_like(ref)
    pred[2, 2, 0:20] = 1
    pred[3, 2, 0:20] = 1                          # 40 voxels, 30 outside: 0.75 > beta
    r = _one_case(ref, pred)
    assert r["tp_ref_lesions"] == 0 and r["tp_pred_lesions"] == 1   # the prediction itself is "detected"
    pred[3, 2, 10:20] = 0                         # 30 voxels, 20 outside: 0.667 <= beta
    assert _one_case(ref, pred)["tp_ref_lesions"] == 1


def test_gamma_rule_only_the_main_contributors_are_checked():
    ref = np.zeros((10, 30, 30), np.uint8)
    ref[1, 1, 0:20] = 1                           # 20 voxels
    good = np.zeros_like(ref)
    good[1, 1, 0:14] = 1                          # covers 14/20 = 0.70 of the overlap, fully inside
    bad = np.zeros_like(ref)
    bad[1, 1, 15:20] = 1
    bad[5:9, 5:25, 5:25] = 1                      # second piece covers 5/20 but is far outside (>0.7)
    bad[2:5, 1, 17] = 1                           # connect the outside slab to the piece
    bad[4, 2:6, 17] = 1
    bad[5, 5, 17] = 1
    assert lesions.label_lesions(bad, 6)[1] == 1
    r = _one_case(ref, good | bad)
    assert r["tp_ref_lesions"] == 1               # 14/19 >= gamma before the bad piece is visited
    good[1, 1, 11:14] = 0                         # main piece now 11/16 overlap ... still >= 0.65
    assert _one_case(ref, good | bad)["tp_ref_lesions"] == 1
    good[1, 1, 9:11] = 0                          # 9/14 = 0.64 < gamma: the bad piece is visited
    assert _one_case(ref, good | bad)["tp_ref_lesions"] == 0


def test_split_and_merged_lesions():
    ref = np.zeros((10, 10, 30), np.uint8)
    ref[4:6, 4:6, 2:12] = 1                       # one lesion, 40 voxels
    pred = ref.copy()
    pred[:, :, 7] = 0                             # split in two pieces inside it
    r = _one_case(ref, pred)
    assert (r["n_ref_lesions"], r["n_pred_lesions"], r["lesion_f1"]) == (1, 2, 1.0)
    ref2 = np.zeros_like(ref)
    ref2[4:6, 4:6, 2:8] = 1
    ref2[4:6, 4:6, 10:16] = 1                     # two lesions
    merged = np.zeros_like(ref)
    merged[4:6, 4:6, 2:16] = 1                    # one prediction bridging them (8 of 32 voxels outside)
    r = _one_case(ref2, merged)
    assert (r["n_ref_lesions"], r["n_pred_lesions"], r["tp_ref_lesions"], r["tp_pred_lesions"]) == (2, 1, 2, 1)
    assert r["lesion_f1"] == 1.0
    wide = merged.copy()
    wide[0:10, 0:10, 8:10] = 1                    # bridge of 200 voxels: 200/248 outside > beta
    r = _one_case(ref2, wide)
    assert (r["tp_ref_lesions"], r["lesion_sensitivity"]) == (0, 0.0)


def test_lesion_free_case_counts_fp_lesions_and_volume_in_mm3():
    ref = np.zeros((10, 10, 10), np.uint8)
    pred = np.zeros_like(ref)
    pred[1:3, 1:3, 1:3] = 1                       # 8 voxels
    pred[6:8, 6, 6] = 1                           # 2 voxels x 0.5 x 1 x 3 = 3 mm³: not > 3, ignored
    pred[6, 1:4, 1] = 1                           # 3 voxels = 4.5 mm³
    r = _one_case(ref, pred, spacing=(0.5, 1.0, 3.0))
    assert r["lesion_free"] and r["n_pred_lesions"] == 2 and r["fp_lesions"] == 2
    assert r["fp_volume_mm3"] == pytest.approx((8 + 3) * 1.5)
    assert math.isnan(r["lesion_f1"])


@pytest.mark.parametrize("loop_bound", [False, True])
def test_msseg_lesion_counts_equal_reference_loop_on_random_maps(loop_bound):
    rng = np.random.default_rng(1 + loop_bound)
    for t in range(12):
        spacing = tuple(rng.choice([0.5, 1.0, 1.5], size=3))
        ref = random_lesion_map(rng)
        pred = ref.copy() if t % 3 == 0 else random_lesion_map(rng)
        if t % 3 == 0:  # perturb a prediction of the reference: splits, shifts, extra blobs
            pred = np.roll(pred, rng.integers(-2, 3), axis=int(rng.integers(3))) | random_lesion_map(rng, n=4)
            pred[:, :, int(rng.integers(24))] = 0
        params = dict(alpha=float(rng.choice([0.1, 0.3])), beta=float(rng.choice([0.5, 0.7])),
                      gamma=float(rng.choice([0.5, 0.65])))
        r = evaluate_msseg2_arrays(ref, pred, spacing, anima_loop_bound=loop_bound, **params)
        exp = reference_anima(ref, pred, spacing, loop_bound=loop_bound, **params)
        assert (r["n_ref_lesions"], r["n_pred_lesions"], r["tp_ref_lesions"], r["tp_pred_lesions"]) == exp


def test_anima_loop_bound_quirk_differs_on_many_small_pieces():
    ref = np.zeros((6, 6, 40), np.uint8)
    ref[2, 2, 0:32] = 1                           # one reference lesion
    pred = np.zeros_like(ref)
    for k in range(3):                            # three pieces of 7 voxels (gaps break 6-connectivity)
        pred[2, 2, 8 * k: 8 * k + 7] = 1
    pred[2:6, 2, 24:29] = 1                       # 4th piece: 5 voxels on the lesion, 15 outside (0.75 > beta)
    pairs_cases = {b: _one_case(ref, pred, anima_loop_bound=b, gamma=0.9, beta=0.5) for b in (False, True)}
    assert pairs_cases[False]["tp_ref_lesions"] == 0   # documented rule visits the 4th piece: outside > beta
    assert pairs_cases[True]["tp_ref_lesions"] == 1    # C++ loop stops after n_ref + 1 = 2 pieces


# ------------------------------------------------------------------------------------------- distances
def test_dice_and_hd95_equal_medpy_on_random_masks_anisotropic():
    rng = np.random.default_rng(5)
    for t in range(8):
        shape = (18, 20, 16) if t % 2 else (30, 26)
        a = rng.random(shape) < 0.04
        b = rng.random(shape) < 0.04
        a[0, 0] = True                             # surface on the image edge (border_value=0 in MedPy)
        spacing = rng.uniform(0.4, 3.0, size=len(shape))
        assert hd95(a, b, spacing) == pytest.approx(medpy_hd95(b, a, voxelspacing=spacing), abs=1e-6)
        assert dice(a, b) == pytest.approx(medpy_dc(b, a), abs=1e-12)


def test_hd95_hand_case_anisotropic():
    a = np.zeros((5, 5, 5), bool)
    b = np.zeros_like(a)
    a[1, 2, 2] = True
    b[3, 2, 2] = True
    assert hd95(a, b, (2.5, 1.0, 1.0)) == pytest.approx(5.0)
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------- BraTS
def _brats_2021_case():
    seg = np.zeros((16, 16, 16), np.uint8)
    seg[2:12, 2:12, 2:12] = 2                     # edema
    seg[4:9, 4:9, 4:9] = 1                        # necrosis
    seg[5:7, 5:7, 5:7] = 4                        # enhancing
    return seg


def test_brats_label_conventions_2021_2023_nnunet():
    ref21 = _brats_2021_case()
    pred21 = np.roll(ref21, 1, axis=0)
    to_nnunet = np.array([0, 2, 1, 0, 3], np.uint8)      # Dataset137: 2->1, 1->2, 4->3
    to_2023 = np.array([0, 1, 2, 0, 3], np.uint8)        # BraTS-GLI 2023: 4 -> 3
    sp = (1.0, 1.0, 2.0)
    r21 = brats.evaluate_brats_arrays(ref21, pred21, sp, "2021")
    r20 = brats.evaluate_brats_arrays(ref21, pred21, sp, "2020")
    rnn = brats.evaluate_brats_arrays(to_nnunet[ref21], to_nnunet[pred21], sp, "nnunet")
    r23 = brats.evaluate_brats_arrays(to_2023[ref21], to_2023[pred21], sp, "2023")
    auto = brats.evaluate_brats_arrays(ref21, pred21, sp, "auto")
    for k in ("dice_WT", "dice_TC", "dice_ET", "hd95_WT", "hd95_TC", "hd95_ET"):
        assert r21[k] == r20[k] == rnn[k] == r23[k] == auto[k]
    assert auto["label_convention"] == "2021"
    # TC of the same 2021 case, computed by hand: labels {1, 4}
    tc_ref, tc_pred = np.isin(ref21, (1, 4)), np.isin(pred21, (1, 4))
    assert r21["dice_TC"] == pytest.approx(medpy_dc(tc_pred, tc_ref))
    assert r21["hd95_TC"] == pytest.approx(medpy_hd95(tc_pred, tc_ref, voxelspacing=sp))
    # 2023 and nnunet share labels {1,2,3} but not TC: reading a 2023 file as nnunet is wrong
    wrong = brats.evaluate_brats_arrays(to_2023[ref21], to_2023[pred21], sp, "nnunet")
    assert wrong["dice_WT"] == r23["dice_WT"] and wrong["dice_TC"] != r23["dice_TC"]
    assert brats.detect_convention([[0, 1, 2, 3]]) == "nnunet"
    with pytest.raises(lesions.EvaluationError, match="mix"):
        brats.detect_convention([[0, 3], [4]])


def test_brats_empty_conventions():
    ref = _brats_2021_case()
    ref[ref == 4] = 1                             # no enhancing tumour in the reference
    r = brats.evaluate_brats_arrays(ref, ref.copy(), (1, 1, 1), "2021", definition="medpy")
    assert (r["dice_ET"], r["hd95_ET"]) == (1.0, 0.0)                 # both empty
    pred = ref.copy()
    pred[0, 0, 0] = 4
    r = brats.evaluate_brats_arrays(ref, pred, (1, 1, 1), "2021", definition="medpy")
    assert (r["dice_ET"], r["hd95_ET"]) == (0.0, 373.1287)            # reference empty, prediction not
    r = brats.evaluate_brats_arrays(pred, ref, (1, 1, 1), "2021", definition="medpy")
    assert (r["dice_ET"], r["hd95_ET"]) == (0.0, 373.1287)            # prediction empty
    assert 373.1287 == pytest.approx(math.sqrt(240 ** 2 + 240 ** 2 + 155 ** 2), abs=1e-4)


# ------------------------------------------------------------------------------------------- VALDO
def test_valdo_centre_of_mass_rule_hand_case():
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[2:5, 2:5, 2:5] = 1                        # lesion A
    ref[10:13, 10:13, 10:13] = 1                  # lesion B (missed)
    pred = np.zeros_like(ref)
    pred[3:6, 3:6, 3:6] = 1                       # centre (4,4,4) inside A: TP
    ring = np.zeros_like(ref)
    ring[15:18, 2:9, 2:9] = 1
    ring[15:18, 3:8, 3:8] = 0                     # hollow square tube: centre in its hole, off any lesion
    ring[15:18, 5, 5] = 0
    ref[15:18, 2, 2:9] = 1                        # the tube overlaps reference lesion C on one side...
    pred |= ring
    r = evaluate_valdo_arrays(ref, pred, (1.0, 1.0, 2.0))
    assert (r["n_ref_lesions"], r["n_pred_lesions"], r["tp_lesions"], r["found_ref_lesions"]) == (3, 2, 1, 1)
    assert r["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))   # ...but overlap alone does not count
    assert r["avd_mm3"] == pytest.approx(abs(pred.sum() - ref.sum()) * 2.0)


def test_valdo_counts_equal_reference_loop_on_random_maps():
    rng = np.random.default_rng(7)
    full = np.ones((3, 3, 3))
    for _ in range(10):
        ref, pred = random_lesion_map(rng, n=10), random_lesion_map(rng, n=10)
        pred = np.maximum(pred, np.roll(ref, 1, axis=0) * (rng.random(ref.shape) < 0.9))
        r = evaluate_valdo_arrays(ref, pred, (1.0, 1.0, 1.0))
        rl, nr = ndimage.label(ref, full)
        pl, npr = ndimage.label(pred, full)
        tp, found = 0, set()
        for j in range(1, npr + 1):
            com = np.rint(ndimage.center_of_mass(pl == j)).astype(int)
            if rl[tuple(com)] > 0:
                tp += 1
                found.add(rl[tuple(com)])
        assert (r["n_ref_lesions"], r["n_pred_lesions"], r["tp_lesions"], r["found_ref_lesions"]) == \
               (nr, npr, tp, len(found))


# ------------------------------------------------------------------------------------------- segmentation
@pytest.mark.parametrize("shape", [(40, 30), (12, 10, 9)])
def test_confusion_metrics_equal_plain_loops(shape):
    rng = np.random.default_rng(len(shape))
    k = 4
    ref = rng.integers(0, k, size=shape)
    pred = np.where(rng.random(shape) < 0.6, ref, rng.integers(0, k - 1, size=shape))  # class 3 never predicted
    cm = confusion_matrix(ref, pred, k)
    p = np.zeros((k, k))
    for r_, q in zip(ref.ravel(), pred.ravel()):
        p[r_, q] += 1
    assert np.array_equal(cm, p)
    m = metrics_from_confusion(cm)
    tot = p.sum()
    pa = sum(p[i, i] for i in range(k)) / tot
    mpa = sum(p[i, i] / p[i].sum() for i in range(k)) / k
    iou = [p[i, i] / (p[i, i] + sum(p[i, j] for j in range(k) if j != i) + sum(p[j, i] for j in range(k) if j != i))
           for i in range(k)]
    fw = sum(p[i].sum() * iou[i] for i in range(k)) / tot
    dsc = [2 * p[i, i] / (p[i].sum() + p[:, i].sum()) for i in range(k)]
    assert m["pixel_accuracy"] == pytest.approx(pa)
    assert m["mean_pixel_accuracy"] == pytest.approx(mpa)
    assert m["iou"] == pytest.approx(iou) and m["mean_iou"] == pytest.approx(np.mean(iou))
    assert m["fw_iou"] == pytest.approx(fw) and m["dice"] == pytest.approx(dsc)
    assert m["dice"][1] == pytest.approx(medpy_dc(pred == 1, ref == 1))


def test_absent_class_is_left_out_of_the_means():
    cm = np.array([[5, 1, 0], [2, 2, 0], [0, 0, 0]])
    m = metrics_from_confusion(cm)
    assert math.isnan(m["iou"][2]) and m["mean_iou"] == pytest.approx((5 / 8 + 2 / 5) / 2)


# ------------------------------------------------------------------------------------------- folders + CLI
@pytest.fixture()
def msseg_folders(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    sp = (2.0, 1.0, 1.0)
    ref = np.zeros((12, 16, 16), np.uint8)
    ref[2:5, 2:6, 2:6] = 1
    pred = np.zeros_like(ref)
    pred[2:5, 3:7, 2:6] = 1
    pred[9:11, 10:12, 10:12] = 1                  # 8 voxels x 2 mm³ = 16 mm³ false positive
    write(ref_dir / "P01.nii.gz", ref, sp)
    write(pred_dir / "P01.nii.gz", pred, sp)
    write(ref_dir / "P02.nii.gz", np.zeros_like(ref), sp)      # lesion-free patient
    write(pred_dir / "P02.nii.gz", pred, sp)
    (pred_dir / "plans.json").write_text("{}")                # nnU-Net's side files are ignored
    return ref_dir, pred_dir


def test_evaluate_folders_msseg2_aggregation(msseg_folders):
    ref_dir, pred_dir = msseg_folders
    df, agg = evaluate_folders("msseg2", str(ref_dir), str(pred_dir), num_processes=2)
    assert list(df["case"]) == ["P01", "P02"]
    p1 = df.set_index("case").loc["P01"]
    assert p1["dice"] == pytest.approx(2 * 36 / (48 + 56))
    assert (p1["tp_ref_lesions"], p1["fp_lesions"], p1["lesion_f1"]) == (1, 1, pytest.approx(2 / 3))
    ch = agg["challenge"]
    assert ch["cases_with_lesions"]["n_cases"] == 1 and ch["lesion_free_cases"]["n_cases"] == 1
    assert ch["lesion_free_cases"]["fp_lesions"]["total"] == 2
    assert ch["lesion_free_cases"]["fp_volume_mm3"]["total"] == pytest.approx((48 + 8) * 2.0)
    assert agg["mean"]["fp_volume_mm3"] == pytest.approx((16 + 112) / 2)
    row = evaluate_case("msseg2", str(ref_dir / "P01.nii.gz"), str(pred_dir / "P01.nii.gz"))
    assert row["lesion_f1"] == pytest.approx(2 / 3)


def _cli_error(capsys, argv):
    assert cli_main(argv) == 1  # bad data (docs/cli.md)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    return err


def test_cli_errors_missing_extra_geometry_nonbinary(msseg_folders, capsys, tmp_path):
    ref_dir, pred_dir = msseg_folders
    base = ["msseg2", "-ref", str(ref_dir), "-pred", str(pred_dir)]
    os.rename(pred_dir / "P02.nii.gz", tmp_path / "P02.nii.gz")
    write(pred_dir / "X99.nii.gz", np.zeros((12, 16, 16)), (2.0, 1.0, 1.0))
    err = _cli_error(capsys, base)
    assert "have no prediction" in err and "P02" in err and "X99.nii.gz" in err and "no reference" in err
    os.remove(pred_dir / "X99.nii.gz")
    write(pred_dir / "P02.nii.gz", np.zeros((12, 16, 16)), (2.0, 1.0, 1.1))
    err = _cli_error(capsys, base)
    assert "geometry mismatch" in err and "P02.nii.gz" in err and "spacing" in err
    write(pred_dir / "P02.nii.gz", np.zeros((12, 16, 16)), (2.0, 1.0, 1.0), origin=(0.0, 0.0, 5.0))
    assert "origin" in _cli_error(capsys, base)
    write(pred_dir / "P02.nii.gz", np.zeros((12, 16, 15)), (2.0, 1.0, 1.0))
    assert "shape" in _cli_error(capsys, base)
    write(pred_dir / "P02.nii.gz", np.full((12, 16, 16), 2), (2.0, 1.0, 1.0))
    err = _cli_error(capsys, base)
    assert "P02.nii.gz" in err and "binary" in err and "[2]" in err


def test_cli_subprocess_writes_json_and_csv(msseg_folders, tmp_path, cli):
    ref_dir, pred_dir = msseg_folders
    out, csv = tmp_path / "out" / "metrics.json", tmp_path / "cases.csv"
    proc = cli(["nnunetv2_ohem_evaluate", "msseg2", "-ref", str(ref_dir), "-pred", str(pred_dir),
                "-o", str(out), "--csv", str(csv), "-np", "1"])
    assert "lesion-free cases: 1" in proc.stdout and "P01" in proc.stdout
    data = json.loads(out.read_text())            # strict JSON: NaN written as null
    assert data["aggregate"]["challenge"]["lesion_free_cases"]["fp_volume_mm3"]["total"] == pytest.approx(112.0)
    assert data["cases"][1]["lesion_f1"] is None
    df = pd.read_csv(csv)
    assert list(df["case"]) == ["P01", "P02"] and df.loc[0, "lesion_f1"] == pytest.approx(2 / 3)
    assert os.listdir(out.parent) == ["metrics.json"]             # no temporary file left


def test_brats_and_segmentation_folders(tmp_path):
    ref_dir, pred_dir = tmp_path / "r", tmp_path / "p"
    ref_dir.mkdir()
    pred_dir.mkdir()
    seg = _brats_2021_case()
    write(ref_dir / "B1.nii.gz", seg)
    write(pred_dir / "B1.nii.gz", np.roll(seg, 1, axis=2))
    seg2 = seg.copy()
    seg2[seg2 == 4] = 1                          # a case without label 4: auto must still read it as 2021
    write(ref_dir / "B2.nii.gz", seg2)
    write(pred_dir / "B2.nii.gz", seg2)
    df, agg = evaluate_folders("brats", str(ref_dir), str(pred_dir), definition="medpy")
    assert agg["challenge"]["label_convention"] == ["2021"]
    b2 = df.set_index("case").loc["B2"]
    assert (b2["dice_TC"], b2["dice_ET"], b2["hd95_ET"]) == (1.0, 1.0, 0.0)
    df, agg = evaluate_folders("segmentation", str(ref_dir), str(pred_dir))
    assert "iou_4" in df.columns and agg["challenge"]["confusion_matrix"][4][4] > 0
    with pytest.raises(lesions.EvaluationError, match="convention '2023'"):
        evaluate_folders("brats", str(ref_dir), str(pred_dir), year="2023")
