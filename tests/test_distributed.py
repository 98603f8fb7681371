"""Real multi-rank runs: the deepspeed launcher, 2 CPU ranks, gloo."""
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_deepspeed
from dat_ds.dist import free_port

SCRIPT = ROOT / "tests" / "scripts" / "dist_train.py"


def load(out, rank=0):
    return torch.load(out / f"params_rank{rank}.pt", weights_only=True)


@pytest.mark.slow  # test_two_ranks_equal_one_rank_with_the_global_batch checks both ranks' weights in the fast suite
def test_two_ranks_end_with_identical_parameters(tmp_path):
    """PGD-DAT with BatchNorm: each rank attacks its own shard, yet the weights stay in lockstep."""
    port = free_port()
    r = run_deepspeed(SCRIPT, ["--out", tmp_path, "--micro", "16", "--steps", "4"], port=port)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    shm = Path("/dev/shm")
    if shm.is_dir():  # DeepSpeed's CPU all-reduce segments are unlinked once mapped, not left in RAM
        assert not [p.name for p in shm.glob(f"deepspeed_allreduce_buffer_*_{port}_*")]
    a, b = load(tmp_path, 0), load(tmp_path, 1)
    assert a["world"] == 2 and a["steps"] == 4
    assert torch.equal(a["params"], b["params"])
    n = a["params"].numel()
    assert a["bytes"] == 4 * 2 * (2 - 1) * n * 4 // 2  # ring all-reduce: 2 (N-1)/N x fp32 bytes, 4 steps


def test_two_ranks_equal_one_rank_with_the_global_batch(tmp_path):
    """Gradient averaging is exact: 2 ranks x 16 == 1 rank x 32 (no BatchNorm, no attack noise)."""
    two, one = tmp_path / "two", tmp_path / "one"
    r = run_deepspeed(SCRIPT, ["--out", two, "--micro", "16", "--steps", "3", "--backbone", "test_vit",
                               "--stem", "auto", "--attack", "none"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = run_deepspeed(SCRIPT, ["--out", one, "--micro", "32", "--steps", "3", "--backbone", "test_vit",
                               "--stem", "auto", "--attack", "none"], num_ranks=1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one_rank = load(one)
    p2, p1 = load(two)["params"], one_rank["params"]
    assert one_rank["steps"] == 3 and (p1 - one_rank["init"]).abs().max() > 1e-3  # training moved the weights
    assert torch.equal(load(two)["init"], one_rank["init"])
    assert (p2 - p1).abs().max() < 1e-4


@pytest.mark.parametrize("compressor, topology", [  # one in the fast suite, two-sided ones slow
    pytest.param("qsgd", "two-sided", marks=pytest.mark.slow), ("sign_vote", "one-sided"),
    pytest.param("ef_sign", "two-sided", marks=pytest.mark.slow)])
def test_compressed_training_keeps_ranks_identical(tmp_path, compressor, topology):
    """The trainer's only gradient exchange is the compressor: every method keeps the ranks in lockstep."""
    r = run_deepspeed(SCRIPT, ["--out", tmp_path, "--micro", "16", "--steps", "3", "--compressor", compressor,
                               "--topology", topology])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = load(tmp_path, 0), load(tmp_path, 1)
    assert torch.equal(a["params"], b["params"])
    assert (a["params"] - a["init"]).abs().max() > 0
    fp32_bytes = 3 * 2 * (2 - 1) * a["params"].numel() * 4 // 2
    assert 0 < a["bytes"] < fp32_bytes / 3  # well under the fp32 all-reduce
