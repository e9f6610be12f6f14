"""Schedule and seed wrappers that let ``nnunetv2_ohem_compare`` train ANY nnU-Net trainer with stock
``nnUNetv2_train``.

nnU-Net has no command-line switch for the number of epochs or a training seed. For every trainer ``T``
(ours, nnU-Net's, or a user's in ``nnUNet_extTrainer``) the module in ``_ext/`` makes ``T_Compare`` available
to nnU-Net's by-name trainer lookup: a subclass of ``T`` that, when the environment variables below are set,
trains for that many epochs / iterations (on a CPU with ``nnUNet_ohem_cpu_threads`` torch threads) and seeds
Python's, NumPy's and torch's global generators before nnU-Net builds the network and its data loaders.
Unset, it behaves exactly like ``T``. ``nnUNetv2_predict`` finds the same class by the checkpoint's trainer
name, so predicting needs ``nnUNet_extTrainer`` to include :data:`EXT_FOLDER` (the commands printed by
``nnunetv2_ohem_compare`` set it).
"""
import os
import threading
from typing import Dict, List, Optional

from nnunetv2_ohem import envvars

SUFFIX = "_Compare"
EXT_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext")
ENV_EPOCHS = envvars.COMPARE_EPOCHS
ENV_ITERATIONS = envvars.COMPARE_ITERATIONS
ENV_VAL_ITERATIONS = envvars.COMPARE_VAL_ITERATIONS
ENV_SEED = envvars.COMPARE_SEED

_CACHE: Dict[str, type] = {}
_LOCK = threading.Lock()


def wrapped_name(trainer: str) -> str:
    """The class name ``nnUNetv2_train -tr`` is given for ``trainer``."""
    return trainer + SUFFIX


def trainer_search_folders(environ=os.environ) -> List[str]:
    """nnU-Net's trainer folders in its own search order, without our wrapper folder: the built-in
    ``nnunetv2/training/nnUNetTrainer`` first, then each existing folder of ``nnUNet_extTrainer``."""
    import nnunetv2
    folders = [os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer")]
    for p in environ.get("nnUNet_extTrainer", "").split(os.pathsep):
        if p.strip() and os.path.isdir(p) and os.path.abspath(p) != EXT_FOLDER:
            folders.append(p)
    return folders


def find_trainer_class(name: str, environ=os.environ) -> Optional[type]:
    """The nnU-Net trainer class called ``name`` as ``nnUNetv2_train`` would find it (its own folder, then
    ``nnUNet_extTrainer``), or None. Uses nnU-Net's ``recursive_find_python_class``, without its printing."""
    import contextlib
    import io

    import nnunetv2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    folders = trainer_search_folders(environ)
    found = None
    with contextlib.redirect_stdout(io.StringIO()):
        for i, folder in enumerate(folders):
            if i == 0:
                found = recursive_find_python_class(folder, name, "nnunetv2.training.nnUNetTrainer",
                                                    nnunetv2.__path__[0])
            else:
                found = recursive_find_python_class(folder, name, None, base_folder=folder,
                                                    cleanup_imports_from_base_folder=True)
            if found is not None:
                break
    if found is None or not (isinstance(found, type) and issubclass(found, nnUNetTrainer)):
        return None
    return found


def make_compare_trainer(name: str) -> type:
    """``T_Compare`` for ``name = T + '_Compare'`` (cached); AttributeError when ``T`` is not a trainer."""
    if name in _CACHE:
        return _CACHE[name]
    if not name.endswith(SUFFIX) or len(name) == len(SUFFIX):
        raise AttributeError(name)
    with _LOCK:  # nnU-Net's lookup walks sys.modules: one thread at a time
        if name not in _CACHE:
            _CACHE[name] = _make(name)
    return _CACHE[name]


def _make(name: str) -> type:
    base = find_trainer_class(name[:-len(SUFFIX)])
    if base is None:
        raise AttributeError(name)
    import torch

    from nnunetv2_ohem.runtime import apply_cpu_threads, seed_everything

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        threads = apply_cpu_threads(device)
        seed = envvars.get_int(ENV_SEED)
        if seed is not None:  # before the base class builds anything random
            seed_everything(seed)
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        for env, attr in ((ENV_EPOCHS, "num_epochs"), (ENV_ITERATIONS, "num_iterations_per_epoch"),
                          (ENV_VAL_ITERATIONS, "num_val_iterations_per_epoch")):
            v = envvars.get_int(env, positive=True)
            if v is not None:
                setattr(self, attr, v)
        self.print_to_log_file(f"nnunetv2_ohem_compare: {base.__name__} with {self.num_epochs} epochs x "
                               f"{self.num_iterations_per_epoch} iterations, seed {'unset' if seed is None else seed}"
                               + ("" if threads is None else f", {threads} torch thread(s) on the CPU"))

    cls = type(name, (base,), {"__init__": __init__, "__module__": "nnunetv2_ohem_compare_trainers",
                               "__doc__": f"{base.__name__} with the schedule and seed set by "
                                          f"nnunetv2_ohem_compare (environment variables)."})
    return cls
