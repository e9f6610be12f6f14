"""BraTS 2023 lesion-wise metrics: hand cases, the sub-challenge parameters, and agreement with a plain
full-volume reference built from other tools (scipy.ndimage.label, distance transforms) on random masks."""
import os

import numpy as np
import pytest
from scipy import ndimage

from nnunetv2_ohem.evaluation import brats
from nnunetv2_ohem.evaluation.brats_lesionwise import (LESION_WISE_PENALTY_MM, lesion_wise_parameters,
                                                        lesion_wise_scores, merged_reference_lesions)
from nnunetv2_ohem.evaluation.lesions import EvaluationError

S26 = np.ones((3, 3, 3), bool)
S18 = ndimage.generate_binary_structure(3, 2)


def _cube(mask, lo, size):
    mask[tuple(slice(a, a + s) for a, s in zip(lo, size))] = True


def _hd95_edt(a, b, spacing):
    """MedPy-definition HD95 from full-volume distance transforms (independent of the k-d tree code)."""
    sa = a & ~ndimage.binary_erosion(a, ndimage.generate_binary_structure(3, 1))
    sb = b & ~ndimage.binary_erosion(b, ndimage.generate_binary_structure(3, 1))
    da = ndimage.distance_transform_edt(~sa, sampling=spacing)
    db = ndimage.distance_transform_edt(~sb, sampling=spacing)
    return float(np.percentile(np.concatenate([db[sa], da[sb]]), 95))


def reference_lesion_wise(ref, pred, spacing, d, min_volume, penalty=374.0):
    """The definition, voxel by voxel over the whole image, one lesion at a time."""
    ref, pred = ref.astype(bool), pred.astype(bool)
    grown = ndimage.binary_dilation(ref, S18, iterations=d) if d else ref
    grown_ids, n = ndimage.label(grown, S26)
    pred_ids, n_pred = ndimage.label(pred, S26)
    vox = float(np.prod(spacing))
    tp_components, scores, kept_tp, kept_fn = set(), [], 0, 0
    for k in range(1, n + 1):
        lesion = ref & (grown_ids == k)
        zone = ndimage.binary_dilation(lesion, S18, iterations=d) if d else lesion
        matched = set(np.unique(pred_ids[zone]).tolist()) - {0}
        tp_components |= matched
        union = np.isin(pred_ids, list(matched)) if matched else np.zeros_like(pred)
        dice = 2.0 * (lesion & union).sum() / (lesion.sum() + union.sum())
        hd = _hd95_edt(lesion, union, spacing) if matched else penalty
        if lesion.sum() * vox > min_volume:
            scores.append((dice, hd))
            kept_tp += bool(matched)
            kept_fn += not matched
    fp = n_pred - len(tp_components)
    denom = len(scores) + fp
    if denom == 0:
        return 1.0, 0.0, kept_tp, kept_fn, fp
    return (sum(s[0] for s in scores) / denom, (sum(s[1] for s in scores) + penalty * fp) / denom,
            kept_tp, kept_fn, fp)


def test_hand_case_one_hit_one_miss_one_false_positive():
    ref = np.zeros((30, 30, 30), bool)
    pred = np.zeros_like(ref)
    _cube(ref, (2, 2, 2), (4, 4, 4))       # 64 mm³, found exactly
    _cube(pred, (2, 2, 2), (4, 4, 4))
    _cube(ref, (20, 2, 2), (4, 4, 4))      # 64 mm³, missed
    _cube(pred, (20, 20, 20), (3, 3, 3))   # far from everything: a false positive
    r = lesion_wise_scores(ref, pred, (1.0, 1.0, 1.0), *lesion_wise_parameters("GLI"))
    assert (r.n_tp, r.n_fn, r.n_fp) == (1, 1, 1)
    assert r.dice == pytest.approx((1 + 0) / 3)
    assert r.hd95 == pytest.approx((0 + 374 + 374) / 3)


def test_close_lesions_merge_with_three_dilations_but_not_one():
    ref = np.zeros((20, 12, 12), bool)
    _cube(ref, (2, 2, 2), (4, 4, 4))   # x 2..5
    _cube(ref, (9, 2, 2), (4, 4, 4))   # x 9..12: a gap of 3 voxels (6, 7, 8)
    assert merged_reference_lesions(ref, 1)[1] == 2  # dilated by 1 they reach 6 and 8, 7 stays empty
    labels, n = merged_reference_lesions(ref, 3)
    assert n == 1 and set(np.unique(labels[ref])) == {1} and not labels[~ref].any()
    # one prediction on the first cube only: with d=3 it covers half of ONE merged lesion (Dice 2*64/(128+64))
    pred = np.zeros_like(ref)
    _cube(pred, (2, 2, 2), (4, 4, 4))
    merged = lesion_wise_scores(ref, pred, (1, 1, 1), 3, 50.0)
    split = lesion_wise_scores(ref, pred, (1, 1, 1), 1, 50.0)
    assert (merged.n_tp, merged.n_fn, merged.dice) == (1, 0, pytest.approx(128 / 192))
    assert (split.n_tp, split.n_fn, split.dice) == (1, 1, pytest.approx(0.5))


def test_small_reference_lesions_are_left_out_without_making_false_positives():
    ref = np.zeros((20, 20, 20), bool)
    pred = np.zeros_like(ref)
    _cube(ref, (2, 2, 2), (3, 3, 3))    # 27 voxels * 1.5 mm³ = 40.5 <= 50: left out
    _cube(pred, (2, 2, 2), (2, 2, 2))   # its match is neither scored nor a false positive
    _cube(ref, (10, 10, 10), (4, 4, 4))  # 96 mm³: kept, missed
    r = lesion_wise_scores(ref, pred, (1.0, 1.0, 1.5), 3, 50.0)
    assert (r.n_tp, r.n_fn, r.n_fp) == (0, 1, 0)
    assert r.dice == 0.0 and r.hd95 == LESION_WISE_PENALTY_MM
    assert [les["kept"] for les in r.lesions] == [False, True]
    assert r.lesions[0]["volume_mm3"] == pytest.approx(40.5)
    # the MET parameters (d=1, 2 mm³) keep the small lesion: now it is a hit
    met = lesion_wise_scores(ref, pred, (1.0, 1.0, 1.5), *lesion_wise_parameters("BraTS-MET"))
    assert (met.n_tp, met.n_fn, met.n_fp) == (1, 1, 0)


def test_empty_conventions():
    empty = np.zeros((10, 10, 10), bool)
    r = lesion_wise_scores(empty, empty, (1, 1, 1), 3, 50.0)
    assert (r.dice, r.hd95, r.n_tp, r.n_fn, r.n_fp) == (1.0, 0.0, 0, 0, 0)
    pred = empty.copy()
    pred[2:4, 2:4, 2:4] = True
    r = lesion_wise_scores(empty, pred, (1, 1, 1), 3, 50.0)
    assert (r.dice, r.hd95, r.n_fp) == (0.0, 374.0, 1)


def _random_blobs(rng, shape, n, p):
    mask = np.zeros(shape, bool)
    for _ in range(n):
        c = rng.integers(0, shape)
        r = rng.uniform(1.0, 4.5, 3)
        grid = np.ogrid[tuple(slice(0, s) for s in shape)]
        blob = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r)) <= 1
        mask |= blob & (rng.random(shape) < p)  # ragged blobs, some split into pieces
    return mask


@pytest.mark.parametrize("seed", range(6))
def test_equals_plain_full_volume_reference_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    shape = (28, 26, 22)
    spacing = (1.0, 0.8, 1.6)
    ref = _random_blobs(rng, shape, int(rng.integers(2, 7)), 0.9)
    # a shifted, thinned copy (partial hits, split lesions) plus unrelated blobs (false positives)
    pred = np.roll(ref, tuple(rng.integers(-2, 3, 3)), axis=(0, 1, 2)) & (rng.random(shape) < 0.8)
    pred = ndimage.binary_dilation(pred) if seed % 2 else pred
    pred |= _random_blobs(rng, shape, int(rng.integers(0, 3)), 0.7)
    d, vol = [(3, 50.0), (1, 2.0), (0, 10.0)][seed % 3]
    ours = lesion_wise_scores(ref, pred, spacing, d, vol)
    dice, hd, tp, fn, fp = reference_lesion_wise(ref, pred, spacing, d, vol)
    assert (ours.n_tp, ours.n_fn, ours.n_fp) == (tp, fn, fp)
    assert ours.dice == pytest.approx(dice, abs=1e-12)
    assert ours.hd95 == pytest.approx(hd, abs=1e-9)


def test_brats_case_rows_get_lesion_wise_columns_per_region():
    ref = np.zeros((24, 24, 24), np.uint8)
    ref[4:12, 4:12, 4:12] = 2     # 2023: SNFH (edema)
    ref[6:10, 6:10, 6:10] = 3     # ET (64 voxels)
    pred = ref.copy()
    pred[18:21, 18:21, 18:21] = 3  # an extra ET blob: false positive for ET, TC and WT
    row = brats.evaluate_brats_arrays(ref, pred, (1, 1, 1), "2023", lesion_wise="GLI", definition="brats2023")
    for r in ("WT", "TC", "ET"):
        assert (row[f"lw_tp_{r}"], row[f"lw_fn_{r}"], row[f"lw_fp_{r}"]) == (1, 0, 1)
        assert row[f"lw_dice_{r}"] == pytest.approx(0.5) and row[f"lw_hd95_{r}"] == pytest.approx(187.0)
    assert row["dice_ET"] == pytest.approx(2 * 64 / (64 + 91))
    assert "lw_dice_ET" not in brats.evaluate_brats_arrays(ref, pred, (1, 1, 1), "2023")
    with pytest.raises(EvaluationError, match="unknown BraTS lesion-wise sub-challenge 'XYZ'"):
        brats.evaluate_brats_arrays(ref, pred, (1, 1, 1), "2023", lesion_wise="XYZ")


def test_cli_prints_lesion_wise_columns(tmp_path, capsys):
    import SimpleITK as sitk

    from nnunetv2_ohem.evaluation.cli import main

    ref = np.zeros((20, 20, 20), np.uint8)
    ref[3:9, 3:9, 3:9] = 2
    ref[5:8, 5:8, 5:8] = 3
    for sub, arr in (("ref", ref), ("pred", ref)):
        (tmp_path / sub).mkdir()
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / sub / "BraTS-GLI-00000-000.nii.gz"))
    main(["brats", "-ref", str(tmp_path / "ref"), "-pred", str(tmp_path / "pred"), "--year", "2023",
          "--lesion_wise", "GLI"])
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert "lw_dice_WT" in header and "lw_hd95_ET" in header
    first = dict(zip(header, out.splitlines()[1].split()))
    # the ET lesion (27 mm³) is below GLI's 50 mm³: no kept lesion, no false positive -> Dice 1, HD95 0
    assert float(first["lw_dice_WT"]) == 1.0 and float(first["lw_dice_ET"]) == 1.0
    assert float(first["lw_hd95_ET"]) == 0.0


def test_brats_2023_phantom_folder_through_evaluate_folders(tmp_path):
    """BraTS 2023 phantoms as reference; prediction = truth except one case's enhancing tumour relabelled as
    necrosis: that case loses its ET lesion (FN) and gains nothing in TC/WT; all else scores perfectly."""
    import SimpleITK as sitk

    from nnunetv2_ohem.evaluation.api import evaluate_folders
    from nnunetv2_ohem.phantoms.brats import BraTSPhantomConfig, write_brats_phantoms

    src = write_brats_phantoms(str(tmp_path / "src"), n_subjects=3, seed=2, year=2023,
                               config=BraTSPhantomConfig(voxel_size=3.0, no_enhancing_fraction=0.0))
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    cases = sorted(d for d in os.listdir(src) if d.startswith("BraTS-"))
    for i, case in enumerate(cases):
        img = sitk.ReadImage(f"{src}/{case}/{case}-seg.nii.gz")
        sitk.WriteImage(img, str(tmp_path / "ref" / f"{case}.nii.gz"))
        arr = sitk.GetArrayFromImage(img)
        if i == 0:
            arr = np.where(arr == 3, 1, arr).astype(arr.dtype)  # ET predicted as NETC
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        sitk.WriteImage(out, str(tmp_path / "pred" / f"{case}.nii.gz"))
    df, agg = evaluate_folders("brats", str(tmp_path / "ref"), str(tmp_path / "pred"), year="2023",
                               lesion_wise="GLI", definition="brats2023")
    df = df.set_index("case")
    first, rest = df.loc[cases[0]], df.loc[cases[1:]]
    assert (first["lw_tp_ET"], first["lw_fn_ET"], first["lw_fp_ET"]) == (0, 1, 0)
    assert first["lw_dice_ET"] == 0.0 and first["lw_hd95_ET"] == 374.0
    assert first["lw_dice_TC"] == 1.0 and first["lw_dice_WT"] == 1.0  # TC = NETC ∪ ET is unchanged
    assert (rest[[f"lw_dice_{r}" for r in ("WT", "TC", "ET")]] == 1.0).all().all()
    assert agg["mean"]["lw_dice_ET"] == pytest.approx(2 / 3)
