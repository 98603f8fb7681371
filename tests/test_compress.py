"""Gradient compressors: bit packing, QSGD statistics, error feedback, state, settings, byte
counts, and exchanges on 2, 3 and 4 real gloo ranks."""
import importlib.util
import io
import math
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT, clean_env
from dat_ds import compress
from dat_ds.compress import create, pack_bits, qsgd_decode, qsgd_encode, unpack_bits

WORKER = ROOT / "tests" / "scripts" / "compress_worker.py"
WORLDS = (2, 3, 4)


@pytest.fixture(autouse=True)
def eager_codec(monkeypatch):
    """The eager kernels (identical bytes, no compile time); tests of the compiled ones opt in."""
    monkeypatch.setenv("DAT_DS_COMPILE", "0")


# --- exchanges on real ranks (one run of the worker script serves all of these tests) ---------

@pytest.fixture(scope="module")
def exchanges(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress")
    r = subprocess.run([sys.executable, str(WORKER), "--out", str(out), "--worlds", *map(str, WORLDS)], cwd=ROOT,
                       env=clean_env({"OMP_NUM_THREADS": "1", "DAT_DS_COMPILE": "0"}), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("compress_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    runs = {w: [torch.load(out / f"world{w}_rank{k}.pt", weights_only=True) for k in range(w)] for w in WORLDS}
    hooks = {w: [torch.load(out / f"world{w}_rank{k}_hooks.pt", weights_only=True) for k in range(w)]
             for w in WORLDS}
    return runs, {w: {key: (name, kw) for key, name, kw, _ in worker.configs(w)} for w in WORLDS}, hooks


def honest_mean(ranks, key):
    return torch.stack([r[key]["in"] for r in ranks]).mean(0)


@pytest.mark.parametrize("world", WORLDS)
def test_every_rank_ends_with_identical_gradients(exchanges, world):
    ranks, configs = exchanges[0][world], exchanges[1][world]
    assert set(ranks[0]) == set(configs) and len(configs) >= 15
    for key in configs:
        first = ranks[0][key]["out"]
        assert torch.isfinite(first).all(), key
        for r in ranks[1:]:
            assert torch.equal(r[key]["out"], first), f"{key}: ranks disagree"
    assert not torch.equal(ranks[0]["none"]["in"], ranks[1]["none"]["in"])  # the ranks had different gradients


@pytest.mark.parametrize("world", WORLDS)
def test_fp32_all_reduce_is_the_exact_mean(exchanges, world):
    ranks = exchanges[0][world]
    torch.testing.assert_close(ranks[0]["none"]["out"], honest_mean(ranks, "none"), rtol=1e-6, atol=1e-6)


def expected_bytes(name, kw, numel, world):
    """What one exchange sends per rank under the module's convention, from first principles."""
    if name == "none":
        return int(2 * (world - 1) * numel * 4 / world)
    if name == "bf16":
        return int(2 * (world - 1) * numel * 2 / world)
    if name == "powersgd":   # 3 all-reduces: the vectors, P, Q; only (7, 11, 13) is worth compressing
        r = kw["matrix_rank"]
        return sum(int(2 * (world - 1) * 4 * k / world) for k in (numel - 7 * 143, 7 * r, 143 * r))
    unit = kw.get("bucket_size", 8)
    padded = math.ceil(numel / (world * unit)) * world * unit
    shard = padded // world

    def payload(size, bits_per_value, scaled=True):
        return (4 * size // unit if scaled else 0) + size * bits_per_value // 8

    if name == "qsgd":
        up = down = payload(shard, kw["bits"])
        whole = payload(padded, kw["bits"])
    elif name == "ef_sign":
        up = down = payload(shard, 1)
        whole = payload(padded, 1)
    else:  # sign_vote: 1 bit up; the vote comes back in 1 bit (odd N) or 2 (even N: ties)
        up, down, whole = payload(shard, 1, False), payload(shard, 1 if world % 2 else 2, False), padded // 8
    return (world - 1) * (whole if kw.get("topology", "one-sided") == "one-sided" else up + down)


@pytest.mark.parametrize("world", WORLDS)
def test_bytes_sent_follow_the_accounting_convention(exchanges, world):
    ranks, configs = exchanges[0][world], exchanges[1][world]
    numel = ranks[0]["none"]["in"].numel()
    for key, (name, kw) in configs.items():
        expected = expected_bytes(name, kw, numel, world)
        assert all(r[key]["bytes"] == [expected] * len(r[key]["bytes"]) for r in ranks), (key, expected)
        assert all(t > 0 for r in ranks for t in r[key]["comm_seconds"]), key     # collectives are timed
        if name == "qsgd" and kw["topology"] == "one-sided":   # b/32 of fp32 + a norm per bucket (+ padding)
            padded = math.ceil(numel / (world * 64)) * world * 64
            assert expected <= (world - 1) * (kw["bits"] / 32 * 4 * padded + 4 * padded / 64)
    # per rank, one-sided sends (N - 1) compressed gradients, two-sided 2 (N - 1) / N of one
    whole = ranks[0]["qsgd bits=8 one-sided"]["bytes"][0] / (world - 1)
    two = ranks[0]["qsgd bits=8 two-sided"]["bytes"][0]
    assert two == pytest.approx(2 * (world - 1) / world * whole, rel=0.02)


@pytest.mark.parametrize("world", WORLDS)
def test_sign_vote_returns_the_majority_of_the_signs(exchanges, world):
    ranks, configs = exchanges[0][world], exchanges[1][world]
    positive = torch.stack([r["sign_vote one-sided"]["in"] >= 0 for r in ranks]).sum(0)
    vote = torch.sign(positive - world / 2)                     # a tie (even N) gives 0
    assert (vote == 0).any() == (world % 2 == 0)
    for key, (name, kw) in configs.items():
        if name == "sign_vote" and not kw.get("byzantine_ranks"):
            assert torch.equal(ranks[0][key]["out"], vote), key


def qsgd_beta(bits, bucket):
    """QSGD's variance factor min(d / s^2, sqrt(d) / s); d for the 1-bit stochastic sign, whose
    variance is exactly sum_i ||v||^2 - v_i^2 = (d - 1) ||v||^2."""
    s = 2 ** (bits - 1) - 1
    return bucket if bits == 1 else min(bucket / s ** 2, math.sqrt(bucket) / s)


def qsgd_variance_bound(flat, bits, bucket):
    """Sum over buckets v of the bound on E||Q(v) - v||^2: beta ||v||^2 summed = beta ||flat||^2."""
    return qsgd_beta(bits, bucket) * flat.pow(2).sum().item()


@pytest.mark.parametrize("world", WORLDS)
def test_qsgd_exchange_error_is_within_the_variance_bound(exchanges, world):
    """One draw of ||result - mean||^2 against the bound on its expectation (a sum of thousands
    of independent terms concentrates well below it). Workers quantize independently:
    V1 = sum_r beta ||g_r||^2 / N^2. Two-sided, the server re-quantizes a = mean + noise, adding
    at most beta E||a||^2 = beta (||mean||^2 + V1)."""
    ranks = exchanges[0][world]
    for bits in (3, 4, 8):   # 1 bit sits at its bound exactly: tested over many draws below
        beta = qsgd_beta(bits, 64)
        for topology in ("one-sided", "two-sided"):
            key = f"qsgd bits={bits} {topology}"
            mean = honest_mean(ranks, key)
            first = sum(qsgd_variance_bound(r[key]["in"], bits, 64) for r in ranks) / world ** 2
            bound = first if topology == "one-sided" else first + beta * (mean.pow(2).sum().item() + first)
            error = (ranks[0][key]["out"] - mean).pow(2).sum().item()
            assert error <= bound, (key, error, bound)


@pytest.mark.parametrize("world", WORLDS)
def test_error_feedback_telescopes_across_ranks(exchanges, world):
    """Constant gradients for T steps: sum of results + (worker errors averaged) + server error
    == T * mean, so nothing the compressor dropped is lost, on workers and servers alike."""
    ranks = exchanges[0][world]
    for topology in ("one-sided", "two-sided"):
        key = f"ef_sign {topology}"
        mean = honest_mean(ranks, key)
        steps = len(ranks[0][key]["bytes"])
        n = mean.numel()
        carried = torch.stack([r[key]["state"]["worker_error"] for r in ranks]).mean(0)[:n]
        if topology == "two-sided":
            assert ranks[0][key]["state"]["server_error"].abs().sum() > 0    # the servers did keep residuals
            carried = carried + torch.cat([r[key]["state"]["server_error"] for r in ranks])[:n]
        else:
            assert "server_error" not in ranks[0][key]["state"]
        torch.testing.assert_close(ranks[0][key]["out_sum"] + carried, steps * mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world", WORLDS)
def test_powersgd_matches_ddps_powersgd_hook(exchanges, world):
    """Three steps (error feedback, warm start, grouping by shape, a rank-2 Gram-Schmidt) give
    what ``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook`` gives on every rank."""
    for r in exchanges[2][world]:
        run = r["powersgd"]
        assert not torch.equal(run["ours"][0], run["ours"][1])      # the warm-started steps differ
        torch.testing.assert_close(run["ours"], run["hook"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(run["our_error"], run["hook_error"], rtol=1e-5, atol=1e-6)
        # start_iter=2: two exact fp32 means, then the same compressed steps as the hook's
        late = r["powersgd start_iter=2"]
        torch.testing.assert_close(late["ours"], late["hook"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(late["our_error"], late["hook_error"], rtol=1e-5, atol=1e-6)
        assert torch.equal(late["ours"][0], late["ours"][1]) and not torch.equal(late["ours"][1], late["ours"][2])
    for key in ("powersgd rank=1", "powersgd rank=2"):
        ranks = exchanges[0][world]
        steps = len(ranks[0][key]["bytes"])
        # error feedback: what was applied plus what is carried adds up to the gradients fed in
        carried = torch.stack([r[key]["state"]["error"] for r in ranks]).mean(0)
        torch.testing.assert_close(ranks[0][key]["out_sum"] + carried, steps * honest_mean(ranks, key),
                                   rtol=1e-4, atol=1e-4)


def powersgd_steps(shapes, steps: int, baseline: bool, **kw):
    """``steps`` exchanges of seeded gradients at world size 1: the results, the error and every
    buffer handed to the all-reduce (what would go on the wire)."""
    c = create("powersgd", random_seed=3, **kw)
    c.grouped = not baseline  # either form on this CPU
    sent = []
    c._all_reduce = lambda stats, buf, world: sent.append(buf.clone())
    gen = torch.Generator().manual_seed(11)
    numel = sum(math.prod(s) for s in shapes)
    outs = []
    for _ in range(steps):
        flat = torch.randn(numel, generator=gen)
        c.all_reduce_flat_(flat, numel, [torch.Size(s) for s in shapes])
        outs.append(flat)
    return torch.stack(outs), c.state_dict()["error"], sent


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_powersgd_grouped_by_shape_gives_the_per_tensor_numbers_and_bytes(rank):
    """Matrices stacked by shape (batched products, one orthogonalization per shape, vectors in one
    copy: a GPU's form) against the per-tensor form (the CPU's): the same results, residuals and
    exchanged buffers."""
    shapes = [(24, 40), (30,), (24, 40), (8, 6, 3, 3), (50, 20), (24, 40), (5,), (8, 6, 3, 3), (3, 2)]
    grouped, err, sent = powersgd_steps(shapes, 3, False, matrix_rank=rank)
    looped, err_looped, sent_looped = powersgd_steps(shapes, 3, True, matrix_rank=rank)
    assert not torch.equal(grouped[0], grouped[1])
    torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-5)  # values ~1: fp32 sums in another order
    torch.testing.assert_close(err, err_looped, rtol=1e-5, atol=1e-5)
    assert [b.numel() for b in sent] == [b.numel() for b in sent_looped] and len(sent) == 9  # vectors, P, Q
    for a, b in zip(sent, sent_looped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_powersgd_dispatches_per_shape_not_per_tensor():
    """4 or 32 matrices of one shape: the grouped exchange (a GPU's) dispatches the same operators
    (one batched product per shape); the per-tensor form dispatches more with every matrix."""
    def ops(count, baseline):
        c = create("powersgd", matrix_rank=2)
        c.grouped = not baseline
        shapes = [torch.Size((16, 12)), torch.Size((16,))] * count
        flat = torch.randn(count * 208)
        c.all_reduce_flat_(flat, flat.numel(), shapes)  # first call: layout, workspaces, Q
        return dispatched_ops(lambda: c.all_reduce_flat_(flat, flat.numel(), shapes))
    assert ops(4, False) == ops(32, False) < ops(4, True) < ops(32, True)
    assert create("powersgd").grouped is None and create("powersgd").use_baseline_codec().grouped is False


@pytest.mark.parametrize("world", WORLDS)
def test_bf16_matches_ddps_bf16_hook(exchanges, world):
    for r in exchanges[2][world]:
        run = r["bf16"]
        assert torch.equal(run["ours"], run["hook"])
    ranks = exchanges[0][world]
    # each of the N terms and every partial sum is rounded to bf16 (8 significant bits)
    scale = torch.stack([r["bf16"]["in"].abs() for r in ranks]).mean(0)
    assert ((ranks[0]["bf16"]["out"] - honest_mean(ranks, "bf16")).abs() <= world * 2 ** -8 * scale + 1e-30).all()


@pytest.mark.parametrize("world", WORLDS)
def test_none_exchanges_bf16_gradients_in_fp32(exchanges, world):
    """DeepSpeed's bf16 mode hands bf16 gradients to the exchange: the all-reduce runs in fp32
    and only the exact fp32 mean is rounded back to bf16."""
    runs = [r["none bf16 grads"] for r in exchanges[2][world]]
    assert all(r["dtypes"] == ["torch.float32"] for r in runs)
    mean = torch.stack([r["in"].float() for r in runs]).mean(0)
    torch.testing.assert_close(runs[0]["out"].float(), mean.to(torch.bfloat16).float(), rtol=0, atol=0)
    assert runs[0]["out"].dtype == torch.bfloat16


@pytest.mark.parametrize("world", (3, 4))
def test_majority_vote_tolerates_a_byzantine_minority(exchanges, world):
    """The last rank flips (or randomizes) its signs; the others agree on sign(g): the vote is
    still sign(g) everywhere, while the same attack on the fp32 mean ruins it."""
    ranks, configs = exchanges[0][world], exchanges[1][world]
    honest = torch.sign(ranks[0]["byzantine none scale"]["in"])
    keys = [k for k, (name, kw) in configs.items() if name == "sign_vote" and kw.get("byzantine_ranks")]
    assert len(keys) == 6
    for key in keys:
        assert torch.equal(ranks[0][key]["out"], honest), key
    spoiled = ranks[0]["byzantine none scale"]["out"]
    assert (torch.sign(spoiled) == honest).float().mean() < 0.5


# --- codecs, single process ------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_is_a_little_endian_bit_stream(bits):
    codes = torch.randint(0, 2 ** bits, (3, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    stream = ((codes.long().unsqueeze(-1) >> torch.arange(bits)) & 1).reshape(3, -1, 8)   # bit i*b+j = code i's bit j
    expected = (stream << torch.arange(8)).sum(-1).to(torch.uint8)
    assert torch.equal(pack_bits(codes, bits), expected)
    assert torch.equal(unpack_bits(expected, bits, 96), codes)
    # into and out of slices of bigger buffers, as payloads with a header are laid out
    buf = torch.zeros(3, 4 + expected.shape[1], dtype=torch.uint8)
    pack_bits(codes, bits, out=buf[:, 4:])
    assert torch.equal(buf[:, 4:], expected) and not buf[:, :4].any()
    assert torch.equal(unpack_bits(buf[:, 4:], bits, 96, out=torch.empty(3, 100, dtype=torch.uint8)[:, :96]), codes)


def exact_qsgd_variance(v, bits):
    """Per-coordinate variance of QSGD's rounding of one bucket v."""
    norm = v.norm()
    if bits == 1:
        return norm ** 2 - v ** 2
    s = 2 ** (bits - 1) - 1
    t = s * v.abs() / norm
    p = t - t.floor()
    return (norm / s) ** 2 * p * (1 - p)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
def test_qsgd_is_unbiased_with_variance_within_the_bound(bits):
    bucket, draws = 64, 20000
    gen = torch.Generator().manual_seed(bits)
    spiky = torch.full((bucket,), 1e-3)
    spiky[5] = -3.0
    v = torch.cat([torch.randn(bucket, generator=gen), spiky, torch.zeros(bucket),
                   torch.linspace(-1, 1, bucket)])
    q = qsgd_decode(qsgd_encode(v.expand(draws, -1).contiguous(), bits, bucket, gen), bits, bucket, v.numel())
    assert q.shape == (draws, v.numel()) and not q[:, 2 * bucket:3 * bucket].any()  # a zero bucket stays 0
    mean = q.mean(0)
    for b in range(4):
        vb, qb = v[b * bucket:(b + 1) * bucket], q[:, b * bucket:(b + 1) * bucket]
        if not vb.any():
            continue
        var = exact_qsgd_variance(vb, bits)
        # unbiased: every coordinate's sample mean within 6 standard errors (+ float rounding)
        tol = 6 * (var / draws).sqrt() + 1e-5 * vb.norm()
        assert ((mean[b * bucket:(b + 1) * bucket] - vb).abs() <= tol).all(), (bits, b)
        # variance: the empirical E||Q(v) - v||^2 matches the exact one and is within QSGD's bound
        sq = (qb - vb).pow(2).sum(1)
        sem = sq.std() / math.sqrt(draws)
        assert abs(sq.mean() - var.sum()) <= 6 * sem + 1e-6, (bits, b, sq.mean(), var.sum())
        assert sq.mean() <= qsgd_variance_bound(vb, bits, bucket) + 6 * sem
        # the support: +-||v|| l / s for integer levels l (for 1 bit, +-||v||)
        levels = qb * (max(2 ** (bits - 1) - 1, 1) / vb.norm())
        assert (levels - levels.round()).abs().max() < 1e-3


def test_qsgd_16_bits_stores_signed_levels_and_rejects_other_widths():
    v = torch.tensor([[3.0, -4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])        # norm 5: levels 0.6 s and -0.8 s
    payload = qsgd_encode(v, 16, 8, torch.Generator().manual_seed(0))
    assert payload.shape == (1, 4 + 16)
    levels = payload[:, 4:].view(torch.int16)[0]
    s = 2 ** 15 - 1
    assert levels[0].item() in (int(0.6 * s), int(0.6 * s) + 1)
    assert levels[1].item() in (-int(0.8 * s), -int(0.8 * s) - 1)
    assert not levels[2:].any()
    assert torch.allclose(qsgd_decode(payload, 16, 8, 8), v, atol=5 / s)
    for bad in (0, 9, 12, 32):
        with pytest.raises(ValueError, match="from 1 to 8, or 16"):
            create("qsgd", bits=bad)


def test_payload_sizes():
    n, bucket = 10_007, 512            # neither a multiple of a bucket nor of a byte
    x = torch.randn(n)
    fp32 = 4 * n
    buckets = math.ceil(n / bucket)
    for bits in (*range(1, 9), 16):
        c = create("qsgd", bits=bits, bucket_size=bucket)
        payload = c.encode(x)
        assert payload.data.dtype == torch.uint8
        assert payload.nbytes <= bits / 32 * fp32 + 4 * buckets + 1
        assert c.decode(payload).shape == x.shape
    assert create("sign_vote").encode(x).nbytes == math.ceil(n / 8)                        # 1/32, padded to a byte
    assert create("ef_sign", bucket_size=bucket).encode(x).nbytes == math.ceil(n / 8) + 4 * buckets


def test_scaled_sign_uses_the_mean_magnitude_of_the_data_not_the_padding():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))    # one bucket of 2048, mostly padding
    c = create("ef_sign", bucket_size=2048)
    payload = c.encode(x)
    scale = payload.data[:4].view(torch.float32)
    torch.testing.assert_close(scale, x.abs().mean().reshape(1))
    torch.testing.assert_close(c.decode(payload), torch.where(x < 0, -scale, scale))
    residual = c.state_dict()["worker_error"]
    assert not residual[1000:].any()                                   # padding keeps no error


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it: a Python loop over buckets or elements
    dispatches more of them the longer the input; vectorized code dispatches the same number."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn) -> int:
    with OpCounter() as counter:
        fn()
    return counter.ops


def test_encode_decode_are_vectorized():
    """encode + decode dispatch as many operators for 2^18 values as for 2^12: no Python loop over
    buckets (64x more of them) or elements; and a few dozen at most (a handful of passes)."""
    for name, kw in [("qsgd", {"bits": 8}), ("qsgd", {"bits": 4}), ("qsgd", {"bits": 3}), ("qsgd", {"bits": 1}),
                     ("qsgd", {"bits": 16}), ("sign_vote", {}), ("ef_sign", {})]:
        counts = []
        for numel in (1 << 12, 1 << 18):
            c = create(name, **kw)
            x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
            c.decode(c.encode(x))  # first call: workspaces
            counts.append(dispatched_ops(lambda: c.decode(c.encode(x))))
        assert counts[0] == counts[1] and counts[0] < 200, (name, kw, counts)
    # the count sees a loop over buckets: 8 buckets of 512 values, then 512 of them
    looped = [dispatched_ops(lambda: torch.stack([b.sign() for b in torch.ones(n).view(-1, 512)]))
              for n in (1 << 12, 1 << 18)]
    assert looped[1] > 20 * looped[0]


def test_error_feedback_carries_the_residual_and_stays_bounded():
    bucket, steps = 64, 100
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    c = create("ef_sign", bucket_size=bucket)
    sent_sum = torch.zeros_like(g)
    largest = 0.0
    for t in range(1, steps + 1):
        sent_sum += c.decode(c.encode(g))
        residual = c.state_dict()["worker_error"][:g.numel()]
        torch.testing.assert_close(sent_sum + residual, t * g, rtol=1e-5, atol=1e-4)   # nothing is lost
        largest = max(largest, residual.norm().item())
    # C(x) = mean|x| sign(x) per bucket gives ||x - C(x)||^2 <= (1 - 1/d) ||x||^2, hence
    # ||e|| <= rho / (1 - rho) ||g|| with rho = sqrt(1 - 1/d)
    rho = math.sqrt(1 - 1 / bucket)
    assert largest <= rho / (1 - rho) * g.norm()
    # the running average of what was sent converges to g; one scaled sign alone stays off
    plain = create("ef_sign", bucket_size=bucket)
    one_shot = (plain.decode(plain.encode(g)) - g).norm()
    assert (sent_sum / steps - g).norm() <= largest / steps + 1e-4
    assert (sent_sum / steps - g).norm() < 0.25 * one_shot


@pytest.mark.parametrize("name, kw", [("ef_sign", {"bucket_size": 64}), ("sign_vote", {"momentum": 0.9}),
                                      ("qsgd", {"bits": 4, "generator": torch.Generator().manual_seed(3)})])
def test_state_dict_round_trips_through_a_safe_torch_load(name, kw):
    grads = [torch.randn(50, 3), torch.randn(7)]
    original = create(name, **kw)
    for _ in range(3):
        original.all_reduce_([g.clone() for g in grads])
    buf = io.BytesIO()
    torch.save(original.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    kw2 = {**kw, "generator": torch.Generator()} if "generator" in kw else kw
    resumed = create(name, **kw2)
    resumed.load_state_dict(state)
    a, b = [g.clone() for g in grads], [g.clone() for g in grads]
    original.all_reduce_(a)
    resumed.all_reduce_(b)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="unexpected state"):
        resumed.load_state_dict({"nonsense": torch.zeros(1)})


def test_world_size_one_applies_the_round_trip_and_sends_nothing():
    """No process group (or a one-rank one): the same math as on N ranks, 0 bytes."""
    torch.manual_seed(0)
    grads = [torch.randn(30, 20), torch.randn(17).to(torch.bfloat16)]
    for name, kw in [("none", {}), ("qsgd", {"bits": 8}), ("qsgd", {"bits": 2, "topology": "two-sided"}),
                     ("sign_vote", {}), ("sign_vote", {"topology": "two-sided"}), ("ef_sign", {})]:
        out = [g.clone() for g in grads]
        stats = create(name, **kw).all_reduce_(out)
        assert stats.bytes_sent == 0
        assert [(o.shape, o.dtype) for o in out] == [(g.shape, g.dtype) for g in grads]
        if name == "none":
            assert all(torch.equal(o, g) for o, g in zip(out, grads))
        else:
            assert not torch.equal(out[0], grads[0])
        if name == "sign_vote":
            assert torch.equal(out[0], torch.where(grads[0] >= 0, 1.0, -1.0))
    close = [g.clone() for g in grads]
    create("qsgd", bits=8, bucket_size=64).all_reduce_(close)
    flat = compress.flatten([g.float() for g in grads])
    assert (compress.flatten(close).float() - flat).pow(2).sum() <= qsgd_variance_bound(flat, 8, 64)


def test_every_module_of_the_package_is_imported_and_settings_are_declared():
    """A compressor is one module: the package imports all of its modules, so registering is
    all a new one does. Every setting has a default and a type; the generator is internal."""
    import pkgutil
    import sys
    for info in pkgutil.iter_modules(compress.__path__):
        assert f"dat_ds.compress.{info.name}" in sys.modules, info.name
    assert {"none", "qsgd", "sign_vote", "ef_sign", "powersgd", "bf16"} <= set(compress.names())
    import inspect
    for name in compress.names():
        settings = compress.COMPRESSORS.settings(name)
        assert "generator" not in settings and all(v is not inspect.Parameter.empty for v in settings.values()), name
        params = inspect.signature(compress.COMPRESSORS.get(name)).parameters
        assert all(params[k].annotation is not inspect.Parameter.empty for k in settings), name
        doc = compress.COMPRESSORS.get(name).__doc__
        assert all(k in doc for k in settings if not k.startswith("byzantine")) and "byzantine_ranks" in doc, name


@pytest.mark.parametrize("name", compress.names())
def test_every_registered_compressor_round_trips_a_tensor(name):
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    c = create(name)
    y = c.decode(c.encode(x))
    assert y.numel() == x.numel() and torch.isfinite(y).all()
    if name != "none":
        assert y.shape == x.shape and y.dtype == x.dtype and isinstance(c.encode(x), compress.Payload)


@pytest.mark.parametrize("name, kw, message", [
    ("qsgd", {"bits": 0}, "bits=0 .*from 1 to 8"),
    ("qsgd", {"bits": 9}, "bits=9 .*from 1 to 8"),
    ("qsgd", {"bits": 2.5}, "bits=2.5 .*from 1 to 8"),
    ("qsgd", {"bucket_size": 0}, "bucket_size=0 .*multiple of 8"),
    ("ef_sign", {"bucket_size": 100}, "bucket_size=100 .*multiple of 8"),
    ("qsgd", {"topology": "ring"}, "topology='ring'.*one-sided, two-sided"),
    ("sign_vote", {"topology": "star"}, "topology='star'.*one-sided, two-sided"),
    ("sign_vote", {"byzantine_mode": "evil"}, "byzantine_mode='evil'.*flip, random, scale"),
    ("none", {"byzantine_mode": "evil"}, "byzantine_mode='evil'.*flip, random, scale"),
    ("ef_sign", {"byzantine_ranks": (-1,)}, "byzantine_ranks entry=-1"),
    ("sign_vote", {"momentum": 1.0}, r"momentum=1.0 .*\[0, 1\)"),
    ("sign_vote", {"momentum": -0.5}, r"momentum=-0.5 .*\[0, 1\)"),
    ("sign_vote", {"bits": 4}, "has no setting.*bits"),
    ("none", {"topology": "two-sided"}, "has no setting.*topology"),
])
def test_bad_settings_raise_a_clear_error(name, kw, message):
    with pytest.raises(ValueError, match=message):
        create(name, **kw)


def test_the_package_documentation_cites_no_missing_file():
    """Module docs name papers and files of this repository only (a cited METHODS.md was missing)."""
    import re
    for path in sorted((ROOT / "dat_ds").rglob("*.py")):
        for cited in re.findall(r"[\w./-]+\.md\b", path.read_text()):
            assert (ROOT / cited).exists(), f"{path.relative_to(ROOT)} cites {cited}, which is not in the repository"
