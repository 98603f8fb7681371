"""The step keeps the device busy: no device synchronize inside an attack, an evaluation forward
or a training step, and at most one host read per optimizer step (the non-finite/stop agreement),
none at all when that agreement stays on the device (the deferred guard, what a GPU run takes).

On the CPU a synchronize costs nothing, so the test counts the calls that would stall a GPU:
DeepSpeed's accelerator ``synchronize``, ``torch.cuda.synchronize``, dat-ds's own
``dist.synchronize``, and host reads of tensors (``item``, ``tolist``, ``cpu``, ``float()``,
``int()``, ``bool()``), over real training steps of every attack and every compressor.
"""
from collections import Counter

import pytest
import torch

from dat_ds import attacks, compress, dist
from dat_ds.guard import StepGuard
from dat_ds.syncs import SyncCounter
from dat_ds.timing import Timers
from dat_ds.trainer import train_epoch

def batches(n, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


@pytest.fixture(scope="module")
def engine():
    from dat_ds.engine import initialize
    from dat_ds.models import create_model
    dist.init()
    torch.manual_seed(0)
    model = create_model("test_resnet", 10, 1, 28, stem="native")
    cfg = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0,
           "optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}}
    engine = initialize(model, cfg, steps_per_epoch=100, epochs=1)
    train_epoch(engine, batches(3), attacks.create("none"), compress.create("none"), Timers())  # past step 2
    return engine


def attack_kwargs(name):
    settings = attacks.ATTACKS.settings(name)
    kw = {"eps": 1.0 if attacks.ATTACKS.get(name).norm == "l2" else 0.1}
    kw.update({k: v for k, v in (("steps", 2), ("noise_copies", 2)) if settings.get(k, 1) != 1})
    return kw


def count_steps(engine, attack, compressor, n=3, defer="off"):
    guard = StepGuard(engine, max_nonfinite=0, defer=defer)
    with SyncCounter() as counter:
        before = engine.global_steps
        train_epoch(engine, batches(n, seed=1), attack, compressor, Timers(), guard=guard)
        steps = engine.global_steps - before
    return counter.counts, steps


@pytest.mark.parametrize("name", attacks.names())
def test_training_steps_of_every_attack_keep_the_sync_budget(engine, name):
    counts, steps = count_steps(engine, attacks.create(name, **attack_kwargs(name)), compress.create("none"))
    assert steps >= 3
    assert counts["sync"] == 0, counts
    assert counts["host_read"] <= steps + 1, counts  # one agreement per optimizer step, one read of the epoch loss


@pytest.mark.parametrize("name", compress.names())
def test_training_steps_of_every_compressor_keep_the_sync_budget(engine, name):
    counts, steps = count_steps(engine, attacks.create("pgd", eps=0.1, steps=1), compress.create(name))
    assert counts["sync"] == 0, counts
    assert counts["host_read"] <= steps + 1, counts


@pytest.mark.parametrize("name", attacks.names())
def test_with_the_deferred_agreement_a_step_reads_nothing_on_the_host(engine, name):
    """The guard's agreement on the device (what a GPU run takes): no host read per step at all,
    only the epoch's mean loss; a shape that needs the host's decision (Free-m) keeps one per step."""
    attack = attacks.create(name, **attack_kwargs(name))
    guard = StepGuard(engine, defer="on")
    deferred = guard.why_not_deferred(compress.create("none"), attack.shape) is None
    counts, steps = count_steps(engine, attack, compress.create("none"), n=4, defer="on")
    assert counts["sync"] == 0, counts
    assert counts["host_read"] == (1 if deferred else steps + 1), (deferred, counts)
    assert deferred == (name != "free")


@pytest.mark.parametrize("name", [n for n in attacks.names() if attacks.ATTACKS.get(n).uses_gradients])
def test_no_synchronize_or_host_read_inside_an_attack(engine, name):
    x, y = batches(1, seed=2)[0]
    attack = attacks.create(name, **attack_kwargs(name))
    assert engine.global_steps >= 2  # DeepSpeed's throughput timer would sync from here on
    with SyncCounter() as counter:
        attack.perturb(engine.module, x, y)
    assert counter.counts == Counter(), counter.counts


def test_no_synchronize_in_an_evaluation_forward(engine):
    x, _ = batches(1, seed=3)[0]
    with SyncCounter() as counter, torch.no_grad():
        engine.module.eval()
        engine.module(x)
        engine.module.train()
    assert counter.counts == Counter(), counter.counts


def test_the_counter_sees_a_hidden_synchronize(engine):
    """DeepSpeed's throughput timer, switched back on, is what the counter must catch."""
    timer = engine.tput_timer
    saved = (timer.config.enabled, timer.config.synchronized, timer.global_step_count)
    timer.config.enabled, timer.config.synchronized = True, True
    timer.global_step_count = timer.start_step  # as after that many steps with the timer on
    try:
        with SyncCounter() as counter:
            attacks.create("pgd", eps=0.1, steps=3).perturb(engine.module, *batches(1)[0])
    finally:
        timer.config.enabled, timer.config.synchronized, timer.global_step_count = saved
    assert counter.counts["sync"] >= 3
    with SyncCounter() as counter:
        torch.ones(2).sum().item()
    assert counter.counts["host_read"] == 1


def test_conadv_attacker_copy_carries_no_engine_hooks(engine):
    conadv = attacks.create("conadv", eps=0.1)
    conadv.launch(engine.module, *batches(1)[0])
    assert engine.module._forward_pre_hooks  # DeepSpeed's own, on the engine's module
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in conadv._attacker.modules())
