"""MNI152-based MSSEG-II phantoms: layout, determinism and lesion properties measured with cc3d."""
import filecmp
import json
import os

import cc3d
import nibabel as nib
import numpy as np
import pytest

from nnunetv2_ohem.phantoms.mni import (MSSEG2PhantomConfig, lesion_free_indices, make_msseg2_subject,
                                        write_msseg2_phantoms)

FAST = MSSEG2PhantomConfig(voxel_size=3.0)
MSSEG2_FILES = ["flair_time01_on_middle_space.nii.gz", "flair_time02_on_middle_space.nii.gz", "ground_truth.nii.gz"] \
    + [f"ground_truth_expert{k}.nii.gz" for k in range(1, 5)]


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("ph") / "msseg2"
    write_msseg2_phantoms(str(out), n_subjects=5, seed=3, config=FAST, first_id=13)
    return out


def _load(path):
    return np.asarray(nib.load(str(path)).dataobj)


def test_layout_and_manifest(phantom_set):
    subjects = sorted(os.listdir(phantom_set / "training"))
    assert subjects == ["013", "014", "015", "016", "017"]
    for sid in subjects:
        assert sorted(os.listdir(phantom_set / "training" / sid)) == sorted(MSSEG2_FILES)
        img = nib.load(str(phantom_set / "training" / sid / MSSEG2_FILES[0]))
        assert np.allclose(img.header.get_zooms(), 3.0)
        shapes = {_load(phantom_set / "training" / sid / f).shape for f in MSSEG2_FILES}
        assert len(shapes) == 1, f"subject {sid}: images and masks differ in shape {shapes}"
    manifest = json.loads((phantom_set / "phantom_manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["config"]["voxel_size"] == 3.0
    # no temporary folder left behind next to the output
    assert [p for p in os.listdir(phantom_set.parent) if ".tmp-" in p] == []


def test_same_seed_same_bytes_other_seed_differs(phantom_set, tmp_path):
    again = write_msseg2_phantoms(str(tmp_path / "again"), n_subjects=2, seed=3, config=FAST, first_id=13)
    other = write_msseg2_phantoms(str(tmp_path / "other"), n_subjects=2, seed=4, config=FAST, first_id=13)
    for sid in ("013", "014"):
        for f in MSSEG2_FILES:
            # subject i depends on (seed, i) only: the 2-subject set equals the first 2 of the 5-subject set
            assert filecmp.cmp(phantom_set / "training" / sid / f, os.path.join(again, "training", sid, f),
                               shallow=False), f"{sid}/{f} differs between two runs with the same seed"
    a = _load(phantom_set / "training" / "013" / MSSEG2_FILES[1])
    b = _load(os.path.join(other, "training", "013", MSSEG2_FILES[1]))
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_existing_output_is_not_overwritten_silently(phantom_set):
    with pytest.raises(FileExistsError, match="overwrite"):
        write_msseg2_phantoms(str(phantom_set), n_subjects=1, seed=3, config=FAST)


def test_lesion_free_count_exact(tmp_path):
    cfg = MSSEG2PhantomConfig(voxel_size=3.0, lesion_free_fraction=0.4, n_experts=1)
    out = write_msseg2_phantoms(str(tmp_path / "lf"), n_subjects=5, seed=11, config=cfg)
    empty = sorted(i for i, sid in enumerate(sorted(os.listdir(os.path.join(out, "training"))))
                   if _load(os.path.join(out, "training", sid, "ground_truth.nii.gz")).sum() == 0)
    assert len(empty) == 2
    assert empty == lesion_free_indices(5, 11, 0.4)


@pytest.mark.parametrize("large_fraction", [0.0, 1.0])
def test_lesion_volumes_counts_and_wm_by_measurement(large_fraction):
    v = 2.0
    cfg = MSSEG2PhantomConfig(voxel_size=v, n_new_lesions=(3, 6), lesion_volume_mm3=(1.0, 50.0),
                              large_lesion_fraction=large_fraction, large_lesion_volume_mm3=(50.0, 300.0),
                              wm_fraction=1.0, n_experts=0)
    vox = v ** 3
    lo, hi = cfg.large_lesion_volume_mm3 if large_fraction == 1.0 else cfg.lesion_volume_mm3
    for index in range(2):
        sub = make_msseg2_subject(7, index, cfg)
        labels, n = cc3d.connected_components(sub.ground_truth, connectivity=6, return_N=True)
        assert 3 <= n <= 6, f"subject {index}: {n} lesions, asked for 3..6"
        assert n == len(sub.lesions)
        volumes = np.bincount(labels.ravel())[1:] * vox
        # blobs have round(V / voxel volume) voxels, at least one: volume within half a voxel of [lo, hi]
        assert volumes.min() >= max(vox, lo - vox / 2) - 1e-6
        assert volumes.max() <= hi + vox / 2 + 1e-6
        assert sorted(volumes) == sorted(les["volume_mm3"] for les in sub.lesions)
        # wm_fraction=1: every lesion voxel lies in the subject's white-matter mask
        assert sub.wm_mask[sub.ground_truth > 0].all()
        assert sub.brain_mask[sub.ground_truth > 0].all()


def test_most_lesions_in_white_matter_with_default_share():
    cfg = MSSEG2PhantomConfig(voxel_size=2.0, n_new_lesions=(8, 8), lesion_free_fraction=0.0, n_experts=0)
    fractions = [les["in_wm_fraction"] for i in range(2) for les in make_msseg2_subject(1, i, cfg).lesions]
    assert len(fractions) == 16
    assert np.mean(np.asarray(fractions) == 1.0) >= 0.6


def test_new_lesions_bright_at_time2_only_old_lesions_at_both():
    cfg = MSSEG2PhantomConfig(voxel_size=2.0, n_new_lesions=(4, 4), n_old_lesions=(4, 4), n_experts=0,
                              lesion_volume_mm3=(40.0, 50.0), large_lesion_fraction=0.0)
    sub = make_msseg2_subject(5, 0, cfg)
    new, old = sub.ground_truth > 0, sub.old_lesions > 0
    assert new.any() and old.any() and not (new & old).any()
    t1, t2 = sub.flair_time01.astype(float), sub.flair_time02.astype(float)
    wm_t1 = np.median(t1[sub.wm_mask & ~new & ~old])
    assert t2[new].mean() / t1[new].mean() > 1.3
    assert t1[new].mean() / wm_t1 < 1.2  # not yet visible at time 1
    assert 0.85 < t2[old].mean() / t1[old].mean() < 1.15
    assert t1[old].mean() / wm_t1 > 1.3  # old lesions are bright at both time points
    brain = sub.brain_mask & ~new & ~old
    assert 0.9 < np.median(t2[brain] / np.maximum(t1[brain], 1e-3)) < 1.1


def test_experts_are_perturbed_copies_of_consensus():
    cfg = MSSEG2PhantomConfig(voxel_size=2.0, n_new_lesions=(6, 6), lesion_free_fraction=0.0)
    sub = make_msseg2_subject(2, 0, cfg)
    gt = sub.ground_truth > 0
    assert len(sub.experts) == 4
    assert any(not np.array_equal(e > 0, gt) for e in sub.experts)
    for e in sub.experts:
        inter = np.logical_and(e > 0, gt).sum()
        dice = 2 * inter / max((e > 0).sum() + gt.sum(), 1)
        assert dice > 0.3


@pytest.mark.parametrize("kwargs, message", [
    ({"voxel_size": 0.0}, "voxel_size"),
    ({"lesion_volume_mm3": (50.0, 1.0)}, "lesion_volume_mm3"),
    ({"wm_fraction": 1.5}, "wm_fraction"),
])
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MSSEG2PhantomConfig(**kwargs)


def test_held_out_split_is_accepted_by_the_msseg2_converter(tmp_path):
    from nnunetv2_ohem.dataset_conversion.msseg2 import convert_msseg2

    cfg = MSSEG2PhantomConfig(voxel_size=3.0, lesion_free_fraction=0.3, n_experts=4)
    src = write_msseg2_phantoms(str(tmp_path / "src"), n_subjects=3, seed=5, config=cfg, n_test=2, first_id=20)
    assert sorted(os.listdir(os.path.join(src, "testing"))) == ["023", "024"]
    # each split gets at least one lesion-free subject
    for split in ("training", "testing"):
        sums = [_load(os.path.join(src, split, s, "ground_truth.nii.gz")).sum()
                for s in os.listdir(os.path.join(src, split))]
        assert min(sums) == 0 and max(sums) > 0
    before = {f: os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(src) for f in fs}
    folder = convert_msseg2(src, 941, name="PhantomCheck", raw_dir=str(tmp_path / "raw"))
    assert sorted(os.listdir(os.path.join(folder, "labelsTr"))) == [f"MSSEG2_{i}.nii.gz" for i in ("020", "021", "022")]
    assert sorted(os.listdir(os.path.join(folder, "labelsTs"))) == ["MSSEG2_023.nii.gz", "MSSEG2_024.nii.gz"]
    assert len(os.listdir(os.path.join(folder, "imagesTs"))) == 4
    for sid, split, sub in (("021", "Tr", "training"), ("024", "Ts", "testing")):
        converted = _load(os.path.join(folder, f"labels{split}", f"MSSEG2_{sid}.nii.gz"))
        assert np.array_equal(converted, _load(os.path.join(src, sub, sid, "ground_truth.nii.gz")))
        t2 = _load(os.path.join(folder, f"images{split}", f"MSSEG2_{sid}_0001.nii.gz"))
        assert np.allclose(t2, _load(os.path.join(src, sub, sid, "flair_time02_on_middle_space.nii.gz")))
    after = {f: os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(src) for f in fs}
    assert before == after
