"""One model per number: every figure a run reports is what ``recipes/evaluate.py`` gives for a
model that was saved, on the same samples, and every rank holds that model."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import ROOT, run_deepspeed, run_recipe
from dat_ds import buffers
from dat_ds.trainer.plan import plan_passes

sys.path.insert(0, str(ROOT / "recipes"))
import evaluate as evaluate_recipe  # noqa: E402  (recipes/evaluate.py)

RECIPE = ROOT / "recipes" / "fashion_mnist_dat.py"
TINY = ["--backbone", "test_resnet", "--stem", "native", "--eval-limit", "96", "--eval-steps", "2",
        "--eval-batch-size", "40", "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json"]


def suite(checkpoint, out, limit=96, *extra):
    """``recipes/evaluate.py`` with the run's check as its only column (seed and batch: the run's)."""
    return evaluate_recipe.main(["--checkpoint", str(checkpoint), "--output-dir", str(out), "--pgd-steps", "2",
                                 "--no-autoattack", "--eps-sweep", "--steps-sweep", "--eval-limit", str(limit),
                                 *extra])


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_one_rank_every_epoch_and_the_best_epoch_are_their_checkpoints(tmp_path):
    """FGSM-RS with a held-out check: each epoch's row is its checkpoint, the summary the best one's."""
    out = tmp_path / "run"
    r = run_recipe([*TINY, "--attack", "fgsm_rs", "--holdout", "64", "--train-limit", "384", "--epochs", "2",
                    "--output-dir", out])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for row in rows(out):
        tag = out / "checkpoints" / f"epoch{row['epoch']:04d}"
        ev = suite(tag, tmp_path / f"eval{row['epoch']}")
        assert (row["clean_acc"], row["robust_acc"], row["eval_samples"]) == (
            ev["clean_acc"], ev["pgd"][0]["robust_acc"], ev["eval_samples"])
        # the held-out check is evaluate.py on the same 64 training images (--eval-limit past them: all 64)
        held = suite(tag, tmp_path / f"held{row['epoch']}", 1000, "--split", "holdout")
        assert held["split"] == "holdout" and held["eval_samples"] == 64
        assert (row["holdout_clean_acc"], row["holdout_pgd_acc"]) == (held["clean_acc"], held["pgd"][0]["robust_acc"])
    ev = suite(summary["checkpoint"], tmp_path / "eval_summary")
    assert (summary["clean_acc"], summary["robust_acc"]) == (ev["clean_acc"], ev["pgd"][0]["robust_acc"])
    assert Path(summary["checkpoint"]).name in ("best", "epoch0001")


def test_two_ranks_hold_one_model_and_report_what_evaluate_gives(tmp_path):
    """2 ranks with BatchNorm and an EMA: the buffers saved by each rank are the same, and the
    reported TA/RA are those of the saved model (EMA weights) on one rank."""
    out = tmp_path / "run"
    config = json.loads((ROOT / "tests" / "configs" / "tiny_lamb.json").read_text())
    (tmp_path / "ema.json").write_text(json.dumps({**config, "ema": {"decay": 0.9}}))
    r = run_deepspeed(RECIPE, [*TINY, "--train-limit", "384", "--epochs", "1", "--steps", "1", "--output-dir", out,
                               "--deepspeed_config", tmp_path / "ema.json"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tag = out / "checkpoints" / "epoch0000"
    ranks = [torch.load(tag / f"rank{i}.pt", weights_only=True) for i in (0, 1)]
    for key in ("buffers",):
        assert ranks[0][key].keys() == ranks[1][key].keys() and ranks[0][key]
        assert all(torch.equal(ranks[0][key][n], ranks[1][key][n]) for n in ranks[0][key])
    assert all(torch.equal(ranks[0]["ema"]["buffers"][n], ranks[1]["ema"]["buffers"][n])
               for n in ranks[0]["ema"]["buffers"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["weights"] == "ema"
    ev = suite(summary["checkpoint"], tmp_path / "eval")
    assert ev["weights"] == "ema"
    assert (summary["clean_acc"], summary["robust_acc"]) == (ev["clean_acc"], ev["pgd"][0]["robust_acc"])


def _pool_worker(rank, port, path):
    import os

    import torch.distributed as tdist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)
    bn = torch.nn.BatchNorm2d(3)
    bn.running_mean.normal_(mean=rank * 2.0)
    bn.running_var.uniform_(0.5, 2.0)
    bn.num_batches_tracked.fill_(7 + rank)
    before = {n: b.clone() for n, b in bn.named_buffers()}
    names, tensors = zip(*bn.named_buffers())
    buffers.pool(list(names), list(tensors))
    torch.save({"before": before, "after": dict(bn.named_buffers())}, f"{path}/rank{rank}.pt")
    tdist.destroy_process_group()


def test_pooled_batchnorm_statistics_follow_the_law_of_total_variance(tmp_path):
    from dat_ds.dist import free_port
    # spawn: a forked child would inherit the one-rank world earlier in-process tests made
    mp.start_processes(_pool_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    for name in r0["after"]:
        assert torch.equal(r0["after"][name], r1["after"][name]), name
    means = torch.stack([r["before"]["running_mean"].double() for r in (r0, r1)])
    variances = torch.stack([r["before"]["running_var"].double() for r in (r0, r1)])
    mean = means.mean(0)
    var = (variances + means ** 2).mean(0) - mean ** 2
    assert torch.allclose(r0["after"]["running_mean"].double(), mean, atol=1e-6)
    assert torch.allclose(r0["after"]["running_var"].double(), var, atol=1e-6)
    assert (var > variances.min(0).values).all()  # the spread between the ranks' means counts
    assert int(r1["after"]["num_batches_tracked"]) == 7  # other buffers: rank 0's


@pytest.mark.parametrize("batches, epochs, replays, gas, expect", [
    (429, 3, 1, 8, (424, 424, 424)),  # 53 steps a pass, the schedule plans 159 and 159 happen
    (20, 2, 1, 3, (18, 18)),
    (100, 5, 4, 1, (100, 25)),  # Free-4 for 5 epochs: 500 updates, as natural training's 5 epochs
    (100, 8, 4, 1, (100, 100)),
    (10, 3, 4, 2, (7,)),  # Free-4, accumulation 2: 7.5 minibatches' worth; 14 updates of whole steps
])
def test_passes_end_on_optimizer_steps_and_count_natural_epochs(batches, epochs, replays, gas, expect):
    plan = plan_passes(batches, epochs, replays, gas)
    assert plan.batches == expect
    assert all(b * replays % gas == 0 for b in plan.batches)
    # the optimizer steps of natural training, to within one minibatch's replays
    assert 0 <= epochs * (batches // gas) - plan.updates < max(1, replays // gas)
    assert plan.schedule_epochs == plan.updates / (batches // gas)


def test_a_pass_shorter_than_one_accumulation_is_refused():
    with pytest.raises(ValueError, match="fewer than the 8 one optimizer step accumulates"):
        plan_passes(5, 1, 1, 8)


@pytest.mark.slow  # three runs; the pass plan's arithmetic is checked in the fast suite above
def test_resume_is_bit_exact_with_accumulation_that_does_not_divide_the_epoch(tmp_path):
    """20 micro-batches a pass, accumulation 3: passes of 18, so the end-of-epoch checkpoint
    holds no partial gradient and the resumed run ends with the straight run's weights."""
    config = json.loads((ROOT / "tests" / "configs" / "tiny_lamb.json").read_text())
    (tmp_path / "gas3.json").write_text(json.dumps({**config, "gradient_accumulation_steps": 3}))
    run = [*TINY, "--train-limit", "640", "--steps", "1", "--epochs", "2", "--eval-limit", "16",
           "--deepspeed_config", tmp_path / "gas3.json"]
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    for args in ([*run, "--output-dir", straight], [*run, "--output-dir", parts, "--stop-after", "1"],
                 [*run, "--output-dir", parts, "--resume"]):
        r = run_recipe(args)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    weights = []
    for out in (straight, parts):
        tag = (out / "checkpoints" / "latest").read_text()
        weights.append(torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True))
    assert weights[0]["global_steps"] == weights[1]["global_steps"] == 12
    diff = [k for k in weights[0]["module"] if not torch.equal(weights[0]["module"][k], weights[1]["module"][k])]
    assert not diff, diff
    assert json.loads((straight / "summary.json").read_text())["updates"] == 12
