"""The persistent flat gradient buffer under a real DeepSpeed engine (ZeRO-0, client optimizer):
``.grad`` views survive DeepSpeed's zero_grad, give the same training as the gradient-list path,
and a checkpoint resumes bit for bit."""
import pytest
import torch

from dat_ds import compress


@pytest.fixture(scope="module")
def one_rank_world():
    from dat_ds import dist
    dist.init()
    return dist


@pytest.fixture(autouse=True)
def eager_codec(monkeypatch):
    monkeypatch.setenv("DAT_DS_COMPILE", "0")


def make_engine(seed: int):
    import deepspeed
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config={"train_micro_batch_size_per_gpu": 8, "steps_per_print": 10 ** 9})
    engine.enable_backward_allreduce = False
    return engine


def batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 12, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def train(engine, compressor, steps, first=0, flat=True):
    for step in range(first, first + steps):
        x, y = batch(step)
        loss = torch.nn.functional.cross_entropy(engine.module(x), y)
        engine.backward(loss)
        if flat:
            compress.exchange(engine, compressor)
        else:
            compressor.all_reduce_([p.grad for p in engine.module.parameters() if p.grad is not None])
        engine.step()


def views_attached(engine) -> bool:
    flat = getattr(engine, compress.flat.ATTR)
    return all(p.grad is v for p, v in zip(flat.params, flat.views))


def make_compressor(name):
    kw = {"qsgd": {"bits": 4, "bucket_size": 64, "generator": torch.Generator().manual_seed(5)},
          "ef_sign": {"bucket_size": 64}, "powersgd": {"matrix_rank": 2}}.get(name, {})
    return compress.create(name, **kw)


@pytest.mark.parametrize("name", ["none", "qsgd", "ef_sign", "powersgd", "bf16"])
def test_flat_buffer_trains_like_the_gradient_list(one_rank_world, name):
    a, b = make_engine(0), make_engine(0)
    train(a, make_compressor(name), 3, flat=True)
    train(b, make_compressor(name), 3, flat=False)
    assert views_attached(a)                      # DeepSpeed's zero_grad kept them
    for p, q in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(p, q)
    buffer = getattr(a, compress.flat.ATTR).buffer
    assert not buffer.any()                       # zeroed after the step, still the gradients' storage


def test_flat_buffer_recovers_when_grads_are_dropped(one_rank_world):
    engine = make_engine(0)
    compressor = make_compressor("none")
    train(engine, compressor, 1)
    for p in engine.module.parameters():
        p.grad = None                             # e.g. optimizer.zero_grad(set_to_none=True)
    train(engine, compressor, 1, first=1)
    assert views_attached(engine)


def test_checkpoint_resumes_bit_for_bit_with_flat_views(one_rank_world, tmp_path):
    compressor = make_compressor("ef_sign")
    engine = make_engine(0)
    train(engine, compressor, 2)
    engine.save_checkpoint(str(tmp_path), tag="t2")
    torch.save(compressor.state_dict(), tmp_path / "compressor.pt")
    train(engine, compressor, 2, first=2)

    resumed = make_engine(1)                      # different initial weights: everything comes from the files
    resumed.load_checkpoint(str(tmp_path), tag="t2")
    again = make_compressor("ef_sign")
    again.load_state_dict(torch.load(tmp_path / "compressor.pt", weights_only=True))
    train(resumed, again, 2, first=2)
    assert views_attached(resumed)
    for p, q in zip(engine.module.parameters(), resumed.module.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(compressor.state_dict()["worker_error"], again.state_dict()["worker_error"])
