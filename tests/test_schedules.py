"""The three per-epoch schedulers share one stepping protocol and follow their pure schedule functions."""
import pickle

import pytest
import torch

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2_ohem.training.deeplab import ConstantThenPolyLRScheduler, constant_then_poly_lr
from nnunetv2_ohem.training.ohem import StepFractionLRScheduler, step_fraction_lr
from nnunetv2_ohem.training.precision import ExponentialDecayLRScheduler, exponential_decay_lr
from nnunetv2_ohem.training.schedules import EpochFunctionLRScheduler

T = 20


def _optimizer(lr=1.0, groups=2):
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(groups)]
    return torch.optim.SGD(params, lr)


CASES = [
    (lambda opt: StepFractionLRScheduler(opt, 1e-3, T), lambda t: step_fraction_lr(t, T, 1e-3)),
    (lambda opt: ExponentialDecayLRScheduler(opt, 5e-4, 0.985), lambda t: exponential_decay_lr(5e-4, 0.985, t)),
    (lambda opt: ConstantThenPolyLRScheduler(opt, 2.5e-4, T, 12), lambda t: constant_then_poly_lr(t, T, 2.5e-4, 12)),
]


def test_step_fraction_reference_values():
    # plain reference: 1e-3, x0.1 from 50 % of training, x0.1 again from 80 %
    assert [step_fraction_lr(t, 10, 1e-3) for t in range(10)] == pytest.approx([1e-3] * 5 + [1e-4] * 3 + [1e-5] * 2)


@pytest.mark.parametrize("make, reference", CASES)
def test_lr_sequence_equals_schedule_function_and_get_last_lr_works(make, reference):
    opt = _optimizer()
    sched = make(opt)
    assert isinstance(sched, EpochFunctionLRScheduler)
    for epoch in range(T):  # nnU-Net's on_train_epoch_start: lr_scheduler.step(current_epoch)
        sched.step(epoch)
        assert [g["lr"] for g in opt.param_groups] == [reference(epoch)] * 2
        assert sched.get_last_lr() == [reference(epoch)] * 2


@pytest.mark.parametrize("make, reference", CASES)
def test_counter_stepping_matches_explicit_epochs(make, reference):
    opt = _optimizer()
    sched = make(opt)  # construction steps once (step 0), like PolyLRScheduler
    assert sched.get_last_lr() == [reference(0)] * 2
    seen = []
    for _ in range(T - 1):
        sched.step()
        seen.append(sched.get_last_lr()[0])
    assert seen == [reference(t) for t in range(1, T)]
    pickle.dumps(sched.state_dict())


def test_function_form_matches_nnunet_poly_scheduler():
    a, b = _optimizer(), _optimizer()
    ours = EpochFunctionLRScheduler(a, lambda t: 1e-2 * (1 - t / T) ** 0.9)
    theirs = PolyLRScheduler(b, 1e-2, T)
    for epoch in range(T):
        ours.step(epoch)
        theirs.step(epoch)
        assert ours.get_last_lr() == theirs.get_last_lr()
    assert "_lr_fn" not in ours.state_dict()
