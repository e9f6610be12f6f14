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
    assert main(["msseg2", str(tmp_path / "out"), "--set", override, "--no-progress"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_show_config_prints_the_resolved_config(capsys):
    assert main(["msseg2", "--show-config", "--voxel-size", "3", "--set", "n_experts=1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["voxel_size"] == 3.0 and shown["n_experts"] == 1 and shown["lesion_volume_mm3"] == [1.0, 50.0]


def test_year_only_for_brats(capsys, tmp_path):
    assert main(["msseg2", str(tmp_path / "o"), "--year", "2023"]) == 1
    assert "--year applies to brats" in capsys.readouterr().err


def test_cli_writes_the_same_bytes_as_the_api(tmp_path, capsys):
    cfg = MSSEG2PhantomConfig(voxel_size=3.0, n_experts=1)
    api = write_msseg2_phantoms(str(tmp_path / "api"), n_subjects=1, seed=7, config=cfg, n_test=1)
    assert main(["msseg2", str(tmp_path / "cli"), "-n", "1", "--extra", "1", "--seed", "7", "--voxel-size", "3",
                 "--set", "n_experts=1", "--no-progress"]) == 0
    assert "nnunetv2_ohem_convert msseg2" in capsys.readouterr().out
    for split, sid in (("training", "001"), ("testing", "002")):
        names = sorted(os.listdir(os.path.join(api, split, sid)))
        assert names == sorted(os.listdir(tmp_path / "cli" / split / sid))
        match, mismatch, errors = filecmp.cmpfiles(os.path.join(api, split, sid), tmp_path / "cli" / split / sid,
                                                   names, shallow=False)
        assert mismatch == [] and errors == []
    # a second run refuses to overwrite without --overwrite
    assert main(["msseg2", str(tmp_path / "cli"), "-n", "1", "--no-progress"]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
