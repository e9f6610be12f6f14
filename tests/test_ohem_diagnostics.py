"""The OHEM diagnostics contract: file content as the trainer wrote it before, round trip, plot, torch-free."""
import json
import os
import subprocess
import sys

import numpy as np

from nnunetv2_ohem import ohem_diagnostics as D


def _logged(n_epochs=4):
    rng = np.random.default_rng(0)
    logged = {k: list(rng.random(n_epochs)) for k in D.LOG_KEYS}
    logged[D.MINING_FRACTION][1] = float("nan")  # an epoch without mining
    logged[D.SELECTION_RECALL] = logged[D.SELECTION_RECALL][:3]  # a key one epoch behind
    return logged


def test_keys_are_the_trainers_log_keys():
    assert D.LOG_KEYS == ("ohem_error_candidates", "ohem_error_selected", "ohem_fg_fraction_candidates",
                          "ohem_fg_fraction_selected", "ohem_miner_online_disagreement", "ohem_mining_fraction",
                          "ohem_selection_recall")
    assert D.DIAGNOSTICS_FILE == "ohem_diagnostics.json" and D.PROGRESS_PLOT == "ohem_progress.png"


def test_content_equals_the_former_inline_construction():
    logged, extra = _logged(), {"trainer": "T", "batch_size": 2, "candidate_factor": 4, "ema_momentum": 0.99}
    # the trainer's previous code, verbatim
    n = min(len(logged[k]) for k in D.LOG_KEYS)
    ref = {k: [None if not np.isfinite(v) else float(v) for v in logged[k][:n]] for k in D.LOG_KEYS}
    ref.update({"epoch": list(range(n)), **extra})
    diag = D.diagnostics_from_log(logged, **extra)
    assert json.dumps(diag, indent=1) == json.dumps(ref, indent=1)
    assert diag["epoch"] == [0, 1, 2] and diag[D.MINING_FRACTION][1] is None


def test_write_read_round_trip_and_plot(tmp_path):
    diag = D.diagnostics_from_log(_logged(), trainer="T", candidate_factor=4, ema_momentum=0.99)
    assert D.read_diagnostics(str(tmp_path)) is None
    D.write_diagnostics(str(tmp_path), diag)
    with open(tmp_path / D.DIAGNOSTICS_FILE) as f:
        assert f.read() == json.dumps(diag, indent=1)
    assert D.read_diagnostics(str(tmp_path)) == diag
    assert os.path.getsize(tmp_path / D.PROGRESS_PLOT) > 1000
    assert sorted(os.listdir(tmp_path)) == [D.DIAGNOSTICS_FILE, D.PROGRESS_PLOT]  # no temporary leftovers
    np.testing.assert_array_equal(D.as_array(diag, D.MINING_FRACTION)[1], np.nan)
    assert D.as_array({}, D.ERROR_SELECTED).shape == (0,)


def test_module_is_torch_free():
    out = subprocess.run([sys.executable, "-c", "import sys, nnunetv2_ohem.ohem_diagnostics; "
                          "print(sorted(m for m in ('torch', 'nnunetv2') if m in sys.modules))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
