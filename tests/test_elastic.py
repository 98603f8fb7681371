"""Resume on another number of ranks: a 2-rank run stopped mid-epoch goes on on 1 and on 3 ranks
with exactly the samples its ranks had not trained (recorded ids), a stateful compressor's state
mapped, and the batch and schedule rules of dat_ds.trainer.elastic."""
import json

import pytest
import torch

from conftest import ROOT, run_deepspeed
from dat_ds.compress import create
from dat_ds.data import ResumableSampler
from dat_ds.trainer.elastic import adapt_batch, place_in_pass
from dat_ds.trainer.loop import EpochState
from dat_ds.trainer.plan import plan_passes
from stopping import read_ids, stop_inside_the_epoch

RECIPE = ROOT / "recipes" / "fashion_mnist_dat.py"
N = 640  # training samples; 2 ranks x 32 = 64 per step: 10 steps, a checkpoint every 2
RUN = ["--plugin", ROOT / "tests" / "scripts" / "id_dataset.py", "--dataset", "fmnist_ids", "--backbone", "test_resnet",
       "--stem", "native", "--steps", "1", "--eval-steps", "1", "--epochs", "1", "--save-every", "2",
       "--compressor", "ef_sign", "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json"]


def epoch_order(n=N, seed=0, epoch=0):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


@pytest.mark.parametrize("ranks", [pytest.param(1, marks=pytest.mark.slow), 3])  # 2 -> 3 in the fast suite
def test_two_ranks_stopped_mid_epoch_go_on_on_another_number_of_ranks(tmp_path, ranks):
    out, log = tmp_path / "run", tmp_path / "ids"
    env = {"DAT_DS_ID_LOG": str(log), "DAT_DS_IDS_TRAIN": str(N)}
    done = stop_inside_the_epoch(RECIPE, [*RUN, "--output-dir", out], env)
    before = read_ids(log)
    trained = [i for rank in before.values() for batch in rank[:done] for i in batch]
    for p in log.parent.glob(log.name + ".rank*"):
        p.unlink()
    r = run_deepspeed(RECIPE, [*RUN, "--output-dir", out, "--resume"], num_ranks=ranks, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = r.stdout + r.stderr
    assert f"resumed a 2-rank checkpoint on {ranks} ranks: global batch 64 -> {64 if ranks == 1 else 96}" in text
    after = [i for rank in read_ids(log).values() for batch in rank for i in batch]
    order = epoch_order()
    assert len(set(trained)) == len(trained) == done * 64 and set(trained) == set(order[:done * 64])
    assert not set(after) & set(trained), "a sample trained twice"
    assert len(set(after)) == len(after)
    global_batch = 64 if ranks == 1 else 96
    assert set(trained) | set(after) == set(order[:len(trained) + len(after)])  # a prefix of the epoch's order
    assert N - len(trained) - len(after) < global_batch  # only the ragged tail of less than one global batch
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == ranks and summary["global_batch_size"] == global_batch


def test_sampler_counts_in_samples_and_deals_the_rest_to_any_world():
    ds = list(range(100))
    first = [ResumableSampler(ds, 2, r, seed=3) for r in range(2)]
    for s in first:
        s.set_epoch(1)
    trained = [i for s in first for i in list(s)[:10]]  # 10 samples per rank: the first 20 of the order
    rest = [ResumableSampler(ds, 3, r, seed=3) for r in range(3)]
    for s in rest:
        s.set_epoch(1, consumed=20)
    later = [i for s in rest for i in s]
    order = torch.randperm(100, generator=torch.Generator().manual_seed(4)).tolist()
    assert sorted(trained) == sorted(order[:20]) and sorted(later) == sorted(order[20:20 + 78])
    assert len(rest[0]) == 26


def test_batch_rule_keeps_the_global_batch_where_accumulation_can():
    marker = {"world_size": 2, "meta": {"batch": {"micro": 32, "gas": 2, "global": 128}}}
    cfg, gas, global_batch, note = adapt_batch({"train_micro_batch_size_per_gpu": 32}, 4, 32, 2, marker)
    assert (gas, global_batch) == (1, 128) and "global batch kept" in note
    cfg, gas, global_batch, note = adapt_batch({"train_micro_batch_size_per_gpu": 32}, 3, 32, 2, marker)
    assert (gas, global_batch) == (2, 192) and "LR rule" in note and cfg["train_batch_size"] == 192
    assert adapt_batch({}, 2, 32, 2, marker)[3] == ""


def test_a_resumed_pass_trains_the_minibatches_its_remaining_samples_make():
    same = EpochState(0, 3, 4, carry={"pending": 1}, consumed_base=192, done_base=3)  # same world: left alone
    assert place_in_pass(same, plan_passes(20, 2, 1, 3), 64) is same
    plan = plan_passes(20, 2, 1, 3)  # 18 minibatches a pass on this world
    # 480 of this world's 18 x 64 = 1152 samples trained
    state = place_in_pass(EpochState(0, consumed_base=5 * 96, regrouped=True), plan, 32 * 2)
    assert state.drawn == state.done == 18 - 9 and state.consumed(state.drawn, 64) == 480


def test_compressor_states_merge_to_their_mean():
    states = [{"worker_error": torch.full((4,), float(r)), "server_error": torch.zeros(2)} for r in range(3)]
    merged = create("ef_sign").merge_states(states)
    assert torch.equal(merged["worker_error"], torch.full((4,), 1.0))
