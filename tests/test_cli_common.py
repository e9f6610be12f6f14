"""The shared exit-code and interruption convention of every console script."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from nnunetv2_ohem import cli_common


def test_run_cli_maps_errors_to_exit_codes(capsys):
    class DataError(Exception):
        pass

    def raises(exc):
        def main(argv):
            raise exc
        return main

    assert cli_common.run_cli("p", lambda argv: 0) == 0
    assert cli_common.run_cli("p", lambda argv: None) == 0
    assert cli_common.run_cli("p", raises(cli_common.UserError("bad.nii.gz: truncated"))) == 1
    assert capsys.readouterr().err == "p: error: bad.nii.gz: truncated\n"
    assert cli_common.run_cli("p", raises(cli_common.UsageError("unknown -c x"))) == 2
    assert cli_common.run_cli("p", raises(DataError("x")), known_errors=(DataError,)) == 1
    assert cli_common.run_cli("p", raises(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err.endswith("interrupted, nothing written\n")
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        cli_common.run_cli("p", raises(ZeroDivisionError()))


def test_sigterm_runs_cleanup_and_exits_143(tmp_path):
    marker = tmp_path / "cleaned"
    started = tmp_path / "started"
    script = textwrap.dedent(f"""
        import time
        from nnunetv2_ohem.cli_common import run_cli
        def main(argv):
            try:
                open({str(started)!r}, "w").close()
                time.sleep(60)
            finally:
                open({str(marker)!r}, "w").close()
        raise SystemExit(run_cli("prog", main))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert started.exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert marker.exists()
    assert err.strip().splitlines() == ["prog: terminated (SIGTERM), interrupted, nothing written"]
