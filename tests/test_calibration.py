"""calibrate_weight: the distillation weight whose gradient on the features matches the task's."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from freekd.calibration import calibrate_weight, gradient_norm


def test_weight_equalises_the_gradient_norms_on_a_constructed_case():
    torch.manual_seed(0)
    feature = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randn(2, 3, 4, 4)
    task = (feature * 5.0).sum()  # gradient 5 everywhere: norm 5 * sqrt(96)
    distill = 0.5 * (feature - target).pow(2).sum()  # gradient feature - target
    expected = 5.0 * math.sqrt(feature.numel()) / float((feature - target).norm())
    mu = calibrate_weight(task, distill, [feature])
    assert mu == pytest.approx(expected, rel=1e-6)
    # the defining property: with mu, both gradients have the same norm
    assert gradient_norm(mu * distill, [feature]) == pytest.approx(
        gradient_norm(task, [feature]), rel=1e-6
    )


def test_several_batches_use_the_ratio_of_the_mean_norms():
    a = torch.ones(4, requires_grad=True)
    b = torch.ones(4, requires_grad=True)
    # batch 1: task gradient norm 2 * 2 = 4, distill 1 * 2 = 2; batch 2: task 2, distill 6
    tasks = [(2 * a).sum(), (1 * b).sum()]
    distills = [(1 * a).sum(), (3 * b).sum()]
    assert calibrate_weight(tasks, distills, [[a], [b]]) == pytest.approx((4 + 2) / (2 + 6))


def test_features_the_loss_does_not_reach_count_as_zero_and_the_sum_is_over_all():
    used = torch.ones(3, requires_grad=True)
    unused = torch.ones(5, requires_grad=True)
    task = (4 * used).sum() + (3 * unused).sum()  # norm sqrt(16 * 3 + 9 * 5)
    distill = (2 * used).sum()  # norm sqrt(4 * 3); `unused` gets no gradient
    expected = math.sqrt(16 * 3 + 9 * 5) / math.sqrt(4 * 3)
    assert calibrate_weight(task, distill, [used, unused]) == pytest.approx(expected)


def test_zero_distillation_gradient_is_refused_with_the_reason():
    feature = torch.ones(3, requires_grad=True)
    task = feature.sum()
    distill = (feature - feature.detach()).pow(2).sum()  # student equals teacher: zero gradient
    with pytest.raises(ValueError, match="calibrate at initialization"):
        calibrate_weight(task, distill, [feature])


def test_detached_loss_and_mismatched_lists_are_refused():
    feature = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="does not depend on anything"):
        calibrate_weight(feature.sum(), feature.sum().detach(), [feature])
    with pytest.raises(ValueError, match="one feature list per batch"):
        calibrate_weight([feature.sum()], [feature.sum(), feature.sum()], [[feature]])


def _pair():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Conv2d(6, 2, 1))
    student = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.Dropout(0.5),
        torch.nn.Conv2d(4, 2, 1),
    )
    return teacher, student


def _task(model, batch):
    return model(batch).square().mean()


def test_distiller_calibrate_matches_a_hand_computed_weight_and_changes_nothing():
    from freekd import Distiller, FeatureMSE

    teacher, student = _pair()
    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    distiller = Distiller(
        teacher, student, ["0"], ["1"], {"mse": FeatureMSE()}, _task, example_batch=batches[0]
    )
    before = {k: v.clone() for k, v in distiller.state_dict().items()}
    torch.manual_seed(5)
    mu = distiller.calibrate(batches)["mse"]
    after_rng = torch.rand(3)

    # the same weight by hand: student features (the BatchNorm output, before the 4 -> 6
    # projection), dropout masks drawn from the same stream, task and MSE gradient norms summed
    torch.manual_seed(5)
    reference = copy.deepcopy(distiller)
    task_norm = distill_norm = 0.0
    captured: list[torch.Tensor] = []
    hook = reference.student[1].register_forward_hook(lambda m, i, o: captured.append(o))
    for batch in batches:
        captured.clear()
        task = _task(reference.student, batch)
        target = reference.teacher[0](batch).detach()
        distill = (reference.projections[0](captured[0]) - target).square().mean()
        task_norm += gradient_norm(task, captured)
        distill_norm += gradient_norm(distill, captured)
    hook.remove()
    assert mu == pytest.approx(task_norm / distill_norm, rel=1e-5)

    # weights, BatchNorm statistics and the random stream are as before the call
    state = distiller.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after_rng)
    assert distiller.student.training and not distiller.teacher.training
    with pytest.raises(ValueError, match="at least one batch"):
        distiller.calibrate([])
