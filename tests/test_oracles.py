"""Free-m, ConAdv, the training objectives and the catastrophic-overfitting watch."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dat_ds import attacks, compress, objectives
from dat_ds.metrics import Timers
from dat_ds.models import create_model
from dat_ds.trainer import OverfitWatch, train_epoch


@pytest.fixture(scope="module")
def make_engine():
    from dat_ds import dist
    from dat_ds.engine import initialize
    dist.init()

    def build(backbone="test_resnet", lr=0.05):
        torch.manual_seed(0)
        model = create_model(backbone, 10, 1, 28, stem="native")
        cfg = {"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 0},
               "optimizer": {"type": "SGD", "params": {"lr": lr, "momentum": 0.0, "weight_decay": 0.0}}}
        return initialize(model, cfg, steps_per_epoch=10, epochs=1)
    return build


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


class Counter:
    def __init__(self, module):
        self.forward = self.backward = 0
        module.register_forward_hook(lambda *a: setattr(self, "forward", self.forward + 1))
        module.register_full_backward_hook(lambda *a: setattr(self, "backward", self.backward + 1))


def test_free_does_one_forward_and_backward_per_replay(make_engine):
    engine = make_engine()
    counter = Counter(engine.module.backbone)
    free = attacks.create("free", eps=0.1, steps=3)
    stats = train_epoch(engine, batches(2), free, compress.create("none"), Timers())
    assert stats["micro_steps"] == 6 and engine.global_steps == 6
    assert counter.forward == 6 and counter.backward == 6


def test_free_perturbation_carries_over_between_minibatches(make_engine):
    engine = make_engine()
    free = attacks.create("free", eps=0.1, steps=2)
    (x1, y1), (x2, y2) = batches(2, seed=1)
    train_epoch(engine, [(x1, y1)], free, compress.create("none"), Timers())
    carried = free.state_dict()["delta"].clone()
    assert carried.abs().max() > 0 and carried.abs().max() <= 0.1 + 1e-6
    seen = []
    handle = engine.module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    train_epoch(engine, [(x2, y2)], free, compress.create("none"), Timers())
    handle.remove()
    assert torch.allclose(seen[0], (x2 + carried).clamp(0, 1))
    assert not torch.allclose(seen[1], seen[0])  # the replay moved the perturbation


def test_free_as_evaluation_attack_is_m_sign_steps():
    model = create_model("test_resnet", 10, 1, 28, stem="native").eval()
    x, y = batches(1)[0]
    a = attacks.create("free", eps=0.1, steps=3).perturb(model, x, y)
    b = attacks.create("pgd", eps=0.1, alpha=0.1, steps=3, random_start=False).perturb(model, x, y)
    assert torch.equal(a, b)


@pytest.mark.parametrize("tau", [1, 2])
def test_conadv_attacks_with_the_weights_of_step_t_minus_tau(make_engine, tau):
    engine = make_engine()
    attack = attacks.create("conadv", eps=0.1, steps=2, tau=tau, random_start=False)
    states, adv = [], []

    class Recording(objectives.Madry):
        def loss(self, engine, x, x_adv, y):
            states.append(copy.deepcopy(engine.module.state_dict()))
            adv.append(x_adv.clone())
            return super().loss(engine, x, x_adv, y)

    data = batches(5, seed=2)
    train_epoch(engine, data, attack, compress.create("none"), Timers(), objective=Recording())
    assert len(adv) == 5
    reference = copy.deepcopy(engine.module)
    for t, (x, y) in enumerate(data):
        reference.load_state_dict(states[max(t - tau, 0)])
        expected = attacks.create("pgd", eps=0.1, alpha=attack.alpha, steps=2, random_start=False).perturb(
            reference, x, y)
        assert torch.equal(adv[t], expected), f"step {t}"
        if t >= tau:  # and not the fresh weights
            reference.load_state_dict(states[t])
            fresh = attacks.create("pgd", eps=0.1, alpha=attack.alpha, steps=2, random_start=False).perturb(
                reference, x, y)
            assert not torch.equal(adv[t], fresh)


def test_trades_loss_matches_hand_computation():
    logits_clean = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    logits_adv = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([0, 1])
    beta = 2.0
    # sample 1: CE = log(1 + e^-2); p = (e^2, 1) / (e^2 + 1), q = (1/2, 1/2)
    p1 = [math.e ** 2 / (math.e ** 2 + 1), 1 / (math.e ** 2 + 1)]
    ce1, kl1 = math.log(1 + math.e ** -2), sum(p * math.log(p / 0.5) for p in p1)
    # sample 2: CE = log(1 + e^-1); p = (1, e) / (1 + e), q = (1/2, 1/2)
    p2 = [1 / (1 + math.e), math.e / (1 + math.e)]
    ce2, kl2 = math.log(1 + math.e ** -1), sum(p * math.log(p / 0.5) for p in p2)
    expected = (ce1 + ce2) / 2 + beta * (kl1 + kl2) / 2
    assert objectives.trades_loss(logits_clean, logits_adv, y, beta).item() == pytest.approx(expected, rel=1e-6)


def test_trades_attack_ascends_the_kl():
    torch.manual_seed(0)
    model = create_model("test_resnet", 10, 1, 28, stem="native").eval()
    x, y = batches(1)[0]
    trades = objectives.create("trades", beta=6.0)
    attack = attacks.create("pgd", eps=0.1, steps=5, loss=trades.attack_loss)
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        kl = lambda xa: F.kl_div(F.log_softmax(model(xa), 1), p, reduction="batchmean").item()
        noise = (x + torch.empty_like(x).uniform_(-0.1, 0.1)).clamp(0, 1)
    assert kl(attack.perturb(model, x, y)) > 5 * kl(noise)


def test_mix_objective_and_bad_settings():
    logits = torch.tensor([[1.0, 0.0]])

    class FakeEngine:
        def __call__(self, x):
            return logits * x.mean()
    x, x_adv, y = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0), torch.tensor([1])
    mix = objectives.create("mix", lam=3.0)
    expected = (F.cross_entropy(logits, y) + 3 * F.cross_entropy(2 * logits, y)) / 4
    assert mix(FakeEngine(), x, x_adv, y).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="--lam must be >= 0"):
        objectives.create("mix", lam=-1)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        objectives.create("hinge")


def test_overfit_watch_flags_collapse_and_keeps_the_best():
    watch = OverfitWatch(co_drop=0.2)
    history = [(0.30, 0.35), (0.42, 0.45), (0.40, 0.47), (0.15, 0.80), (0.10, 0.85)]
    flags = [watch.observe(e, pgd, fgsm) for e, (pgd, fgsm) in enumerate(history)]
    assert [f["holdout_best"] for f in flags] == [True, True, False, False, False]
    assert [f["catastrophic_overfitting"] for f in flags] == [False, False, False, True, True]
    assert watch.best_epoch == 1 and watch.best == 0.42
    # a drop without FGSM accuracy rising is ordinary overfitting, not the catastrophic kind
    calm = OverfitWatch(co_drop=0.2)
    calm.observe(0, 0.5, 0.6)
    assert not calm.observe(1, 0.2, 0.3)["catastrophic_overfitting"]


def test_conadv_and_free_settings_are_checked():
    with pytest.raises(ValueError, match="tau must be >= 1"):
        attacks.create("conadv", eps=0.1, tau=0)
    with pytest.raises(ValueError, match="replays m"):
        attacks.create("free", eps=0.1, steps=0)


def test_label_smoothing_of_the_ce_objectives():
    from dat_ds import cli
    logits, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])

    class FakeEngine:
        def __call__(self, x):
            return logits * x.mean()
    x, x_adv = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)
    # targets (1 - s + s/C, s/C, s/C): the smoothed CE by hand, on the adversarial logits
    s = 0.3
    log_p = F.log_softmax(2 * logits, 1)[0]
    by_hand = -((1 - s + s / 3) * log_p[0] + s / 3 * log_p[1] + s / 3 * log_p[2])
    madry = objectives.create("madry", label_smoothing=s)
    assert madry(FakeEngine(), x, x_adv, y).item() == pytest.approx(by_hand.item())
    assert objectives.create("madry")(FakeEngine(), x, x_adv, y).item() == pytest.approx(-log_p[0].item())
    mix = objectives.create("mix", lam=1.0, label_smoothing=s)
    clean = F.cross_entropy(logits, y, label_smoothing=s)
    assert mix(FakeEngine(), x, x_adv, y).item() == pytest.approx(((clean + by_hand) / 2).item())
    with pytest.raises(ValueError, match=r"--label-smoothing must be in \[0, 1\)"):
        objectives.create("madry", label_smoothing=1.0)
    # the flag reaches the chosen loss, and a loss that does not take it refuses it
    args = cli.parser("t").parse_args(["--backbone", "test_resnet", "--label-smoothing", "0.1"])
    assert cli.train_config(args).loss_kwargs == {"label_smoothing": 0.1}
    args = cli.parser("t").parse_args(["--backbone", "test_resnet", "--loss", "trades", "--label-smoothing", "0.1"])
    with pytest.raises(ValueError, match="label-smoothing"):
        cli.train_config(args)


def test_views_put_each_image_in_its_minibatch_m_times_each_from_its_own_random_start(make_engine):
    engine = make_engine()
    seen = []

    class Recording(objectives.Madry):
        def loss(self, engine, x, x_adv, y):
            seen.append((x.clone(), x_adv.clone(), y.clone()))
            return super().loss(engine, x, x_adv, y)

    data = batches(2, seed=3)
    pgd = attacks.create("pgd", eps=0.1, steps=1)
    stats = train_epoch(engine, data, pgd, compress.create("none"), Timers(), objective=Recording(), views=3)
    assert stats["micro_steps"] == 2 and engine.global_steps == 2  # one update per minibatch, as without views
    for (x0, y0), (x, x_adv, y) in zip(data, seen):
        assert len(x) == 48 and torch.equal(y, y0.repeat(3))
        for v in range(3):
            assert torch.equal(x[16 * v:16 * (v + 1)], x0)
        assert (x_adv - x).abs().max() <= 0.1 + 1e-6
        for a, b in ((0, 1), (0, 2), (1, 2)):  # three different adversarial examples of every image
            diff = (x_adv[16 * a:16 * (a + 1)] - x_adv[16 * b:16 * (b + 1)]).flatten(1).abs().amax(1)
            assert (diff > 0).all()


def test_views_keep_the_batch_memory_format():
    from dat_ds.trainer.loop import repeated
    x = torch.rand(4, 3, 8, 8).to(memory_format=torch.channels_last)
    (xs, ys), = repeated(iter([(x, torch.arange(4))]), 2)
    assert xs.is_contiguous(memory_format=torch.channels_last) and torch.equal(xs[4:], x)
    assert torch.equal(ys, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))


def test_views_need_a_random_start():
    from dat_ds import cli

    def config(*flags):
        return cli.train_config(cli.parser("t").parse_args(["--backbone", "test_resnet", *flags]))
    assert config("--views", "2").views == 2
    assert config("--views", "2", "--loss", "trades", "--no-random-start").views == 2  # TRADES' x + 0.001 N(0, 1)
    for flags, message in ((("--views", "0"), "--views must be >= 1"),
                           (("--views", "2", "--no-random-start"), "needs an attack with a random start"),
                           (("--views", "2", "--attack", "free"), "needs an attack with a random start")):
        with pytest.raises(ValueError, match=message):
            config(*flags).validate()


def test_the_large_batch_recipe_smooths_labels_by_default_and_a_loss_without_the_setting_is_untouched():
    from conftest import recipe_module
    from dat_ds import cli
    parser = recipe_module("recipes/imagenet_dat.py").parser()

    def config(*flags):
        return cli.train_config(parser.parse_args(["--backbone", "test_resnet", *flags]))
    assert config().loss_kwargs == {"label_smoothing": 0.1}
    assert config("--label-smoothing", "0").loss_kwargs == {"label_smoothing": 0.0}
    assert config("--loss", "trades").loss_kwargs == {}  # the recipe's default, not a flag the user gave
    with pytest.raises(ValueError, match="label-smoothing"):
        config("--loss", "trades", "--label-smoothing", "0.1")
