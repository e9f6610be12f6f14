"""Zero-config trainer discovery: our trainers are found by nnU-Net's stock lookup with no env var set,
a user's own nnUNet_extTrainer folders keep working, and the start-up hook stays light."""
import os
import subprocess
import sys
import textwrap

from nnunetv2_ohem import _discovery

FIND = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
        "import sys; c = f(sys.argv[1]); print('FOUND', c.__module__, c.__name__)")


def _python(code: str, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _env_without_ext():
    env = dict(os.environ)
    env.pop("nnUNet_extTrainer", None)
    return env


def test_register_appends_once_and_keeps_user_folders():
    env = {"nnUNet_extTrainer": os.pathsep.join(["/a", "/b"])}
    value = _discovery.register(env)
    assert value.split(os.pathsep) == ["/a", "/b", _discovery.EXT_FOLDER]
    assert _discovery.register(env) == value  # idempotent
    empty = {}
    assert _discovery.register(empty) == _discovery.EXT_FOLDER
    assert os.path.isfile(os.path.join(_discovery.EXT_FOLDER, "nnunetv2_ohem_trainers.py"))


def test_startup_hook_sets_variable_without_heavy_imports():
    out = _python("import os, sys; print(os.environ.get('nnUNet_extTrainer')); "
                  "print(sorted(m for m in ('torch', 'nnunetv2', 'numpy') if m in sys.modules))",
                  env=_env_without_ext())
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == _discovery.EXT_FOLDER
    assert lines[1] == "[]"


def test_our_trainer_found_with_variable_unset():
    out = _python(FIND, "nnUNetTrainer_Debug", env=_env_without_ext())
    assert out.returncode == 0, out.stderr
    assert "FOUND nnunetv2_ohem.training.debug nnUNetTrainer_Debug" in out.stdout


def test_user_ext_folder_and_ours_both_resolve(tmp_path):
    (tmp_path / "my_lab_trainers.py").write_text(textwrap.dedent("""
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        class nnUNetTrainerMyLab(nnUNetTrainer):
            pass
    """))
    env = dict(os.environ, nnUNet_extTrainer=str(tmp_path))
    mine = _python(FIND, "nnUNetTrainerMyLab", env=env)
    assert mine.returncode == 0, mine.stderr
    assert "FOUND my_lab_trainers nnUNetTrainerMyLab" in mine.stdout
    ours = _python(FIND, "nnUNetTrainer_Debug", env=env)
    assert ours.returncode == 0, ours.stderr
    assert "FOUND nnunetv2_ohem.training.debug nnUNetTrainer_Debug" in ours.stdout


def test_unknown_trainer_still_fails_clearly():
    out = _python(FIND, "nnUNetTrainerDoesNotExist", env=_env_without_ext())
    assert out.returncode != 0
    assert "Could not find requested nnunet trainer nnUNetTrainerDoesNotExist" in out.stderr


def test_broken_trainer_module_is_reported_not_fatal(tmp_path):
    """A trainer module that cannot import (missing optional dependency) warns by name; the others
    stay discoverable."""
    import nnunetv2_ohem.training as training

    broken = os.path.join(os.path.dirname(training.__file__), "zz_broken_for_test.py")
    with open(broken, "w") as f:
        f.write("import a_module_that_does_not_exist_xyz\n")
    try:
        out = _python(FIND, "nnUNetTrainer_Debug", env=_env_without_ext())
    finally:
        os.remove(broken)
    assert out.returncode == 0, out.stderr
    assert "FOUND nnunetv2_ohem.training.debug nnUNetTrainer_Debug" in out.stdout
    assert "nnunetv2_ohem.training.zz_broken_for_test are unavailable" in out.stderr
    assert "a_module_that_does_not_exist_xyz" in out.stderr
