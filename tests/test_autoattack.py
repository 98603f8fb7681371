"""AutoAttack on models of any class count: the attacks that fit, what they find, what is recorded."""
import logging

import pytest
import torch

from dat_ds.evaluate import AUTOATTACK_VERSIONS, AutoAttackSpec


def linear(classes: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, classes)).eval()


def ran(caplog) -> list:
    return [r.getMessage().split()[-1] for r in caplog.records if r.getMessage().startswith("running ")]


@pytest.mark.parametrize("version", sorted(AUTOATTACK_VERSIONS))
def test_attack_sets_are_pyautoattacks(version):
    from pyautoattack import AutoAttack
    aa = AutoAttack(linear(10), version=version, eps=0.1)
    assert aa.attacks_to_run == list(AUTOATTACK_VERSIONS[version])
    assert AutoAttackSpec(0.1, version=version).plan(10)[0] == AUTOATTACK_VERSIONS[version]


def test_five_classes_run_the_standard_set_with_four_targets(caplog):
    """AutoAttack's 9 target classes made pyautoattack index past a 5-class output (IndexError)."""
    model, x = linear(5), torch.rand(4, 1, 4, 4)
    y = model(x).argmax(1)
    spec = AutoAttackSpec(1e-4)                   # tiny eps: every attack runs on every sample
    with caplog.at_level(logging.DEBUG, logger="auto-attack"):
        out = spec.correct(model, x, y, torch.ones(4, dtype=torch.bool), (0, 0))
    assert out.all()
    assert ran(caplog) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    record = spec.record(1.0)
    assert (record["num_classes"], record["attacks"], record["target_classes"]) == \
        (5, ["apgd-ce", "apgd-t", "fab-t", "square"], 4)


def test_two_classes_leave_out_the_dlr_attacks_and_find_the_exact_radius(caplog):
    """Two classes, a linear model: sample i is robust exactly when its margin over ||w_1 - w_0||_1
    exceeds eps (inputs kept off the box's faces), and the attacks that fit find every other one."""
    model = linear(2)
    w, b = model[1].weight.detach(), model[1].bias.detach()
    b.copy_(torch.tensor([0.0, -0.5 * float((w[1] - w[0]).sum())]))   # the boundary through the grey image
    x = 0.3 + 0.4 * torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    margin = (x.flatten(1) @ (w[1] - w[0]) + b[1] - b[0]).abs()
    radius = margin / (w[1] - w[0]).abs().sum()
    low, high = radius.sort().values[3:5]
    eps = float((low + high) / 2)
    assert eps < 0.3 and high - low > 1e-3
    y = model(x).argmax(1)
    spec = AutoAttackSpec(eps, num_classes=2)
    with caplog.at_level(logging.DEBUG, logger="auto-attack"):
        out = spec.correct(model, x, y, torch.ones(8, dtype=torch.bool), (0, 0))
    assert torch.equal(out, radius > eps) and out.sum() == 4
    assert ran(caplog) == ["apgd-ce", "fab-t", "square"]
    record = spec.record(0.5)
    assert (record["attacks"], record["target_classes"]) == (["apgd-ce", "fab-t", "square"], 1)


def test_three_classes_plus_keeps_untargeted_dlr_and_rand_drops_it_for_two():
    assert AutoAttackSpec(0.1, version="plus").plan(3) == (("apgd-ce", "apgd-dlr", "fab", "square", "fab-t"), 2)
    assert AutoAttackSpec(0.1, version="rand").plan(2) == (("apgd-ce",), None)
    assert AutoAttackSpec(0.1).plan(100) == (AUTOATTACK_VERSIONS["standard"], 9)


def test_class_count_is_checked():
    with pytest.raises(ValueError, match="at least 2 classes"):
        AutoAttackSpec(0.1, num_classes=1)
    with pytest.raises(ValueError, match="version must be one of"):
        AutoAttackSpec(0.1, version="fast")
    model, x = linear(5), torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="the model gives 5 logits, but num_classes is 3"):
        AutoAttackSpec(0.1, num_classes=3).correct(model, x, model(x).argmax(1), torch.ones(2, dtype=torch.bool),
                                                   (0, 0))
