"""The environment-variable table and its readers (torch-free)."""
import subprocess
import sys

import pytest

from nnunetv2_ohem import envvars as E


def test_every_name_has_the_prefix_and_no_alias_is_shared():
    assert all(name.startswith(E.PREFIX) for name in E.VARIABLES)
    olds = [old for aliases in E.VARIABLES.values() for old in aliases]
    assert len(olds) == len(set(olds)) and not set(olds) & set(E.VARIABLES)


def test_new_name_wins_then_old_name_with_one_message(monkeypatch, capsys):
    monkeypatch.setattr(E, "_WARNED", set())
    env = {"nnUNet_blob_alpha": "1.5"}
    assert E.get_float(E.BLOB_ALPHA, 2.0, environ=env) == 1.5
    assert E.get_float(E.BLOB_ALPHA, 2.0, environ=env) == 1.5
    err = capsys.readouterr().err
    assert err.count("nnUNet_blob_alpha is deprecated, use nnUNet_ohem_blob_alpha") == 1
    env[E.BLOB_ALPHA] = "0.25"
    assert E.get_float(E.BLOB_ALPHA, 2.0, environ=env) == 0.25
    assert capsys.readouterr().err == ""


def test_unset_and_empty_give_the_default():
    assert E.get_int(E.DEMO_EPOCHS, 60, environ={}) == 60
    assert E.get_int(E.DEMO_EPOCHS, 60, environ={E.DEMO_EPOCHS: ""}) == 60
    assert E.get_str(E.CPU_FP16, "fp32", environ={}) == "fp32"
    assert E.get_int(E.COMPARE_SEED, environ={}) is None


@pytest.mark.parametrize("value,positive,ok", [("3", True, 3), ("0", True, None), ("-2", False, -2),
                                               ("x", False, None), ("1.5", True, None)])
def test_get_int_validates_and_names_the_variable(value, positive, ok):
    env = {"NNUNETV2_OHEM_COMPARE_EPOCHS": value}
    if ok is None:
        with pytest.raises(ValueError, match="NNUNETV2_OHEM_COMPARE_EPOCHS"):
            E.get_int(E.COMPARE_EPOCHS, positive=positive, environ=env)
    else:
        assert E.get_int(E.COMPARE_EPOCHS, positive=positive, environ=env) == ok


def test_bad_float_and_unknown_name():
    with pytest.raises(ValueError, match="nnUNet_ohem_blob_beta='a'"):
        E.get_float(E.BLOB_BETA, environ={E.BLOB_BETA: "a"})
    with pytest.raises(KeyError, match="nnUNet_ohem_typo"):
        E.get_str("nnUNet_ohem_typo", environ={})


def test_set_value_drops_stale_aliases():
    env = {"NNUNETV2_OHEM_COMPARE_ITERATIONS": "7", "OTHER": "1"}
    E.set_value(E.COMPARE_SEED, 4, env)
    E.unset(E.COMPARE_ITERATIONS, env)
    assert env == {"OTHER": "1", E.COMPARE_SEED: "4"}


def test_import_is_torch_free():
    code = "import sys, nnunetv2_ohem.envvars; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
