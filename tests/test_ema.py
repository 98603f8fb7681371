import io
import time

import pytest
import torch

from dat_ds import ema


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))


def train_steps(model, opt, n, seed=1):
    """``n`` SGD steps on random data; yields after each so the EMA can follow."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_matches_a_loop_reference(warmup):
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    avg = ema.create(model, decay=0.9, warmup=warmup)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t, _ in enumerate(train_steps(model, opt, 6)):
        avg.update()
        d = min(0.9, (1 + t) / (10 + t)) if warmup else 0.9
        for n, p in model.named_parameters():
            ref[n] = d * ref[n] + (1 - d) * p.detach()
    state = avg.state_dict()
    for n, r in ref.items():
        torch.testing.assert_close(state["params"][n], r, rtol=1e-6, atol=1e-6)
    for n, b in model.named_buffers():  # BatchNorm statistics are copied, not averaged
        assert torch.equal(state["buffers"][n], b)
    assert int(state["updates"]) == 6 and avg.decay_at(0) == (0.1 if warmup else 0.9)


def test_applied_swaps_the_ema_weights_in_and_back():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    avg = ema.create(model, decay=0.5, warmup=False)
    for _ in train_steps(model, opt, 3):
        avg.update()
    live = {n: t.clone() for n, t in model.state_dict().items()}
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    with avg.applied():
        inside = {n: t.clone() for n, t in model.state_dict().items()}
        out_ema = model(x)
    after = model.state_dict()
    assert all(torch.equal(after[n], live[n]) for n in live)  # bit for bit back
    for n, shadow in avg.state_dict()["params"].items():
        assert torch.equal(inside[n], shadow)
    assert not torch.equal(out_ema, model(x))  # the EMA model is another model


def test_state_dict_round_trip_is_bit_exact_and_weights_only():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    avg = ema.create(model, decay=0.8)
    for _ in train_steps(model, opt, 4):
        avg.update()
    buf = io.BytesIO()
    torch.save(avg.state_dict(), buf)
    buf.seek(0)
    restored = ema.create(small_net(), decay=0.8)
    restored.params = avg.params  # follow the same live weights from here on
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.updates == 4
    for _ in train_steps(model, opt, 2, seed=7):
        avg.update()
        restored.update()
    a, b = avg.state_dict(), restored.state_dict()
    assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
    with pytest.raises(ValueError, match="does not fit this model"):
        ema.create(torch.nn.Linear(2, 2)).load_state_dict(a)


def test_low_precision_weights_keep_fp32_shadows():
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    avg = ema.create(model, decay=0.99, warmup=False)
    start = avg.shadow[0].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    avg.update()
    assert avg.shadow[0].dtype == torch.float32
    torch.testing.assert_close(avg.shadow[0], 0.99 * start + 0.01 * model.weight.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block, message", [
    ({"decay": 1.0}, "ema.decay must be a number in \\[0, 1\\)"),
    ({"decay": "0.9"}, "ema.decay must be a number"),
    ({"warmup": "yes"}, "ema.warmup must be true or false"),
    ({"decay": 0.9, "beta": 2}, "ema has no setting 'beta'; it takes: decay, warmup"),
    (0.999, "ema must be a JSON object"),
])
def test_config_block_is_checked(block, message):
    with pytest.raises(ValueError, match=f"cfg.json: {message}"):
        ema.check_config({"ema": block}, "cfg.json")


def test_from_config():
    model = small_net()
    assert ema.from_config({}, model) is None
    avg = ema.from_config({"ema": {"decay": 0.99, "warmup": False}}, model)
    assert (avg.decay, avg.warmup) == (0.99, False)


def test_update_costs_about_one_optimizer_step():
    """The EMA step is a handful of foreach kernels, like a plain SGD step on the same weights."""
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(16)])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    avg = ema.create(model)
    times = {"ema": [], "sgd": []}
    for _ in range(30):  # interleaved, so machine load hits both alike
        for name, fn in (("ema", avg.update), ("sgd", opt.step)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ema_s, sgd_s = (sorted(v)[len(v) // 2] for v in (times["ema"], times["sgd"]))
    print(f"EMA update {1e3 * ema_s:.2f} ms vs SGD-momentum step {1e3 * sgd_s:.2f} ms "
          f"({ema_s / sgd_s:.2f}x) on {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M weights")
    assert ema_s < 3 * sgd_s


@pytest.mark.slow
def test_training_keeps_checkpoints_and_resumes_the_ema(tmp_path):
    """A run with ``"ema"`` in its ds_config: one EMA step per optimizer step, saved per rank, resumed."""
    import json

    from conftest import run_recipe
    cfg = tmp_path / "ema.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 32, "optimizer": {"type": "Lamb"},
                               "ema": {"decay": 0.9}, "zero_optimization": {"stage": 0}}))
    out = tmp_path / "run"
    args = ["--backbone", "test_resnet", "--stem", "native", "--train-limit", "400", "--holdout", "80",
            "--eval-limit", "64", "--steps", "1", "--eval-steps", "2", "--deepspeed_config", cfg,
            "--output-dir", out]
    first = run_recipe(args + ["--epochs", "2", "--stop-after", "1"])
    assert first.returncode == 0, first.stderr[-2000:]
    steps = 320 // 32
    saved = torch.load(out / "checkpoints" / "epoch0000" / "rank0.pt", weights_only=True)["ema"]
    assert int(saved["updates"]) == steps
    second = run_recipe(args + ["--epochs", "2", "--resume"])
    assert second.returncode == 0, second.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ema"] == {"decay": 0.9, "warmup": True}
    resumed = torch.load(out / "checkpoints" / "epoch0001" / "rank0.pt", weights_only=True)["ema"]
    assert int(resumed["updates"]) == 2 * steps  # counted on from the saved state, not restarted
