"""Integrity of reading and writing: refused bad files, umask modes, interruption, stale temp folders, overwrite.

Tiny synthetic NIfTI files throughout; the subprocess tests stop a real conversion while it runs.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, os.path.dirname(__file__))
from converter_fixtures import make_msseg2, tree_hash, write  # noqa: E402

from nnunetv2_ohem import atomic  # noqa: E402
from nnunetv2_ohem.dataset_conversion import cli as convert_cli  # noqa: E402
from nnunetv2_ohem.dataset_conversion.brats import brats_back  # noqa: E402
from nnunetv2_ohem.dataset_conversion.common import ConversionError  # noqa: E402
from nnunetv2_ohem.dataset_conversion.msseg2 import convert_msseg2  # noqa: E402
from nnunetv2_ohem.evaluation.cli import main as evaluate_main  # noqa: E402
from nnunetv2_ohem.phantoms.mni import MSSEG2PhantomConfig, write_msseg2_phantoms  # noqa: E402

SHAPE = (12, 14, 16)


def _truncate(path) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _eval_folders(tmp_path, n=2):
    """Reference and prediction folders with ``n`` random binary cases (identical predictions)."""
    rng = np.random.default_rng(0)
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for i in range(n):
        mask = (rng.random(SHAPE) < 0.3).astype(np.uint8)
        write(str(ref / f"C{i}.nii.gz"), mask)
        write(str(pred / f"C{i}.nii.gz"), mask)
    return ref, pred


def _evaluate(argv, capsys):
    """Exit code (returned, or raised by argparse for bad options) and stderr of the evaluate CLI."""
    try:
        code = evaluate_main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------- bad files are refused

@pytest.mark.parametrize("defect", ["truncated prediction", "truncated reference", "NaN float prediction",
                                    "Inf float prediction", "non-integer prediction", "truncated .nii prediction"])
def test_evaluator_refuses_bad_files_with_one_line(tmp_path, capsys, defect):
    ref, pred = _eval_folders(tmp_path)
    culprit = (ref if "reference" in defect else pred) / "C1.nii.gz"
    if defect.startswith("truncated .nii"):
        os.remove(culprit)
        culprit = pred / "C1.nii"
        write(str(culprit), np.ones(SHAPE, np.float32))
        _truncate(culprit)
    elif defect.startswith("truncated"):
        _truncate(culprit)
        # the hazard being guarded against: ITK reads the truncated uint8 file without complaint
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(culprit))).shape == SHAPE
    else:
        arr = (np.random.default_rng(1).random(SHAPE) < 0.3).astype(np.float32)
        arr[2, 3, 4] = {"NaN": np.nan, "Inf": np.inf, "non": 0.5}[defect.split()[0].split("-")[0]]
        write(str(culprit), arr)
    out = tmp_path / "metrics.json"
    code, err = _evaluate(["msseg2", "-ref", str(ref), "-pred", str(pred), "-o", str(out)], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(culprit) in lines[0], err
    reason = {"truncated": "truncated", "NaN": "NaN or Inf", "Inf": "NaN or Inf", "non-integer": "non-integer"}
    assert reason[defect.split()[0].replace(".nii", "").strip()] in lines[0]
    assert not out.exists()


def test_nan_hidden_from_itk_by_scaling_is_seen_in_raw_data(tmp_path, capsys):
    """A float32 prediction with a raw NaN voxel and scl_slope 2: ITK returns 0 there, the reader refuses it."""
    ref, pred = _eval_folders(tmp_path)
    arr = np.zeros(SHAPE, np.float32)
    arr[1, 1, 1] = np.nan
    img = nib.Nifti1Image(arr, np.eye(4))
    img.header.set_slope_inter(2.0, 0.0)
    nib.save(img, str(pred / "C0.nii.gz"))
    assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(pred / "C0.nii.gz")))).any()   # the hazard
    code, err = _evaluate(["msseg2", "-ref", str(ref), "-pred", str(pred)], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert str(pred / "C0.nii.gz") in err and "NaN or Inf" in err


@pytest.mark.parametrize("defect", ["truncated label", "truncated .nii image", "NaN image"])
def test_converter_refuses_bad_files(tmp_path, defect):
    src = str(tmp_path / "src")
    make_msseg2(src)
    case = os.path.join(src, "training", "021")   # the .nii case of the fixture
    if defect == "truncated label":
        culprit = os.path.join(src, "training", "013", "ground_truth.nii.gz")
        _truncate(culprit)
    elif defect == "truncated .nii image":
        culprit = os.path.join(case, "flair_time01_on_middle_space.nii")
        _truncate(culprit)
    else:
        culprit = os.path.join(case, "flair_time02_on_middle_space.nii")
        arr = sitk.GetArrayFromImage(sitk.ReadImage(culprit))
        arr[0, 0, 0] = np.nan
        write(culprit, arr)
    with pytest.raises(ConversionError) as e:
        convert_msseg2(src, 981, raw_dir=str(tmp_path / "raw"))
    assert str(e.value).startswith(culprit + ": ") and "\n" not in str(e.value)
    assert ("NaN or Inf" if defect == "NaN image" else "truncated") in str(e.value)
    assert not (tmp_path / "raw").exists()


def test_brats_back_refuses_truncated_prediction(tmp_path):
    pred = tmp_path / "pred"
    write(str(pred / "a.nii.gz"), np.random.default_rng(0).integers(0, 4, SHAPE).astype(np.uint8))
    _truncate(pred / "a.nii.gz")
    with pytest.raises(ConversionError, match="a.nii.gz: .*truncated"):
        brats_back(str(pred), str(tmp_path / "out"), 2021)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- modes

def _modes(root):
    """(folder modes, file modes) of everything under ``root``, ``root`` included."""
    dirs, files = {os.stat(root).st_mode & 0o777}, set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirs |= {os.stat(os.path.join(dirpath, d)).st_mode & 0o777 for d in dirnames}
        files |= {os.stat(os.path.join(dirpath, f)).st_mode & 0o777 for f in filenames}
    return dirs, files


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_atomic_module_modes_follow_umask(tmp_path, umask):
    with atomic.AtomicFolder(str(tmp_path / "deep" / "folder")) as tmp:
        os.mkdir(os.path.join(tmp, "sub"))
        with open(os.path.join(tmp, "sub", "f.txt"), "w") as f:
            f.write("x")
    atomic.write_text_atomic(str(tmp_path / "deep" / "a.txt"), "a")
    with atomic.atomic_file(str(tmp_path / "deep" / "b.bin"), "wb") as f:
        f.write(b"b")
    with atomic.atomic_path(str(tmp_path / "deep" / "c.png")) as p:
        assert p.endswith("c.png") and os.path.basename(p).startswith(".")
        with open(p, "w") as f:
            f.write("c")
    assert _modes(tmp_path / "deep") == ({0o777 & ~umask}, {0o666 & ~umask})
    assert sorted(os.listdir(tmp_path / "deep")) == ["a.txt", "b.bin", "c.png", "folder"]


def test_converter_evaluator_phantoms_report_modes_follow_umask(tmp_path, umask):
    src = str(tmp_path / "src")
    make_msseg2(src)
    os.chmod(src, 0o700)   # the source's own modes must not leak into the output
    target = convert_msseg2(src, 982, raw_dir=str(tmp_path / "raw"))
    assert _modes(target) == ({0o777 & ~umask}, {0o666 & ~umask})
    back = tmp_path / "back"
    brats_back(os.path.join(target, "labelsTr"), str(back), 2021)
    assert _modes(back) == ({0o777 & ~umask}, {0o666 & ~umask})

    ref, pred = _eval_folders(tmp_path)
    out = tmp_path / "eval"
    assert evaluate_main(["msseg2", "-ref", str(ref), "-pred", str(pred), "-o", str(out / "m.json"),
                          "--csv", str(out / "c.csv")]) == 0
    assert sorted(os.listdir(out)) == ["c.csv", "m.json"]
    assert _modes(out) == ({0o777 & ~umask}, {0o666 & ~umask})

    phantoms = write_msseg2_phantoms(str(tmp_path / "ph"), n_subjects=1, seed=0,
                                     config=MSSEG2PhantomConfig(voxel_size=6.0), progress=False)
    assert _modes(phantoms) == ({0o777 & ~umask}, {0o666 & ~umask})

    from nnunetv2_ohem.demo.report import build_report
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "nnUNetTrainer.json").write_text("{}")
    html = build_report(str(tmp_path), ["nnUNetTrainer"], {}, "", "", "", str(metrics), str(tmp_path / "report"))
    assert os.path.exists(html)
    assert _modes(tmp_path / "report") == ({0o777 & ~umask}, {0o666 & ~umask})
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


# ---------------------------------------------------------------------------------- interruption

def _big_msseg2_source(root: str, n_cases: int) -> str:
    """An MSSEG-II tree of ``n_cases`` copies of the fixture's ``.nii`` case (re-encoded by the converter, so a
    conversion takes a while)."""
    make_msseg2(root)
    case = os.path.join(root, "training", "021")
    for i in range(n_cases):
        shutil.copytree(case, os.path.join(root, "training", f"{100 + i:03d}"))
    return root


def _temp_folders(raw: str, name: str):
    if not os.path.isdir(raw):
        return []
    return sorted(os.path.join(raw, n) for n in os.listdir(raw) if n.startswith(f".{name}.tmp-"))


def _default_sigint() -> None:
    # a shell without job control starts background jobs with SIGINT ignored, and children inherit that (a
    # test runner launched with `... &` would make Ctrl-C a no-op); a terminal's foreground job has the default
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_conversion(src: str, raw: str, dataset_id: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nnunetv2_ohem.dataset_conversion.cli", "msseg2", src, "-d",
                             str(dataset_id), "-o", raw, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True,   # own process group
                            preexec_fn=_default_sigint)


def _wait_mid_run(proc: subprocess.Popen, raw: str, name: str, min_files: int = 2, timeout: float = 120) -> str:
    """Wait until ``proc`` has written ``min_files`` images into its temporary folder; return that folder."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"conversion ended early: {proc.communicate()}"
        for tmp in _temp_folders(raw, name):
            images = os.path.join(tmp, "imagesTr")
            if os.path.isdir(images) and len(os.listdir(images)) >= min_files:
                return tmp
        time.sleep(0.01)
    raise AssertionError("the conversion never got going")


def _children(pid: int):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("how", ["SIGTERM to the process", "Ctrl-C to the process group"])
def test_interrupt_mid_conversion_with_workers_leaves_nothing(tmp_path, how):
    """SIGTERM (a scheduler's kill) to the converter, or SIGINT to its whole process group (what Ctrl-C in a
    terminal does, workers included), while two worker processes write: one line, exit 143/130, nothing left."""
    src = _big_msseg2_source(str(tmp_path / "src"), 150)
    raw = str(tmp_path / "raw")
    before = tree_hash(src)
    proc = _start_conversion(src, raw, 983, "-np", "2")
    _wait_mid_run(proc, raw, "Dataset983_MSSEG2")
    workers = _children(proc.pid)
    if how.startswith("SIGTERM"):
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == (143 if how.startswith("SIGTERM") else 130), err
    line = "terminated (SIGTERM), interrupted" if how.startswith("SIGTERM") else "interrupted"
    assert err.strip().splitlines() == [f"nnunetv2_ohem_convert: {line}, nothing written"]
    assert not os.path.exists(raw)              # temp folder gone, and the raw folder this run created too
    # the pool's workers are stopped before the temporary folder goes; multiprocessing's resource tracker
    # (also a child) exits by itself once its parent is gone
    deadline = time.time() + 20
    while [w for w in workers if _running(w)] and time.time() < deadline:
        time.sleep(0.05)
    assert len(workers) >= 2 and not [w for w in workers if _running(w)]
    assert tree_hash(src) == before


def test_stale_temp_folders_live_kept_and_named_dead_removed(tmp_path, capsys):
    src_big = _big_msseg2_source(str(tmp_path / "big"), 150)
    src = str(tmp_path / "src")
    make_msseg2(src)
    raw = str(tmp_path / "raw")
    name = "Dataset984_MSSEG2"
    proc = _start_conversion(src_big, raw, 984)
    try:
        tmp = _wait_mid_run(proc, raw, name)
        proc.send_signal(signal.SIGSTOP)   # alive, but not progressing
        # another run on the same target names the live temp folder and leaves it alone
        assert convert_cli.main(["msseg2", src, "-d", "984", "-o", raw]) == 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and tmp in err[0] and f"running process {proc.pid}" in err[0]
        assert os.path.isdir(tmp) and os.path.isdir(os.path.join(raw, name))
    finally:
        proc.kill()                        # a hard kill: no cleanup can run
        proc.communicate(timeout=60)
    assert _temp_folders(raw, name) == [tmp]
    # its process is gone now: the next run removes it and says so in one line
    assert convert_cli.main(["msseg2", src, "-d", "984", "-o", raw, "--overwrite"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"removed {tmp}: ")
    assert _temp_folders(raw, name) == [] and os.listdir(raw) == [name]


def test_temp_folder_without_marker_or_from_other_host_is_named_not_removed(tmp_path, capsys):
    target = tmp_path / "out"
    unknown = tmp_path / ".out.tmp-aaaa0000"
    unknown.mkdir()
    other = tmp_path / ".out.tmp-bbbb0000"
    other.mkdir()
    (other / atomic.MARKER).write_text(json.dumps({"pid": 1, "host": "elsewhere.invalid", "start": None}))
    with atomic.AtomicFolder(str(target)):
        pass
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and str(unknown) in err[0] and "without owner marker" in err[0]
    assert str(other) in err[1] and "host elsewhere.invalid" in err[1]
    assert unknown.is_dir() and other.is_dir() and target.is_dir() and os.listdir(target) == []


def test_atomic_folder_removes_temp_on_interrupt_and_keeps_old_target(tmp_path):
    target = tmp_path / "t"
    with atomic.AtomicFolder(str(target)) as tmp:
        open(os.path.join(tmp, "v1"), "w").close()
    for exc in (KeyboardInterrupt, atomic.UserError, RuntimeError):
        with pytest.raises(exc):
            with atomic.AtomicFolder(str(target), overwrite=True) as tmp:
                open(os.path.join(tmp, "v2"), "w").close()
                raise exc()
        assert os.listdir(tmp_path) == ["t"] and os.listdir(target) == ["v1"]
    with atomic.AtomicFolder(str(target), overwrite=True) as tmp:
        open(os.path.join(tmp, "v2"), "w").close()
    assert os.listdir(tmp_path) == ["t"] and os.listdir(target) == ["v2"]   # old copy and marker gone


def test_unwritable_output_location_is_one_line(tmp_path, capsys):
    src = str(tmp_path / "src")
    make_msseg2(src)
    (tmp_path / "afile").write_text("not a folder")
    raw = tmp_path / "afile" / "raw"
    assert convert_cli.main(["msseg2", src, "-d", "987", "-o", str(raw)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(raw / "Dataset987_MSSEG2") in err[0] and "cannot create the output" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["afile", "src"]
    with pytest.raises(atomic.OutputError, match="afile/m.json: cannot create the output"):
        atomic.write_text_atomic(str(tmp_path / "afile" / "m.json"), "{}")


# ----------------------------------------------------------------------------------------- overwrite

def test_overwrite_refuses_foreign_folders_and_replaces_own(tmp_path, capsys):
    src = str(tmp_path / "src")
    make_msseg2(src)
    raw = tmp_path / "raw"
    target = raw / "Dataset979_MSSEG2"
    target.mkdir(parents=True)
    (target / "dataset.json").write_text(json.dumps({"name": "mine"}))   # e.g. a hand-made nnU-Net dataset
    (target / "notes.txt").write_text("my notes")
    before = tree_hash(str(target))
    assert convert_cli.main(["msseg2", src, "-d", "979", "-o", str(raw), "--overwrite"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(target) in err[0] and "not written by this converter" in err[0]
    assert "remove it yourself or choose another -d" in err[0]
    assert tree_hash(str(target)) == before and os.listdir(raw) == ["Dataset979_MSSEG2"]

    shutil.rmtree(target)
    assert convert_cli.main(["msseg2", src, "-d", "979", "-o", str(raw)]) == 0
    meta = json.loads((target / "dataset.json").read_text())
    assert meta["converted_by"] == "nnunetv2_ohem_convert msseg2"
    (target / "imagesTr" / "extra_0000.nii.gz").write_bytes(b"stale")
    assert convert_cli.main(["msseg2", src, "-d", "979", "-o", str(raw), "--overwrite"]) == 0
    assert "extra_0000.nii.gz" not in os.listdir(target / "imagesTr") and os.listdir(raw) == ["Dataset979_MSSEG2"]

    # brats-back output folders and phantom folders: the same rule
    pred = tmp_path / "pred"
    write(str(pred / "a.nii.gz"), np.zeros(SHAPE, np.uint8))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="--overwrite refused"):
        brats_back(str(pred), str(foreign), 2021, overwrite=True)
    with pytest.raises(FileExistsError, match="overwrite refused"):
        write_msseg2_phantoms(str(foreign), n_subjects=1, config=MSSEG2PhantomConfig(voxel_size=6.0),
                              overwrite=True, progress=False)
    assert os.listdir(foreign) == ["keep.txt"] and (foreign / "keep.txt").read_text() == "mine"
    brats_back(str(pred), str(tmp_path / "back"), 2021)
    assert brats_back(str(pred), str(tmp_path / "back"), 2021, overwrite=True)


# ------------------------------------------------------------------------------------------ options

@pytest.mark.parametrize("value", ["0", "-3"])
def test_non_positive_num_processes_is_a_usage_error(tmp_path, capsys, value):
    src = str(tmp_path / "src")
    make_msseg2(src)
    with pytest.raises(SystemExit) as e:
        convert_cli.main(["msseg2", src, "-d", "986", "-o", str(tmp_path / "raw"), "-np", value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "-np" in err[-1] and value in err[-1] and not (tmp_path / "raw").exists()
    ref, pred = _eval_folders(tmp_path)
    code, err = _evaluate(["msseg2", "-ref", str(ref), "-pred", str(pred), "-np", value], capsys)
    assert code == 2 and "-np" in err.strip().splitlines()[-1]
