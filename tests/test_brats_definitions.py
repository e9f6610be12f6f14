"""BraTS metric definitions (brats2025 / brats2023 / medpy): each checked against a plain reference
implementation of its own rules (voxel loops, all pairwise distances, every one-to-one matching), on hand
cases with known answers and on small random masks with anisotropic spacing."""
import itertools
import json
import math

import numpy as np
import pytest
from medpy.metric.binary import hd95 as medpy_hd95
from scipy import ndimage

from nnunetv2_ohem.evaluation import brats
from nnunetv2_ohem.evaluation.brats_lesionwise import matched_lesion_scores
from nnunetv2_ohem.evaluation.distances import hd95, surface_hd95, surfel_area_table
from nnunetv2_ohem.evaluation.lesions import EvaluationError

S26 = np.ones((3, 3, 3), bool)
BITS = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])


# ---------------------------------------------------------------- reference: surface-distance HD95, by loops
def ref_surface_elements(mask, spacing):
    """Every voxel corner visited in a Python loop; its 8 voxels give the code; outside the image is 0."""
    p = np.pad(mask.astype(bool), 1)
    table = surfel_area_table(tuple(float(s) for s in spacing))
    pts, areas = [], []
    for i in range(mask.shape[0] + 1):
        for j in range(mask.shape[1] + 1):
            for k in range(mask.shape[2] + 1):
                code = sum(int(BITS[a, b, c]) for a in (0, 1) for b in (0, 1) for c in (0, 1)
                           if p[i + a, j + b, k + c])
                if 0 < code < 255:
                    pts.append((i * spacing[0], j * spacing[1], k * spacing[2]))
                    areas.append(table[code])
    return np.array(pts), np.array(areas)


def ref_directed(dist, areas, percent=95.0):
    """Walk the (distance, area)-sorted surfels until their area share reaches the percentile."""
    pairs = sorted(zip(dist.tolist(), areas.tolist()))
    total, acc = sum(a for _, a in pairs), 0.0
    for d, a in pairs:
        acc += a
        if acc / total >= percent / 100.0:
            return d
    return pairs[-1][0]


def ref_surface_hd95(a, b, spacing):
    pa, wa = ref_surface_elements(a, spacing)
    pb, wb = ref_surface_elements(b, spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))  # all pairwise distances
    return max(ref_directed(d.min(1), wa), ref_directed(d.min(0), wb))


def _sphere_and_far_cube():
    z, y, x = np.mgrid[:48, :48, :48]
    sphere = (z - 15) ** 2 + (y - 15) ** 2 + (x - 15) ** 2 <= 8 ** 2
    pred = sphere.copy()
    pred[34:38, 34:38, 34:38] = True  # 64-voxel false positive, 24-31 mm from the sphere's surface
    return sphere, pred


# ------------------------------------------------------------------------------------ surface HD95
def test_surfel_areas_hand_values_and_complement_symmetry():
    s0, s1, s2 = 1.7, 0.6, 2.3
    t = surfel_area_table((s0, s1, s2))
    # one voxel in the cell: the triangle through the midpoints of its three edges
    v = np.array([[s0 / 2, 0, 0], [0, s1 / 2, 0], [0, 0, s2 / 2]])
    tri = 0.5 * np.linalg.norm(np.cross(v[1] - v[0], v[2] - v[0]))
    assert t[1] == pytest.approx(tri) and t[128] == pytest.approx(tri)
    assert t[0b1111] == pytest.approx(s1 * s2)                        # half cell split across axis 0
    assert t[0b11] == pytest.approx(s2 * math.hypot(s0, s1) / 2)      # two voxels along axis 2
    assert np.allclose(t, t[::-1]) and t[0] == t[255] == 0 and (t[1:255] > 0).all()


def test_surface_hd95_equals_brute_force_on_random_anisotropic_masks():
    rng = np.random.default_rng(0)
    for trial in range(12):
        shape = tuple(int(v) for v in rng.integers(3, 9, 3))
        spacing = tuple(float(v) for v in rng.uniform(0.4, 3.0, 3))
        a = rng.random(shape) < rng.uniform(0.1, 0.6)
        b = rng.random(shape) < rng.uniform(0.1, 0.6)
        a[0, 0, 0] = b[-1, -1, -1] = True
        assert surface_hd95(a, b, spacing) == pytest.approx(ref_surface_hd95(a, b, spacing), abs=1e-9)
        assert surface_hd95(b, a, spacing) == pytest.approx(surface_hd95(a, b, spacing), abs=1e-12)


def test_single_voxels_shifted_by_k_voxels():
    a = np.zeros((3, 3, 8), bool)
    b = a.copy()
    a[1, 1, 1] = b[1, 1, 6] = True
    # each voxel has 8 corner surfels of equal area: half at 4 voxels, half at 5 voxels from the other's
    assert surface_hd95(a, b, (1.0, 1.0, 0.7)) == pytest.approx(5 * 0.7)
    assert hd95(a, b, (1.0, 1.0, 0.7)) == pytest.approx(5 * 0.7)


def test_sphere_with_far_false_positive_cube_medpy_zero_surface_distance_not():
    sphere, pred = _sphere_and_far_cube()
    sp = (1.0, 1.0, 1.0)
    assert hd95(sphere, pred, sp) == 0.0 == medpy_hd95(pred, sphere, voxelspacing=sp)
    got = surface_hd95(sphere, pred, sp)
    # the cube is > 5 % of the prediction's surface: one of its distances (24-31 mm) is the percentile
    assert got == pytest.approx(ref_surface_hd95(sphere, pred, sp), abs=1e-9)
    assert 23.5 < got < 31.0


def test_surface_hd95_refuses_empty_and_non_3d():
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    b[1, 1, 1] = True
    with pytest.raises(EvaluationError, match="undefined"):
        surface_hd95(a, b, (1, 1, 1))
    with pytest.raises(EvaluationError, match="3D"):
        surface_hd95(b[0], b[0], (1, 1))


def test_surface_hd95_matches_deepmind_surface_distance_if_installed():
    sd = pytest.importorskip("surface_distance", reason="DeepMind's surface-distance is not installed "
                                                        "(optional cross-check only)")
    rng = np.random.default_rng(3)
    for _ in range(5):
        a = rng.random((7, 6, 8)) < 0.3
        b = rng.random((7, 6, 8)) < 0.3
        sp = tuple(float(v) for v in rng.uniform(0.5, 2.5, 3))
        theirs = sd.compute_robust_hausdorff(sd.compute_surface_distances(a, b, sp), 95)
        assert surface_hd95(a, b, sp) == pytest.approx(theirs, abs=1e-9)


# ------------------------------------------------------------------------- region empty conventions
@pytest.mark.parametrize("name,both,penalty", [("brats2025", (math.nan, math.nan), 373.0),
                                               ("brats2023", (1.0, 0.0), 374.0),
                                               ("medpy", (1.0, 0.0), 373.1287)])
def test_region_empty_and_disjoint_conventions(name, both, penalty):
    empty = np.zeros((12, 12, 12), bool)
    a, b = empty.copy(), empty.copy()
    a[1:4, 1:4, 1:4] = True
    b[7:10, 7:10, 7:10] = True
    got = brats.region_dice_hd95(empty, empty, (1, 1, 1), definition=name)
    assert np.allclose(got, both, equal_nan=True)
    assert brats.region_dice_hd95(empty, a, (1, 1, 1), definition=name) == (0.0, penalty)
    assert brats.region_dice_hd95(a, empty, (1, 1, 1), definition=name) == (0.0, penalty)
    assert brats.region_dice_hd95(a, empty, (1, 1, 1), 99.0, definition=name) == (0.0, 99.0)
    d, h = brats.region_dice_hd95(a, b, (1, 1, 2), definition=name)
    measured = {"brats2025": penalty, "brats2023": ref_surface_hd95(a, b, (1, 1, 2)),
                "medpy": medpy_hd95(b, a, voxelspacing=(1, 1, 2))}[name]  # panoptica: no overlap -> penalty
    assert d == 0.0 and h == pytest.approx(measured)
    with pytest.raises(EvaluationError, match="unknown BraTS metric definition"):
        brats.region_dice_hd95(a, b, (1, 1, 1), definition="brats2099")


def test_region_hd95_flavour_per_definition():
    sphere, pred = _sphere_and_far_cube()
    ref = sphere.astype(np.uint8) * 3  # 2023 labels: ET only
    prd = pred.astype(np.uint8) * 3
    rows = {n: brats.evaluate_brats_arrays(ref, prd, (1, 1, 1), "2023", definition=n) for n in brats.DEFINITIONS}
    assert rows["brats2025"]["hd95_ET"] == rows["medpy"]["hd95_ET"] == 0.0
    assert rows["brats2023"]["hd95_ET"] == pytest.approx(surface_hd95(sphere, pred, (1, 1, 1)))
    assert {r["dice_ET"] for r in rows.values()} == {2 * sphere.sum() / (sphere.sum() + pred.sum())}
    assert [r["definition"] for r in rows.values()] == list(brats.DEFINITIONS)


# ------------------------------------------------------------------------------- lesion-wise rules
def _blob(mask, lo, size):
    mask[tuple(slice(a, a + s) for a, s in zip(lo, size))] = True


def _two_false_positive_blobs():
    ref = np.zeros((40, 40, 40), bool)
    _blob(ref, (5, 5, 5), (6, 6, 6))            # 216 mm³ lesion
    pred = ref.copy()
    _blob(pred, (25, 25, 25), (3, 3, 3))        # two far false positives
    _blob(pred, (30, 5, 30), (3, 3, 3))
    return ref, pred


def _lw(ref, pred, name, challenge):
    return brats.get_definition(name).lesion_wise(ref, pred, (1.0, 1.0, 1.0), challenge)


def test_two_false_positive_blobs_matched_only_versus_penalised():
    ref, pred = _two_false_positive_blobs()
    gli25 = _lw(ref, pred, "brats2025", "GLI")
    assert (gli25.dice, gli25.hd95, gli25.n_tp, gli25.n_fn, gli25.n_fp) == (1.0, 0.0, 1, 0, 2)
    met25 = _lw(ref, pred, "brats2025", "MET")
    assert met25.dice == pytest.approx(1 / 3) and met25.hd95 == pytest.approx(2 * 373 / 3)
    gli23 = _lw(ref, pred, "brats2023", "GLI")
    assert gli23.dice == pytest.approx(1 / 3) and gli23.hd95 == pytest.approx(2 * 374 / 3)


def test_one_to_one_matching_versus_2023_union_of_touching_components():
    ref = np.zeros((30, 30, 30), bool)
    _blob(ref, (5, 5, 5), (8, 8, 8))
    pred = np.zeros_like(ref)
    _blob(pred, (5, 5, 5), (8, 8, 5))           # 320 voxels of the lesion
    _blob(pred, (5, 5, 11), (8, 8, 2))          # 128 voxels, split off by the empty slab at z = 10
    r25 = _lw(ref, pred, "brats2025", "GLI")
    assert (r25.n_tp, r25.n_fp) == (1, 1)       # only the better component is matched
    assert r25.dice == pytest.approx(2 * 320 / (512 + 320))
    r23 = _lw(ref, pred, "brats2023", "GLI")
    assert (r23.n_tp, r23.n_fp) == (1, 0)       # both components touch the lesion: their union is scored
    assert r23.dice == pytest.approx(2 * 448 / (512 + 448))


def test_close_reference_lesions_stay_separate_without_dilation():
    ref = np.zeros((30, 30, 30), bool)
    _blob(ref, (5, 5, 5), (5, 5, 5))
    _blob(ref, (5, 5, 12), (5, 5, 5))           # 2 voxels apart: merged by 3 dilations (2023), not in 2025
    pred = np.zeros_like(ref)
    _blob(pred, (5, 5, 5), (5, 5, 5))
    r25 = _lw(ref, pred, "brats2025", "GLI")
    assert (r25.n_tp, r25.n_fn, r25.dice) == (1, 1, 1.0)
    r23 = _lw(ref, pred, "brats2023", "GLI")
    assert (r23.n_tp, r23.n_fn) == (1, 0) and r23.dice == pytest.approx(2 * 125 / 375)


def test_brats2025_empty_and_small_lesion_conventions():
    empty = np.zeros((20, 20, 20), bool)
    small = empty.copy()
    _blob(small, (3, 3, 3), (2, 2, 2))          # 8 mm³: below the mets 20 mm³ threshold
    for pen in (False, True):
        r = matched_lesion_scores(empty, empty, (1, 1, 1), pen)
        assert math.isnan(r.dice) and math.isnan(r.hd95)
    r = matched_lesion_scores(small, empty, (1, 1, 1), False)       # a miss, no match at all
    assert (r.dice, r.hd95, r.n_fn) == (0.0, 373.0, 1)
    r = matched_lesion_scores(empty, small, (1, 1, 1), False)       # only a false positive
    assert (r.dice, r.hd95, r.n_fp) == (0.0, 373.0, 1)
    r = matched_lesion_scores(small, empty, (1, 1, 1), True)        # mets: no lesion >= 20 mm³ -> NaN
    assert math.isnan(r.dice)
    big = small.copy()
    _blob(big, (10, 10, 10), (3, 3, 3))         # 27 mm³, missed
    r = matched_lesion_scores(big, small, (1, 1, 1), True)          # small one matched but not scored
    assert (r.dice, r.hd95, r.n_tp, r.n_fn) == (0.0, 373.0, 1, 1)


def _hd95_medpy(a, b, spacing):
    return float(medpy_hd95(b, a, voxelspacing=spacing))


def ref_matched(ref, pred, spacing, penalise, min_volume=20.0, penalty=373.0):
    """BraTS-evaluation's rules by enumeration: every one-to-one matching, the one of largest Σ Dice."""
    r_ids, nr = ndimage.label(ref, S26)
    p_ids, npr = ndimage.label(pred, S26)
    dice = np.zeros((nr + 1, npr + 1))
    for i in range(1, nr + 1):
        for j in range(1, npr + 1):
            a, b = r_ids == i, p_ids == j
            dice[i, j] = 2 * (a & b).sum() / (a.sum() + b.sum())
    best, best_pairs = -1.0, []
    for perm in itertools.permutations(range(npr + nr), nr):   # reference i -> component perm[i] (>= npr: none)
        pairs = [(i + 1, j + 1) for i, j in enumerate(perm) if j < npr and dice[i + 1, j + 1] >= 1e-6]
        total = sum(dice[p] for p in pairs)
        if total > best + 1e-12:
            best, best_pairs = total, pairs
    scores = {i: (dice[i, j], _hd95_medpy(r_ids == i, p_ids == j, spacing)) for i, j in best_pairs}
    n_fp = npr - len(best_pairs)
    vox = float(np.prod(spacing))
    if not penalise:
        if scores:
            return (np.mean([s[0] for s in scores.values()]), np.mean([s[1] for s in scores.values()]),
                    len(scores), n_fp)
        return ((math.nan, math.nan) if nr == 0 and npr == 0 else (0.0, penalty)) + (0, n_fp)
    kept = [i for i in range(1, nr + 1) if (r_ids == i).sum() * vox >= min_volume]
    if not kept:
        return math.nan, math.nan, len(scores), n_fp
    d = [scores.get(i, (0.0, penalty))[0] for i in kept] + [0.0] * n_fp
    h = [scores.get(i, (0.0, penalty))[1] for i in kept] + [penalty] * n_fp
    return np.mean(d), np.mean(h), len(scores), n_fp


def test_brats2025_lesion_scores_equal_enumeration_on_random_masks():
    rng = np.random.default_rng(7)
    for trial in range(10):
        ref = np.zeros((18, 18, 18), bool)
        pred = np.zeros_like(ref)
        for _ in range(rng.integers(1, 4)):
            lo, size = rng.integers(0, 13, 3), rng.integers(1, 5, 3)
            _blob(ref, lo, size)
            if rng.random() < 0.8:
                _blob(pred, np.clip(lo + rng.integers(-2, 3, 3), 0, 15), rng.integers(1, 5, 3))
        for _ in range(rng.integers(0, 3)):
            _blob(pred, rng.integers(0, 15, 3), rng.integers(1, 4, 3))
        spacing = (1.0, 1.3, 0.8)
        for penalise in (False, True):
            ours = matched_lesion_scores(ref, pred, spacing, penalise)
            want = ref_matched(ref, pred, spacing, penalise)
            assert np.allclose([ours.dice, ours.hd95], want[:2], equal_nan=True, atol=1e-9), (trial, penalise)
            assert (ours.n_tp, ours.n_fp) == want[2:]


def test_brats2023_lesion_hd95_is_the_surface_distance():
    ref = np.zeros((30, 30, 30), bool)
    _blob(ref, (5, 5, 5), (8, 8, 8))
    pred = np.zeros_like(ref)
    _blob(pred, (6, 5, 5), (8, 6, 8))
    _blob(pred, (6, 5, 15), (3, 3, 3))          # within 3 dilations: part of the lesion's prediction
    sp = (1.0, 1.0, 1.5)
    r23 = brats.get_definition("brats2023").lesion_wise(ref, pred, sp, "GLI")
    rmp = brats.get_definition("medpy").lesion_wise(ref, pred, sp, "GLI")
    assert r23.hd95 == pytest.approx(ref_surface_hd95(ref, pred, sp))
    assert rmp.hd95 == pytest.approx(_hd95_medpy(ref, pred, sp)) and rmp.hd95 < r23.hd95


# ----------------------------------------------------------------------- every output names the definition
def test_outputs_state_the_definition(tmp_path, capsys):
    import SimpleITK as sitk

    from nnunetv2_ohem.evaluation.cli import main

    ref, pred = _two_false_positive_blobs()
    for sub, arr in (("ref", ref), ("pred", pred)):
        (tmp_path / sub).mkdir()
        sitk.WriteImage(sitk.GetImageFromArray(arr.astype(np.uint8) * 3), str(tmp_path / sub / "c1.nii.gz"))
    common = ["brats", "-ref", str(tmp_path / "ref"), "-pred", str(tmp_path / "pred"), "--year", "2023",
              "--lesion_wise", "GLI"]
    assert main(common + ["-o", str(tmp_path / "m.json"), "--csv", str(tmp_path / "c.csv")]) == 0
    out = capsys.readouterr().out
    assert "metric definition: brats2025 (BraTS-evaluation" in out
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["aggregate"]["challenge"]["definition"] == "brats2025"
    assert data["aggregate"]["challenge"]["hd95_empty_penalty_mm"] == 373.0
    assert data["cases"][0]["definition"] == "brats2025" and data["cases"][0]["lw_dice_ET"] == 1.0
    assert "definition" in (tmp_path / "c.csv").read_text().splitlines()[0].split(",")
    main(common + ["--definition", "brats2023", "-o", str(tmp_path / "m23.json")])
    assert "metric definition: brats2023" in capsys.readouterr().out
    case = json.loads((tmp_path / "m23.json").read_text())["cases"][0]
    assert case["definition"] == "brats2023" and case["lw_dice_ET"] == pytest.approx(1 / 3)


def test_brats2025_lengths_are_mm_along_the_right_axis():
    """BraTS-evaluation 0.0.10 reports 2.0 here (voxels globally, x/y/z spacing on z/y/x axes per lesion)."""
    ref = np.zeros((20, 30, 30), np.uint8)
    ref[5:11, 5:15, 5:15] = 3
    pred = np.roll(ref, 2, axis=0)               # two slices off along axis 0, 3 mm apart
    iso = brats.evaluate_brats_arrays(ref, pred, (1.0, 1.0, 1.0), "2023", lesion_wise="GLI")
    row = brats.evaluate_brats_arrays(ref, pred, (3.0, 1.0, 1.0), "2023", lesion_wise="GLI")
    assert iso["hd95_ET"] == iso["lw_hd95_ET"] == 2.0
    assert row["hd95_ET"] == row["lw_hd95_ET"] == pytest.approx(_hd95_medpy(ref > 0, pred > 0, (3, 1, 1))) == 6.0


def test_cli_offers_exactly_the_definitions():
    from nnunetv2_ohem.evaluation.cli import build_parser

    parser = build_parser()
    for name in brats.DEFINITIONS:
        assert parser.parse_args(["brats", "-ref", "r", "-pred", "p", "--definition", name]).definition == name
    assert parser.parse_args(["brats", "-ref", "r", "-pred", "p"]).definition == brats.DEFAULT_DEFINITION
    with pytest.raises(SystemExit):
        parser.parse_args(["brats", "-ref", "r", "-pred", "p", "--definition", "brats2099"])
