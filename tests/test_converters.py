"""Dataset converters on fake trees with the real file names: outputs voxel by voxel, dataset.json, bad input.

Every conversion is of tiny 8³ volumes, so the whole file runs in seconds; only the CLI smoke test and the
``-np 2`` test start extra processes.
"""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, os.path.dirname(__file__))
from converter_fixtures import (DIRECTION, MAKERS, ORIGIN, SHAPE, SPACING, make_acdc, make_brats,  # noqa: E402
                                make_msseg2, make_valdo, read, tree_hash, write)

from nnunetv2_ohem.dataset_conversion import cli  # noqa: E402
from nnunetv2_ohem.dataset_conversion.acdc import convert_acdc  # noqa: E402
from nnunetv2_ohem.dataset_conversion.brats import (brats_back, convert_brats, detect_year,  # noqa: E402
                                                    labels_back_to_brats)
from nnunetv2_ohem.dataset_conversion.common import (ConversionError, Geometry, geometry_mismatch,  # noqa: E402
                                                     label_values, remap_labels)
from nnunetv2_ohem.dataset_conversion.nifti import payload_size  # noqa: E402
from nnunetv2_ohem.dataset_conversion.msseg2 import convert_msseg2  # noqa: E402
from nnunetv2_ohem.dataset_conversion.valdo import convert_valdo  # noqa: E402

REGIONS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
BRATS_CHANNELS = {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}
# Written out independently of the package (the challenges' documented layouts), not imported from it.
EXPECTED = {
    "msseg2": dict(convert=convert_msseg2, folder="Dataset950_MSSEG2", mapping={0: 0, 1: 1},
                   channels={"0": "FLAIR_time01", "1": "FLAIR_time02"},
                   labels={"background": 0, "new_lesion": 1}),
    "valdo": dict(convert=convert_valdo, folder="Dataset951_VALDO", mapping={0: 0, 1: 1},
                  channels={"0": "T1", "1": "T2", "2": "FLAIR"}, labels={"background": 0, "lacune": 1}),
    "brats2020": dict(convert=convert_brats, folder="Dataset952_BraTS2020", mapping={0: 0, 1: 2, 2: 1, 4: 3},
                      channels=BRATS_CHANNELS, labels=REGIONS, regions_class_order=[1, 2, 3]),
    "brats2021": dict(convert=convert_brats, folder="Dataset953_BraTS2021", mapping={0: 0, 1: 2, 2: 1, 4: 3},
                      channels=BRATS_CHANNELS, labels=REGIONS, regions_class_order=[1, 2, 3]),
    "brats2023": dict(convert=convert_brats, folder="Dataset954_BraTS2023", mapping={0: 0, 1: 2, 2: 1, 3: 3},
                      channels=BRATS_CHANNELS, labels=REGIONS, regions_class_order=[1, 2, 3]),
    "acdc": dict(convert=convert_acdc, folder="Dataset955_ACDC", mapping={0: 0, 1: 1, 2: 2, 3: 3},
                 channels={"0": "cineMRI"}, labels={"background": 0, "RV": 1, "MYO": 2, "LV": 3}),
}


def loop_map(arr, mapping):
    """Reference: map voxel by voxel in plain Python."""
    out = np.zeros(arr.shape, np.uint8)
    for idx, v in np.ndenumerate(arr):
        out[idx] = mapping[int(v)]
    return out


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every fake tree converted once: key -> (source, output folder, expected cases, summary, hash before)."""
    root = tmp_path_factory.mktemp("conv")
    out = {}
    for i, key in enumerate(EXPECTED):
        src = str(root / "src" / key)
        expected = MAKERS[key](src)
        before = tree_hash(src)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            folder = EXPECTED[key]["convert"](src, 950 + i, raw_dir=str(root / "raw"))
        out[key] = (src, folder, expected, buf.getvalue(), before)
    return out


# ------------------------------------------------------------------------------------------- pure parts

def test_label_values_match_reference_on_random_arrays():
    rng = np.random.default_rng(0)
    for dtype in (np.uint8, np.int16, np.int32, np.float32, np.float64):
        for high in (1, 5, 300):
            arr = rng.integers(0, high + 1, size=(5, 6, 7)).astype(dtype)
            assert label_values(arr).tolist() == sorted({int(v) for v in arr.ravel()})
    big = np.array([0, 70000, 3], np.int64)          # beyond the bincount range: np.unique path
    assert label_values(big).tolist() == [0, 3, 70000]


@pytest.mark.parametrize("arr, reason", [
    (np.array([0, 0.5, 1], np.float32), "non-integer"),
    (np.array([0, -1, 1], np.int16), "negative"),
    (np.array([0, -2.0], np.float32), "negative"),
    (np.array([0, np.nan], np.float32), "NaN"),
])
def test_label_values_rejects_bad_values(arr, reason):
    with pytest.raises(ValueError, match=reason):
        label_values(arr)


def test_remap_labels_matches_loop_reference():
    rng = np.random.default_rng(1)
    for _ in range(5):
        src = rng.choice(20, size=4, replace=False).tolist()
        mapping = dict(zip(src, rng.permutation(4).tolist()))
        arr = rng.choice(src, size=(4, 5, 6)).astype(rng.choice([np.uint8, np.int32, np.float32]))
        out = remap_labels(arr, mapping)
        assert out.dtype == np.uint8 and out.shape == arr.shape
        np.testing.assert_array_equal(out, loop_map(arr, mapping))


def test_remap_labels_names_unknown_values():
    with pytest.raises(ValueError, match=r"unknown label values \[2, 7\] \(expected \[0, 1\]\)"):
        remap_labels(np.array([0, 1, 2, 7]), {0: 0, 1: 1})


@pytest.mark.parametrize("year, src, dst", [
    (2020, [0, 1, 2, 4], [0, 2, 1, 3]), (2021, [0, 1, 2, 4], [0, 2, 1, 3]), (2023, [0, 1, 2, 3], [0, 2, 1, 3])])
def test_brats_label_mapping_and_back(year, src, dst):
    back = labels_back_to_brats(np.array(dst, np.uint8), year)
    assert back.tolist() == src
    with pytest.raises(ValueError, match=r"unknown label values \[4\]"):
        labels_back_to_brats(np.array([0, 4], np.uint8), year)


def test_geometry_mismatch_tolerance():
    ref = Geometry((8, 8, 8), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), DIRECTION)
    assert geometry_mismatch(ref, ref) is None
    near = Geometry((8, 8, 8), (1.0 + 1e-5, 1.0, 2.0), (1e-4, 0.0, 0.0), DIRECTION)
    assert geometry_mismatch(ref, near) is None
    assert "shape" in geometry_mismatch(ref, Geometry((8, 8, 7), ref.spacing, ref.origin, DIRECTION))
    assert "spacing" in geometry_mismatch(ref, Geometry(ref.size, (1.0, 1.01, 2.0), ref.origin, DIRECTION))
    assert "origin" in geometry_mismatch(ref, Geometry(ref.size, ref.spacing, (0.0, 0.5, 0.0), DIRECTION))
    assert "direction" in geometry_mismatch(ref, Geometry(ref.size, ref.spacing, ref.origin,
                                                          (1, 0, 0, 0, 1, 0, 0, 0, 1)))


def test_nifti_payload_size_matches_written_file(tmp_path):
    import nibabel as nib

    path = write(str(tmp_path / "a.nii"), np.zeros((3, 4, 5), np.int16))
    assert payload_size(nib.load(path)) == os.path.getsize(path) == 352 + 3 * 4 * 5 * 2


def test_detect_year():
    assert detect_year(["BraTS20_Training_001", "BraTS20_Validation_002"]) == 2020
    assert detect_year(["BraTS2021_00000"]) == 2021
    assert detect_year(["BraTS-GLI-00000-000", "other"]) == 2023
    with pytest.raises(ConversionError, match="several BraTS releases"):
        detect_year(["BraTS2021_00000", "BraTS-GLI-00000-000"], "/src")


# ------------------------------------------------------------------------------------- converter outputs

@pytest.mark.parametrize("key", list(EXPECTED))
def test_converter_output_voxel_by_voxel(converted, key):
    src, folder, expected, summary, before = converted[key]
    spec = EXPECTED[key]
    assert os.path.basename(folder) == spec["folder"]
    n_channels = len(spec["channels"])
    want_files = {"dataset.json"}
    for case, e in expected.items():
        images_dir = "imagesTs" if e.test else "imagesTr"
        want_files |= {f"{images_dir}/{case}_{c:04d}.nii.gz" for c in range(n_channels)}
        if e.label is not None:
            want_files.add(f"{'labelsTs' if e.test else 'labelsTr'}/{case}.nii.gz")
    assert set(files_under(folder)) == want_files

    for case, e in expected.items():
        images_dir = os.path.join(folder, "imagesTs" if e.test else "imagesTr")
        for c, arr in enumerate(e.images):
            img = sitk.ReadImage(os.path.join(images_dir, f"{case}_{c:04d}.nii.gz"))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)
            assert img.GetSpacing() == pytest.approx(SPACING)
            assert img.GetOrigin() == pytest.approx(ORIGIN)
            assert img.GetDirection() == pytest.approx(DIRECTION)
        if e.label is not None:
            lab = sitk.ReadImage(os.path.join(folder, "labelsTs" if e.test else "labelsTr", case + ".nii.gz"))
            assert lab.GetPixelID() == sitk.sitkUInt8
            np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), loop_map(e.label, spec["mapping"]))
            assert lab.GetSpacing() == pytest.approx(SPACING) and lab.GetOrigin() == pytest.approx(ORIGIN)
            assert lab.GetDirection() == pytest.approx(DIRECTION)

    with open(os.path.join(folder, "dataset.json")) as f:
        dj = json.load(f)
    assert dj["channel_names"] == spec["channels"]
    assert dj["labels"] == spec["labels"]
    assert dj["numTraining"] == sum(not e.test for e in expected.values())
    assert dj["file_ending"] == ".nii.gz"
    assert dj.get("regions_class_order") == spec.get("regions_class_order")
    for k in ("description", "reference", "licence"):
        assert len(dj[k]) > 10
    assert f"{dj['numTraining']} training" in summary
    assert tree_hash(src) == before


@pytest.mark.parametrize("year, pairs", [(2020, [(4, 3), (2, 1), (1, 2)]), (2021, [(4, 3), (2, 1), (1, 2)]),
                                         (2023, [(3, 3), (2, 1), (1, 2)])])
def test_brats_label_remapping_per_voxel(converted, year, pairs):
    _, folder, expected, _, _ = converted[f"brats{year}"]
    for case, e in expected.items():
        if e.label is None:
            continue
        out = read(os.path.join(folder, "labelsTr", case + ".nii.gz"))
        for src_value, dst_value in pairs:
            assert (e.label == src_value).any()
            assert np.all(out[e.label == src_value] == dst_value)
        assert np.all(out[e.label == 0] == 0)


def test_special_cases_in_outputs(converted):
    _, folder, expected, summary, _ = converted["msseg2"]
    assert not read(os.path.join(folder, "labelsTr", "MSSEG2_015.nii.gz")).any()   # lesion-free case kept
    assert "foreground-free training cases (kept): 1" in summary
    assert "ground_truth_expert1" in summary                                      # experts ignored, reported
    _, _, _, summary, _ = converted["brats2020"]
    assert "W39_1998.09.19_Segm.nii" in summary and "quirk" in summary
    _, _, _, summary, _ = converted["acdc"]
    assert "patient001_4d.nii.gz" in summary and "patient001_frame05.nii.gz" in summary


class _SerialPool:
    """Stands in for the spawn pool of ``verify_dataset_integrity``: same checks, run in this process (a
    spawned worker importing torch costs ~10 s on the 2-core CI machine)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def starmap(self, func, iterable):
        return [func(*args) for args in iterable]


@pytest.mark.parametrize("key", list(EXPECTED))
def test_nnunet_verify_dataset_integrity_accepts_output(converted, key, monkeypatch, capsys):
    from types import SimpleNamespace

    import nnunetv2.experiment_planning.verify_dataset_integrity as vdi

    monkeypatch.setattr(vdi, "multiprocessing", SimpleNamespace(get_context=lambda *_: SimpleNamespace(
        Pool=_SerialPool)))
    vdi.verify_dataset_integrity(converted[key][1], num_processes=1)
    out = capsys.readouterr().out
    assert "verify_dataset_integrity Done" in out
    assert "Warning" not in out and "Error" not in out     # origin/direction warnings would show here


def test_msseg2_expert_label(tmp_path):
    src = str(tmp_path / "src")
    make_msseg2(src)
    with pytest.raises(ConversionError, match=r"ground_truth_expert2.nii.gz: missing label \(expert2\)"):
        convert_msseg2(src, 956, raw_dir=str(tmp_path / "raw"), label="expert2")   # case 015 has expert1 only
    shutil.copy(os.path.join(src, "training", "013", "ground_truth_expert2.nii.gz"),
                os.path.join(src, "training", "015", "ground_truth_expert2.nii.gz"))
    shutil.copy(os.path.join(src, "training", "013", "ground_truth_expert2.nii.gz"),
                os.path.join(src, "training", "021", "ground_truth_expert2.nii.gz"))
    folder = convert_msseg2(src, 956, raw_dir=str(tmp_path / "raw"), label="expert2")
    np.testing.assert_array_equal(read(os.path.join(folder, "labelsTr", "MSSEG2_013.nii.gz")),
                                  read(os.path.join(src, "training", "013", "ground_truth_expert2.nii.gz")))
    with pytest.raises(ConversionError, match="'consensus' or 'expertN'"):
        convert_msseg2(src, 957, raw_dir=str(tmp_path / "raw"), label="expert")


def test_msseg2_flat_layout_and_nii(tmp_path):
    """SOURCE/<id>/ directly, all .nii: case names keep the zero-padded id, images are re-encoded exactly."""
    src = tmp_path / "src"
    make_msseg2(str(tmp_path / "tree"))
    shutil.copytree(tmp_path / "tree" / "training" / "021", src / "21")
    folder = convert_msseg2(str(src), 958, raw_dir=str(tmp_path / "raw"))
    assert files_under(folder) == ["dataset.json", "imagesTr/MSSEG2_021_0000.nii.gz",
                                   "imagesTr/MSSEG2_021_0001.nii.gz", "labelsTr/MSSEG2_021.nii.gz"]
    np.testing.assert_array_equal(read(os.path.join(folder, "imagesTr", "MSSEG2_021_0001.nii.gz")),
                                  read(str(src / "21" / "flair_time02_on_middle_space.nii")))


def test_valdo_rater_selection(tmp_path):
    src = str(tmp_path / "src")
    make_valdo(src)
    extra = os.path.join(src, "sub-101", "sub-101_space-T1_desc-Rater2_Lacunes.nii.gz")
    write(extra, np.ones(SHAPE, np.uint8))
    with pytest.raises(ConversionError, match="sub-101: several rater masks.*--rater"):
        convert_valdo(src, 959, raw_dir=str(tmp_path / "raw"))
    with pytest.raises(ConversionError, match="sub-102: no Rater2 lacune mask"):
        convert_valdo(src, 959, raw_dir=str(tmp_path / "raw"), rater=2)
    os.remove(os.path.join(src, "sub-102", "sub-102_space-T1_desc-Rater3_Lacunes.nii.gz"))
    folder = convert_valdo(src, 959, raw_dir=str(tmp_path / "raw"), rater=2)
    assert read(os.path.join(folder, "labelsTr", "VALDO_101.nii.gz")).all()
    assert os.path.exists(os.path.join(folder, "imagesTs", "VALDO_102_0000.nii.gz"))   # no mask left → test


def test_brats_2020_quirk_with_two_candidates_is_reported(tmp_path):
    src = str(tmp_path / "src")
    make_brats(src, 2020)
    case = os.path.join(src, "MICCAI_BraTS2020_TrainingData", "BraTS20_Training_355")
    shutil.copy(os.path.join(case, "W39_1998.09.19_Segm.nii"), os.path.join(case, "copy_of_seg.nii"))
    with pytest.raises(ConversionError, match=r"BraTS20_Training_355_seg.nii: missing segmentation .*"
                                              r"candidates: W39_1998.09.19_Segm.nii, copy_of_seg.nii"):
        convert_brats(src, 960, raw_dir=str(tmp_path / "raw"))
    assert not (tmp_path / "raw").exists()


def test_brats_year_argument_checked(tmp_path):
    src = str(tmp_path / "src")
    make_brats(src, 2021)
    with pytest.raises(ConversionError, match="named like BraTS 2021, but year 2023"):
        convert_brats(src, 961, raw_dir=str(tmp_path / "raw"), year=2023)
    folder = convert_brats(src, 961, raw_dir=str(tmp_path / "raw"), year="2021", name="Glioma")
    assert os.path.basename(folder) == "Dataset961_Glioma"


def test_acdc_info_cfg_frame_missing(tmp_path):
    src = str(tmp_path / "src")
    make_acdc(src)
    os.remove(os.path.join(src, "training", "patient002", "patient002_frame09.nii.gz"))
    with pytest.raises(ConversionError, match=r"patient002_frame09.nii.gz: missing ED/ES frame of patient002"):
        convert_acdc(src, 962, raw_dir=str(tmp_path / "raw"))


@pytest.mark.parametrize("year", [2020, 2021, 2023])
def test_brats_back_round_trip(converted, tmp_path, year):
    _, folder, expected, _, _ = converted[f"brats{year}"]
    back = brats_back(os.path.join(folder, "labelsTr"), str(tmp_path / "back"), year)
    assert len(back) == sum(e.label is not None for e in expected.values())
    for case, e in expected.items():
        if e.label is not None:
            img = sitk.ReadImage(str(tmp_path / "back" / (case + ".nii.gz")))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(img), e.label)
            assert img.GetOrigin() == pytest.approx(ORIGIN) and img.GetDirection() == pytest.approx(DIRECTION)


def test_brats_back_bad_prediction_and_existing_output(tmp_path):
    pred = tmp_path / "pred"
    write(str(pred / "a.nii.gz"), np.zeros(SHAPE, np.uint8))
    write(str(pred / "b.nii.gz"), np.full(SHAPE, 5, np.uint8))
    with pytest.raises(ConversionError, match=r"b.nii.gz: unknown label values \[5\]"):
        brats_back(str(pred), str(tmp_path / "out"), 2021)
    assert os.listdir(tmp_path) == ["pred"]
    os.remove(pred / "b.nii.gz")
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError, match="out: output folder already exists"):
        brats_back(str(pred), str(tmp_path / "out"), 2021)
    with pytest.raises(ConversionError, match="out: --overwrite refused"):   # not written by brats-back
        brats_back(str(pred), str(tmp_path / "out"), 2021, overwrite=True)
    os.rmdir(tmp_path / "out")
    brats_back(str(pred), str(tmp_path / "out"), 2021)
    assert brats_back(str(pred), str(tmp_path / "out"), 2021, overwrite=True) == [str(tmp_path / "out" / "a.nii.gz")]


def test_geometry_within_tolerance_gets_first_channel_geometry(tmp_path):
    src = str(tmp_path / "src")
    make_msseg2(src)
    case = os.path.join(src, "training", "013")
    label = read(os.path.join(case, "ground_truth.nii.gz"))
    write(os.path.join(case, "ground_truth.nii.gz"), label, origin=np.add(ORIGIN, (1e-5, 0, 0)))
    t2 = read(os.path.join(case, "flair_time02_on_middle_space.nii.gz"))
    write(os.path.join(case, "flair_time02_on_middle_space.nii.gz"), t2, spacing=np.multiply(SPACING, 1 + 1e-6))
    folder = convert_msseg2(src, 963, raw_dir=str(tmp_path / "raw"))
    ref = sitk.ReadImage(os.path.join(case, "flair_time01_on_middle_space.nii.gz"))
    for f in ("imagesTr/MSSEG2_013_0001.nii.gz", "labelsTr/MSSEG2_013.nii.gz"):
        out = sitk.ReadImage(os.path.join(folder, f))
        assert out.GetOrigin() == ref.GetOrigin() and out.GetSpacing() == ref.GetSpacing()
        assert out.GetDirection() == ref.GetDirection()
    np.testing.assert_array_equal(read(os.path.join(folder, "imagesTr/MSSEG2_013_0001.nii.gz")), t2)
    np.testing.assert_array_equal(read(os.path.join(folder, "labelsTr/MSSEG2_013.nii.gz")), label)


# -------------------------------------------------------------------------------------------- bad input
# Each mutation breaks the MSSEG-II tree (case 021 is converted last, so the failure happens after other
# cases were written into the temporary folder). Returns the path the error must name.

def _rewrite(path, arr=None, **geometry):
    return write(path, read(path) if arr is None else arr, **geometry)


def _t2(src):
    return os.path.join(src, "training", "021", "flair_time02_on_middle_space.nii")


def _gt(src):
    return os.path.join(src, "training", "021", "ground_truth.nii")


def _with_value(src, value):
    arr = read(_gt(src)).astype(np.float32)
    arr.flat[100] = value
    return _rewrite(_gt(src), arr)


def _truncate(src):
    path = os.path.join(src, "training", "015", "flair_time02_on_middle_space.nii.gz")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    return path


def _garbage(src):
    path = os.path.join(src, "training", "015", "flair_time01_on_middle_space.nii.gz")
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b not really gzip")
    return path


def _nan(src, value):
    arr = read(_t2(src))
    arr[2, 3, 4] = value
    return _rewrite(_t2(src), arr)


BAD_INPUTS = {
    "missing channel": (lambda s: os.remove(_t2(s)) or _t2(s) + ".gz", "missing channel"),
    "missing label": (lambda s: os.remove(os.path.join(s, "training", "013", "ground_truth.nii.gz"))
                      or os.path.join(s, "training", "013", "ground_truth.nii.gz"), "missing label"),
    "truncated nii.gz": (_truncate, "truncated"),
    "not a nifti": (_garbage, "unreadable"),
    "channel shape": (lambda s: _rewrite(_t2(s), np.zeros((8, 8, 7), np.float32)), "channel grid differs.*shape"),
    "channel spacing": (lambda s: _rewrite(_t2(s), spacing=(0.9, 1.1, 1.4)), "channel grid differs.*spacing"),
    "channel origin": (lambda s: _rewrite(_t2(s), origin=(0, 0, 0)), "channel grid differs.*origin"),
    "channel direction": (lambda s: _rewrite(_t2(s), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)),
                          "channel grid differs.*direction"),
    "label shape": (lambda s: _rewrite(_gt(s), np.zeros((7, 8, 8), np.float32)), "label grid differs.*shape"),
    "NaN in image": (lambda s: _nan(s, np.nan), "NaN or Inf"),
    "NaN in .nii.gz image": (lambda s: _rewrite(os.path.join(s, "training", "015", "flair_time01_on_middle_space.nii.gz"),
                                                np.full(SHAPE, np.nan, np.float32)), "NaN or Inf"),
    "Inf in image": (lambda s: _nan(s, np.inf), "NaN or Inf"),
    "non-integer label": (lambda s: _with_value(s, 0.5), "non-integer values"),
    "negative label": (lambda s: _with_value(s, -1), "negative values"),
    "non-binary label": (lambda s: _with_value(s, 2), r"unknown label values \[2\] \(expected \[0, 1\]\)"),
}


def run_main(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_clear_error_nothing_written_source_untouched(tmp_path, capsys, case):
    src = str(tmp_path / "src")
    make_msseg2(src)
    mutate, reason = BAD_INPUTS[case]
    culprit = mutate(src)
    before = tree_hash(src)
    code, _, err = run_main(["msseg2", src, "-d", "964", "-o", str(tmp_path / "raw")], capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert culprit in err
    assert re.search(reason, err), err
    assert not (tmp_path / "raw").exists()          # no target, no temp folder, not even the raw dir we made
    assert tree_hash(src) == before


@pytest.mark.parametrize("which", ["missing", "empty", "no cases"])
def test_bad_source_folder(tmp_path, capsys, which):
    src = tmp_path / "src"
    if which != "missing":
        src.mkdir()
    if which == "no cases":
        (src / "notes.txt").write_text("x")
    code, _, err = run_main(["valdo", str(src), "-d", "964", "-o", str(tmp_path / "raw")], capsys)
    assert code == 1 and str(src) in err
    assert {"missing": "does not exist", "empty": "is empty", "no cases": "no valdo cases"}[which] in err
    assert not (tmp_path / "raw").exists()


def test_existing_target_needs_overwrite_and_is_replaced_atomically(tmp_path, capsys):
    src = str(tmp_path / "src")
    make_valdo(src)
    raw = tmp_path / "raw"
    target = raw / "Dataset965_VALDO"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("old")
    code, _, err = run_main(["valdo", src, "-d", "965", "-o", str(raw)], capsys)
    assert code == 1 and str(target) in err and "--overwrite" in err
    assert os.listdir(raw) == ["Dataset965_VALDO"] and os.listdir(target) == ["keep.txt"]
    # a folder this converter did not write is not replaced, not even with --overwrite
    code, _, err = run_main(["valdo", src, "-d", "965", "-o", str(raw), "--overwrite"], capsys)
    assert code == 1 and "--overwrite refused" in err and str(target) in err
    assert os.listdir(raw) == ["Dataset965_VALDO"] and os.listdir(target) == ["keep.txt"]
    shutil.rmtree(target)
    assert run_main(["valdo", src, "-d", "965", "-o", str(raw)], capsys)[0] == 0
    before = tree_hash(str(target))

    # a failing overwrite leaves the old target as it was
    os.remove(os.path.join(src, "sub-101", "sub-101_space-T1_desc-masked_T2.nii.gz"))
    code, _, err = run_main(["valdo", src, "-d", "965", "-o", str(raw), "--overwrite"], capsys)
    assert code == 1 and "sub-101_space-T1_desc-masked_T2.nii.gz: missing T2 channel" in err
    assert os.listdir(raw) == ["Dataset965_VALDO"] and tree_hash(str(target)) == before

    make_valdo(src)
    (target / "imagesTr" / "stale.nii.gz").write_bytes(b"x")
    code, out, _ = run_main(["valdo", src, "-d", "965", "-o", str(raw), "--overwrite"], capsys)
    assert code == 0 and "2 training" in out
    assert os.listdir(raw) == ["Dataset965_VALDO"]               # old copy and temp folder gone
    assert "stale.nii.gz" not in os.listdir(target / "imagesTr") and len(os.listdir(target / "imagesTr")) == 6


def test_dataset_id_used_by_another_name(tmp_path, capsys):
    src = str(tmp_path / "src")
    make_acdc(src)
    other = tmp_path / "raw" / "Dataset966_Other"
    other.mkdir(parents=True)
    code, _, err = run_main(["acdc", src, "-d", "966", "-o", str(tmp_path / "raw")], capsys)
    assert code == 1 and str(other) in err and "already used by another name" in err
    assert os.listdir(tmp_path / "raw") == ["Dataset966_Other"]


def test_unset_raw_dir(tmp_path, capsys, monkeypatch):
    src = str(tmp_path / "src")
    make_acdc(src)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    code, _, err = run_main(["acdc", src, "-d", "967"], capsys)
    assert code == 1 and "nnUNet_raw is not set" in err and "-o RAW_DIR" in err
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_output_inside_source_refused(tmp_path, capsys):
    src = str(tmp_path / "src")
    make_acdc(src)
    before = tree_hash(src)
    code, _, err = run_main(["acdc", src, "-d", "967", "-o", os.path.join(src, "raw")], capsys)
    assert code == 1 and "inside the source" in err
    assert tree_hash(src) == before


def test_parallel_conversion_equals_serial(converted, tmp_path):
    src, folder, _, _, _ = converted["brats2020"]
    parallel = convert_brats(src, 968, raw_dir=str(tmp_path), num_processes=2)
    assert files_under(parallel) == files_under(folder)
    for f in files_under(folder):
        if f.endswith(".nii.gz"):
            np.testing.assert_array_equal(read(os.path.join(parallel, f)), read(os.path.join(folder, f)))


def test_cli_subprocess_msseg2_and_exit_code(tmp_path, cli):
    src = str(tmp_path / "src")
    make_msseg2(src)
    raw = str(tmp_path / "raw")
    proc = cli(["nnunetv2_ohem_convert", "msseg2", src, "-d", "969", "-o", raw])
    assert "Wrote " + os.path.join(raw, "Dataset969_MSSEG2") in proc.stdout and "3 training" in proc.stdout
    exe = os.path.join(os.path.dirname(sys.executable), "nnunetv2_ohem_convert")
    again = subprocess.run([exe, "msseg2", src, "-d", "969", "-o", raw], capture_output=True, text=True)
    assert again.returncode == 1 and "already exists" in again.stderr
