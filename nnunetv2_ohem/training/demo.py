"""Demo-length trainers: the compared methods with one shared, short training budget.

``nnunetv2_ohem_demo`` trains ``<method>_Demo`` through stock ``nnUNetv2_train``. Every variant has the same
default schedule (:data:`DEMO_EPOCHS` x :data:`DEMO_ITERATIONS`), so the methods get the same number of
optimiser steps on the same number of patches. The demo CLI's ``--epochs`` / ``--iterations`` reach the
trainer in the ``nnUNetv2_train`` subprocess through the ``nnUNet_ohem_demo_*`` environment variables
(:mod:`nnunetv2_ohem.envvars`; nnU-Net has no command-line switch for the schedule); outside the demo they
are unset and the defaults apply. One variant per method of :data:`nnunetv2_ohem.demo.methods.METHODS`.

The variants skip nnU-Net's final validation (sliding-window prediction of the validation fold, with
mirroring TTA): the demo scores held-out cases with ``nnUNetv2_predict`` instead, and on a 2-core CPU the
validation fold would cost more than the training itself. Per-epoch pseudo Dice is still computed.
"""

import importlib

import torch

from nnunetv2_ohem import envvars
from nnunetv2_ohem.demo.methods import DEMO_EPOCHS, DEMO_ITERATIONS, DEMO_VAL_ITERATIONS, METHODS
from nnunetv2_ohem.runtime import apply_cpu_threads, seed_everything
from nnunetv2_ohem.training.common import with_training_length

#: nnU-Net redraws its 30 x 54 inch progress.png after every epoch (~0.7 s on a 2-core CPU, as long as the
#: epoch itself at the demo's size); the demo trainers redraw it every this many epochs and after the last
PLOT_EVERY = 10
ENV_EPOCHS = envvars.DEMO_EPOCHS
ENV_ITERATIONS = envvars.DEMO_ITERATIONS
ENV_VAL_ITERATIONS = envvars.DEMO_VAL_ITERATIONS
#: training seed (the study's repetitions): seeds Python's, NumPy's and torch's global generators when the
#: trainer is built, i.e. before nnU-Net creates the network (initial weights) and its data loaders (case and
#: patch choice, foreground oversampling, augmentation; with nnUNet_n_proc_DA=0 these all draw from the global
#: NumPy/torch generators). Unset: nnU-Net's usual unseeded behaviour.
ENV_SEED = envvars.DEMO_SEED


def throttle_progress_plot(trainer, every: int) -> None:
    """Make nnU-Net's per-epoch ``logger.plot_progress_png`` draw only every ``every`` epochs and after the
    last one (the plot shows the whole history, so nothing is lost)."""
    draw = trainer.logger.plot_progress_png

    def plot_progress_png(output_folder: str) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % every == 0 or epoch >= trainer.num_epochs - 1:
            draw(output_folder)
    trainer.logger.plot_progress_png = plot_progress_png


def _demo_variant(base, name: str):
    cls = with_training_length(base, name, DEMO_EPOCHS, DEMO_ITERATIONS, DEMO_VAL_ITERATIONS)
    fixed_init = cls.__init__

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        fixed_init(self, plans, configuration, fold, dataset_json, device)
        threads = apply_cpu_threads(device)
        if threads is not None:
            self.print_to_log_file(f"Demo trainer: {threads} torch thread(s) ({envvars.CPU_THREADS})")
        self.num_epochs = envvars.get_int(ENV_EPOCHS, self.num_epochs, positive=True)
        self.num_iterations_per_epoch = envvars.get_int(ENV_ITERATIONS, self.num_iterations_per_epoch,
                                                        positive=True)
        self.num_val_iterations_per_epoch = envvars.get_int(ENV_VAL_ITERATIONS, self.num_val_iterations_per_epoch,
                                                            positive=True)
        throttle_progress_plot(self, PLOT_EVERY)
        seed = envvars.get_int(ENV_SEED)
        if seed is not None:
            seed_everything(seed)
            self.print_to_log_file(f"Demo trainer: {ENV_SEED}={seed}")

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("Demo trainer: final validation skipped (the demo predicts held-out cases with "
                               "nnU-Net's predictor)")

    cls.__init__ = __init__
    cls.perform_actual_validation = perform_actual_validation
    cls.__module__ = __name__
    return cls


# nnU-Net finds trainers by scanning module attributes for the class name: each variant is a module global
for _method in METHODS.values():
    globals()[_method.trainer] = _demo_variant(getattr(importlib.import_module(_method.module), _method.name),
                                               _method.trainer)
del _method
