"""Shim that nnU-Net's external-trainer search imports (see ``nnunetv2_ohem/_discovery.py``).

nnU-Net imports every module of an ``nnUNet_extTrainer`` folder as a top-level module, which breaks
relative imports; so this folder holds only this uniquely named module, which re-exports every
``nnUNetTrainer*`` class defined in ``nnunetv2_ohem.training``'s submodules. A new trainer module there
is picked up without editing this file.
"""
import importlib
import pkgutil

import nnunetv2_ohem.training as _training

for _info in pkgutil.iter_modules(_training.__path__):
    _module = importlib.import_module(f"{_training.__name__}.{_info.name}")
    for _name, _obj in vars(_module).items():
        if _name.startswith("nnUNetTrainer") and isinstance(_obj, type):
            globals()[_name] = _obj
