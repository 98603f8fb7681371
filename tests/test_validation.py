"""Bad input of every kind ends a recipe with one line and a known exit code, before any work.

The table runs in-process through the recipe's own ``main`` and ``cli.run`` (fast: DeepSpeed is
imported once); the checkpoint cases run as real subprocesses, so their exit codes are the ones
a shell sees.
"""
import gzip
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, refused_in_process, run_recipe
from dat_ds.engine import COMPLETE

FMNIST = Path("/usr/share/datasets/fashion-mnist")
TINY = ["--backbone", "test_resnet", "--stem", "native", "--train-limit", "128", "--eval-limit", "32", "--steps",
        "1", "--eval-steps", "1", "--epochs", "1", "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json"]
FLAG = "side_effect_ran"


def ds_config(tmp, text):
    path = tmp / "ds.json"
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    return ["--deepspeed_config", path]


def idx_dir(tmp, damage):
    """A copy of the Fashion-MNIST IDX files with the training images damaged."""
    d = tmp / "fmnist"
    d.mkdir()
    for f in FMNIST.glob("*.gz"):
        shutil.copy(f, d / f.name)
    target = d / "train-images-idx3-ubyte.gz"
    if damage == "truncated":  # a well-formed gzip of an IDX file that stops short
        raw = gzip.decompress(target.read_bytes())
        target.write_bytes(gzip.compress(raw[:100_000], compresslevel=1))
    else:  # the gzip stream itself is cut
        target.write_bytes(target.read_bytes()[:5000])
    return ["--data-dir", d]


def cifar_dir(tmp):
    d = tmp / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}, f)
    (d / "data_batch_2").write_bytes((d / "data_batch_2").read_bytes()[:100])
    return ["--dataset", "cifar10", "--data-dir", tmp]


LINEAR = {"train_micro_batch_size_per_gpu": 32}
CASES = [  # (id, args or a function of the tmp folder, exit code, message)
    ("backbone", ["--backbone", "resnet19"], 2, "unknown backbone 'resnet19'"),
    ("attack", ["--attack", "cw"], 2, "argument --attack: invalid choice: 'cw'"),
    ("eps-negative", ["--eps", "-0.1"], 2, "eps must be >= 0, got -0.1"),
    ("eps-div-zero", ["--eps", "8/0"], 2, "argument --eps: not a number: '8/0'"),
    ("eps-text", ["--eps", "abc"], 2, "argument --eps: not a number: 'abc'"),
    ("steps-zero", ["--steps", "0"], 2, "steps must be >= 1"),
    ("epochs-zero", ["--epochs", "0"], 2, "--epochs must be >= 1, got 0"),
    ("epochs-text", ["--epochs", "two"], 2, "argument --epochs: invalid int value: 'two'"),
    ("save-every", ["--save-every", "-1"], 2, "--save-every must be >= 0, got -1"),
    ("max-nonfinite", ["--max-nonfinite", "-2"], 2, "--max-nonfinite must be >= 0, got -2"),
    ("num-workers", ["--num-workers", "-1"], 2, "--num-workers must be >= 0, got -1"),
    ("defer-guard", ["--defer-guard", "always"], 2, "argument --defer-guard: invalid choice: 'always'"),
    ("defer-guard-stateful", ["--defer-guard", "on", "--compressor", "ef_sign"], 2,
     "--defer-guard on: the compressor ef_sign keeps state that a discarded exchange would change; "
     "use --defer-guard auto or off"),
    ("defer-guard-free", ["--defer-guard", "on", "--attack", "free"], 2,
     "--defer-guard on: the Replay step shape acts on the host's skip decision"),
    ("train-limit", ["--train-limit", "0"], 2, "--train-limit must be >= 1, got 0"),
    ("seed", ["--seed", "-5"], 2, "--seed must be >= 0, got -5"),
    ("lam", ["--loss", "mix", "--lam", "-1"], 2, "--lam must be a finite number >= 0, got -1.0"),
    ("co-drop", ["--co-drop", "1.5"], 2, "--co-drop must lie in (0, 1], got 1.5"),
    ("tau", ["--attack", "conadv", "--tau", "0"], 2, "--tau must be >= 1, got 0"),
    ("bits", ["--compressor", "qsgd", "--bits", "9"], 2, "bits=9 is not allowed"),
    ("ranks-list", ["--byzantine-ranks", "1,a"], 2, "argument --byzantine-ranks: not a comma-separated list"),
    ("ranks-negative", ["--byzantine-ranks=-1"], 2, "byzantine_ranks entry=-1 is not allowed"),
    ("ranks-outside", ["--byzantine-ranks", "3"], 2, "--byzantine-ranks: rank 3 does not exist in a world of 1"),
    ("dataset", ["--dataset", "svhn"], 2, "unknown dataset 'svhn'"),
    ("img-size-fixed", ["--img-size", "32"], 2,
     "--img-size 32: dataset 'fashion_mnist' has one fixed image size and is not resized"),
    ("output-is-file", lambda t: ["--output-dir", (t / "f").write_text("x") and t / "f"], 2, "is a file, not a folder"),
    ("ds-missing", ["--deepspeed_config", "/nonexistent.json"], 2,
     "--deepspeed_config /nonexistent.json does not exist"),
    ("ds-bad-json", lambda t: ds_config(t, "{not json"), 2, "is not valid JSON"),
    ("ds-not-object", lambda t: ds_config(t, "[1, 2]"), 2, "expected a JSON object {...}, got list"),
    ("ds-wrong-type", lambda t: ds_config(t, {"train_micro_batch_size_per_gpu": "32"}), 2,
     "train_micro_batch_size_per_gpu must be a positive integer, got '32'"),
    ("ds-negative-lr", lambda t: ds_config(t, {**LINEAR, "optimizer": {"type": "Lamb", "params": {"lr": -0.1}}}), 2,
     "optimizer.params.lr must be a number > 0, got -0.1"),
    ("ds-unknown-optimizer", lambda t: ds_config(t, {**LINEAR, "optimizer": {"type": "Adamax"}}), 2,
     "unknown optimizer 'Adamax'; choose one of: AdamW, Lamb, Lars, SGD"),
    ("ds-unknown-setting", lambda t: ds_config(t, {**LINEAR, "optimizer": {"type": "SGD", "params": {"lr_rate": 1}}}),
     2, "optimizer 'SGD' has no setting 'lr_rate'"),
    ("ds-unknown-scheduler", lambda t: ds_config(t, {**LINEAR, "scheduler": {"type": "Cosine"}}), 2,
     "unknown scheduler 'Cosine'"),
    ("ds-zero2", ["--deepspeed_config", ROOT / "tests" / "configs" / "zero2.json"], 2,
     "zero_optimization.stage=2 is not supported"),
    ("ds-clipping", lambda t: ds_config(t, {**LINEAR, "gradient_clipping": -1}), 2,
     "gradient_clipping must be a number >= 0, got -1"),
    ("ds-batch-vs-world", lambda t: ds_config(t, {"train_batch_size": 100, "train_micro_batch_size_per_gpu": 64}), 2,
     "train_batch_size=100 is not divisible by micro 64 x 1 ranks"),
    ("ds-typo-top-key", lambda t: ds_config(t, {**LINEAR, "gradient_accumulation_step": 2}), 2,
     "unknown key 'gradient_accumulation_step': neither DeepSpeed 0.19.8 nor dat-ds reads it (did you mean "
     "'gradient_accumulation_steps'?)"),
    ("ds-typo-ema-block", lambda t: ds_config(t, {**LINEAR, "emaa": {"decay": 0.9}}), 2,
     "unknown key 'emaa': neither DeepSpeed 0.19.8 nor dat-ds reads it (did you mean 'ema'?)"),
    ("ds-typo-micro-batch", lambda t: ds_config(t, {"train_micro_batch_size_per_gpus": 32}), 2,
     "unknown key 'train_micro_batch_size_per_gpus': neither DeepSpeed 0.19.8 nor dat-ds reads it (did you mean "
     "'train_micro_batch_size_per_gpu'?)"),
    ("ds-removed-block", lambda t: ds_config(t, {**LINEAR, "elasticity": {"enabled": True}}), 2,
     "DeepSpeed 0.19.8 refuses it: Elastic training has been removed"),
    ("ds-typo-in-zero", lambda t: ds_config(t, {**LINEAR, "zero_optimization": {"stage": 0, "stagee": 0}}), 2,
     "DeepSpeed 0.19.8 refuses it: zero_optimization.stagee: Extra inputs are not permitted (did you mean 'stage'?)"),
    ("ds-typo-in-ema", lambda t: ds_config(t, {**LINEAR, "ema": {"decai": 0.9}}), 2,
     "ema has no setting 'decai'; it takes: decay, warmup"),
    ("ds-typo-in-optimizer", lambda t: ds_config(t, {**LINEAR, "optimizer": {"type": "SGD", "param": {"lr": 1}}}), 2,
     "optimizer has no key 'param' (did you mean 'params'?); it takes \"type\" and \"params\""),
    ("ds-typo-optimizer-setting", lambda t: ds_config(t, {**LINEAR, "optimizer": {"type": "SGD",
                                                                                  "params": {"momentun": 0.9}}}),
     2, "optimizer 'SGD' has no setting 'momentun' (did you mean 'momentum'?)"),
    ("data-dir", ["--data-dir", "/nonexistent/fmnist"], 2, "--data-dir /nonexistent/fmnist does not exist"),
    ("idx-truncated", lambda t: idx_dir(t, "truncated"), 2, "train-images-idx3-ubyte.gz is truncated or corrupt"),
    ("idx-bad-gzip", lambda t: idx_dir(t, "gzip"), 2, "cannot read "),
    ("cifar-truncated", cifar_dir, 2, "cannot read CIFAR batch "),
]


def run_in_process(argv, monkeypatch, capsys):
    """The recipe's ``cli.run(main)`` in this process: returns (exit code, stderr)."""
    code, _, err = refused_in_process(argv, monkeypatch, capsys)
    return code, err


def resolve(args, tmp_path):
    return args(tmp_path) if callable(args) else args


@pytest.mark.parametrize("args, code, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_table(tmp_path, monkeypatch, capsys, args, code, message):
    out = tmp_path / "out"
    status, err = run_in_process([*TINY, "--output-dir", out, *resolve(args, tmp_path)], monkeypatch, capsys)
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert status == code and len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not (out / "checkpoints").exists()


# --- checkpoints: another architecture, a malicious pickle ----------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    r = run_recipe([*TINY, "--output-dir", out])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


class Evil:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(run, tmp_path, filename):
    """A copy of ``run`` whose newest checkpoint has ``filename`` replaced by a malicious pickle
    (the completeness marker updated too, as an attacker would)."""
    copy = tmp_path / "planted"
    shutil.copytree(run, copy)
    tag_dir = copy / "checkpoints" / (copy / "checkpoints" / "latest").read_text()
    torch.save({"module": Evil(tmp_path / FLAG)}, tag_dir / filename)
    marker = json.loads((tag_dir / COMPLETE).read_text())
    marker["files"][filename] = (tag_dir / filename).stat().st_size
    (tag_dir / COMPLETE).write_text(json.dumps(marker))
    return copy, tag_dir


@pytest.mark.parametrize("filename", ["mp_rank_00_model_states.pt", "rank0.pt"])
def test_resume_refuses_a_malicious_pickle_without_running_it(tiny_run, tmp_path, filename):
    run, tag_dir = plant(tiny_run, tmp_path, filename)
    r = run_recipe([*TINY, "--epochs", "2", "--output-dir", run, "--resume"], timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"checkpoint {tag_dir} refused: not a plain tensor checkpoint or damaged (it would run io.open " \
        "when unpickled)" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / FLAG).exists(), "unpickling ran code"


def test_evaluate_refuses_a_malicious_pickle_without_running_it(tiny_run, tmp_path):
    _, tag_dir = plant(tiny_run, tmp_path, "mp_rank_00_model_states.pt")
    r = run_recipe(["--checkpoint", tag_dir, "--eval-limit", "8", "--no-autoattack"], script="recipes/evaluate.py",
                   timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "cannot read checkpoint" in r.stderr and "it would run io.open when unpickled" in r.stderr, r.stderr
    assert not (tmp_path / FLAG).exists(), "unpickling ran code"


def test_a_trained_run_records_and_exports_its_class_names(tiny_run, tmp_path):
    from dat_ds.checkpoint_io import find_checkpoint, load_model
    from dat_ds.models.export import export_model
    model, meta = load_model(find_checkpoint(tiny_run))
    assert meta["class_names"][:2] == ["T-shirt/top", "Trouser"] and meta["class_names"][9] == "Ankle boot"
    manifest = export_model(model, meta, tmp_path / "exported")
    assert manifest["class_names"] == meta["class_names"]


def test_resume_refuses_a_checkpoint_of_another_architecture(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    other = [a if a != "test_resnet" else "test_vit" for a in TINY]
    r = run_recipe([*other, "--epochs", "2", "--output-dir", copy, "--resume"], timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "has backbone 'test_resnet', this run 'test_vit'; it belongs to another model" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
