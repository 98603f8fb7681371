"""What an exact zero votes in ``sign_vote``, and parameters without a gradient under the flat
buffer: they keep their weights through a real DeepSpeed step with LAMB."""
import pytest
import torch

from dat_ds import compress
from dat_ds.compress import kernels
from dat_ds.optim import Lamb, param_groups


@pytest.fixture(autouse=True)
def eager_codec(monkeypatch):
    monkeypatch.setenv("DAT_DS_COMPILE", "0")


@pytest.fixture(scope="module")
def one_rank_world():
    from dat_ds import dist
    dist.init()
    return dist


class HalfUsed(torch.nn.Module):
    """``spare`` takes part in no forward: its parameters never get a gradient."""

    def __init__(self):
        super().__init__()
        self.used, self.spare = torch.nn.Linear(12, 3), torch.nn.Linear(12, 3)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("name", ["sign_vote", "none"])
def test_a_parameter_without_gradient_does_not_move(one_rank_world, name):
    import deepspeed
    torch.manual_seed(0)
    model = HalfUsed()
    optimizer = Lamb(param_groups(model, weight_decay=0.1), lr=0.01)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config={"train_micro_batch_size_per_gpu": 8, "steps_per_print": 10 ** 9})
    engine.enable_backward_allreduce = False
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    compressor = compress.create(name)
    spare_grads = []
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 12, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        engine.backward(torch.nn.functional.cross_entropy(engine.module(x), y))
        compress.exchange(engine, compressor)
        spare_grads += [model.spare.weight.grad, model.spare.bias.grad]
        engine.step()
    after = model.state_dict()
    for key in ("spare.weight", "spare.bias"):
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["used.weight"], before["used.weight"])
    assert spare_grads == [None] * 6                     # the optimizer saw no gradient for them
    assert getattr(engine, compress.flat.ATTR).unused == [2, 3]


@pytest.mark.parametrize("topology", ["one-sided", "two-sided"])
def test_exact_zeros_vote_plus_or_minus_one_by_a_fair_coin(topology):
    """1 bit cannot say 0: a zero votes +1 or -1 at random (mean 0), no longer always +1 (its
    sign bit); every other value votes its sign."""
    x = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    x[::2] = 0
    x[1] = -0.0                                          # a negative zero is a zero too
    c = compress.create("sign_vote", topology=topology, generator=torch.Generator().manual_seed(1))
    out = x.clone()
    c.all_reduce_([out])
    zeros, nonzero = out[x == 0], x != 0
    assert set(zeros.unique().tolist()) == {-1.0, 1.0}
    assert abs(zeros.mean().item()) < 0.1                # 2001 coins: std of the mean 0.022
    assert torch.equal(out[nonzero], x[nonzero].sign())
    again = x.clone()
    c.all_reduce_([again])
    assert not torch.equal(again, out), "a fresh coin every exchange"
    payload = compress.create("sign_vote", generator=torch.Generator().manual_seed(1)).encode(torch.zeros(800))
    decoded = compress.create("sign_vote").decode(payload)
    assert (decoded == 1).sum() not in (0, 800)


def test_the_baseline_codec_casts_the_same_coins():
    """The benchmark's baseline codec casts the same coins: identical bytes for the same generator."""
    x = torch.randn(1024, generator=torch.Generator().manual_seed(0))
    x[:300] = 0
    fused = compress.create("sign_vote", generator=torch.Generator().manual_seed(2))
    first = compress.create("sign_vote", generator=torch.Generator().manual_seed(2)).use_baseline_codec()
    assert torch.equal(fused.encode(x).data, first.encode(x).data)


@pytest.mark.slow  # one compilation (about 10 s on a CPU core the first time)
def test_compiled_tie_kernel_gives_the_eager_bytes(monkeypatch):
    x = torch.randn(3, 4096, generator=torch.Generator().manual_seed(0))
    x[:, ::3] = 0
    payloads = []
    for on in ("0", "1"):
        monkeypatch.setenv("DAT_DS_COMPILE", on)
        c = compress.create("sign_vote", generator=torch.Generator().manual_seed(4))
        payloads.append(c.encode(x).data)
    assert any(k.startswith("tie_sign_kernel") for k in kernels.COMPILE_SECONDS) or kernels._FAILED
    assert torch.equal(payloads[0], payloads[1])
