
import io

import pytest
import torch

from dat_ds.optim import Lamb, check_lr_rule, create_optimizer, create_scheduler, lr_plan, warmup_piecewise


def reference_lamb_step(params, grads, lr, betas, eps, wd, c_l, c_u, state, t):
    """Eq. (6) of the DAT paper on each layer, written out with Python loops."""
    b1, b2 = betas
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = state.setdefault(i, (torch.zeros_like(p), torch.zeros_like(p)))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        state[i] = (m, v)
        u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps) + wd * p
        w_norm, u_norm = p.norm().item(), u.norm().item()
        ratio = min(max(w_norm, c_l), c_u) / u_norm if w_norm > 0 and u_norm > 0 else 1.0
        out.append(p - lr * ratio * u)
    return out


def test_lamb_matches_layerwise_formula():
    torch.manual_seed(0)
    params = [torch.randn(5, 3) * 4, torch.randn(7) * 0.01, torch.zeros(3), torch.randn(2, 2) * 100]
    ps = [p.clone().requires_grad_(True) for p in params]
    opt = Lamb([{"params": ps, "weight_decay": 0.01}], lr=0.1, c_l=0.05, c_u=5.0)
    ref, state = [p.clone() for p in params], {}
    for t in range(1, 4):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        ref = reference_lamb_step(ref, grads, 0.1, (0.9, 0.999), 1e-6, 0.01, 0.05, 5.0, state, t)
        for p, r in zip(ps, ref):
            assert torch.allclose(p.detach(), r, atol=1e-5, rtol=1e-5)


def test_lamb_step_size_is_clipped_by_phi():
    p = torch.full((100,), 1000.0, requires_grad=True)  # ||p|| = 10000, clipped to c_u
    opt = Lamb([p], lr=1.0, c_l=0.0, c_u=10.0)
    p.grad = torch.randn(100)
    before = p.detach().clone()
    opt.step()
    assert (p.detach() - before).norm().item() == pytest.approx(10.0, rel=1e-4)


def test_lamb_rejects_bad_settings():
    with pytest.raises(ValueError, match="c_l <= c_u"):
        Lamb([torch.zeros(1, requires_grad=True)], c_l=2, c_u=1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        Lamb([torch.zeros(1, requires_grad=True)], lr=0)


def test_optimizer_from_spec_excludes_1d_params_from_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = create_optimizer({"type": "Lamb", "params": {"lr": 0.01, "weight_decay": 0.1}}, model)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.ndim for p in decay["params"]] == [2]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3
    with pytest.raises(ValueError, match="unknown optimizer 'Adamax'"):
        create_optimizer({"type": "Adamax"}, model)
    with pytest.raises(ValueError, match="has no setting"):
        create_optimizer({"type": "SGD", "params": {"betas": [0.9, 0.9]}}, model)


def test_warmup_then_piecewise_decay():
    f = [warmup_piecewise(s, steps_per_epoch=10, epochs=10, warmup_epochs=2, milestones=(0.5, 0.75), gamma=0.1)
         for s in range(100)]
    assert f[0] == pytest.approx(1 / 20) and f[19] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:19], f[1:20]))  # linear ramp
    assert f[20] == f[49] == 1.0 and f[50] == pytest.approx(0.1) and f[75] == pytest.approx(0.01)


def test_scheduler_scales_lr_with_global_batch():
    model = torch.nn.Linear(2, 2)
    opt = create_optimizer({"type": "SGD", "params": {"lr": 0.1}}, model)
    sched = create_scheduler({"type": "WarmupPiecewise", "params": {"base_batch_size": 256, "milestones": [0.5]}},
                             opt, steps_per_epoch=4, epochs=2, global_batch_size=1024)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.04)
    with pytest.raises(ValueError, match="milestones in \\(0, 1\\)"):
        create_scheduler({"params": {"milestones": [5, 8]}}, opt, 4, 2, 1024)


@pytest.mark.parametrize("rule, scale", [("none", 1.0), ("linear", 8.0), ("sqrt", 8 ** 0.5)])
def test_lr_rule_sets_the_peak_lr(rule, scale, capsys):
    opt = create_optimizer({"type": "Lamb", "params": {"lr": 0.01}}, torch.nn.Linear(2, 2))
    sched = create_scheduler({"type": "WarmupPiecewise", "params": {"lr_rule": rule, "base_batch_size": 128,
                                                                    "milestones": [0.5]}},
                             opt, steps_per_epoch=10, epochs=4, global_batch_size=1024)
    assert sched.lr_plan.lr_scale == pytest.approx(scale)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * scale)  # no warm-up: the peak at once
    assert f"peak lr {0.01 * scale:.4g}" in capsys.readouterr().out


def test_warmup_scales_with_the_batch_and_is_capped_by_a_share_of_the_run():
    plan = lr_plan(steps_per_epoch=10, epochs=20, global_batch_size=1024, warmup_epochs=1, base_batch_size=128,
                   lr_rule="linear", warmup_rule="linear")
    assert (plan.lr_scale, plan.warmup_epochs, plan.warmup_steps) == (8.0, 8.0, 80)  # 1 epoch at 128 -> 8 at 1024
    short = lr_plan(steps_per_epoch=10, epochs=2, global_batch_size=1024, warmup_epochs=1, base_batch_size=128,
                    warmup_rule="linear", max_warmup_fraction=0.25)
    assert short.warmup_epochs == 0.5 and short.warmup_steps == 5
    assert lr_plan(10, 2, 1024, warmup_epochs=3).lr_scale == 1.0  # no base batch: no scaling


def test_capped_warmup_ramps_linearly_to_the_scaled_peak():
    opt = create_optimizer({"type": "SGD", "params": {"lr": 0.1}}, torch.nn.Linear(2, 2))
    sched = create_scheduler({"type": "WarmupPiecewise",
                              "params": {"warmup_epochs": 5, "max_warmup_fraction": 0.2, "base_batch_size": 256,
                                         "lr_rule": "linear", "milestones": [0.9]}},
                             opt, steps_per_epoch=10, epochs=2, global_batch_size=512, verbose=False)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.05, 0.1, 0.15, 0.2]) and lrs[4:] == pytest.approx([0.2] * 6)


@pytest.mark.parametrize("params, message", [
    ({"lr_rule": "cubic", "base_batch_size": 128}, "lr_rule must be one of none, linear, sqrt, got 'cubic'"),
    ({"lr_rule": "sqrt"}, "set base_batch_size"),
    ({"warmup_rule": "linear"}, "set base_batch_size"),
    ({"base_batch_size": 0}, "base_batch_size must be a positive integer"),
    ({"max_warmup_fraction": 0}, "max_warmup_fraction must lie in \\(0, 1\\]"),
    ({"warmup_epochs": -1}, "warmup_epochs must be >= 0"),
])
def test_lr_rule_settings_are_checked(params, message):
    opt = create_optimizer({"type": "SGD", "params": {"lr": 0.1}}, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=message):
        create_scheduler({"type": "WarmupPiecewise", "params": params}, opt, 4, 2, 1024)
    with pytest.raises(ValueError, match=message):
        check_lr_rule(**params)


def test_scheduler_state_loads_weights_only():
    """The LR plan is rebuilt from the config, not pickled: checkpoints stay plain tensors and numbers."""
    opt = create_optimizer({"type": "Lamb", "params": {"lr": 0.01}}, torch.nn.Linear(2, 2))
    spec = {"type": "WarmupPiecewise", "params": {"lr_rule": "sqrt", "base_batch_size": 128, "warmup_epochs": 1}}
    sched = create_scheduler(spec, opt, 10, 4, 512, verbose=False)
    for _ in range(3):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    again = create_scheduler(spec, opt, 10, 4, 512, verbose=False)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.last_epoch == 3 and again.get_last_lr() == sched.get_last_lr()
    assert again.lr_plan == sched.lr_plan


def test_vit_position_embedding_and_class_token_get_no_weight_decay():
    """timm's ViT declares pos_embed and cls_token exempt (``no_weight_decay()``); they are not 1-D,
    and the backbone sits inside the normalizing wrapper, so only its declaration finds them."""
    from dat_ds.models import create_model
    model = create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, pretrained=False)
    opt = create_optimizer({"type": "Lamb", "params": {"lr": 0.01, "weight_decay": 0.1}}, model)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert {"backbone.pos_embed", "backbone.cls_token"} <= no_decay
    assert model.backbone.pos_embed.ndim == model.backbone.cls_token.ndim == 3
    assert "backbone.patch_embed.proj.weight" in decay and "backbone.blocks.0.attn.qkv.weight" in decay
    assert all(model.get_parameter(n).ndim <= 1 for n in no_decay - {"backbone.pos_embed", "backbone.cls_token"})
    everything = create_optimizer({"type": "Lamb", "params": {"lr": 0.01, "weight_decay": 0.1, "no_decay_1d": False}},
                                  model)
    assert len(everything.param_groups) == 1 and everything.param_groups[0]["weight_decay"] == 0.1
