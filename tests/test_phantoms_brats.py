"""BraTS-like glioma phantoms: layouts per year, determinism, nested sub-regions and contrasts measured on the
written files, and the folders go through our BraTS converter."""
import filecmp
import json
import os
from decimal import ROUND_HALF_UP, Decimal

import cc3d
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from nnunetv2_ohem.dataset_conversion.brats import convert_brats
from nnunetv2_ohem.phantoms.brats import (BraTSPhantomConfig, brats_config_from_dict, has_enhancing,
                                          make_brats_subject, no_enhancing_count, write_brats_phantoms)

FAST = BraTSPhantomConfig(voxel_size=3.0)
# written out from the challenge's documentation, not imported from the package
FILES = {2020: ["_t1", "_t1ce", "_t2", "_flair"], 2021: ["_t1", "_t1ce", "_t2", "_flair"],
         2023: ["-t1n", "-t1c", "-t2w", "-t2f"]}
SEG = {2020: "_seg", 2021: "_seg", 2023: "-seg"}
ENDING = {2020: ".nii", 2021: ".nii.gz", 2023: ".nii.gz"}
ET_LABEL = {2020: 4, 2021: 4, 2023: 3}
TO_NNUNET = {0: 0, 2: 1, 1: 2}  # + ET_LABEL[year] -> 3
CUBE = np.ones((3, 3, 3), bool)


def _load(path):
    return np.asarray(nib.load(str(path)).dataobj)


def _cases(folder):
    return sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))


@pytest.fixture(scope="module")
def set2021(tmp_path_factory):
    out = tmp_path_factory.mktemp("b21") / "brats2021"
    write_brats_phantoms(str(out), n_subjects=5, seed=3, config=FAST, year=2021, n_validation=1)
    return out


@pytest.fixture(scope="module")
def set2023(tmp_path_factory):
    out = tmp_path_factory.mktemp("b23") / "brats2023"
    cfg = BraTSPhantomConfig(voxel_size=3.0, no_enhancing_fraction=0.5)
    write_brats_phantoms(str(out), n_subjects=2, seed=5, config=cfg, year=2023, first_id=7, n_validation=1)
    return out


def _seg(folder, case, year):
    return _load(os.path.join(folder, case, case + SEG[year] + ENDING[year]))


# ------------------------------------------------------------------------------------------- layout

def test_layout_2021_and_manifest(set2021):
    cases = _cases(set2021)
    assert cases == [f"BraTS2021_{i:05d}" for i in range(6)]
    for case in cases:
        want = [case + s + ".nii.gz" for s in FILES[2021]] + ([case + "_seg.nii.gz"] if case != cases[-1] else [])
        assert sorted(os.listdir(set2021 / case)) == sorted(want)
        imgs = [nib.load(str(set2021 / case / f)) for f in want]
        assert {i.shape for i in imgs} == {imgs[0].shape}, f"{case}: channels/seg differ in shape"
        assert all(np.allclose(i.affine, imgs[0].affine) for i in imgs)
        assert np.allclose(imgs[0].header.get_zooms(), 3.0)
    manifest = json.loads((set2021 / "phantom_manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["year"] == 2021
    assert brats_config_from_dict(manifest["config"]) == FAST
    assert [manifest["subjects"][c]["split"] for c in cases] == ["training"] * 5 + ["validation"]
    assert [manifest["subjects"][c]["index"] for c in cases] == list(range(6))
    assert [p for p in os.listdir(set2021.parent) if ".tmp-" in p] == []


def test_layout_2020_uncompressed_and_validation_names(tmp_path):
    out = write_brats_phantoms(str(tmp_path / "b20"), n_subjects=1, seed=1, config=FAST, year=2020, n_validation=1)
    assert _cases(out) == ["BraTS20_Training_001", "BraTS20_Validation_002"]
    case = "BraTS20_Training_001"
    assert sorted(os.listdir(os.path.join(out, case))) == sorted(case + s + ".nii" for s in FILES[2020] + ["_seg"])
    with open(os.path.join(out, case, case + "_t1.nii"), "rb") as f:
        assert f.read(2) != b"\x1f\x8b"  # not gzip
    assert sorted(os.listdir(os.path.join(out, "BraTS20_Validation_002"))) == sorted(
        "BraTS20_Validation_002" + s + ".nii" for s in FILES[2020])
    assert set(np.unique(_seg(out, case, 2020))) <= {0, 1, 2, 4}


def test_layout_2023_and_its_et_label(set2023):
    cases = _cases(set2023)
    assert cases == ["BraTS-GLI-00007-000", "BraTS-GLI-00008-000", "BraTS-GLI-00009-000"]
    for case in cases[:2]:
        assert sorted(os.listdir(set2023 / case)) == sorted(case + s + ".nii.gz" for s in FILES[2023] + ["-seg"])
    assert "BraTS-GLI-00009-000-seg.nii.gz" not in os.listdir(set2023 / cases[2])
    manifest = json.loads((set2023 / "phantom_manifest.json").read_text())
    for case in cases[:2]:
        values = set(np.unique(_seg(set2023, case, 2023)).tolist())
        assert values <= {0, 1, 2, 3}
        assert (3 in values) == manifest["subjects"][case]["with_enhancing"]
    # fraction 0.5 over 3 subjects: round(1.5) = 2 without enhancing tumour
    assert sum(not s["with_enhancing"] for s in manifest["subjects"].values()) == 2


def test_existing_output_is_not_overwritten_silently(set2021, tmp_path):
    with pytest.raises(FileExistsError, match="overwrite"):
        write_brats_phantoms(str(set2021), n_subjects=1, seed=3, config=FAST)
    out = tmp_path / "ow"
    write_brats_phantoms(str(out), n_subjects=1, seed=3, config=FAST)
    write_brats_phantoms(str(out), n_subjects=1, seed=3, config=FAST, year=2023, overwrite=True)
    assert _cases(out) == ["BraTS-GLI-00000-000"]


# ------------------------------------------------------------------------------------------- determinism

def test_same_seed_same_bytes_prefix_stable_other_seed_differs(set2021, tmp_path):
    again = write_brats_phantoms(str(tmp_path / "again"), n_subjects=2, seed=3, config=FAST)
    other = write_brats_phantoms(str(tmp_path / "other"), n_subjects=1, seed=4, config=FAST)
    for case in ("BraTS2021_00000", "BraTS2021_00001"):
        for s in FILES[2021] + ["_seg"]:
            # subject i depends on (seed, i) only: the 2-subject set equals the first 2 of the 6-case set
            name = case + s + ".nii.gz"
            assert filecmp.cmp(set2021 / case / name, os.path.join(again, case, name), shallow=False), name
    a = _load(set2021 / "BraTS2021_00000" / "BraTS2021_00000_t1ce.nii.gz")
    b = _load(os.path.join(other, "BraTS2021_00000", "BraTS2021_00000_t1ce.nii.gz"))
    assert a.shape != b.shape or not np.array_equal(a, b)


# ------------------------------------------------------------------------------------------- tumour geometry

def test_sub_regions_nest_and_necrosis_is_enclosed_by_the_enhancing_shell(set2021):
    necrotic = 0
    for case in _cases(set2021)[:5]:
        seg = _seg(set2021, case, 2021)
        brain = _load(set2021 / case / (case + "_t1.nii.gz")) > 0
        wt, tc, et, ncr = seg > 0, np.isin(seg, (1, 4)), seg == 4, seg == 1
        assert wt.any() and tc.any()
        assert not (et & ~tc).any() and not (tc & ~wt).any()
        assert brain[wt].all(), f"{case}: tumour outside the brain"
        # one tumour per subject by default; the core is wrapped in edema (never touches normal tissue)
        assert cc3d.connected_components(wt, connectivity=26, return_N=True)[1] == 1
        assert wt[ndimage.binary_dilation(tc, CUBE)].all()
        if et.any() and ncr.any():
            necrotic += 1
            # necrosis sits inside the enhancing shell: its 26-neighbourhood holds no edema or background
            assert tc[ndimage.binary_dilation(ncr, CUBE)].all()
            centroid = tuple(np.round(np.argwhere(ncr).mean(0)).astype(int))
            assert tc[centroid]
    assert necrotic >= 2


def test_no_enhancing_share_exact_in_manifest_and_labels(set2021):
    manifest = json.loads((set2021 / "phantom_manifest.json").read_text())["subjects"]
    cases = _cases(set2021)
    without = [i for i, c in enumerate(cases) if not manifest[c]["with_enhancing"]]
    # default 0.15 of 6 subjects: round(0.9) = 1
    assert len(without) == 1
    for c in cases[:5]:
        assert (4 in _seg(set2021, c, 2021)) == manifest[c]["with_enhancing"]
        assert (manifest[c]["label_voxels"]["et"] > 0) == manifest[c]["with_enhancing"]
    for f in (0.0, 0.15, 0.3, 0.5, 1 / 3, 1.0):
        for n in range(0, 41):
            want = int((Decimal(n) * Decimal(str(f))).quantize(Decimal(1), ROUND_HALF_UP))
            got = sum(not has_enhancing(i, f) for i in range(n))
            assert got == no_enhancing_count(n, f) == want, (f, n)


@pytest.mark.parametrize("voxel_size", [3.0, 4.0])
def test_volumes_in_requested_range_in_mm3(voxel_size):
    lo, hi = 30.0, 45.0
    cfg = BraTSPhantomConfig(voxel_size=voxel_size, whole_tumour_volume_cm3=(lo, hi), core_fraction=(0.3, 0.5))
    vox = voxel_size ** 3
    for index in range(2):
        sub = make_brats_subject(11, index, cfg)
        wt_mm3 = (sub.label > 0).sum() * vox
        tumour = sub.facts["tumours"][0]
        assert lo * 1000 - vox / 2 <= wt_mm3 <= hi * 1000 + vox / 2
        assert wt_mm3 == pytest.approx(tumour["volume_mm3"]["whole"])
        assert abs(wt_mm3 - tumour["target_whole_volume_mm3"]) <= vox / 2 + 1e-6
        tc = np.isin(sub.label, (1, 4)).sum()
        assert tc == tumour["n_voxels"]["core"] and tc / (sub.label > 0).sum() <= 0.5 + 1 / tc
        assert sub.brain_mask[sub.label > 0].all()


def test_several_tumours_stay_separate():
    cfg = BraTSPhantomConfig(voxel_size=3.0, n_tumours=(2, 2), whole_tumour_volume_cm3=(10.0, 20.0))
    sub = make_brats_subject(2, 0, cfg)
    assert len(sub.facts["tumours"]) == 2
    assert cc3d.connected_components(sub.label > 0, connectivity=26, return_N=True)[1] == 2


# ------------------------------------------------------------------------------------------- contrasts

def test_sub_region_contrasts_like_mr_and_zero_outside_brain():
    cfg = BraTSPhantomConfig(voxel_size=3.0, whole_tumour_volume_cm3=(60.0, 120.0))
    for index in range(2):
        sub = make_brats_subject(4, index, cfg, with_enhancing=True)
        lab, img = sub.label, sub.images
        wm = sub.wm_mask & ~ndimage.binary_dilation(lab > 0, CUBE, iterations=2)
        ed, et, ncr = lab == 2, lab == 4, lab == 1
        assert ed.any() and et.any() and ncr.any()

        def mean(ch, m):
            return float(img[ch][m].mean())

        wm_ref = {ch: float(np.median(img[ch][wm])) for ch in img}
        assert mean("t1ce", et) > 1.3 * wm_ref["t1ce"] and mean("t1ce", et) > 1.3 * mean("t1ce", ed)
        assert mean("flair", ed) > 1.4 * wm_ref["flair"] and mean("t2", ed) > 1.4 * wm_ref["t2"]
        assert mean("t1ce", ncr) < 0.8 * mean("t1ce", et) and mean("t2", ncr) > 1.4 * wm_ref["t2"]
        assert mean("t1", ncr) < 0.8 * wm_ref["t1"] and mean("t1", lab > 0) < wm_ref["t1"]
        for ch in ("t1", "t1ce", "t2", "flair"):
            assert (img[ch][~sub.brain_mask] == 0).all() and (img[ch][sub.brain_mask] > 0).mean() > 0.999
        # each channel has its own bias field and noise: no channel is a scaled copy of another
        assert abs(np.corrcoef(img["t1"][wm], img["t1ce"][wm])[0, 1]) < 0.9


# ------------------------------------------------------------------------------------------- converter

@pytest.mark.parametrize("year", [2021, 2023])
def test_written_folder_goes_through_our_converter(year, set2021, set2023, tmp_path):
    src = set2021 if year == 2021 else set2023
    cases = _cases(src)
    folder = convert_brats(str(src), 960 + year % 100, raw_dir=str(tmp_path / "raw"))
    dj = json.loads(open(os.path.join(folder, "dataset.json")).read())
    assert dj["labels"] == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                            "enhancing tumor": [3]}
    assert dj["regions_class_order"] == [1, 2, 3] and dj["numTraining"] == len(cases) - 1
    assert sorted(os.listdir(os.path.join(folder, "labelsTr"))) == sorted(c + ".nii.gz" for c in cases[:-1])
    assert sorted(os.listdir(os.path.join(folder, "imagesTs"))) == [f"{cases[-1]}_{k:04d}.nii.gz" for k in range(4)]
    assert not os.path.exists(os.path.join(folder, "labelsTs"))
    mapping = {**TO_NNUNET, ET_LABEL[year]: 3}
    for case in cases[:-1]:
        source = _seg(src, case, year)
        converted = _load(os.path.join(folder, "labelsTr", case + ".nii.gz"))
        src_counts = {mapping[int(v)]: int(c) for v, c in zip(*np.unique(source, return_counts=True))}
        out_counts = {int(v): int(c) for v, c in zip(*np.unique(converted, return_counts=True))}
        assert out_counts == src_counts
        assert np.array_equal(converted, np.vectorize(mapping.get)(source))
        t2 = _load(os.path.join(folder, "imagesTr", case + "_0002.nii.gz"))
        assert np.array_equal(t2, _load(os.path.join(src, case, case + FILES[year][2] + ENDING[year])))


# ------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, message", [
    ({"voxel_size": 0.0}, "voxel_size"),
    ({"whole_tumour_volume_cm3": (120.0, 10.0)}, "whole_tumour_volume_cm3"),
    ({"core_fraction": (0.5, 1.0)}, "core_fraction"),
    ({"no_enhancing_fraction": 1.5}, "no_enhancing_fraction"),
    ({"n_tumours": (0, 1)}, "n_tumours"),
    ({"voxel_size": 8.0}, "at least 27"),
])
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BraTSPhantomConfig(**kwargs)


def test_bad_write_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="year"):
        write_brats_phantoms(str(tmp_path / "y"), n_subjects=1, config=FAST, year=2019)
    with pytest.raises(ValueError, match="3 digits"):
        write_brats_phantoms(str(tmp_path / "d"), n_subjects=2, config=FAST, year=2020, first_id=999)
    assert os.listdir(tmp_path) == []
