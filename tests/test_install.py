"""Installing our package as a regular wheel and as an editable install: the discovery hook lands in
site-packages, works, is removed by ``pip uninstall``, and nothing of nnU-Net's installed files changes.

A throwaway venv borrows this venv's packages (torch, nnunetv2, setuptools) through a path ``.pth`` so
that no 6 GB install is repeated; pip from this venv installs into it with ``--python``.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTH = "nnunetv2_ohem-discovery.pth"


def _tree_digest(folder: str) -> dict:
    digest = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                digest[os.path.relpath(p, folder)] = hashlib.sha1(fh.read()).hexdigest()
    return digest


@pytest.fixture(scope="module")
def throwaway_venv(tmp_path_factory):
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = os.path.join(venv, "bin", "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # Only our own site dir is processed for .pth files; the borrowed one is a plain path entry, so
    # this venv's editable install of nnunetv2_ohem and its hook stay invisible there.
    with open(os.path.join(site, "borrow.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return py, site


def _pip(py: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", py, *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _probe(py: str, tmp_path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    code = ("import os, sys; print('EXT', os.environ.get('nnUNet_extTrainer')); "
            "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
            "c = f('nnUNetTrainer_Debug'); print('FOUND', c.__module__, sys.modules[c.__module__].__file__)")
    proc = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()
            if line.startswith(("EXT ", "FOUND "))}


def _source_modules() -> set:
    """Dotted names of every module in the source tree, as the wheel should install them."""
    names = set()
    for top, dotted in (("nnunetv2_ohem", "nnunetv2_ohem"), ("dataset_conversion", "nnunetv2_ohem.dataset_conversion")):
        for root, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            rel = os.path.relpath(root, os.path.join(REPO, top))
            prefix = dotted if rel == "." else dotted + "." + rel.replace(os.sep, ".")
            names.update(f"{prefix}.{f[:-3]}" for f in files if f.endswith(".py") and f != "__init__.py")
    return {n for n in names if "._nnunet_ext." not in n}


def _assert_every_source_module_installed(site: str) -> None:
    """A module committed without its package's ``__init__.py`` works in a clone but is silently left
    out of the wheel; compare the installed files with the source tree."""
    installed = set()
    for root, dirs, files in os.walk(os.path.join(site, "nnunetv2_ohem")):
        rel = os.path.relpath(root, site).replace(os.sep, ".")
        installed.update(f"{rel}.{f[:-3]}" for f in files if f.endswith(".py") and f != "__init__.py")
    missing = _source_modules() - installed
    assert not missing, f"modules missing from the wheel: {sorted(missing)}"


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["wheel", "editable"])
def test_install_hook_works_and_uninstall_removes_it(throwaway_venv, tmp_path, editable):
    py, site = throwaway_venv
    import nnunetv2
    nnunet_dir = os.path.dirname(nnunetv2.__file__)
    before = _tree_digest(nnunet_dir)

    _pip(py, "install", "--no-deps", "--no-build-isolation", "--no-index", *(["-e"] if editable else []), REPO)
    try:
        assert os.path.isfile(os.path.join(site, PTH))
        out = _probe(py, tmp_path)
        assert out["EXT"][0].endswith(os.path.join("nnunetv2_ohem", "_nnunet_ext"))
        module, path = out["FOUND"]
        assert module == "nnunetv2_ohem.training.debug"
        if editable:
            assert path.startswith(REPO)  # edits in the clone take effect
        else:
            assert path.startswith(site)
            _assert_every_source_module_installed(site)
    finally:
        _pip(py, "uninstall", "-y", "nnunetv2-ohem")
    assert not os.path.exists(os.path.join(site, PTH))
    leftovers = [f for f in os.listdir(site) if "ohem" in f.lower()]
    assert leftovers == []
    assert _tree_digest(nnunet_dir) == before
    if not editable:
        shutil.rmtree(os.path.join(REPO, "build"), ignore_errors=True)
