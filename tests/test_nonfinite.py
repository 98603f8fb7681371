"""Non-finite loss or gradients, from real images poisoned to NaN: the step is skipped on every
rank and counted, and a run that keeps producing them stops with one clear line."""
import json

import pytest
import torch
from torch.utils.data import DistributedSampler

from conftest import ROOT, run_deepspeed

SCRIPT = ROOT / "tests" / "scripts" / "nonfinite_train.py"
POISON = [5, 17, 300]  # sample indices; each rank sees its own shard, so one rank meets each


def poisoned_steps(samples=512, micro=16, world=2, bad=POISON):
    """The optimizer steps (global batches) of epoch 0 that hold a poisoned sample."""
    steps = set()
    for rank in range(world):
        sampler = DistributedSampler(range(samples), num_replicas=world, rank=rank, shuffle=True, seed=0,
                                     drop_last=True)
        sampler.set_epoch(0)
        order = list(sampler)
        steps |= {i // micro for i, s in enumerate(order) if s in bad}
    return steps


@pytest.mark.parametrize("defer", ["off", pytest.param("on", marks=pytest.mark.slow)])  # "on": slow suite
def test_poisoned_batches_are_skipped_on_every_rank(tmp_path, defer):
    """On the host at once (off), or on the device and settled one step later (on): the same steps."""
    r = run_deepspeed(SCRIPT, ["--out", tmp_path, "--poison", ",".join(map(str, POISON)), "--defer", defer])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"params_rank{k}.pt", weights_only=True) for k in (0, 1))
    assert a["deferred"] == b["deferred"] == (defer == "on")
    expected = len(poisoned_steps())
    assert 1 <= expected <= 3
    assert a["skipped"] == b["skipped"] == expected, "both ranks skip the step only one of them saw"
    assert a["steps"] == 512 // 32 and a["lr_steps"] == a["steps"] - expected, "the LR schedule holds on a skip"
    assert torch.isfinite(a["params"]).all() and torch.isfinite(a["buffers"]).all()
    assert torch.isfinite(b["buffers"]).all(), "BatchNorm statistics (per rank) stay finite"
    assert torch.equal(a["params"], b["params"])
    assert a["loss"] == a["loss"], "the mean loss leaves skipped steps out"


@pytest.mark.parametrize("defer", ["off", pytest.param("on", marks=pytest.mark.slow)])
def test_skipped_steps_reach_metrics_and_summary(tmp_path, defer):
    r = run_deepspeed(SCRIPT, ["--out", tmp_path, "--poison", ",".join(map(str, POISON)), "--recipe",
                               "--defer", defer])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    expected = len(poisoned_steps(micro=32))
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert row["skipped_steps"] == summary["skipped_steps"] == expected
    assert row["train_loss"] is not None and row["train_loss"] > 0


def test_a_run_that_keeps_producing_nan_stops_with_a_clear_message(tmp_path):
    r = run_deepspeed(SCRIPT, ["--out", tmp_path, "--poison", "all", "--max-nonfinite", "3"])
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    msg = "error: 3 optimizer steps in a row had a non-finite loss or gradient (last at epoch 0, batch 2); stopping"
    assert msg in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr


def test_deepspeed_bf16_optimizer_skips_a_nan_batch_in_process(fmnist):
    """DeepSpeed's ``"bf16"`` mode wraps the optimizer; a skipped step still applies no update."""
    from dat_ds import attacks, compress, dist
    from dat_ds.engine import initialize
    from dat_ds.guard import StepGuard
    from dat_ds.metrics import Timers
    from dat_ds.models import create_model
    from dat_ds.trainer import train_epoch

    dist.init()
    model = create_model("test_vit", 10, 1, 28, fmnist.mean, fmnist.std)
    cfg = {"train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    engine = initialize(model, cfg, 3, 1)
    x, y = fmnist.test.__getitems__(list(range(8)))
    poisoned = x.clone()
    poisoned[3] = float("nan")
    guard = StepGuard(engine, max_nonfinite=2)
    stats = train_epoch(engine, [(x, y)], attacks.create("none"), compress.create("none"), Timers(), guard=guard)
    before = [p.detach().clone() for p in engine.module.parameters()]
    train_epoch(engine, [(poisoned, y)], attacks.create("none"), compress.create("none"), Timers(), guard=guard)
    assert engine.skipped_steps == 1 and guard.consecutive == 1
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    stats = train_epoch(engine, [(x, y)], attacks.create("none"), compress.create("none"), Timers(), guard=guard)
    assert guard.consecutive == 0 and stats["train_loss"] == stats["train_loss"]
