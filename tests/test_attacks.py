import pytest
import torch

from dat_ds import attacks

EPS = 0.1
L2_EPS = 1.5  # a comparable L2 radius for 28x28 images
GRADIENT_ATTACKS = [n for n in attacks.names() if attacks.ATTACKS.get(n).uses_gradients]


def eps_for(name):
    return L2_EPS if attacks.ATTACKS.get(name).norm == "l2" else EPS


def make(name, **kw):
    kw.setdefault("eps", eps_for(name))
    return attacks.create(name, **kw)


def distance(name, d):
    if attacks.ATTACKS.get(name).norm == "l2":
        return d.flatten(1).norm(dim=1).max()
    return d.abs().max()


@pytest.mark.parametrize("name", attacks.names())
def test_every_attack_stays_in_ball_and_box(name, trained_model, test_batch):
    x, y = test_batch
    x_adv = make(name).perturb(trained_model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert distance(name, x_adv - x) <= eps_for(name) + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad


def same_size_noise(name, x):
    """Random noise as large as the threat model allows: Linf corners, or an L2 sphere point."""
    if attacks.ATTACKS.get(name).norm == "l2":
        d = torch.randn_like(x)
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * L2_EPS
    else:
        d = torch.randint_like(x, 0, 2) * 2 * EPS - EPS
    return (x + d).clamp(0, 1)


@pytest.mark.parametrize("name", GRADIENT_ATTACKS)
def test_every_attack_beats_random_noise_of_the_same_size(name, trained_model, test_batch):
    x, y = test_batch
    torch.manual_seed(0)
    noisy = accuracy(trained_model, same_size_noise(name, x), y)
    attacked = accuracy(trained_model, make(name).perturb(trained_model, x, y), y)
    assert attacked < noisy - 0.1, (attacked, noisy)


@pytest.mark.parametrize("name", attacks.names())
def test_every_attack_is_deterministic_under_a_seed(name, trained_model, test_batch):
    x, y = test_batch
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(make(name).perturb(trained_model, x, y))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name", GRADIENT_ATTACKS)
def test_attack_leaves_model_untouched(name, trained_model, test_batch):
    x, y = test_batch
    model = trained_model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make(name).perturb(model, x, y)
    assert model.training, "training mode must be restored"
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters()), "attacks take input gradients only"
    for k, v in model.state_dict().items():  # BN running stats too (bn_mode=eval)
        assert torch.equal(v, before[k]), k
    model.eval()


def test_zero_eps_is_identity(trained_model, test_batch):
    x, y = test_batch
    assert torch.equal(make("pgd", eps=0.0).perturb(trained_model, x, y), x)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_strength_order_pgd_fgsm_noise_clean(trained_model, test_batch):
    """On a trained model: PGD hurts more than FGSM-RS, which hurts more than noise of the same size."""
    x, y = test_batch
    torch.manual_seed(0)
    acc = {"clean": accuracy(trained_model, x, y)}
    for name in ("noise", "fgsm_rs", "pgd"):
        acc[name] = accuracy(trained_model, make(name).perturb(trained_model, x, y), y)
    assert acc["clean"] > 0.7, acc
    assert acc["pgd"] < acc["fgsm_rs"] < acc["noise"] <= acc["clean"] + 0.02, acc
    assert acc["noise"] - acc["pgd"] > 0.2, acc


@pytest.mark.parametrize("name", ["pgd", "pgd_l2"])
def test_more_pgd_steps_are_at_least_as_strong(name, trained_model, test_batch):
    x, y = test_batch
    accs = []
    for steps in (1, 3, 10):
        torch.manual_seed(0)
        attack = make(name, steps=steps, alpha=2.5 * eps_for(name) / steps)
        accs.append(accuracy(trained_model, attack.perturb(trained_model, x, y), y))
    assert accs[2] <= accs[1] + 0.01 and accs[1] <= accs[0] + 0.01, accs


def test_pgd_without_random_start_starts_from_x(trained_model, test_batch):
    x, y = test_batch
    a = make("pgd", steps=2, random_start=False).perturb(trained_model, x, y)
    b = make("pgd", steps=2, random_start=False).perturb(trained_model, x, y)
    assert torch.equal(a, b)


def test_fgsm_rs_defaults_follow_wong():
    a = make("fgsm_rs")
    assert a.steps == 1 and a.alpha == pytest.approx(1.25 * EPS)


@pytest.mark.parametrize("kw, match", [
    ({"eps": -0.1}, "eps must be >= 0"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"alpha": -1.0}, "alpha must be > 0"),
    ({"bn_mode": "frozen"}, "bn_mode must be one of"),
    ({"gamma": 1}, "has no setting"),
])
def test_bad_settings_raise_value_error(kw, match):
    kw.setdefault("eps", EPS)
    with pytest.raises(ValueError, match=match):
        attacks.create("pgd", **kw)


def test_unknown_attack_names_the_choices():
    with pytest.raises(ValueError, match="unknown attack 'cw'.*pgd"):
        attacks.create("cw", eps=0.1)


def test_bn_mode_train_uses_batch_statistics(trained_model, test_batch):
    x, y = test_batch
    torch.manual_seed(0)
    a = make("pgd", steps=3, bn_mode="eval").perturb(trained_model, x, y)
    torch.manual_seed(0)
    b = make("pgd", steps=3, bn_mode="train").perturb(trained_model, x, y)
    assert not torch.equal(a, b)
