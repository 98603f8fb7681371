"""transformers backbones (``--backbone transformers:PATH``) on tiny models saved with
``save_pretrained``: the [0, 1] contract, head, channels, resolution, rebuild, and the recipes."""
import json
import shutil

import pytest
import torch

from conftest import ROOT, refused_in_process, run_deepspeed, run_recipe
from dat_ds import attacks, compress
from dat_ds.checkpoint_io import find_checkpoint, load_model
from dat_ds.models import check_backbone, create_model, split_backbone

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TINY = ["--train-limit", "96", "--eval-limit", "32", "--steps", "2", "--eval-steps", "2", "--eval-batch-size", "32",
        "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json"]


def tiny_config(family: str, num_channels: int = 3):
    """A few-thousand-parameter model of ``family``: a step takes milliseconds."""
    import transformers as tf
    if family == "vit":  # 32 px native, so 28 px Fashion-MNIST needs interpolated position embeddings
        return tf.ViTConfig(image_size=32, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, num_labels=3, num_channels=num_channels)
    if family == "convnext":
        return tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3)
    if family == "resnet":
        return tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                               num_labels=3)
    raise ValueError(family)


def save_tiny(folder, family: str, processor: bool = True):
    """``save_pretrained`` of a seeded tiny model (and an image processor with MEAN/STD)."""
    from transformers import AutoModelForImageClassification, ViTImageProcessor
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(tiny_config(family))
    model.save_pretrained(folder)
    if processor:
        ViTImageProcessor(image_mean=list(MEAN), image_std=list(STD)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """ViT and ResNet with an image processor config; ConvNeXt without one (ImageNet statistics)."""
    root = tmp_path_factory.mktemp("hf")
    return {f: save_tiny(root / f, f, processor=f != "convnext") for f in ("vit", "convnext", "resnet")}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_logits(folder, model, x):
    """What the saved model computes on ``x`` normalized by hand (grey repeated to RGB)."""
    hf = model.backbone.model
    mean, std = (MEAN, STD) if (folder / "preprocessor_config.json").exists() else IMAGENET
    z = (x.expand(-1, 3, -1, -1) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return hf(pixel_values=z, **({"interpolate_pos_encoding": True} if model.backbone.interpolate else {})).logits


@pytest.mark.parametrize("family", ["vit", "convnext", "resnet"])
def test_pixels_in_logits_out_with_the_processors_normalization(folders, family):
    model = create_model(f"transformers:{folders[family]}", 5, 1, 28, mean=(0.3,), std=(0.3,)).eval()
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (4, 5) and logits.dtype == torch.float32
    assert torch.allclose(logits, hf_logits(folders[family], model, x), atol=1e-5)
    mean = model.normalize.mean.flatten().tolist()
    assert mean == pytest.approx(MEAN if family != "convnext" else IMAGENET[0]), "the processor's, not the dataset's"
    logits[:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["vit", "convnext", "resnet"])
def test_head_is_resized_and_the_rest_comes_from_the_folder(folders, family):
    from transformers import AutoModelForImageClassification
    model = create_model(f"transformers:{folders[family]}", 7, 3, 32, class_names=[f"c{i}" for i in range(7)])
    head = model.backbone.get_classifier()
    assert head.out_features == 7 and model.backbone.model.config.id2label[6] == "c6"
    saved = AutoModelForImageClassification.from_pretrained(folders[family]).state_dict()  # its 3 classes
    ours = model.backbone.model.state_dict()
    head_keys = {k for k in saved if saved[k].shape != ours[k].shape}
    assert head_keys and all(k.startswith("classifier") for k in head_keys)
    assert all(torch.equal(saved[k], ours[k]) for k in saved if k not in head_keys), "pre-trained weights loaded"


def test_vit_position_embeddings_are_interpolated_at_another_resolution(folders):
    name = f"transformers:{folders['vit']}"
    native = create_model(name, 3, 3, 32).eval()
    assert not native.backbone.interpolate, "32 px is the config's size: nothing to interpolate"
    for size in (16, 28, 48):
        model = create_model(name, 3, 3, size).eval()
        x = torch.rand(2, 3, size, size)
        assert model.backbone.interpolate and model(x).shape == (2, 3)
        assert torch.allclose(model(x), hf_logits(folders["vit"], model, x), atol=1e-5)


def test_backbone_spellings_and_one_line_errors(folders, tmp_path):
    assert split_backbone("resnet18") == split_backbone("timm:resnet18") == ("timm", "resnet18")
    assert split_backbone(f"transformers:{folders['vit']}") == ("transformers", str(folders["vit"]))
    check_backbone("timm:resnet18")
    check_backbone(f"transformers:{folders['resnet']}")
    (tmp_path / "empty").mkdir()
    from transformers import BertConfig
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(
        tmp_path / "bert")
    for name, message in [("timm:resnet19", "unknown backbone 'resnet19'"),
                          ("transformers:/nonexistent/vit", "'/nonexistent/vit': no such folder"),
                          (f"transformers:{tmp_path / 'empty'}", "has no config.json"),
                          (f"transformers:{tmp_path / 'bert'}", "a 'bert' model is not an image classifier"),
                          ("transformers:", "names no model")]:
        with pytest.raises(ValueError, match=message) as err:
            check_backbone(name)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="--stem small is for timm backbones"):
        create_model(f"transformers:{folders['vit']}", 3, 3, 32, stem="small")
    with pytest.raises(ValueError, match="does not run at 4 px"):
        create_model(f"transformers:{folders['convnext']}", 3, 3, 4)  # 1x1 after the stem, then a stride-2 conv


def test_checkpoint_rebuilds_after_the_folder_moved(folders, tmp_path):
    folder = shutil.copytree(folders["convnext"], tmp_path / "convnext")
    meta = {"backbone": f"transformers:{folder}", "stem": "auto", "dataset": "fashion_mnist", "num_classes": 4,
            "in_chans": 1, "img_size": 28, "mean": [0.3], "std": [0.3], "classes": None}
    torch.manual_seed(3)
    model = create_model(meta["backbone"], 4, 1, 28).eval()
    torch.save({"module": model.state_dict(), "meta": meta}, tmp_path / "mp_rank_00_model_states.pt")
    shutil.rmtree(folder)
    rebuilt, _ = load_model(tmp_path / "mp_rank_00_model_states.pt")
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(rebuilt(x), model(x))


@pytest.mark.parametrize("name", attacks.names())
def test_every_attack_runs_on_a_transformers_backbone(folders, name):
    torch.manual_seed(0)
    model = create_model(f"transformers:{folders['vit']}", 3, 1, 28)
    atk = attacks.create(name, eps=0.1)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 0])
    x_adv = atk.perturb(model, x, y)
    assert x_adv.shape == x.shape and torch.isfinite(x_adv).all() and 0 <= x_adv.min() and x_adv.max() <= 1
    if name != "none":
        assert not torch.equal(x_adv, x)
    if getattr(atk, "norm", "linf") == "linf":
        assert (x_adv - x).abs().max() <= 0.1 + 1e-6


# --- models that declare other input channels ------------------------------------------------

def save_vit(folder, num_channels: int, mean=None, std=None):
    """A tiny ViT for ``num_channels``-channel images; its processor is ViTImageProcessor's default
    (0.5 for each of 3 channels, what ``save_pretrained`` writes unless told otherwise) or ``mean``/``std``."""
    from transformers import AutoModelForImageClassification, ViTImageProcessor
    torch.manual_seed(0)
    AutoModelForImageClassification.from_config(tiny_config("vit", num_channels)).save_pretrained(folder)
    stats = {} if mean is None else {"image_mean": list(mean), "image_std": list(std)}
    ViTImageProcessor(**stats).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def grey_vit(tmp_path_factory):
    return save_vit(tmp_path_factory.mktemp("hf") / "grey_vit", 1)


def test_a_grey_model_is_fed_grey_images(grey_vit):
    """num_channels=1: one normalization channel, and the model sees the grey image itself (not RGB)."""
    model = create_model(f"transformers:{grey_vit}", 5, 1, 28, mean=(0.3,), std=(0.3,)).eval()
    assert model.normalize.mean.shape == (1, 1, 1, 1) and model.normalize.mean.item() == 0.5
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    logits = model(x)
    hf = model.backbone.model
    assert torch.allclose(logits, hf(pixel_values=(x - 0.5) / 0.5, interpolate_pos_encoding=True).logits, atol=1e-6)
    logits[:, 0].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_a_grey_model_without_statistics_takes_the_datasets(tmp_path):
    folder = save_vit(tmp_path / "vit", 1)
    (folder / "preprocessor_config.json").unlink()
    model = create_model(f"transformers:{folder}", 5, 1, 28, mean=(0.3,), std=(0.4,))
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.3])
    assert (1 / model.normalize.inv_std).flatten().tolist() == pytest.approx([0.4])


def test_channel_mismatches_are_refused_when_the_model_is_built(grey_vit, tmp_path):
    with pytest.raises(ValueError, match="takes grey images .* and the data is RGB") as err:
        create_model(f"transformers:{grey_vit}", 5, 3, 28)
    assert "\n" not in str(err.value)
    four = save_vit(tmp_path / "vit4", 4, mean=[0.5] * 4, std=[0.5] * 4)
    with pytest.raises(ValueError, match="takes 4-channel images and the data has 1 channel"):
        create_model(f"transformers:{four}", 5, 1, 28)
    assert create_model(f"transformers:{four}", 5, 4, 28)(torch.rand(2, 4, 28, 28)).shape == (2, 5)
    odd = save_vit(tmp_path / "odd", 1, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"image_mean has 3 values .* for a 1-channel model"):
        create_model(f"transformers:{odd}", 5, 1, 28)


def test_a_grey_vit_trains_through_the_recipe_and_rebuilds(grey_vit, tmp_path):
    out = tmp_path / "run"
    r = run_recipe(["--backbone", f"transformers:{grey_vit}", *TINY, "--epochs", "1", "--output-dir", out])
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 3 and 0 <= summary["robust_acc"] <= summary["clean_acc"] <= 1
    state = torch.load(find_checkpoint(out), weights_only=True)
    assert state["module"]["normalize.mean"].shape == (1, 1, 1, 1)
    assert state["module"]["backbone.model.vit.embeddings.patch_embeddings.projection.weight"].shape[1] == 1
    model, _ = load_model(find_checkpoint(out))
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


# --- the recipes, as a user runs them ---------------------------------------------------------

@pytest.fixture(scope="module")
def vit_run(folders, tmp_path_factory):
    """2 ranks through the deepspeed launcher: the tiny ViT on 28 px grey Fashion-MNIST (RGB,
    interpolated position embeddings), PGD-2, the error-feedback sign compressor."""
    out = tmp_path_factory.mktemp("vit") / "run"
    r = run_deepspeed(ROOT / "recipes" / "fashion_mnist_dat.py",
                      ["--backbone", f"transformers:{folders['vit']}", *TINY, "--epochs", "1", "--attack", "pgd",
                       "--compressor", "ef_sign", "--output-dir", out])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_two_ranks_train_a_transformers_backbone(vit_run, folders):
    summary = json.loads((vit_run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backbone"] == f"transformers:{folders['vit']}"
    assert 0 <= summary["robust_acc"] <= summary["clean_acc"] <= 1 and summary["bytes_sent_per_rank"] > 0
    state = torch.load(find_checkpoint(vit_run), weights_only=True)
    assert state["meta"]["backbone"] == f"transformers:{folders['vit']}"
    config = json.loads(bytes(state["module"]["backbone.hf_config_json"].tolist()).decode())
    assert config["model_type"] == "vit" and config["image_size"] == 32, "the config travels with the weights"
    assert state["module"]["backbone.model.classifier.weight"].shape[0] == 10


def test_evaluate_runs_pgd_and_autoattack_on_it(vit_run):
    out = vit_run / "eval_aa"
    r = run_recipe(["--checkpoint", vit_run, "--eval-limit", "8", "--batch-size", "8", "--pgd-steps", "2",
                    "--eps-sweep", "--steps-sweep", "--output-dir", out], script=ROOT / "recipes" / "evaluate.py")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "eval_summary.json").read_text())
    assert s["model"]["backbone"].startswith("transformers:") and s["eval_samples"] == 8
    assert s["autoattack"]["robust_acc"] <= s["pgd"][0]["robust_acc"] <= s["clean_acc"]


@pytest.mark.slow  # a second training run (~7 s)
def test_finetune_replaces_the_transformers_head(vit_run):
    out = vit_run.parent / "finetune"
    r = run_recipe(["--from", vit_run, "--dataset", "fashion_mnist", "--classes", "0-4", *TINY, "--epochs", "1",
                    "--output-dir", out], script=ROOT / "recipes" / "finetune.py")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["skipped_keys"] == ["backbone.model.classifier.bias", "backbone.model.classifier.weight"]
    assert s["loaded_tensors"] > 10 and s["backbone"].startswith("transformers:")


@pytest.mark.slow  # stop and resume under the launcher (~15 s)
def test_resume_and_trades_with_qsgd_on_convnext(folders, tmp_path):
    args = ["--backbone", f"transformers:{folders['convnext']}", *TINY, "--loss", "trades", "--compressor", "qsgd",
            "--output-dir", tmp_path / "run"]
    r = run_recipe([*args, "--epochs", "2", "--stop-after", "1"])
    assert r.returncode == 0 and "stopping after 1 epoch" in r.stdout, r.stderr[-3000:]
    r = run_recipe([*args, "--epochs", "2", "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 2


def test_bad_transformers_backbone_exits_with_one_line(tmp_path, monkeypatch, capsys):
    code, lines, err = refused_in_process(["--backbone", f"transformers:{tmp_path / 'gone'}", *TINY, "--output-dir",
                                           tmp_path / "out"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert len(lines) == 1 and "no such folder" in lines[0], err[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("compressor", compress.COMPRESSORS.names())
def test_every_compressor_on_two_ranks(folders, tmp_path, compressor):
    r = run_deepspeed(ROOT / "recipes" / "fashion_mnist_dat.py",
                      ["--backbone", f"transformers:{folders['resnet']}", *TINY, "--epochs", "1",
                       "--compressor", compressor, "--output-dir", tmp_path / "run"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_smooth_at_and_certify(folders, tmp_path):
    out = tmp_path / "smooth"
    r = run_recipe(["--backbone", f"transformers:{folders['resnet']}", *TINY, "--epochs", "1", "--output-dir", out],
                   script=ROOT / "recipes" / "smooth_at.py")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_recipe(["--checkpoint", out, "--eval-limit", "3", "--n0", "10", "--n", "50", "--batch-size", "50"],
                   script=ROOT / "recipes" / "certify.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "certify" / "certify_summary.json").is_file()


def test_no_pretrained_starts_from_random_weights(folders):
    """``--no-pretrained`` (and fine-tuning's ``--scratch``): the folder's architecture, not its weights."""
    from transformers import AutoModelForImageClassification
    saved = AutoModelForImageClassification.from_pretrained(folders["resnet"]).state_dict()
    torch.manual_seed(1)
    ours = create_model(f"transformers:{folders['resnet']}", 3, 3, 32, pretrained=False).backbone.model.state_dict()
    weights = [k for k in saved if k.endswith("weight") and saved[k].dim() > 1]
    assert weights and not any(torch.equal(saved[k], ours[k]) for k in weights)
