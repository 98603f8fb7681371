"""recipes/export.py: the weights in the backbone's own format and model.pt2, each loaded in a fresh
process that never imports dat-ds and compared with dat-ds's predictions on the same images."""
import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, clean_env, run_recipe
from dat_ds.checkpoint_io import MODEL_FILE, load_model
from dat_ds.models import create_model
from dat_ds.models.export import export_model
from test_transformers import save_tiny

EXPORT = ROOT / "recipes" / "export.py"
# (backbone, stem, in_chans, img_size, the weights folder export writes)
CASES = {
    "timm_native": ("test_resnet", "native", 1, 28, "timm"),
    "timm_vit_patch4": ("test_vit", "auto", 3, 32, "timm"),
    "timm_small_stem": ("test_resnet", "small", 1, 28, "dat_ds"),
    "zoo": ("preactresnet18_w16", "auto", 3, 32, "dat_ds"),
    "hf_vit_grey": ("vit", "auto", 1, 28, "transformers"),
    "hf_resnet": ("resnet", "auto", 3, 32, "transformers"),
}

# Plain torch, timm and transformers only: what a user of the exported files runs.
LOADER = r'''
import json, sys
from pathlib import Path
import torch
results = {}
for case, (out, images) in json.loads(sys.argv[1]).items():
    out, x = Path(out), torch.load(images)
    got = {"pt2": torch.export.load(str(out / "model.pt2")).module()(x)}
    if (out / "timm").is_dir():
        import timm
        cfg = json.loads((out / "timm" / "config.json").read_text())
        mean = torch.tensor(cfg["pretrained_cfg"]["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(cfg["pretrained_cfg"]["std"]).view(1, -1, 1, 1)
        overlay = dict(file=str(out / "timm" / "model.safetensors"), num_classes=cfg["num_classes"])
        model = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                                  pretrained_cfg_overlay=overlay).eval()
        got["timm"] = model((x - mean) / std)
        got["timm_local_dir"] = timm.create_model(f"local-dir:{out / 'timm'}", pretrained=True).eval()((x - mean) / std)
    if (out / "transformers").is_dir():
        from transformers import AutoImageProcessor, AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained(out / "transformers").eval()
        proc = AutoImageProcessor.from_pretrained(out / "transformers")
        size = proc.size["height"]
        rgb = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        z = (rgb - torch.tensor(proc.image_mean).view(1, 3, 1, 1)) / torch.tensor(proc.image_std).view(1, 3, 1, 1)
        interpolate = getattr(model.config, "image_size", size) != size
        kw = {"interpolate_pos_encoding": True} if interpolate else {}
        got["transformers"] = model(pixel_values=z, **kw).logits
    results[case] = {k: v.detach() for k, v in got.items()}
assert "dat_ds" not in sys.modules, "the exported files must not need dat-ds"
torch.save(results, sys.argv[2])
'''


def _checkpoint(path, backbone, stem, in_chans, img_size, hf_root):
    """A model-states file as training writes it (``module`` + ``meta``), random weights."""
    name = backbone if backbone.startswith("test_") or backbone.startswith("pre") else \
        f"transformers:{save_tiny(hf_root / backbone, backbone)}"
    meta = {"backbone": name, "stem": stem, "dataset": "fashion_mnist", "num_classes": 10, "in_chans": in_chans,
            "img_size": img_size, "mean": [0.3] * in_chans, "std": [0.4] * in_chans, "classes": None}
    torch.manual_seed(0)
    model = create_model(name, 10, in_chans, img_size, meta["mean"], meta["std"], stem=stem)
    path.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "meta": meta}, path / MODEL_FILE)
    return path / MODEL_FILE


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case exported, then loaded by LOADER in one fresh ``python -I`` process."""
    root = tmp_path_factory.mktemp("export")
    jobs, ours, manifests = {}, {}, {}
    for case, (backbone, stem, chans, size, _) in CASES.items():
        model_file = _checkpoint(root / "ckpt" / case, backbone, stem, chans, size, root / "hf")
        model, meta = load_model(model_file)
        manifests[case] = export_model(model, meta, root / "out" / case)
        torch.manual_seed(1)
        x = torch.rand(5, chans, size, size)
        torch.save(x, root / f"x_{case}.pt")
        jobs[case] = (str(root / "out" / case), str(root / f"x_{case}.pt"))
        with torch.no_grad():
            ours[case] = model(x)
    proc = subprocess.run([sys.executable, "-I", "-c", LOADER, json.dumps(jobs), root / "results.pt"],
                          capture_output=True, text=True, env=clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, ours, torch.load(root / "results.pt"), manifests


@pytest.mark.parametrize("case", CASES)
def test_exported_files_reproduce_dat_ds_predictions(exported, case):
    root, ours, results, manifests = exported
    folder = CASES[case][4]
    assert (root / "out" / case / folder).is_dir(), manifests[case]["weights"]
    expected = {"pt2", "timm", "timm_local_dir"} if folder == "timm" else \
        {"pt2", "transformers"} if folder == "transformers" else {"pt2"}
    assert set(results[case]) == expected
    for fmt, logits in results[case].items():
        assert torch.equal(logits.argmax(1), ours[case].argmax(1)), (case, fmt)
        assert torch.allclose(logits, ours[case], atol=1e-4, rtol=1e-4), (case, fmt)


def test_manifest_and_weights_record_normalization_size_and_classes(exported):
    from safetensors import safe_open
    root, _, _, manifests = exported
    m = json.loads((root / "out" / "timm_native" / "export.json").read_text())
    assert m == manifests["timm_native"]
    assert m["input_size"] == [1, 28, 28] and m["mean"] == [0.3] and m["std"] == [0.4]
    assert m["class_names"] == [str(i) for i in range(10)]
    with safe_open(str(root / "out" / "timm_native" / "timm" / "model.safetensors"), "pt") as f:
        header = f.metadata()
    assert json.loads(header["mean"]) == [0.3] and json.loads(header["input_size"]) == [1, 28, 28]
    assert "small stem" in manifests["timm_small_stem"]["weights"]
    assert "not in stock timm" in manifests["zoo"]["weights"]
    hf = json.loads((root / "out" / "hf_vit_grey" / "transformers" / "preprocessor_config.json").read_text())
    assert hf["image_mean"] == pytest.approx([0.4, 0.5, 0.6]) and hf["size"] == {"height": 28, "width": 28}
    config = json.loads((root / "out" / "hf_vit_grey" / "transformers" / "config.json").read_text())
    assert config["id2label"]["9"] == "9"


@pytest.mark.slow  # a training run and two export runs (~25 s); the formats are checked in the fast suite
def test_the_recipe_exports_a_run_and_refuses_bad_input(exported, tmp_path):
    root = exported[0]
    r = run_recipe(["--checkpoint", root / "ckpt" / "hf_resnet", "--out", tmp_path / "cli"], script=EXPORT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "transformers/" in r.stdout and (tmp_path / "cli" / "model.pt2").is_file()
    (tmp_path / "file").write_text("x")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    (tmp_path / "ro").mkdir(mode=0o500)
    bad = [(["--checkpoint", tmp_path / "file", "--out", tmp_path / "o"], "is not a checkpoint but a text file"),
           (["--checkpoint", tmp_path / "other.pt", "--out", tmp_path / "o"], "is not a dat-ds checkpoint"),
           (["--checkpoint", tmp_path / "nothing", "--out", tmp_path / "o"], "does not exist"),
           (["--checkpoint", root / "ckpt" / "zoo", "--out", tmp_path / "file"], "is a file, not a folder")]
    import os
    if os.geteuid() != 0:  # root writes anywhere
        bad.append((["--checkpoint", root / "ckpt" / "zoo", "--out", tmp_path / "ro" / "x"], "is not writable"))
    for args, message in bad:
        r = run_recipe(args, script=EXPORT, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr[-2000:]


def _readme_export_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Export\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_export_snippets_give_dat_ds_predictions(tmp_path, monkeypatch):
    """The Export section's snippets, copied as written (and its `# or:` local-dir alternative),
    give the model's own predictions: each loads the weights in eval mode."""
    model_file = _checkpoint(tmp_path / "ckpt", "test_resnet", "native", 1, 28, tmp_path / "hf")
    model, meta = load_model(model_file)
    export_model(model, meta, tmp_path / "exported" / "fmnist")
    torch.manual_seed(3)
    images = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        ours = model(images)
    block = _readme_export_block()
    program, rest = block.split("# timm/", 1)
    timm_part = "# timm/" + rest.split("# transformers/", 1)[0]
    local_dir = timm_part.replace("# or: model = ", "model = ")
    assert local_dir != timm_part, "the README names the local-dir: alternative"
    monkeypatch.chdir(tmp_path)
    for name, code in (("model.pt2", program), ("timm", timm_part), ("timm local-dir", local_dir)):
        scope = {"images": images}
        with torch.no_grad():
            exec(compile(code, f"README.md Export ({name})", "exec"), scope)
        assert torch.allclose(scope["logits"], ours, atol=1e-4, rtol=1e-4), name


def test_readme_transformers_snippet_takes_grey_images(tmp_path, monkeypatch):
    """The snippet's transformers part, given grey PIL images (Fashion-MNIST) for a 3-channel model,
    feeds them as dat-ds did (repeated to RGB) and gives dat-ds's predictions."""
    import numpy as np
    from PIL import Image
    backbone, stem, chans, size, _ = CASES["hf_vit_grey"]
    model, meta = load_model(_checkpoint(tmp_path / "ckpt", backbone, stem, chans, size, tmp_path / "hf"))
    export_model(model, meta, tmp_path / "exported" / "run")
    torch.manual_seed(3)
    images = (torch.rand(4, 1, size, size) * 255).round() / 255  # what 8-bit grey files hold
    pil_images = [Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8)) for x in images]
    code = "# transformers/" + _readme_export_block().split("# transformers/", 1)[1]
    monkeypatch.chdir(tmp_path)
    scope = {"pil_images": pil_images}
    with torch.no_grad():
        exec(compile(code, "README.md Export (transformers)", "exec"), scope)
        ours = model(images)
    assert torch.allclose(scope["logits"], ours, atol=1e-4, rtol=1e-4)
