"""Fused codec kernels: compiled and eager give identical payload bytes; every (compressor, bits,
bucket) combination that validation accepts round-trips, small buckets included."""
import pytest
import torch

from dat_ds import compress
from dat_ds.compress import kernels, qsgd_decode, qsgd_encode, sign_decode, sign_encode


def compiled(monkeypatch, on: bool):
    monkeypatch.setenv("DAT_DS_COMPILE", "1" if on else "0")


def encode_all(x, bits, bucket, seed):
    """Payloads of one input under QSGD (``bits``) and both sign codecs, plus the EF residual."""
    out = {"qsgd": qsgd_encode(x, bits, bucket, torch.Generator().manual_seed(seed)),
           "sign": sign_encode(x), "scaled": sign_encode(x, bucket, valid=x.numel() - 5)}
    err = x.clone()
    out["ef"] = compress.ef_encode(err, bucket, x.numel() - 5)
    out["ef residual"] = err
    return out


def test_compiled_qsgd_encode_matches_the_eager_kernel(monkeypatch):
    """One compiled kernel in the fast suite (seconds once inductor's cache is warm): 4-bit
    QSGD's encode, the same bytes as the eager path, and a decode of both that agrees."""
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(0))
    x[1, :128] = 0                                   # a zero bucket
    x[2, 128:256] *= 1e-32                           # a bucket below MIN_NORM
    payloads = {}
    for on in (False, True):
        compiled(monkeypatch, on)
        payloads[on] = qsgd_encode(x, 4, 128, torch.Generator().manual_seed(1))
    assert kernels.COMPILE_SECONDS or kernels._FAILED, "the kernel was not compiled"
    assert torch.equal(payloads[True], payloads[False])
    compiled(monkeypatch, False)
    decoded = qsgd_decode(payloads[False], 4, 128, 1024)
    assert not decoded[1, :128].any()


@pytest.mark.slow
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_every_compiled_kernel_matches_the_eager_one(monkeypatch, bits):
    x = torch.randn(3, 4096, generator=torch.Generator().manual_seed(bits))
    results = {}
    for on in (False, True):
        compiled(monkeypatch, on)
        res = encode_all(x, bits, 256, bits)
        res["qsgd decoded"] = qsgd_decode(res["qsgd"], bits, 256, 4096)
        res["qsgd mean"] = qsgd_decode(res["qsgd"], bits, 256, 4096, weight=1 / 3, mean=True)
        res["scaled mean"] = sign_decode(res["scaled"], 4096, 256, weight=1 / 3, mean=True)
        res["vote"] = compress.majority_vote(res["sign"], 4096)
        results[on] = res
    for key in results[False]:
        if key.endswith("mean"):     # a sum over ranks may round differently once compiled
            torch.testing.assert_close(results[True][key], results[False][key], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(results[True][key], results[False][key]), key


def accepted_combinations():
    """(name, settings) for every bit width and the bucket sizes around the alignment limits."""
    out = []
    for bucket in (8, 16, 24, 40, 64):
        out += [("qsgd", {"bits": b, "bucket_size": bucket}) for b in (*range(1, 9), 16)]
        out.append(("ef_sign", {"bucket_size": bucket}))
    return out


@pytest.mark.parametrize("topology", ["one-sided", "two-sided"])
def test_small_buckets_round_trip(topology):
    """Payload rows whose sections are not 4-byte aligned (e.g. 3 bits, bucket 8: 4 + 3 bytes)."""
    x = torch.randn(37, generator=torch.Generator().manual_seed(0))
    for name, kw in accepted_combinations():
        c = compress.create(name, topology=topology, **kw)
        y = c.decode(c.encode(x))
        assert y.shape == x.shape and torch.isfinite(y).all(), (name, kw)
        grads = [x.clone().view(37, 1), torch.randn(3)]
        stats = c.all_reduce_(grads)
        assert stats.bytes_sent == 0 and all(torch.isfinite(g).all() for g in grads), (name, kw)
        if name == "qsgd" and kw["bits"] == 16:
            torch.testing.assert_close(y, x, rtol=0, atol=1e-3 * x.norm().item())


def test_compile_can_be_switched_off(monkeypatch):
    compiled(monkeypatch, False)
    assert not kernels.use_compiled(10 ** 9)
    monkeypatch.setenv("DAT_DS_COMPILE", "")
    monkeypatch.setenv("DAT_DS_COMPILE_MIN", "1000")
    assert kernels.use_compiled(1000) and not kernels.use_compiled(999)
