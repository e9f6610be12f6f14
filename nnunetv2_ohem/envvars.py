"""The package's environment variables: one prefix, one table, one set of readers.

nnU-Net has no command-line switch for trainer options, so the stock ``nnUNetv2_train`` / ``nnUNetv2_predict``
subprocesses receive them through the environment. Every name starts with :data:`PREFIX`, in nnU-Net's own
style (``nnUNet_compile``, ``nnUNet_n_proc_DA``). Names used by earlier versions are still read, with a
one-time deprecation message on stderr, so existing job scripts keep working.

Only ``os`` and ``sys`` are imported: the trainers' wrappers read these in every training subprocess and the
command-line tools set them without needing torch.
"""
import os
import sys
from typing import Dict, Mapping, MutableMapping, Optional, Set, Tuple

PREFIX = "nnUNet_ohem_"

BLOB_ALPHA = "nnUNet_ohem_blob_alpha"
BLOB_BETA = "nnUNet_ohem_blob_beta"
BLOB_CONNECTIVITY = "nnUNet_ohem_blob_connectivity"
CPU_FP16 = "nnUNet_ohem_cpu_fp16"
CPU_THREADS = "nnUNet_ohem_cpu_threads"
COMPARE_EPOCHS = "nnUNet_ohem_compare_epochs"
COMPARE_ITERATIONS = "nnUNet_ohem_compare_iterations"
COMPARE_VAL_ITERATIONS = "nnUNet_ohem_compare_val_iterations"
COMPARE_SEED = "nnUNet_ohem_compare_seed"
DEMO_EPOCHS = "nnUNet_ohem_demo_epochs"
DEMO_ITERATIONS = "nnUNet_ohem_demo_iterations"
DEMO_VAL_ITERATIONS = "nnUNet_ohem_demo_val_iterations"
DEMO_SEED = "nnUNet_ohem_demo_seed"

#: every variable the package reads -> the deprecated names still accepted for it (first match wins)
VARIABLES: Dict[str, Tuple[str, ...]] = {
    BLOB_ALPHA: ("nnUNet_blob_alpha",),
    BLOB_BETA: ("nnUNet_blob_beta",),
    BLOB_CONNECTIVITY: ("nnUNet_blob_connectivity",),
    CPU_FP16: (),
    CPU_THREADS: (),
    COMPARE_EPOCHS: ("NNUNETV2_OHEM_COMPARE_EPOCHS",),
    COMPARE_ITERATIONS: ("NNUNETV2_OHEM_COMPARE_ITERATIONS",),
    COMPARE_VAL_ITERATIONS: ("NNUNETV2_OHEM_COMPARE_VAL_ITERATIONS",),
    COMPARE_SEED: ("NNUNETV2_OHEM_COMPARE_SEED",),
    DEMO_EPOCHS: ("NNUNETV2_OHEM_DEMO_EPOCHS",),
    DEMO_ITERATIONS: ("NNUNETV2_OHEM_DEMO_ITERATIONS",),
    DEMO_VAL_ITERATIONS: ("NNUNETV2_OHEM_DEMO_VAL_ITERATIONS",),
    DEMO_SEED: ("NNUNETV2_OHEM_DEMO_SEED",),
}

# one message per old name and process: a trainer is built several times per run (training, then
# validation / prediction), and repeating the same advice each time buries the training log
_WARNED: Set[str] = set()


def _lookup(name: str, environ: Mapping[str, str]) -> Tuple[str, Optional[str]]:
    """(the variable that supplied the value, the value); an empty value counts as unset, as in nnU-Net."""
    if name not in VARIABLES:
        raise KeyError(f"{name!r} is not one of nnunetv2_ohem's environment variables ({', '.join(VARIABLES)})")
    value = environ.get(name)
    if value not in (None, ""):
        return name, value
    for old in VARIABLES[name]:
        value = environ.get(old)
        if value not in (None, ""):
            if old not in _WARNED:
                _WARNED.add(old)
                print(f"nnunetv2_ohem: environment variable {old} is deprecated, use {name}", file=sys.stderr)
            return old, value
    return name, None


def get_str(name: str, default: Optional[str] = None, environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The value of ``name`` (or of a deprecated alias), ``default`` when unset or empty."""
    _, value = _lookup(name, environ)
    return default if value is None else value


def get_int(name: str, default: Optional[int] = None, positive: bool = False,
            environ: Mapping[str, str] = os.environ) -> Optional[int]:
    """``name`` as an integer (``default`` when unset); ValueError naming the variable when it is not one,
    or, with ``positive``, when it is below 1."""
    source, value = _lookup(name, environ)
    if value is None:
        return default
    kind = "a positive integer" if positive else "an integer"
    try:
        parsed = int(value)
    except ValueError:
        raise ValueError(f"environment variable {source}={value!r} must be {kind}") from None
    if positive and parsed < 1:
        raise ValueError(f"environment variable {source}={value!r} must be {kind}")
    return parsed


def get_float(name: str, default: Optional[float] = None,
              environ: Mapping[str, str] = os.environ) -> Optional[float]:
    """``name`` as a float (``default`` when unset); ValueError naming the variable when it is not a number."""
    source, value = _lookup(name, environ)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"environment variable {source}={value!r} is not a number") from None


def unset(name: str, environ: MutableMapping[str, str]) -> None:
    """Remove ``name`` and its deprecated aliases from ``environ``: a child process given a copy of the parent's
    environment must not fall back to a stale old name the parent happened to have set."""
    for key in (name,) + VARIABLES[name]:
        environ.pop(key, None)


def set_value(name: str, value, environ: MutableMapping[str, str]) -> None:
    """Set ``name`` in ``environ`` (a subprocess environment), dropping its deprecated aliases."""
    unset(name, environ)
    environ[name] = str(value)
