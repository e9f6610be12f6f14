"""Shim that nnU-Net's external-trainer search imports (see ``nnunetv2_ohem/_discovery.py``).

nnU-Net imports every module of an ``nnUNet_extTrainer`` folder as a top-level module, which breaks
relative imports; so this folder holds only this uniquely named module, which re-exports every
``nnUNetTrainer*`` class defined in ``nnunetv2_ohem.training``'s submodules. A new trainer module there
is picked up without editing this file.

A module that fails to import (e.g. an optional dependency missing) is reported with a warning and
skipped, so one broken family of trainers does not hide all the others from ``-tr``.
"""
import importlib
import pkgutil
import warnings

import nnunetv2_ohem.training as _training

for _info in pkgutil.iter_modules(_training.__path__):
    try:
        _module = importlib.import_module(f"{_training.__name__}.{_info.name}")
    except Exception as _e:  # noqa: BLE001 - reported, not swallowed
        warnings.warn(f"nnunetv2_ohem: trainers in {_training.__name__}.{_info.name} are unavailable: "
                      f"{type(_e).__name__}: {_e}", RuntimeWarning)
        continue
    for _name, _obj in vars(_module).items():
        if _name.startswith("nnUNetTrainer") and isinstance(_obj, type):
            globals()[_name] = _obj
