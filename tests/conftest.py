"""Shared pytest fixtures: isolated nnU-Net folders and one tiny phantom dataset with tiny plans per session.

Everything heavy (phantoms, fingerprint, plans, preprocessing) is built once per session; tests that train
reuse it. Environment variables are set before any test runs so no test ever touches a user's real
nnU-Net folders, and subprocesses (stock CLIs) inherit them.
"""
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional

import pytest

TINY_DATASET_ID = 991
TINY_DATASET_NAME = f"Dataset{TINY_DATASET_ID:03d}_Phantom"


@pytest.fixture(scope="session", autouse=True)
def nnunet_env(tmp_path_factory):
    """Point nnU-Net's three folders at session temp dirs and make runs CPU-friendly."""
    root = tmp_path_factory.mktemp("nnunet")
    values = {
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_n_proc_DA": "0",
        "nnUNet_compile": "f",
        # nnU-Net's final validation exports through a spawn Pool of 8 workers by default; on 2 cores
        # starting 8 interpreters that each import torch costs more than the whole tiny training.
        "nnUNet_def_n_proc": "1",
        # nnU-Net sets torch's thread count to the core count on CPU; busy-waiting OpenMP threads then
        # fight any other process on 2 cores (a 5 s validation measured at 96 s under load)
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "MPLBACKEND": "Agg",
    }
    old = {k: os.environ.get(k) for k in values}
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(values[k], exist_ok=True)
    os.environ.update(values)
    yield values
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@dataclass
class TinyDataset:
    dataset_id: int
    name: str
    raw_folder: str
    plans_identifier: str
    preprocessed_folder: str


@pytest.fixture(scope="session")
def tiny_dataset(nnunet_env) -> TinyDataset:
    """Six 40³ two-channel training phantoms (+2 test cases with labels in labelsTs), planned with tiny
    plans (3 stages, features 4/8/16, 32³/32² patch, batch 2) and preprocessed for 3d_fullres and 2d."""
    from nnunetv2_ohem.phantoms.simple import write_simple_lesion_dataset
    from nnunetv2_ohem.plans.tiny import plan_and_preprocess_tiny

    raw = write_simple_lesion_dataset(nnunet_env["nnUNet_raw"], TINY_DATASET_ID, "Phantom", seed=0)
    plans = plan_and_preprocess_tiny(TINY_DATASET_ID, configurations=("3d_fullres", "2d"), num_processes=1,
                                     fast_fingerprint_if_missing=True)
    return TinyDataset(TINY_DATASET_ID, TINY_DATASET_NAME, raw, plans,
                       os.path.join(nnunet_env["nnUNet_preprocessed"], TINY_DATASET_NAME))


def run_cli(args: List[str], timeout: float = 600, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run a console script (resolved next to this interpreter) and fail with its output if it fails."""
    exe = os.path.join(os.path.dirname(sys.executable), args[0])
    proc = subprocess.run([exe if os.path.exists(exe) else args[0], *args[1:]], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed with exit code {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def cli():
    return run_cli
