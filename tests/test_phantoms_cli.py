"""``nnunetv2_ohem_phantoms``: config overrides, errors that name the field, and files equal to the Python API's."""
import filecmp
import json
import os

import pytest

from nnunetv2_ohem.phantoms.cli import config_from_overrides, main
from nnunetv2_ohem.phantoms.mni import MSSEG2PhantomConfig, write_msseg2_phantoms


def test_overrides_parse_to_the_field_types():
    cfg = config_from_overrides(MSSEG2PhantomConfig, ["voxel_size=2.5", "lesion_volume_mm3=3,40",
                                                      "n_new_lesions=2,4", "n_experts=2"])
    assert cfg.voxel_size == 2.5 and cfg.lesion_volume_mm3 == (3.0, 40.0)
    assert cfg.n_new_lesions == (2, 4) and isinstance(cfg.n_new_lesions[0], int) and cfg.n_experts == 2
    assert cfg.wm_fraction == MSSEG2PhantomConfig().wm_fraction  # untouched fields keep their defaults


@pytest.mark.parametrize("override, message", [
    ("colour=red", "unknown field of MSSEG2PhantomConfig; known: voxel_size"),
    ("voxel_size=big", "voxel_size=big"),
    ("lesion_volume_mm3=5", "lesion_volume_mm3=5: expected 2 comma-separated values"),
    ("wm_fraction=1.5", "wm_fraction must lie in"),  # the config's own validation
    ("voxel_size", "expected FIELD=VALUE"),
])
def test_bad_overrides_are_errors_naming_the_field(override, message, capsys, tmp_path):
    assert main(["msseg2", str(tmp_path / "out"), "--set", override, "--no-progress"]) == 2  # usage
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_show_config_prints_the_resolved_config(capsys):
    assert main(["msseg2", "--show-config", "--voxel-size", "3", "--set", "n_experts=1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["voxel_size"] == 3.0 and shown["n_experts"] == 1 and shown["lesion_volume_mm3"] == [1.0, 50.0]


def test_year_only_for_brats(capsys, tmp_path):
    assert main(["msseg2", str(tmp_path / "o"), "--year", "2023"]) == 2  # usage
    assert "--year applies to brats" in capsys.readouterr().err


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


@pytest.mark.parametrize("kind", ["msseg2", "valdo", "brats"])
def test_cli_writes_the_same_bytes_as_the_api(kind, tmp_path, capsys):
    from nnunetv2_ohem.phantoms import brats, valdo

    api_calls = {
        "msseg2": lambda out: write_msseg2_phantoms(out, n_subjects=1, seed=7, n_test=1,
                                                    config=MSSEG2PhantomConfig(voxel_size=3.0, n_experts=1)),
        "valdo": lambda out: valdo.write_valdo_phantoms(out, n_subjects=1, seed=7, n_unlabelled=1,
                                                        config=valdo.VALDOPhantomConfig(voxel_size=3.0)),
        "brats": lambda out: brats.write_brats_phantoms(out, n_subjects=1, seed=7, n_validation=1, year=2023,
                                                        config=brats.BraTSPhantomConfig(voxel_size=3.0)),
    }
    extra = {"msseg2": ["--set", "n_experts=1"], "valdo": [], "brats": ["--year", "2023"]}[kind]
    api = api_calls[kind](str(tmp_path / "api"))
    assert main([kind, str(tmp_path / "cli"), "-n", "1", "--extra", "1", "--seed", "7", "--voxel-size", "3",
                 "--no-progress", *extra]) == 0
    assert f"nnunetv2_ohem_convert {kind}" in capsys.readouterr().out
    names = _tree(api)
    assert names == _tree(tmp_path / "cli") and len(names) >= 5
    if kind == "brats":
        assert any(n.endswith("-t2f.nii.gz") for n in names)  # the 2023 names
    match, mismatch, errors = filecmp.cmpfiles(api, tmp_path / "cli", names, shallow=False)
    assert mismatch == [] and errors == []
    # a second run refuses to overwrite without --overwrite
    assert main([kind, str(tmp_path / "cli"), "-n", "1", "--no-progress"]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
