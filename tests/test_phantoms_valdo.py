"""VALDO task 3 (lacune) phantoms: layout, determinism, lacune/PVS properties measured with cc3d and image means,
and acceptance by our VALDO converter."""
import filecmp
import json
import os

import cc3d
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from nnunetv2_ohem.phantoms.anatomy import lesion_free_indices
from nnunetv2_ohem.phantoms.valdo import (VALDOPhantomConfig, make_valdo_subject, segment_voxels,
                                          valdo_config_from_dict, write_valdo_phantoms)

SEED = 3
FAST = VALDOPhantomConfig(voxel_size=3.0)  # default lacune/PVS ranges, 3 mm grid
N_LABELLED, N_UNLABELLED = 4, 1
CHANNELS = ("T1", "T2", "FLAIR")


def _images(sid):
    return [f"sub-{sid}_space-T1_desc-masked_{c}.nii.gz" for c in CHANNELS]


def _rater(sid, k=1):
    return f"sub-{sid}_space-T1_desc-Rater{k}_Lacunes.nii.gz"


def _load(path):
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("valdo") / "Task3"
    write_valdo_phantoms(str(out), n_subjects=N_LABELLED, seed=SEED, config=FAST, n_unlabelled=N_UNLABELLED)
    return out


@pytest.fixture(scope="module")
def manifest(phantom_set):
    return json.loads((phantom_set / "phantom_manifest.json").read_text())


@pytest.fixture(scope="module")
def contrast_subject():
    """2 mm subject with mid-sized lacunes, all in white matter, and many PVS: big enough to measure means."""
    cfg = VALDOPhantomConfig(voxel_size=2.0, n_lacunes=(6, 6), lacune_volume_mm3=(40.0, 150.0),
                             lacune_wm_fraction=1.0, n_pvs=(20, 20), pvs_volume_mm3=(4.0, 40.0))
    return make_valdo_subject(8, 0, cfg)


def test_layout_and_manifest(phantom_set, manifest):
    assert sorted(os.listdir(phantom_set)) == ["phantom_manifest.json", "sub-101", "sub-102", "sub-103",
                                               "sub-104", "sub-105"]
    for sid in ("101", "102", "103", "104"):
        files = sorted(os.listdir(phantom_set / f"sub-{sid}"))
        assert files == sorted(_images(sid) + [_rater(sid)])
        shapes = {_load(phantom_set / f"sub-{sid}" / f).shape for f in files}
        assert len(shapes) == 1, f"sub-{sid}: channels and mask differ in shape {shapes}"
        img = nib.load(str(phantom_set / f"sub-{sid}" / files[0]))
        assert np.allclose(img.header.get_zooms(), 3.0)
    # the unlabelled subject has images only
    assert sorted(os.listdir(phantom_set / "sub-105")) == sorted(_images("105"))
    assert manifest["seed"] == SEED and manifest["first_id"] == 101
    assert valdo_config_from_dict(manifest["config"]) == FAST
    assert [manifest["subjects"][s]["labelled"] for s in sorted(manifest["subjects"])] == [True] * 4 + [False]
    for s in manifest["subjects"].values():
        assert s["n_lacunes"] == len(s["lacunes"]) and s["n_pvs"] == len(s["pvs"])
        assert FAST.n_pvs[0] <= s["n_pvs"] <= FAST.n_pvs[1]  # PVS recorded separately, lacune-free subjects too
    # no temporary folder left behind next to the output
    assert [p for p in os.listdir(phantom_set.parent) if ".tmp-" in p] == []


def test_existing_output_is_not_overwritten_silently(phantom_set):
    before = {f: os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(phantom_set) for f in fs}
    with pytest.raises(FileExistsError, match="overwrite"):
        write_valdo_phantoms(str(phantom_set), n_subjects=1, seed=SEED, config=FAST)
    assert before == {f: os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(phantom_set) for f in fs}


def test_same_seed_same_bytes_other_seed_differs(phantom_set, tmp_path):
    again = write_valdo_phantoms(str(tmp_path / "again"), n_subjects=2, seed=SEED, config=FAST)
    # precondition of the comparison: subjects 0 and 1 get the same lacune-free flag in both set sizes
    # (the lacune-free subjects are drawn per set size; everything else depends on (seed, index) only)
    flags = lambda n: [i in lesion_free_indices(n, SEED, FAST.lacune_free_fraction) for i in range(2)]  # noqa: E731
    assert flags(2) == flags(N_LABELLED)
    for sid in ("101", "102"):
        for f in _images(sid) + [_rater(sid)]:
            assert filecmp.cmp(phantom_set / f"sub-{sid}" / f, os.path.join(again, f"sub-{sid}", f),
                               shallow=False), f"sub-{sid}/{f} differs between two runs with the same seed"
    other = make_valdo_subject(SEED + 1, 0, FAST)
    mine = _load(phantom_set / "sub-101" / _images("101")[2])
    assert other.flair.shape != mine.shape or not np.allclose(other.flair, mine)


def test_lacune_counts_match_manifest_and_lacune_free_share_is_exact(phantom_set, manifest):
    counts = {}
    for sid in ("101", "102", "103", "104"):
        mask = _load(phantom_set / f"sub-{sid}" / _rater(sid))
        assert set(np.unique(mask)) <= {0, 1}
        _, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
        counts[sid] = n
        assert n == manifest["subjects"][sid]["n_lacunes"], f"sub-{sid}: {n} components vs manifest"
        if not manifest["subjects"][sid]["lacune_free"]:
            assert FAST.n_lacunes[0] <= n <= FAST.n_lacunes[1]
        # the rater mask holds the lacunes the manifest lists, voxel for voxel
        assert mask.sum() == sum(les["n_voxels"] for les in manifest["subjects"][sid]["lacunes"])
    empty = sorted(i for i, sid in enumerate(sorted(counts)) if counts[sid] == 0)
    assert len(empty) == round(N_LABELLED * FAST.lacune_free_fraction) == 1
    assert empty == lesion_free_indices(N_LABELLED, SEED, FAST.lacune_free_fraction)


def test_lacune_volumes_in_range_and_in_white_or_deep_grey_matter():
    v = 2.0
    cfg = VALDOPhantomConfig(voxel_size=v, n_lacunes=(8, 12), lacune_volume_mm3=(12.0, 150.0))
    sub = make_valdo_subject(5, 1, cfg)
    labels, n = cc3d.connected_components(sub.raters[0], connectivity=26, return_N=True)
    assert 8 <= n <= 12 and n == len(sub.lacune_facts)
    sizes = np.bincount(labels.ravel())[1:]
    # a lacune of V mm³ has round(V / v³) voxels: 12..150 mm³ at 2 mm -> 2..19 voxels (rounding 1.5 -> 2)
    assert sizes.min() >= 2 and sizes.max() <= 19, sorted(sizes)
    assert sorted(sizes) == sorted(les["n_voxels"] for les in sub.lacune_facts)
    region = sub.wm_mask | sub.deep_grey_mask
    assert region[sub.lacunes > 0].all()
    # deep grey matter: ~45 cm³ of basal ganglia and thalami, left and right of the midline
    deep_cm3 = sub.deep_grey_mask.sum() * v ** 3 / 1000
    assert 25 < deep_cm3 < 70
    xs = np.argwhere(sub.deep_grey_mask)[:, 0]
    assert np.ptp(xs) * v > 30  # both hemispheres


def _ring(mask, brain, inner=2, outer=4):
    """Voxels 2..4 voxels away from ``mask``: the lacune's surroundings beyond its rim."""
    return ndimage.binary_dilation(mask, iterations=outer) & ~ndimage.binary_dilation(mask, iterations=inner) & brain


def test_lacunes_csf_like_with_flair_rim(contrast_subject):
    sub = contrast_subject
    blobs = (sub.lacunes > 0) | (sub.pvs > 0)
    calm_wm = sub.wm_mask & ~ndimage.binary_dilation(blobs, iterations=1)
    assert len(sub.lacune_facts) == 6
    rims, rings = [], []
    for les in sub.lacune_facts:
        m = sub.lacunes == les["id"]
        ring = _ring(m, calm_wm)
        rim = sub.rim & ndimage.binary_dilation(m)
        assert ring.sum() > 10 and rim.any()
        t1, t2, fl = (img[m].mean() / np.median(img[ring]) for img in (sub.t1, sub.t2, sub.flair))
        assert t1 < 0.6 and fl < 0.6 and t2 > 1.8, f"lacune {les['id']}: T1 {t1:.2f} T2 {t2:.2f} FLAIR {fl:.2f}"
        assert sub.flair[rim].mean() > 2 * sub.flair[m].mean()
        rims.append(sub.flair[rim].mean())
        rings.append(np.median(sub.flair[ring]))
    # the rim is hyperintense against the surrounding white matter, and is not labelled
    assert np.mean(np.asarray(rims) / np.asarray(rings)) > 1.1
    assert not sub.raters[0][sub.rim].any()


def test_pvs_visible_in_images_but_not_labelled(contrast_subject):
    sub = contrast_subject
    pvs = sub.pvs > 0
    assert len(sub.pvs_facts) == 20
    assert cc3d.connected_components(pvs.astype(np.uint8), connectivity=26, return_N=True)[1] == 20
    assert not (sub.raters[0].astype(bool) & pvs).any()
    assert not (sub.lacunes > 0)[pvs].any()
    blobs = (sub.lacunes > 0) | pvs
    calm_wm = sub.wm_mask & ~ndimage.binary_dilation(blobs, iterations=2)
    wm = {name: np.median(img[calm_wm]) for name, img in zip(CHANNELS, (sub.t1, sub.t2, sub.flair))}
    # CSF-like like the lacunes: bright on T2, dark on T1 and FLAIR
    assert sub.t2[pvs].mean() / wm["T2"] > 1.5
    assert sub.t1[pvs].mean() / wm["T1"] < 0.7
    assert sub.flair[pvs].mean() / wm["FLAIR"] < 0.7
    # ... but without a hyperintense FLAIR rim: their 6-neighbour shell is not brighter than white matter
    near_lacune = ndimage.binary_dilation(sub.lacunes > 0, iterations=2)
    shell = ndimage.binary_dilation(pvs) & ~pvs & sub.brain_mask & ~near_lacune
    assert sub.flair[shell & sub.wm_mask].mean() / wm["FLAIR"] < 1.0
    assert {f["shape"] for f in sub.pvs_facts} == {"linear", "ovoid"}


@pytest.mark.parametrize("n_voxels", [1, 2, 3, 4, 7, 8])
def test_linear_pvs_segments_are_connected_lines_of_exact_length(n_voxels):
    rng = np.random.default_rng(n_voxels)
    for _ in range(20):
        tilt, azimuth = np.deg2rad(rng.uniform(0, 25)), rng.uniform(0, 2 * np.pi)
        d = np.array([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), np.cos(tilt)])
        centre = np.array([10, 10, 10])
        vox = segment_voxels(centre, n_voxels, d)
        assert len({tuple(p) for p in vox}) == n_voxels and (vox == centre).all(1).any()
        grid = np.zeros((21, 21, 21), np.uint8)
        grid[tuple(vox.T)] = 1
        assert cc3d.connected_components(grid, connectivity=26, return_N=True)[1] == 1
        # it runs along z: one voxel per slice over n_voxels slices
        assert np.ptp(vox[:, 2]) == n_voxels - 1


def test_images_are_zero_outside_the_brain_mask(contrast_subject, phantom_set):
    sub = contrast_subject
    for img in (sub.t1, sub.t2, sub.flair):
        assert (img[~sub.brain_mask] == 0).all()
        assert (img[sub.brain_mask] > 0).mean() > 0.999
    # written files: the three channels share one support, the brain
    supports = [_load(phantom_set / "sub-102" / f) != 0 for f in _images("102")]
    assert supports[0].mean() > 0.2
    assert all(np.array_equal(supports[0], s) for s in supports[1:])


def test_extra_raters_are_perturbed_copies():
    cfg = VALDOPhantomConfig(voxel_size=3.0, n_lacunes=(10, 12), lacune_volume_mm3=(60.0, 150.0), n_raters=3,
                             rater_miss_probability=0.2, rater_border_probability=0.3)
    sub = make_valdo_subject(2, 0, cfg)
    truth = sub.raters[0] > 0
    assert len(sub.raters) == 3 and np.array_equal(truth, sub.lacunes > 0)
    assert any(not np.array_equal(r > 0, truth) for r in sub.raters[1:])
    for r in sub.raters[1:]:
        dice = 2 * (truth & (r > 0)).sum() / (truth.sum() + (r > 0).sum())
        assert 0.3 < dice < 1.0


def test_written_set_is_accepted_by_the_valdo_converter(phantom_set, tmp_path):
    from nnunetv2_ohem.dataset_conversion.valdo import convert_valdo

    folder = convert_valdo(str(phantom_set), 944, name="ValdoPhantom", raw_dir=str(tmp_path / "raw"))
    assert sorted(os.listdir(os.path.join(folder, "labelsTr"))) == [f"VALDO_{i}.nii.gz" for i in (101, 102, 103, 104)]
    assert sorted(os.listdir(os.path.join(folder, "imagesTs"))) == [f"VALDO_105_000{c}.nii.gz" for c in range(3)]
    ds = json.loads(open(os.path.join(folder, "dataset.json")).read())
    assert ds["channel_names"] == {"0": "T1", "1": "T2", "2": "FLAIR"} and ds["numTraining"] == 4
    for sid in ("101", "102", "103", "104"):
        converted = _load(os.path.join(folder, "labelsTr", f"VALDO_{sid}.nii.gz"))
        source = _load(phantom_set / f"sub-{sid}" / _rater(sid))
        assert converted.sum() == source.sum() and np.array_equal(converted, source)
    for c, name in enumerate(_images("103")):
        assert np.array_equal(_load(os.path.join(folder, "imagesTr", f"VALDO_103_000{c}.nii.gz")),
                              _load(phantom_set / "sub-103" / name))


@pytest.mark.parametrize("kwargs, message", [
    ({"voxel_size": 0.0}, "voxel_size"),
    ({"lacune_volume_mm3": (150.0, 3.0)}, "lacune_volume_mm3"),
    ({"n_lacunes": (0, 5)}, "lacune_free_fraction"),
    ({"lacune_fill": (0.5, 1.5)}, "lacune_fill is a CSF fraction"),
    ({"flair_rim_gain": (0.8, 1.2)}, "hyperintense"),
    ({"pvs_wm_fraction": 1.5}, "pvs_wm_fraction"),
    ({"n_raters": 0}, "n_raters"),
])
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VALDOPhantomConfig(**kwargs)
