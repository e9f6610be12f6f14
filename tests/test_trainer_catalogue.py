"""The trainer catalogue: every trainer we define (and each stock baseline the docs recommend) has a
``<name>_Debug`` sibling with the short smoke-run schedule, as the README promises; the one trainer with an
optional dependency fails with a one-line message naming the extra."""
import importlib
import pkgutil
import sys

import pytest

import nnunetv2_ohem.training as training

# schedule variants, not trainers of their own
VARIANT_SUFFIXES = ("_Debug", "_Demo")
# stock nnU-Net trainers the README and docs/walkthrough.md recommend as baselines
STOCK_BASELINES = ("nnUNetTrainer", "nnUNetTrainer_probabilisticOversampling")


def _catalogue():
    """name -> class of every ``nnUNetTrainer*`` class bound at module level in ``nnunetv2_ohem.training``,
    the set the discovery shim re-exports to ``-tr``."""
    found = {}
    for info in pkgutil.iter_modules(training.__path__):
        module = importlib.import_module(f"{training.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if name.startswith("nnUNetTrainer") and isinstance(obj, type):
                found[name] = obj
    return found


def _is_ours(cls) -> bool:
    return cls.__module__.startswith("nnunetv2_ohem.")


def test_catalogue_is_not_empty():
    ours = [n for n, c in _catalogue().items() if _is_ours(c) and not n.endswith(VARIANT_SUFFIXES)]
    assert len(ours) > 50, ours  # OHEM, blob, precision/BTRSeg families, DeepLab
    assert {"nnUNetTrainerOHEMEMA", "nnUNetTrainerBlobLoss", "nnUNetTrainerBF16",
            "nnUNetTrainerDeepLabV3_OS8"} <= set(ours)


def test_every_trainer_has_a_debug_sibling():
    catalogue = _catalogue()
    wanted = sorted(n for n, c in catalogue.items() if _is_ours(c) and not n.endswith(VARIANT_SUFFIXES))
    wanted += list(STOCK_BASELINES)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.training.nnUNetTrainer.variants.sampling.nnUNetTrainer_probabilisticOversampling import \
        nnUNetTrainer_probabilisticOversampling
    STOCK = {"nnUNetTrainer": nnUNetTrainer,
             "nnUNetTrainer_probabilisticOversampling": nnUNetTrainer_probabilisticOversampling}
    missing, wrong = [], []
    for name in wanted:
        debug = catalogue.get(name + "_Debug")
        if debug is None:
            missing.append(name)
            continue
        base = STOCK[name] if name in STOCK_BASELINES else catalogue[name]
        if not issubclass(debug, base) or debug.__name__ != name + "_Debug" or \
                not (debug.__doc__ or "").startswith(f"{name} for 2 epochs x 5 iterations"):
            wrong.append(name)
    assert not missing, f"trainers without a _Debug variant: {missing}"
    assert not wrong, f"_Debug variants that are not the 2 x 5 schedule of their trainer: {wrong}"


def test_debug_siblings_are_found_by_nnunet_lookup():
    """The shim nnU-Net's ``-tr`` search imports re-exports them (no environment variable needed)."""
    from nnunetv2_ohem import _discovery
    sys.path.insert(0, _discovery.EXT_FOLDER)
    try:
        shim = importlib.import_module("nnunetv2_ohem_trainers")
    finally:
        sys.path.remove(_discovery.EXT_FOLDER)
    for name in ("nnUNetTrainerDeepLabV3_OS8_Debug", "nnUNetTrainer_probabilisticOversampling_Debug",
                 "nnUNetTrainer_Debug"):
        assert isinstance(getattr(shim, name, None), type), name


def test_valdo_trainer_without_ranger21_names_the_extra(monkeypatch):
    from nnunetv2_ohem.training.blob import nnUNetTrainerBlobLoss_VALDO

    monkeypatch.setitem(sys.modules, "ranger21", None)  # what an install without the extra looks like
    with pytest.raises(ImportError) as info:
        # the import is the first thing the optimizer setup does: no trainer state is needed to reach it
        nnUNetTrainerBlobLoss_VALDO.configure_optimizers(object())
    message = str(info.value)
    assert "\n" not in message
    assert "nnunetv2-ohem[valdo]" in message and "ranger21" in message
