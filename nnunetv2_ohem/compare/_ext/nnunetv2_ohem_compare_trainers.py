"""nnU-Net trainer lookup entry of ``nnunetv2_ohem_compare``: any ``<Trainer>_Compare`` name resolves to the
schedule/seed wrapper of ``<Trainer>`` (see ``nnunetv2_ohem.compare.trainers``). Only this uniquely named
module lives in this folder, because nnU-Net imports the folder's modules as top-level modules."""
from nnunetv2_ohem.compare.trainers import make_compare_trainer as _make


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    cls = _make(name)
    globals()[name] = cls
    return cls
