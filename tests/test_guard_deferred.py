"""The step guard's deferred agreement: the skip decision stays on the device (gated LAMB, gated
EMA, BatchNorm restored by a ``where``) and the host settles it one step later.

Every test runs the deferred path on the CPU (``defer="on"``), the same arithmetic as on CUDA,
against the synchronous guard on the same real images with the same poisoned batch.
"""
import pytest
import torch

from dat_ds import attacks, compress, dist
from dat_ds import ema as ema_lib
from dat_ds.guard import NonFiniteError, StepGuard, StopSignal
from dat_ds.syncs import SyncCounter
from dat_ds.timing import Timers
from dat_ds.trainer import train_epoch

LAMB = {"type": "Lamb", "params": {"lr": 0.01, "weight_decay": 5e-4}}
SCHEDULE = {"type": "WarmupPiecewise", "params": {"warmup_epochs": 0.5, "milestones": [0.5, 0.75]}}


@pytest.fixture(scope="module")
def data(fmnist):
    x, y = fmnist.test.__getitems__(list(range(48)))
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, 48, 8)]


def poisoned(batches, *steps):
    out = []
    for i, (x, y) in enumerate(batches):
        if i in steps:
            x = x.clone()
            x[2] = float("nan")
        out.append((x, y))
    return out


def build(optimizer=LAMB, with_ema=True, gas=1):
    from dat_ds.engine import initialize
    from dat_ds.models import create_model
    dist.init()
    torch.manual_seed(0)
    model = create_model("test_resnet", 10, 1, 28, stem="native")
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": gas, "zero_optimization": {"stage": 0},
           "gradient_clipping": 0.0, "optimizer": optimizer, "scheduler": SCHEDULE}
    engine = initialize(model, cfg, steps_per_epoch=6 // gas, epochs=1)
    return engine, (ema_lib.create(engine.module, decay=0.9) if with_ema else None)


def train(defer, batches, attack="pgd", compressor="none", gas=1, **guard_kw):
    engine, ema = build(gas=gas)
    guard = StepGuard(engine, defer=defer, **guard_kw)
    attack = attacks.create(attack, eps=0.1, steps=2) if attack == "pgd" else attacks.create(attack)
    stats = train_epoch(engine, batches, attack, compress.create(compressor), Timers(), guard=guard, ema=ema)
    return engine, ema, guard, stats


@pytest.mark.parametrize("gas", [1, 2])
def test_a_poisoned_step_is_skipped_on_the_device_as_the_synchronous_guard_skips_it(data, gas):
    batches = poisoned(data, 2)
    sync_engine, sync_ema, sync_guard, sync_stats = train("off", batches, gas=gas)
    engine, ema, guard, stats = train("on", batches, gas=gas)
    applied = 6 // gas - 1
    assert not sync_guard.deferred and guard.deferred
    assert engine.skipped_steps == sync_engine.skipped_steps == 1
    assert engine.global_steps == sync_engine.global_steps == 6 // gas
    assert engine.get_lr() == sync_engine.get_lr(), "the LR schedule holds on a skip"
    assert engine.lr_scheduler.last_epoch == sync_engine.lr_scheduler.last_epoch == applied
    steps = {engine.optimizer.state[p]["step"] for p in engine.module.parameters()}
    assert steps == {sync_engine.optimizer.state[p]["step"] for p in sync_engine.module.parameters()} == {applied}
    assert ema.updates == sync_ema.updates == applied
    for a, b in zip(engine.module.parameters(), sync_engine.module.parameters()):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(engine.module.buffers(), sync_engine.module.buffers()):
        assert torch.isfinite(a.float()).all(), "BatchNorm statistics of the skipped step are restored"
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(ema.shadow, sync_ema.shadow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert stats["train_loss"] == pytest.approx(sync_stats["train_loss"], rel=1e-4), "skipped loss left out"
    for p in engine.module.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_without_a_poisoned_step_the_gated_step_is_the_plain_one(data):
    sync_engine, _, _, _ = train("off", data)
    engine, _, guard, _ = train("on", data)
    assert guard.deferred and engine.skipped_steps == 0
    for a, b in zip(engine.module.parameters(), sync_engine.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_no_host_read_of_a_step_and_the_agreement_is_settled_one_step_later(data):
    engine, ema = build()
    guard = StepGuard(engine, defer="on")
    backwards, agreed, settled = [], [], []
    backward, agree, settle = engine.backward, guard.agree_deferred, guard.settle

    def counted_backward(loss):
        backwards.append(engine.global_steps)
        return backward(loss)

    def recorded_agree(*args):
        skip = agree(*args)
        agreed.append(engine.global_steps)
        return skip

    def recorded_settle():
        if guard._flags.pending:
            settled.append((engine.global_steps, len(backwards)))
        settle()
    engine.backward, guard.agree_deferred, guard.settle = counted_backward, recorded_agree, recorded_settle
    with SyncCounter() as counter:
        train_epoch(engine, poisoned(data, 4), attacks.create("none"), compress.create("none"), Timers(),
                    guard=guard, ema=ema)
    assert counter.counts["sync"] == 0
    assert counter.counts["host_read"] == 1, counter.counts  # the epoch's mean loss, nothing per step
    # step t's flags are read after step t+1's backward (or at the epoch's end), never before
    assert agreed == list(range(6))
    assert settled == [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 6)]
    assert engine.skipped_steps == 1


def test_a_run_that_keeps_producing_nan_stops_one_step_later_with_the_same_message(data):
    """Read one step later, the message still names the step that made the count."""
    with pytest.raises(NonFiniteError, match=r"^3 optimizer steps in a row had a non-finite loss or gradient "
                                             r"\(last at epoch 0, batch 2\); stopping"):
        train("on", poisoned(data, *range(6)), max_nonfinite=3)


def test_a_stop_request_is_agreed_at_the_next_step(data):
    engine, _ = build(with_ema=False)
    stop = StopSignal()
    guard = StepGuard(engine, stop=stop, defer="on")
    seen = []

    def at_boundary(state, totals):
        if state.done == 2:
            stop.signum = 15  # as the SIGTERM handler sets it
        seen.append(state.done)
        return guard.stop_requested
    stats = train_epoch(engine, data, attacks.create("none"), compress.create("none"), Timers(), guard=guard,
                        at_boundary=at_boundary)
    assert stats["stopped"] and guard.stop_signum == 15
    assert seen == [1, 2, 3, 4], "raised after step 2, agreed in step 3, read at step 4's agreement"


@pytest.mark.parametrize("case, reason", [
    ({"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}}, "the optimizer is SGD"),
    ({"compressor": "ef_sign"}, "the compressor ef_sign keeps state"),
    ({"attack": "free"}, "the Replay step shape acts on the host's skip decision"),
])
def test_steps_that_cannot_take_a_device_side_skip_keep_the_synchronous_agreement(data, case, reason):
    engine, ema = build(optimizer=case.get("optimizer", LAMB))
    guard = StepGuard(engine, defer="on")
    attack = attacks.create("free", eps=0.1, steps=2) if case.get("attack") else attacks.create("none")
    compressor = compress.create(case.get("compressor", "none"))
    assert reason in guard.why_not_deferred(compressor, attack.shape)
    train_epoch(engine, poisoned(data[:3], 1), attack, compressor, Timers(), guard=guard, ema=ema)
    assert not guard.deferred and engine.skipped_steps == attack.shape.updates_per_minibatch(attack)


def test_auto_defers_on_cuda_only_and_a_bad_mode_is_refused():
    engine, ema = build()
    guard = StepGuard(engine)
    assert guard.defer == "auto"
    assert guard.prepare(compress.create("none"), attacks.create("none").shape, ema) is (engine.device.type == "cuda")
    with pytest.raises(ValueError, match="StepGuard defer must be one of auto, on, off, got 'always'"):
        StepGuard(engine, defer="always")
