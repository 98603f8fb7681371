"""Randomized smoothing: certification against closed forms (Cohen et al. 2019), the Smooth-AT
attack and objective, rank-independent Monte Carlo counts, and the two recipes."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import beta, binom, norm

from conftest import ROOT, recipe_module, refused_in_process, run_deepspeed, run_recipe
from dat_ds import attacks, objectives, smoothing
from dat_ds.smoothing import ABSTAIN

SIGMA = 0.25
SCRIPT = ROOT / "tests" / "scripts" / "smooth_ranks.py"


# --- Clopper-Pearson -----------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_clopper_pearson_lower_bound_is_the_beta_quantile(alpha):
    n = 200
    bounds = [smoothing.lower_confidence_bound(k, n, alpha) for k in range(n + 1)]
    assert bounds[0] == 0.0
    for k in (1, 50, 100, 199, 200):
        assert bounds[k] == pytest.approx(beta.ppf(alpha, k, n - k + 1), rel=1e-12)
    assert bounds[n] == pytest.approx(alpha ** (1 / n))  # all hits: p^n = alpha
    assert all(a < b for a, b in zip(bounds, bounds[1:])), "more hits, higher bound"
    assert all(b <= k / n for k, b in enumerate(bounds)), "a lower bound sits below the hit rate"
    assert smoothing.lower_confidence_bound(150, n, alpha / 10) < bounds[150], "more confidence, lower bound"
    assert smoothing.lower_confidence_bound(1500, 10 * n, alpha) > bounds[150], "more draws, tighter bound"


@pytest.mark.parametrize("n", [20, 100, 1000])
def test_clopper_pearson_bound_covers_the_true_proportion(n):
    """Exact coverage: P_p(bound(K) > p) <= alpha for K ~ Binomial(n, p), at every p."""
    alpha = 0.05
    bounds = np.array([smoothing.lower_confidence_bound(k, n, alpha) for k in range(n + 1)])
    ks = np.arange(n + 1)
    misses = [binom.pmf(ks, n, p)[bounds > p].sum() for p in np.linspace(0.005, 0.995, 199)]
    assert max(misses) <= alpha + 1e-12
    assert max(misses) > alpha / 2, "conservative, but not vacuous"


# --- a linear base classifier: the smoothed classifier in closed form ----------------------

class LinearBinary(nn.Module):
    """``f(x) = 1 if w.x + b > 0 else 0``: ``g = f``, ``pA = Phi(margin / sigma)``, robust radius = margin."""

    def __init__(self, seed=0, b=0.1):
        super().__init__()
        self.register_buffer("w", torch.randn(64, generator=torch.Generator().manual_seed(seed)))
        self.b = b

    def forward(self, x):
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(z), z], dim=1)

    def at_margin(self, signed_margin, seed=0):
        """An input at signed L2 distance ``signed_margin`` from the decision boundary."""
        x = torch.rand(64, generator=torch.Generator().manual_seed(seed))
        norm_w = self.w.norm()
        x = x + (signed_margin * norm_w - (x @ self.w + self.b)) / norm_w ** 2 * self.w
        return x.view(1, 8, 8)


@pytest.mark.parametrize("signed_margin", [0.3, -0.5, 0.12])
def test_linear_classifier_certificate_matches_closed_form(signed_margin):
    f, n = LinearBinary(), 100_000
    x, base = f.at_margin(signed_margin), int(signed_margin > 0)
    margin = abs(signed_margin)
    p_a = norm.cdf(margin / SIGMA)
    counts = smoothing.sample_counts(f, x, SIGMA, n, 10_000, seed=1)
    assert abs(counts[base].item() / n - p_a) < 5 * math.sqrt(p_a * (1 - p_a) / n)
    label, radius = smoothing.certify(f, x, SIGMA, 100, n, 0.001, 10_000, seed=2)
    assert label == base, "the smoothed prediction of a linear classifier is its own"
    assert radius <= margin, "no certificate beyond the true robust radius"
    assert radius >= margin - 0.02, "and at n = 100,000 only the Clopper-Pearson slack is lost"
    assert smoothing.predict(f, x, SIGMA, 1000, 0.001, 1000, seed=3) == base


def test_certified_radius_is_capped_by_the_number_of_draws():
    f, n, alpha = LinearBinary(), 1000, 0.001
    label, radius = smoothing.certify(f, f.at_margin(3.0), SIGMA, 100, n, alpha, 500)
    assert label == 1
    assert radius == pytest.approx(SIGMA * norm.ppf(alpha ** (1 / n)))  # all n hits: ~0.62, not 3.0


@pytest.mark.parametrize("seed", range(4))
def test_coin_flip_between_two_classes_abstains(seed):
    """On the decision boundary the noise picks either class with probability 1/2."""
    f = LinearBinary()
    x = f.at_margin(0.0, seed=seed)
    counts = smoothing.sample_counts(f, x, SIGMA, 10_000, 5000, seed=seed)
    assert abs(counts[1].item() / 10_000 - 0.5) < 0.03
    assert smoothing.certify(f, x, SIGMA, 100, 10_000, 0.001, 5000, seed=seed) == (ABSTAIN, 0.0)
    assert smoothing.predict(f, x, SIGMA, 10_000, 0.001, 5000, seed=seed) == ABSTAIN


def test_more_draws_turn_an_abstention_into_a_certificate():
    """pA = Phi(0.05) = 0.52: too close to 1/2 for 1,000 draws, certifiable with 100,000."""
    f = LinearBinary()
    x = f.at_margin(0.0125)
    assert smoothing.certify(f, x, SIGMA, 100, 1000, 0.001, 1000, seed=5) == (ABSTAIN, 0.0)
    assert smoothing.predict(f, x, SIGMA, 1000, 0.001, 1000, seed=5) == ABSTAIN
    label, radius = smoothing.certify(f, x, SIGMA, 100, 100_000, 0.001, 10_000, seed=5)
    assert label == 1 and 0 < radius <= 0.0125


# --- Monte Carlo draws: seeded by (seed, batch), never by the rank ---------------------------

def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12 * 12, 10)).eval()


def test_counts_are_the_same_however_the_draws_are_split():
    net, x = small_net(), torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(1))
    num, batch = 1100, 128  # 9 batches, the last one ragged
    full = smoothing.local_counts(net, x, 0.2, num, batch, seed=(3, 4))
    assert full.sum() == num and (full > 0).sum() >= 2, full
    for world in (2, 3, 5):
        owned = [k for r in range(world) for k, _ in smoothing.rank_batches(num, batch, r, world)]
        assert sorted(owned) == list(range(9))
        split = sum(smoothing.local_counts(net, x, 0.2, num, batch, (3, 4), smoothing.ESTIMATE, r, world)
                    for r in range(world))
        assert torch.equal(split, full)
    assert torch.equal(smoothing.sample_counts(net, x, 0.2, num, batch, seed=(3, 4)), full)
    assert not torch.equal(smoothing.sample_counts(net, x, 0.2, num, batch, seed=(3, 5)), full)
    assert not torch.equal(smoothing.sample_counts(net, x, 0.2, num, batch, (3, 4), smoothing.SELECT), full)


@pytest.mark.parametrize("kw, match", [
    ({"sigma": 0.0}, "sigma must be > 0"),
    ({"n": 0}, "n must be an integer >= 1"),
    ({"n0": 2.5}, "n0 must be an integer >= 1"),
    ({"alpha": 1.0}, r"alpha must lie in \(0, 1\)"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"x": torch.rand(2, 1, 8, 8)}, r"one input of shape \(C, H, W\)"),
    ({"seed": -1}, "seed must be non-negative"),
])
def test_certify_rejects_bad_settings(kw, match):
    args = {"model": LinearBinary(), "x": torch.rand(1, 8, 8), "sigma": SIGMA, "n0": 10, "n": 100, "alpha": 0.001,
            "batch_size": 50, **kw}
    with pytest.raises(ValueError, match=match):
        smoothing.certify(**args)


# --- Smooth-AT: attack and objective ---------------------------------------------------------

@pytest.fixture(scope="module")
def noisy_model(fmnist):
    """test_resnet trained one pass over 4,096 images with Gaussian noise (sigma 0.25): a usable base classifier."""
    from dat_ds.models import create_model
    torch.manual_seed(0)
    model = create_model("test_resnet", 10, 1, 28, fmnist.mean, fmnist.std, stem="native")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    perm = torch.randperm(4096)
    for i in range(0, 4096, 128):
        x, y = fmnist.train.__getitems__(perm[i:i + 128].tolist())
        loss = F.cross_entropy(model(x + SIGMA * torch.randn_like(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def smoothed_accuracy(model, x, y, draws=32):
    """Accuracy of the hard smoothed classifier, by majority vote over fresh noise draws."""
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        xs = x.repeat_interleave(draws, dim=0)
        pred = model(xs + SIGMA * torch.randn(xs.shape, generator=g)).argmax(1).view(len(x), draws)
    votes = F.one_hot(pred, 10).sum(1)
    return (votes.argmax(1) == y).float().mean().item()


def smooth_attack(**kw):
    return attacks.create("smooth_pgd_l2", **{"eps": 1.0, "steps": 4, "sigma": SIGMA, "noise_copies": 4, **kw})


def test_smooth_attack_stays_in_ball_and_box_and_beats_noise_of_the_same_size(noisy_model, test_batch):
    x, y = test_batch[0][:128], test_batch[1][:128]
    torch.manual_seed(0)
    x_adv = smooth_attack().perturb(noisy_model, x, y)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    d = torch.randn_like(x)
    same_size = (x + d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
    clean, noise, attacked = (smoothed_accuracy(noisy_model, v, y) for v in (x, same_size, x_adv))
    assert clean > 0.55, clean
    assert attacked < noise - 0.1, (attacked, noise, clean)


class Recorder(nn.Module):
    """Passes inputs to ``model`` and keeps a copy of each batch (an engine stand-in)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.model(x)


def test_smooth_attack_draws_m_copies_once_and_keeps_them_for_every_step(noisy_model, test_batch):
    x, y = test_batch[0][:8], test_batch[1][:8]
    rec = Recorder(noisy_model)
    smooth_attack(steps=3, noise_copies=4).perturb(rec, x, y)
    assert [len(t) for t in rec.inputs] == [32, 32, 32], "one forward of m x B per step"
    noise = (rec.inputs[0] - x.repeat_interleave(4, dim=0)).view(8, 4, -1)  # d starts at 0 (SmoothAdv)
    assert abs(noise.std().item() - SIGMA) < 0.01
    assert (noise[:, 0] - noise[:, 1]).abs().max() > 0.1, "m different draws per sample"
    for before, after in zip(rec.inputs, rec.inputs[1:]):
        step = (after - before).view(8, 4, -1)  # d_t - d_{t-1}, the same for the m copies: same noise
        assert step.abs().max() > 0 and torch.allclose(step, step[:, :1].expand_as(step), atol=1e-6)


def test_smooth_attack_leaves_model_untouched(noisy_model, test_batch):
    x, y = test_batch[0][:16], test_batch[1][:16]
    model = noisy_model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    smooth_attack(steps=2).perturb(model, x, y)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.eval()


def test_smooth_attack_settings():
    a = smooth_attack(eps=0.5, steps=2)
    assert a.norm == "l2" and a.alpha == pytest.approx(0.5) and not a.random_start  # SmoothAdv: 2 eps / steps
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(smooth_attack(eps=0.0).perturb(Recorder(LinearBinary()), x, torch.zeros(4).long()), x)
    for kw, match in (({"sigma": 0}, "sigma must be > 0"), ({"noise_copies": 0}, "noise_copies must be >= 1"),
                      ({"loss": "kl"}, "pair it with --loss smooth"), ({"eps": -1}, "eps must be >= 0")):
        with pytest.raises(ValueError, match=match):
            smooth_attack(**kw)


@pytest.mark.parametrize("m", [1, 4])
def test_smooth_objective_is_the_mean_cross_entropy_over_m_noisy_copies(noisy_model, test_batch, m):
    x, y = test_batch[0][:16], test_batch[1][:16]
    x_adv = (x + 0.05).clamp(0, 1)
    engine = Recorder(noisy_model)
    objective = objectives.create("smooth", sigma=SIGMA, noise_copies=m)
    loss = objective(engine, x, x_adv, y)
    assert objective.attack_loss == "ce"
    (noisy,) = engine.inputs
    assert noisy.shape == (m * 16, 1, 28, 28), "the batch grows to m x micro"
    noise = noisy - x_adv.repeat_interleave(m, dim=0)
    assert abs(noise.std().item() - SIGMA) < 0.01 and abs(noise.mean().item()) < 0.01
    with torch.no_grad():
        per_copy = F.cross_entropy(noisy_model(noisy), y.repeat_interleave(m), reduction="none")
    assert loss.item() == pytest.approx(per_copy.mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="noise_copies must be >= 1"):
        objectives.create("smooth", noise_copies=0)


# --- two ranks --------------------------------------------------------------------------------

@pytest.mark.slow  # 2-rank training and certification (~16 s)
def test_two_ranks_split_the_draws_and_certify_like_one_rank(tmp_path):
    """2 ranks (deepspeed launcher) and 1 process give identical counts; Smooth-AT batches m x micro per rank."""
    two, one = tmp_path / "two", tmp_path / "one"
    r = run_deepspeed(SCRIPT, ["--out", two, "--train", "--micro", "8", "--copies", "4"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = run_recipe(["--out", one], script="tests/scripts/smooth_ranks.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b, single = (torch.load(p, weights_only=True) for p in (two / "rank0.pt", two / "rank1.pt", one / "rank0.pt"))
    assert (a["world"], b["world"], single["world"]) == (2, 2, 1)
    assert set(a["local_batches"]).isdisjoint(b["local_batches"])
    assert sorted(a["local_batches"] + b["local_batches"]) == single["local_batches"]
    for res in (a, b):
        assert all(torch.equal(c2, c1) for c2, c1 in zip(res["counts"], single["counts"]))
        assert res["certify"] == single["certify"] and res["predict"] == single["predict"]
    labels = [label for label, _ in single["certify"]]
    assert ABSTAIN in labels and any(label != ABSTAIN for label in labels), single["certify"]
    for res in (a, b):  # micro 8 x m 4 = 32 inputs per rank, in every attack step and training forward
        assert res["steps"] == 2 and res["seen"]["train"] == [32, 32] and set(res["seen"]["attack"]) == {32}
    assert torch.equal(a["params"], b["params"]), "the ranks stay in lockstep"


# --- recipes ----------------------------------------------------------------------------------

QUICK = ["--backbone", "test_resnet", "--stem", "native", "--train-limit", "256", "--eval-limit", "64",
         "--eval-steps", "2", "--epochs", "1", "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json"]


def load_certify_module():
    return recipe_module("recipes/certify.py")


@pytest.fixture(scope="module")
def smooth_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smooth_at")
    r = run_recipe([*QUICK, "--sigma", "0.3", "--noise-copies", "2", "--steps", "1", "--output-dir", out],
                   script="recipes/smooth_at.py")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_smooth_at_then_certify_single_process(smooth_run, tmp_path):
    config = json.loads((smooth_run / "config.json").read_text())
    assert config["attack"] == "smooth_pgd_l2" and config["loss"] == "smooth"
    # every setting of a component lives in its settings: --steps 1 with the attack's noise
    assert config["attack_kwargs"] == {"sigma": 0.3, "noise_copies": 2, "steps": 1}
    assert config["loss_kwargs"] == {"sigma": 0.3, "noise_copies": 2}
    summary = json.loads((smooth_run / "summary.json").read_text())
    assert summary["eval_attack"] == "pgd_l2-2" and "SmoothPGDL2" in summary["attack_settings"]

    out = tmp_path / "cert"
    r = run_recipe(["--checkpoint", smooth_run, "--eval-limit", "6", "--skip", "3", "--n0", "32", "--n", "300",
                    "--batch-size", "128", "--output-dir", out], script="recipes/certify.py")
    assert r.returncode == 0, r.stderr[-3000:]
    cert = json.loads((out / "certify_summary.json").read_text())
    assert cert["sigma"] == 0.3, "sigma comes from the training run"
    assert cert["samples"] == 6 and cert["world_size"] == 1 and cert["checkpoint"].endswith("epoch0000")
    assert list(cert["certified_accuracy"]) == ["0", "0.25", "0.5", "0.75", "1", "1.5", "2"]
    accs = list(cert["certified_accuracy"].values())
    assert all(a >= b for a, b in zip(accs, accs[1:]))
    assert cert["max_certifiable_radius"] == pytest.approx(0.3 * norm.ppf(0.001 ** (1 / 300)))
    lines = (out / "certify.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["index", "label", "prediction", "radius", "correct", "seconds"]
    rows = [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]
    assert [int(row["index"]) for row in rows] == [0, 3, 6, 9, 12, 15]
    assert accs[0] == pytest.approx(sum(int(row["correct"]) for row in rows) / 6)
    assert all(float(row["radius"]) <= cert["max_certifiable_radius"] + 1e-9 for row in rows)
    assert all((row["prediction"] == "-1") == (float(row["radius"]) == 0) for row in rows)
    assert (out / "certify.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_certify_bad_input_exits_with_one_line(tmp_path, monkeypatch, capsys):
    code, errors, err = refused_in_process(["--checkpoint", tmp_path / "missing"], monkeypatch, capsys,
                                           script="recipes/certify.py")
    assert code == 2 and "Traceback" not in err
    assert errors == [f"certify.py: error: --checkpoint {tmp_path / 'missing'} does not exist"], err[-2000:]


def test_certify_checks_its_settings_before_any_work(smooth_run, tmp_path, monkeypatch):
    from dat_ds.models import create_model
    certify = load_certify_module()
    tag = tmp_path / "tag"
    tag.mkdir()
    model = create_model("test_resnet", 10, 1, 28, stem="native")
    meta = {"backbone": "test_resnet", "stem": "native", "dataset": "fashion_mnist", "num_classes": 10,
            "in_chans": 1, "img_size": 28, "mean": [0.5], "std": [0.5]}
    torch.save({"module": model.state_dict(), "meta": meta}, tag / "mp_rank_00_model_states.pt")
    (tmp_path / "bare").mkdir()
    torch.save({"module": model.state_dict()}, tmp_path / "bare" / "mp_rank_00_model_states.pt")
    cases = [
        ([tmp_path], "no checkpoint in"),
        ([tag], "--sigma is required"),
        ([tmp_path / "bare", "--sigma", "0.25"], "not a dat-ds checkpoint"),
        ([smooth_run, "--n", "0"], "n must be an integer >= 1"),
        ([smooth_run, "--alpha", "1.5"], r"alpha must lie in \(0, 1\)"),
        ([smooth_run, "--sigma", "-1"], "sigma must be > 0"),
        ([smooth_run, "--skip", "0"], "--skip must be >= 1"),
    ]
    for args, match in cases:
        monkeypatch.setattr("sys.argv", ["certify.py", "--checkpoint", *map(str, args), "--output-dir",
                                         str(tmp_path / "out")])
        with pytest.raises(ValueError, match=match):
            certify.main()
        assert not (tmp_path / "out").exists()
    model_file, run_dir = certify.resolve_checkpoint(str(smooth_run / "checkpoints" / "epoch0000"))
    assert model_file.parent == smooth_run / "checkpoints" / "epoch0000"
    assert run_dir.resolve() == smooth_run.resolve() and certify.run_sigma(run_dir) == 0.3
    assert certify.resolve_checkpoint(str(smooth_run)) == (model_file, run_dir)
    from dat_ds.checkpoint_io import load_model
    model, loaded = load_model(tag / "mp_rank_00_model_states.pt")
    assert loaded == meta and not model.training


# --- slow: Smooth-AT on Fashion-MNIST with m = 1 and m = 4, 2 ranks, then certification -----

SLOW_TRAIN = ["--deepspeed_config", ROOT / "ds_configs" / "fashion_mnist_demo.json", "--backbone", "test_resnet",
              "--stem", "native", "--train-limit", "8000", "--eval-limit", "500", "--epochs", "1",
              "--sigma", "0.25", "--eps", "0.5", "--steps", "2"]
# --N, not --n: the deepspeed launcher takes --n as an abbreviation of its own options (see certify.py)
SLOW_CERTIFY = ["--skip", "33", "--eval-limit", "300", "--N0", "64", "--N", "1000", "--batch-size", "500"]


@pytest.mark.slow
@pytest.mark.parametrize("m", [1, 4])
def test_smooth_at_fashion_mnist_two_ranks_certified(m, tmp_path):
    out = tmp_path / f"m{m}"
    r = run_deepspeed(ROOT / "recipes" / "smooth_at.py", [*SLOW_TRAIN, "--noise-copies", m, "--output-dir", out],
                      timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 128
    r = run_deepspeed(ROOT / "recipes" / "certify.py", ["--checkpoint", out, *SLOW_CERTIFY], timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(r.stdout[-1200:])
    cert = json.loads((out / "certify" / "certify_summary.json").read_text())
    acc = cert["certified_accuracy"]
    assert cert["world_size"] == 2 and cert["samples"] == 300 and cert["sigma"] == 0.25
    assert acc["0"] > 0.6 and acc["0.25"] > 0.35, acc
    assert acc["1"] == 0.0, "beyond what n = 1000 draws can certify (0.62)"
    assert cert["average_certified_radius"] > 0.1
    assert (out / "certify" / "certify.png").is_file()
