"""TRADES' KL attack objective is flat at the clean input: attacks without a random start begin
at x + 0.001 N(0, 1) (the reference code's start), and the KL grows from there.

At x itself the KL's input gradient is 0 up to rounding: a sign step then follows rounding
noise, and where the prediction is confident the gradient rounds to exactly 0 and the sample
never moves. The model here is confident on part of the batch, so both show."""
import pytest
import torch
import torch.nn.functional as F

from dat_ds import attacks


def tiny_model(scale: float = 50.0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    with torch.no_grad():
        model[1].weight.mul_(scale)              # confident predictions
    return model


def kl(model, x, x_adv) -> torch.Tensor:
    """Per sample KL(p(x) || p(x_adv))."""
    with torch.no_grad():
        return F.kl_div(F.log_softmax(model(x_adv), 1), F.log_softmax(model(x), 1), reduction="none",
                        log_target=True).sum(1)


def batch():
    gen = torch.Generator().manual_seed(1)
    return 0.2 + 0.6 * torch.rand(64, 1, 8, 8, generator=gen), torch.randint(0, 5, (64,), generator=gen)


def exact_zero_gradient_at_x(model, x) -> torch.Tensor:
    """Samples whose KL input gradient at x itself rounds to exactly 0."""
    loss = attacks.ATTACK_LOSSES["kl"](model, x)
    d = torch.zeros_like(x, requires_grad=True)
    (g,) = torch.autograd.grad(loss(model(x + d), None), d)
    return g.flatten(1).abs().sum(1) == 0


@pytest.mark.parametrize("name, eps", [("pgd", 0.1), ("pgd_l2", 1.0)])
def test_kl_attack_without_random_start_moves_every_sample_and_ascends(name, eps):
    model, (x, y) = tiny_model(), batch()
    assert exact_zero_gradient_at_x(model, x).any()      # these would stay at x
    attack = attacks.create(name, eps=eps, steps=3, random_start=False, loss="kl")
    torch.manual_seed(3)
    x_adv = attack.perturb(model, x, y)
    torch.manual_seed(3)
    start = x + 0.001 * torch.randn(x.shape)             # where it began
    moved = (x_adv - x).flatten(1).norm(dim=1)
    assert (moved > 0.1 * eps).all(), "every sample took its steps, none stayed at its start"
    assert (kl(model, x, x_adv) > kl(model, x, start)).all()
    if name == "pgd":
        assert (x_adv - x).abs().max() <= eps + 1e-6
    else:
        assert moved.max() <= eps + 1e-5


def test_cross_entropy_attacks_still_start_at_x():
    model, (x, y) = tiny_model(1.0), batch()
    attack = attacks.create("pgd", eps=0.1, steps=1, random_start=False)
    torch.manual_seed(3)
    first = attack.perturb(model, x, y)
    expected = (x + 0.1 * 2.5 * torch.autograd.grad(F.cross_entropy(model(x.requires_grad_()), y, reduction="sum"),
                                                     x)[0].sign()).clamp(x.detach() - 0.1, x.detach() + 0.1)
    torch.testing.assert_close(first, expected.clamp(0, 1).detach())
    assert attacks.create("free", eps=0.1).adversarial_input(x.detach()).equal(x.detach())


def test_free_with_trades_moves_its_perturbation():
    """Free-m carries d from 0: under the KL its first input gradient was 0, and so was d forever."""
    model, (x, y) = tiny_model(), batch()
    free = attacks.create("free", eps=0.1, loss="kl")
    x_adv = free.adversarial_input(x)
    assert 0 < (x_adv - x).abs().max() <= 0.01
    loss = attacks.trades.trades_loss(model(x), model(x_adv), y, beta=6.0)
    loss.backward()
    free.update(x, x_adv)
    assert (free.state_dict()["delta"].abs() > 0.09).float().mean() > 0.9   # one sign step of alpha = eps
