"""Every console script: nnU-Net flag style, help that helps (fast, complete, with defaults), deprecated aliases,
one exit-code convention, progress bars on a terminal only; ``nnunetv2_ohem_plan`` leaves nnU-Net's
fingerprint alone and ``-pl`` selects the planner class as in nnU-Net."""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from nnunetv2_ohem.cli_common import UsageError, show_progress

sys.path.insert(0, os.path.dirname(__file__))  # converter_fixtures

SCRIPTS = {  # console script -> module with build_parser()
    "nnunetv2_ohem_plan": "nnunetv2_ohem.plans.cli",
    "nnunetv2_ohem_evaluate": "nnunetv2_ohem.evaluation.cli",
    "nnunetv2_ohem_convert": "nnunetv2_ohem.dataset_conversion.cli",
    "nnunetv2_ohem_phantoms": "nnunetv2_ohem.phantoms.cli",
    "nnunetv2_ohem_demo": "nnunetv2_ohem.demo.cli",
}
# generous for a loaded 2-core test machine; an idle one takes ~0.1-0.3 s (see docs/cli.md)
HELP_SECONDS = float(os.environ.get("NNUNETV2_OHEM_HELP_SECONDS", "3"))


def _exe(name: str) -> str:
    exe = os.path.join(os.path.dirname(sys.executable), name)
    return exe if os.path.exists(exe) else name


def _parsers(module: str):
    """The top-level parser of ``module`` and every subcommand parser, as (name, parser)."""
    top = importlib.import_module(module).build_parser()
    yield module, top
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _help_invocations():
    for script, module in SCRIPTS.items():
        yield [script]
        for name, parser in list(_parsers(module))[1:]:
            yield [script, name]
    yield ["nnunetv2_ohem_demo", "--study"]


# ------------------------------------------------------------------------------------------------ help

@pytest.mark.parametrize("cmd", list(_help_invocations()), ids=" ".join)
def test_help_is_fast_complete_and_plain(cmd):
    t0 = time.perf_counter()
    proc = subprocess.run([_exe(cmd[0]), *cmd[1:], "--help"], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert seconds < HELP_SECONDS, f"{' '.join(cmd)} --help took {seconds:.2f} s"
    text = proc.stdout
    assert "`" not in text, "RST markup in terminal help"
    # the description: the paragraphs between the usage block and the first option/argument section
    body = text.split("\n\n", 1)[1]
    description = re.split(r"\n(?:options|positional arguments):\n", body)[0]
    assert description.strip(), f"{' '.join(cmd)} has no description"
    first = " ".join(description.split("\n\n")[0].split())
    assert first.endswith((".", ":")), f"description cut: {first[-60:]!r}"


@pytest.mark.parametrize("module", sorted(SCRIPTS.values()) + ["nnunetv2_ohem.demo.study"])
def test_every_option_has_help_and_nnunet_style(module):
    for name, parser in _parsers(module):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or \
                    action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
            for opt in action.option_strings:
                assert "-" not in opt.lstrip("-"), f"{name}: {opt} is not nnU-Net style (underscores)"


# ------------------------------------------------------------------------------------------------ aliases

def test_deprecated_aliases_work_and_print_a_note(capsys):
    from nnunetv2_ohem.demo.cli import build_parser as demo_parser
    from nnunetv2_ohem.phantoms.cli import main as phantoms_main

    args = demo_parser().parse_args(["--voxel-size", "3", "--test-cases", "4", "--dataset-id", "950",
                                     "--no-progress", "--lesion-volume", "2", "9"])
    assert (args.voxel_size, args.test_cases, args.dataset_id, args.no_progress) == (3.0, 4, 950, True)
    assert args.lesion_volume == [2.0, 9.0]
    err = capsys.readouterr().err
    assert "--voxel-size is deprecated, use --voxel_size" in err and "--dataset-id is deprecated, use -d" in err
    assert len(err.strip().splitlines()) == 5
    assert phantoms_main(["msseg2", "--show-config", "--voxel-size", "3"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["voxel_size"] == 3.0 and "--show-config is deprecated, use --show_config" in err
    assert demo_parser().parse_args([]).voxel_size == demo_parser().get_default("voxel_size")
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------ plan

def test_plan_usage_and_data_errors(nnunet_env, capsys, tmp_path):
    from nnunetv2_ohem.plans.cli import main

    def exit_code(argv):
        try:
            return main(argv)
        except SystemExit as e:  # argparse's own usage errors
            return e.code

    assert exit_code(["tiny", "-d", "991", "-c", "3d_bogus"]) == 2
    err = capsys.readouterr().err
    assert "3d_bogus" in err and "'2d', '3d_fullres'" in err
    assert exit_code(["tiny", "-d", "991", "-np", "0"]) == 2
    assert "-np" in capsys.readouterr().err
    assert exit_code(["paper", "-d", "991", "-pl", "nnUNetPaperPlans"]) == 2
    assert "planner class" in capsys.readouterr().err
    assert exit_code(["tiny", "-d", "991", "-pl", "NoSuchPlanner"]) == 2
    assert "NoSuchPlanner" in capsys.readouterr().err
    # unknown dataset: one line, exit 1 (the deprecated --plans_identifier still parses, with its note)
    assert exit_code(["tiny", "-d", "997", "--plans_identifier", "X"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].endswith("--plans_identifier is deprecated, use -p")
    assert len(err) == 2 and "dataset 997" in err[1] and "Traceback" not in err[1]
    folder = os.path.join(nnunet_env["nnUNet_raw"], "Dataset996_NoJson")
    os.makedirs(folder)
    try:
        assert exit_code(["tiny", "-d", "996"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and os.path.join(folder, "dataset.json") in err
    finally:
        os.rmdir(folder)


def test_check_configurations_names_the_valid_ones():
    from nnunetv2_ohem.plans.common import check_configurations

    plans = {"plans_name": "nnUNetTinyPlans", "configurations": {"2d": {}}}  # a 2D dataset has no 3d_fullres
    with pytest.raises(UsageError, match="3d_fullres is not in .* valid: 2d"):
        check_configurations(plans, ["3d_fullres"])
    check_configurations(plans, ["2d"])


def test_plan_tiny_resenc_planner_leaves_the_fingerprint_alone(tiny_dataset):
    """``-pl nnUNetPlannerResEncM`` shrinks the ResEnc planner's plans (named after it, not the user's) and
    nnU-Net's dataset_fingerprint.json keeps its bytes."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunetv2_ohem.plans.cli import main

    fingerprint = os.path.join(tiny_dataset.preprocessed_folder, "dataset_fingerprint.json")
    with open(fingerprint, "rb") as f:
        original = f.read()
    marked = original + b"\n\n"  # still valid JSON, but not what any extractor writes
    with open(fingerprint, "wb") as f:
        f.write(marked)
    try:
        assert main(["tiny", "-d", str(tiny_dataset.dataset_id), "-pl", "nnUNetPlannerResEncM", "-np", "1",
                     "--no_progress"]) == 0
        with open(fingerprint, "rb") as f:
            assert f.read() == marked
    finally:
        with open(fingerprint, "wb") as f:
            f.write(original)
    plans = load_json(os.path.join(tiny_dataset.preprocessed_folder, "nnUNetResEncUNetMTinyPlans.json"))
    cfg = plans["configurations"]["3d_fullres"]
    arch = cfg["architecture"]
    assert arch["network_class_name"].endswith("ResidualEncoderUNet")
    kw = arch["arch_kwargs"]
    assert kw["features_per_stage"] == [4, 8, 16] and kw["n_blocks_per_stage"] == [2, 2, 2]
    assert "n_conv_per_stage" not in kw and kw["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    assert cfg["batch_size"] == 2 and max(cfg["patch_size"]) <= 32
    # its own data folder: the ResEnc planners' own data identifier would be the user's nnUNetPlans_3d_fullres
    assert cfg["data_identifier"] == "nnUNetResEncUNetMTinyPlans_3d_fullres"
    assert os.path.isdir(os.path.join(tiny_dataset.preprocessed_folder, "nnUNetResEncUNetMTinyPlans_3d_fullres"))
    assert not os.path.exists(os.path.join(tiny_dataset.preprocessed_folder, "nnUNetPlans_3d_fullres"))
    # the session's default tiny plans are PlainConvUNet plans shrunk the same way
    tiny = load_json(os.path.join(tiny_dataset.preprocessed_folder, tiny_dataset.plans_identifier + ".json"))
    plain = tiny["configurations"]["3d_fullres"]["architecture"]
    assert plain["network_class_name"].endswith("PlainConvUNet")
    assert plain["arch_kwargs"]["features_per_stage"] == [4, 8, 16]
    assert plain["arch_kwargs"]["n_conv_per_stage"] == [2, 2, 2]


# ------------------------------------------------------------------------------------------------ progress

class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self):
        return self.tty


def test_show_progress_only_on_a_terminal_and_never_with_no_progress():
    assert show_progress(False, _Stream(True))
    assert not show_progress(True, _Stream(True))
    assert not show_progress(False, _Stream(False))


def test_forked_pool_workers_still_stop_under_the_sigterm_handler():
    """nnU-Net's fork Pools stop idle workers with SIGTERM when they close; workers that inherited the CLI's
    handler used to raise instead of dying, and the pool's shutdown then waited forever."""
    code = ("from nnunetv2_ohem.cli_common import install_sigterm_handler\n"
            "install_sigterm_handler()\n"
            "from multiprocessing import get_context\n"
            "for _ in range(10):\n"
            "    with get_context('fork').Pool(8) as p:\n"
            "        p.starmap(max, [(1, 2)] * 4)\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _on_a_terminal(cmd, timeout: float = 300):
    """Run ``cmd`` with stderr on a pseudo-terminal (as in an interactive shell); returns (exit code, stderr)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    # a real terminal's size: on a 0-column pty tqdm draws an empty bar
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=max(1.0, deadline - time.time())), b"".join(chunks).decode(errors="replace")


BAR = re.compile(r"\d+%\|")  # tqdm's "40%|████" on a terminal


def test_convert_and_evaluate_draw_bars_on_a_terminal_only(tmp_path):
    from converter_fixtures import make_msseg2, write

    src = str(tmp_path / "msseg2")
    make_msseg2(src)
    convert = [_exe("nnunetv2_ohem_convert"), "msseg2", src, "-d", "971", "-o", str(tmp_path / "raw")]
    code, err = _on_a_terminal(convert)
    assert code == 0, err
    assert BAR.search(err) and "msseg2 -> Dataset971_MSSEG2" in err
    code, err = _on_a_terminal(convert + ["--overwrite", "--no_progress"])
    assert code == 0 and not BAR.search(err), err

    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for i in range(3):
        mask = np.zeros((8, 8, 8), np.uint8)
        mask[2:5, 2:5, 2:5] = 1
        write(str(ref / f"c{i}.nii.gz"), mask)
        write(str(pred / f"c{i}.nii.gz"), mask)
    evaluate = [_exe("nnunetv2_ohem_evaluate"), "msseg2", "-ref", str(ref), "-pred", str(pred)]
    code, err = _on_a_terminal(evaluate)
    assert code == 0 and BAR.search(err), err
    code, err = _on_a_terminal(evaluate + ["--no_progress"])
    assert code == 0 and not BAR.search(err), err
    # not a terminal (a log, a pipe): no bar either
    proc = subprocess.run(evaluate, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and not BAR.search(proc.stderr)


def test_evaluate_exit_codes(tmp_path):
    """Bad data (a missing folder) is 1 with one line, a bad option 2 (argparse's usage error)."""
    base = [_exe("nnunetv2_ohem_evaluate"), "msseg2", "-ref", str(tmp_path / "missing"), "-pred", str(tmp_path)]
    proc = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "missing" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(base + ["-np", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "-np" in proc.stderr
    proc = subprocess.run(base + ["--no_such_option"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--no_such_option" in proc.stderr


def test_missing_fingerprint_is_created_by_nnunets_own_extractor(nnunet_env, monkeypatch):
    """Without --fast_fingerprint a missing dataset_fingerprint.json is written by nnU-Net's extractor (its own
    sample count; made small here for speed), not by our fast one, which is returned for planning only."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    from nnunetv2_ohem.phantoms.simple import write_simple_lesion_dataset
    from nnunetv2_ohem.plans.common import fingerprint_for_planning

    write_simple_lesion_dataset(nnunet_env["nnUNet_raw"], 985, "Fingerprint", n_train=3, n_test=0,
                                shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0), seed=5)
    stock_init = DatasetFingerprintExtractor.__init__

    def small_stock_sample(self, *args, **kwargs):
        stock_init(self, *args, **kwargs)
        if type(self) is DatasetFingerprintExtractor:
            self.num_foreground_voxels_for_intensitystats = 30_000

    monkeypatch.setattr(DatasetFingerprintExtractor, "__init__", small_stock_sample)
    fast = fingerprint_for_planning(985, 1)
    written = load_json(os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset985_Fingerprint",
                                     "dataset_fingerprint.json"))
    assert written["spacings"] == fast["spacings"] and written["shapes_after_crop"] == fast["shapes_after_crop"]
    stats = [(f["foreground_intensity_properties_per_channel"]["0"]["mean"]) for f in (written, fast)]
    assert stats[0] != stats[1]  # 30 000 samples (the stock extractor) vs 10 000 (ours)
