"""``--channels-last`` and ``--compile`` (:mod:`dat_ds.speed`): the modes, the memory format kept
through the attacks and the gradients, compiled and channels-last steps giving eager's losses and
gradients, graphs compiled once (no recompiles across epochs, evaluations and a resume), plain
checkpoint keys, and a backbone that cannot be compiled running eager with one line.

The fast tests compile with cheap backends (``eager``: dynamo's graph capture only;
``aot_eager``: also AOTAutograd's forward and backward graphs); the slow ones with inductor.
"""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from conftest import ROOT
from dat_ds import attacks, compress, dist, objectives, speed
from dat_ds.attacks.conadv import detached_copy
from dat_ds.data import to_device
from dat_ds.engine import initialize
from dat_ds.models import create_model
from dat_ds.timing import Timers
from dat_ds.trainer import TrainConfig, train, train_epoch

CL = torch.channels_last
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# momentum SGD: an update proportional to the gradient, so rounding differences stay rounding-sized
# (Adam-like first steps, g / (|g| + eps), magnify them where a gradient is about 0)
DS_CONFIG = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0,
             "optimizer": {"type": "SGD", "params": {"lr": 0.05}}}
METHODS = {"pgd": ("pgd", {"steps": 2}, "madry"), "fgsm_rs": ("fgsm_rs", {}, "madry"),
           "free": ("free", {"steps": 2}, "madry"), "conadv": ("conadv", {}, "madry"),
           "trades": ("pgd", {"steps": 2, "loss": "kl"}, "trades")}


def channels_last(t: torch.Tensor) -> bool:
    """Laid out channels-last and not contiguous (3 channels, more than 1 px: the two differ)."""
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def tiny(in_chans: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return create_model("test_resnet", 10, in_chans, 16, stem="native")


def uint8_batches(n: int = 2, batch: int = 8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (batch, 3, 16, 16), dtype=torch.uint8, generator=g),
             torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


# --- the modes ----------------------------------------------------------------------------------

def test_auto_means_a_gpu_and_for_channels_last_a_convolutional_backbone():
    conv = tiny()
    vit = create_model("test_vit", 10, 3, 32, stem="native")
    assert speed.convolutional(conv) and not speed.convolutional(vit)
    assert speed.wants_channels_last("auto", conv, CUDA) and not speed.wants_channels_last("auto", conv, CPU)
    assert not speed.wants_channels_last("auto", vit, CUDA)
    assert speed.wants_channels_last("on", conv, CPU) and not speed.wants_channels_last("off", conv, CUDA)
    assert speed.wants_compile("auto", CUDA) and not speed.wants_compile("auto", CPU)
    assert speed.wants_compile("on", CPU) and not speed.wants_compile("off", CUDA)
    with pytest.raises(ValueError, match="--channels-last on: the backbone has no 2-d convolution"):
        speed.wants_channels_last("on", nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), CPU)


def test_bad_modes_are_refused_naming_the_flag():
    for field, flag in (("channels_last", "--channels-last"), ("compile", "--compile")):
        with pytest.raises(ValueError, match=f"{flag} must be one of auto, on, off, got 'always'"):
            TrainConfig(**{field: "always"}).validate()
    from dat_ds import cli
    p = cli.parser("t")
    with pytest.raises(ValueError, match="--compile: invalid choice: 'always'"):  # one line, exit 2 in a recipe
        p.parse_args(["--compile", "always"])
    args = p.parse_args(["--channels-last", "on", "--compile", "off"])
    cfg = cli.train_config(args)
    assert (cfg.channels_last, cfg.compile) == ("on", "off")


# --- the memory format through the attacks and the gradients ------------------------------------

class Recorder(nn.Module):
    """The model, recording whether each input and the gradient reaching it are channels-last."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs, self.grads = model, [], []

    def forward(self, x):
        self.inputs.append(channels_last(x))
        if x.requires_grad:
            x.register_hook(lambda g: self.grads.append(channels_last(g)))
        return self.model(x)


def test_channels_last_holds_through_pgd_free_and_the_flat_gradients():
    dist.init()
    engine = initialize(tiny(), DS_CONFIG, 4, 1)
    speed.prepare(engine.module, "on", "off", CPU)
    assert speed.input_format(engine.module) == CL and channels_last(engine.module.backbone.conv1[0].weight)
    x, y = to_device(*uint8_batches(1)[0], CPU, speed.input_format(engine.module))
    assert channels_last(x) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    rec = Recorder(engine.module)
    x_adv = attacks.create("pgd", eps=0.1, steps=2).perturb(rec, x, y)
    assert channels_last(x_adv) and rec.inputs == [True, True] and rec.grads == [True, True]
    free = attacks.create("free", eps=0.1, steps=2)
    x_free = free.adversarial_input(x)
    torch.nn.functional.cross_entropy(engine.module(x_free), y).backward()  # what the training backward leaves
    assert channels_last(x_free) and channels_last(x_free.grad)
    engine.module.zero_grad(set_to_none=True)
    free.update(x, x_free)
    assert channels_last(free.state_dict()["delta"])
    # the flat gradient buffer gives each weight a gradient of its own layout: backward fills it in place
    train_epoch(engine, uint8_batches(1), attacks.create("pgd", eps=0.1, steps=1), compress.create("none"), Timers())
    for p in engine.module.parameters():
        assert p.grad.stride() == p.stride(), (p.shape, p.grad.stride(), p.stride())
    # contiguous models get contiguous batches, as before
    plain = tiny()
    assert speed.input_format(plain) == torch.contiguous_format
    assert to_device(*uint8_batches(1)[0], CPU, speed.input_format(plain))[0].is_contiguous()


def test_random_starts_do_not_depend_on_the_memory_format():
    """The same seed gives the same random start with or without channels-last batches (so a
    channels-last training run's evaluation matches recipes/evaluate.py's on a plain model)."""
    x = torch.rand(4, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    model(x)
    y = torch.randint(0, 10, (4,))
    for name in ("pgd", "pgd_l2", "noise"):
        outs = []
        for layout in (torch.contiguous_format, CL):
            torch.manual_seed(5)
            outs.append(attacks.create(name, eps=0.05, **({} if name == "noise" else {"steps": 1}))
                        .perturb(model, x.contiguous(memory_format=layout), y))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


# --- compiled and channels-last steps against eager --------------------------------------------

def step_record(method: str, channels_last_mode: str, compile_mode: str, backend=None):
    """Two minibatches of ``method`` on a fresh engine: the epoch's loss and the gradients every
    exchange saw (in logical order, whatever their layout)."""
    name, kw, loss = METHODS[method]
    dist.init()
    engine = initialize(tiny(), DS_CONFIG, 4, 1)
    speed.prepare(engine.module, channels_last_mode, compile_mode, CPU, backend=backend)
    seen = []

    class Recording(compress.COMPRESSORS.get("none")):
        def all_reduce_flat_(self, flat, n, shapes=None):
            seen.append([p.grad.clone() for p in engine.module.parameters()])
            return super().all_reduce_flat_(flat, n, shapes)

    torch.manual_seed(3)
    stats = train_epoch(engine, uint8_batches(2), attacks.create(name, eps=0.05, **kw), Recording(), Timers(),
                        objectives.create(loss))
    return stats["train_loss"], seen, speed.describe(engine.module)


def assert_same_step(method: str, backend) -> None:
    loss, grads, plain = step_record(method, "off", "off")
    loss_fast, grads_fast, fast = step_record(method, "on", "on", backend)
    assert not plain.channels_last and not plain.compiled
    assert fast.channels_last and fast.compiled
    assert len(grads) == len(grads_fast) == 2 * METHODS[method][1].get("steps", 1) ** (method == "free")
    assert abs(loss - loss_fast) <= 1e-4 * max(1.0, abs(loss)), (loss, loss_fast)
    for step, step_fast in zip(grads, grads_fast):
        for g, g_fast in zip(step, step_fast):
            torch.testing.assert_close(g_fast, g, rtol=1e-3, atol=1e-5)


def test_compiled_channels_last_pgd_gives_eagers_loss_and_gradients():
    assert_same_step("pgd", "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_compiled_by_inductor_and_channels_last_gives_eagers_steps(method):
    assert_same_step(method, "inductor")


# --- compiled once -----------------------------------------------------------------------------

def run_config(out: Path, **kw) -> TrainConfig:
    return TrainConfig(backbone="test_resnet", stem="native", train_limit=64, eval_limit=48, eval_batch_size=32,
                       epochs=3, eval_steps=1, attack="pgd", attack_kwargs={"steps": 1}, compile="on",
                       channels_last="on", output_dir=str(out),
                       deepspeed_config=str(ROOT / "tests" / "configs" / "tiny_lamb.json"), **kw)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_graphs_compile_in_the_first_epoch_only_through_epochs_evaluations_and_a_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "BACKEND", "eager")
    out = tmp_path / "run"
    start = graphs()
    assert train(run_config(out, stop_after=1)) == {"stopped_after_epoch": 0}
    warm = graphs()
    assert warm > start  # training, attack and evaluation graphs
    summary = train(run_config(out, resume=True))
    assert graphs() == warm, "recompiled after the first epoch"
    assert summary["speed"] == {"channels_last": True, "compiled": True, "compile_backend": "eager"}
    assert json.loads((out / "summary.json").read_text())["speed"]["compiled"] is True
    # checkpoints keep plain keys and load into a plain model
    from dat_ds.checkpoint_io import find_checkpoint, load_model, read_states
    model_file = find_checkpoint(out)
    keys = read_states(model_file)["module"].keys()
    assert keys and not any("_orig_mod" in k for k in keys)
    model, meta = load_model(model_file)
    assert meta["backbone"] == "test_resnet" and not speed.describe(model).compiled
    assert speed.input_format(model) == torch.contiguous_format


def test_conadvs_attacker_copy_is_compiled_and_runs_its_own_weights():
    model = tiny()
    speed.prepare(model, "off", "on", CPU, backend="eager")
    copy = detached_copy(model)
    assert speed.describe(copy).compiled and copy.backbone._compiled_call_impl.module is copy.backbone
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        for p in copy.parameters():
            p.zero_()
        assert not copy(x).any() and model(x).any()


def test_a_backbone_that_cannot_be_compiled_runs_eager_and_says_so_in_one_line(capsys):
    def failing(gm, example_inputs):
        raise RuntimeError("no kernel for this")

    model = tiny()
    x = torch.rand(2, 3, 16, 16)
    expected = model(x)
    speed.prepare(model, "off", "on", CPU, backend=failing)
    assert speed.describe(model).compiled
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(model(x), expected)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile" in err[0] and "cannot be compiled" in err[0] and "runs eager" in err[0]
    assert "no kernel for this" in err[0]
    assert not speed.describe(model).compiled


# --- a short run trains as far -------------------------------------------------------------------

@pytest.mark.slow
def test_a_compiled_channels_last_run_trains_to_eagers_accuracy(tmp_path):
    """fashion-MNIST, 2,000 images, 2 epochs of PGD-1: the same accuracy within a few points
    (the runs differ only by floating-point rounding, which grows over the steps)."""
    def run(name, cl, comp):
        cfg = TrainConfig(backbone="test_resnet", stem="native", train_limit=2000, eval_limit=500, epochs=2,
                          eval_steps=2, attack="pgd", attack_kwargs={"steps": 1}, channels_last=cl, compile=comp,
                          output_dir=str(tmp_path / name),
                          deepspeed_config=str(ROOT / "tests" / "configs" / "tiny_lamb.json"))
        return train(cfg)
    eager = run("eager", "off", "off")
    fast = run("fast", "on", "on")
    assert fast["speed"] == {"channels_last": True, "compiled": True, "compile_backend": "inductor"}
    assert eager["clean_acc"] > 0.5
    assert abs(fast["clean_acc"] - eager["clean_acc"]) < 0.05
    assert abs(fast["robust_acc"] - eager["robust_acc"]) < 0.05


# --- ConAdv's second stream ------------------------------------------------------------------------

class OnTheGPU:
    """Stands for a batch on a CUDA device where only ``is_cuda`` is asked."""
    is_cuda = True


def test_conadv_takes_a_second_stream_only_where_it_pays(monkeypatch):
    """auto: a second CUDA stream beside the update only in a multi-rank run (where the update
    waits on the gradient exchange); one rank runs the attack in sequence; never on the CPU."""
    cpu = torch.rand(2, 3, 4, 4)
    auto, on, off = (attacks.create("conadv", eps=0.1, side_stream=m) for m in ("auto", "on", "off"))
    assert not auto.overlaps(OnTheGPU()) and on.overlaps(OnTheGPU()) and not off.overlaps(OnTheGPU())
    assert not any(a.overlaps(cpu) for a in (auto, on, off))
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    assert auto.overlaps(OnTheGPU()) and not off.overlaps(OnTheGPU())
    with pytest.raises(ValueError, match="--side-stream must be one of auto, on, off, got 'sometimes'"):
        TrainConfig(attack="conadv", attack_kwargs={"side_stream": "sometimes"}).validate()
    from dat_ds import cli
    args = cli.parser("t").parse_args(["--attack", "conadv", "--side-stream", "off"])
    assert cli.train_config(args).attack_kwargs["side_stream"] == "off"
    assert "second CUDA stream" in cli.parser("t").format_help()


@pytest.mark.gpu
def test_conadv_in_sequence_and_on_a_second_stream_give_the_same_batches():
    model = tiny().cuda()
    x, y = torch.rand(8, 3, 16, 16, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    out = []
    for mode in ("on", "off"):
        torch.manual_seed(0)
        attack = attacks.create("conadv", eps=0.05, side_stream=mode)
        assert attack.overlaps(x) == (mode == "on")
        out.append(attack.collect(attack.launch(model, x, y)))
    torch.testing.assert_close(out[0], out[1])
