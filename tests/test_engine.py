
import pytest

from dat_ds.engine import ConfigError, check_config, load_config, resolve_batch


@pytest.mark.parametrize("cfg, world, expected", [
    ({"train_micro_batch_size_per_gpu": 64}, 4, (64, 1, 256)),
    ({"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 2}, 2, (32, 2, 128)),
    ({"train_batch_size": 512, "train_micro_batch_size_per_gpu": 64}, 2, (64, 4, 512)),
    ({"train_batch_size": 512}, 4, (128, 1, 512)),
])
def test_batch_sizes_resolve_like_deepspeed(cfg, world, expected):
    assert resolve_batch(cfg, world) == expected


def test_inconsistent_batches_are_refused():
    with pytest.raises(ConfigError, match="not divisible"):
        resolve_batch({"train_batch_size": 100, "train_micro_batch_size_per_gpu": 64}, 2)


@pytest.mark.parametrize("cfg, match", [
    ({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}, "stage=2 is not supported"),
    ({"train_micro_batch_size_per_gpu": 8, "fp16": {"enabled": True}, "bf16": {"enabled": True}}, "pick one"),
    ({"train_micro_batch_size_per_gpu": 0}, "positive integer"),
    ({"optimizer": {"type": "Lamb"}}, "train_micro_batch_size_per_gpu"),
    ({"train_micro_batch_size_per_gpu": 8, "fp16": {"enabled": True}}, "float16 training is not supported"),
    ({"train_micro_batch_size_per_gpu": 8, "torch_autocast": {"enabled": True, "dtype": "float16"}},
     "float16 training is not supported"),
])
def test_config_checks(cfg, match):
    with pytest.raises(ConfigError, match=match):
        check_config(cfg)


def test_shipped_configs_are_valid():
    from pathlib import Path
    configs = sorted(Path(__file__).resolve().parents[1].glob("ds_configs/*.json"))
    assert len(configs) >= 4
    for path in configs:
        cfg = load_config(str(path))
        assert cfg["zero_optimization"]["stage"] == 0


def test_bad_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "none.json"))


@pytest.fixture(scope="module")
def one_rank_world():
    from dat_ds import dist
    dist.init()
    return dist


def test_bf16_cast_mode_refuses_batchnorm_and_autocast_trains(one_rank_world):
    import torch
    from dat_ds import attacks, compress
    from dat_ds.metrics import Timers
    from dat_ds.models import create_model
    from dat_ds.engine import initialize
    from dat_ds.trainer import train_epoch

    model = create_model("test_resnet", 10, 1, 28, stem="native")
    with pytest.raises(ConfigError, match="torch_autocast"):
        initialize(model, {"train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True}}, 1, 1)
    cfg = load_config(str(__import__("conftest").ROOT / "ds_configs" / "lamb_bf16.json"))
    cfg["train_micro_batch_size_per_gpu"] = 8
    engine = initialize(model, cfg, 1, 1)
    before = [p.detach().clone() for p in engine.module.parameters()]
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    stats = train_epoch(engine, [(x, y)], attacks.create("pgd", eps=0.1, steps=2), compress.create("none"), Timers())
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())  # fp32 master weights
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    assert stats["micro_steps"] == 1


def test_bf16_autocast_trains_and_exchanges_fp32_gradients():
    """bf16 autocast: forwards in bf16, fp32 weights and gradients, and every compressor sees fp32."""
    import torch

    from dat_ds import attacks, compress, dist
    from dat_ds.engine import initialize
    from dat_ds.models import create_model
    from dat_ds.timing import Timers
    from dat_ds.trainer import train_epoch
    dist.init()
    torch.manual_seed(0)
    model = create_model("test_resnet", 10, 1, 28, stem="native")
    cfg = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0,
           "torch_autocast": {"enabled": True, "dtype": "bfloat16"},
           "optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}}
    check_config(cfg)
    engine = initialize(model, cfg, steps_per_epoch=4, epochs=1)
    seen = []

    class Recording(compress.COMPRESSORS.get("none")):
        def all_reduce_flat_(self, flat, n, shapes=None):
            seen.append(flat.dtype)
            return super().all_reduce_flat_(flat, n, shapes)

        def all_reduce_(self, grads):
            seen.extend(g.dtype for g in grads)
            return super().all_reduce_(grads)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in engine.module.parameters()]
    train_epoch(engine, [(x, y)] * 2, attacks.create("pgd", eps=0.1, steps=1), Recording(), Timers())
    assert seen and set(seen) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
