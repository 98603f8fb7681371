"""The recipes as a user runs them: outputs, resume, and one-line errors on bad input."""
import json

import pytest
import torch

from conftest import ROOT, refused_in_process, run_recipe
from dat_ds.metrics import read_jsonl

QUICK = ["--backbone", "test_resnet", "--stem", "native", "--train-limit", "256", "--eval-limit", "128",
         "--steps", "2", "--eval-steps", "2", "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json"]
SUMMARY_KEYS = {"clean_acc", "robust_acc", "epochs", "world_size", "global_batch_size", "compute_s", "comm_s",
                "bytes_sent_per_rank", "backbone", "attack"}


def test_single_process_run_writes_outputs_and_resumes(tmp_path):
    out = tmp_path / "run"
    # --resume on a folder without a checkpoint says so (once) and starts fresh
    r = run_recipe([*QUICK, "--epochs", "1", "--output-dir", out, "--wandb", "--resume"], env={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(f"--resume: no checkpoint in {out / 'checkpoints'}; starting fresh\n") == 1, r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["world_size"] == 1 and summary["global_batch_size"] == 32 and summary["epochs"] == 1
    assert 0 <= summary["robust_acc"] <= summary["clean_acc"] <= 1
    assert "TA  clean accuracy" in r.stdout and "RA  pgd-2 accuracy" in r.stdout
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [0]
    assert (out / "checkpoints" / "latest").read_text() == "epoch0000"
    assert list((out / "wandb").glob("offline-run-*")), "offline W&B run folder"

    r = run_recipe([*QUICK, "--epochs", "2", "--output-dir", out, "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    said = [line for line in r.stdout.splitlines() if line.startswith("resuming from ")]
    tag_dir = out / "checkpoints" / "epoch0000"
    assert len(said) == 1 and said[0].startswith(f"resuming from {tag_dir} (epoch 1, batch 0"), r.stdout
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [0, 1], "resume continues at epoch 1 and keeps epoch 0"
    assert rows[1]["global_step"] == 2 * rows[0]["global_step"]
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2


BAD_INPUTS = [
    (["--backbone", "resnet19"], "unknown backbone 'resnet19'"),
    (["--attack", "cw"], "argument --attack: invalid choice: 'cw'"),
    (["--eps", "-0.1"], "eps must be >= 0, got -0.1"),
    (["--eps", "abc"], "argument --eps: not a number: 'abc'"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--data-dir", "/nonexistent/fmnist"], "--data-dir /nonexistent/fmnist does not exist"),
    (["--deepspeed_config", ROOT / "tests" / "configs" / "zero2.json"], "zero_optimization.stage=2 is not supported"),
    (["--deepspeed_config", "/nonexistent.json"], "--deepspeed_config /nonexistent.json does not exist"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--train-limit", "0"], "--train-limit must be >= 1"),
]


@pytest.mark.parametrize("args, message", [pytest.param(a, m, id=" ".join(map(str, a))) for a, m in BAD_INPUTS])
def test_bad_input_exits_with_one_line(tmp_path, monkeypatch, capsys, args, message):
    code, lines, err = refused_in_process(["--output-dir", tmp_path / "out", *args], monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_bad_input_from_the_shell_exits_2_with_one_line(tmp_path):
    """The same refusal as a user meets it: the script in its own interpreter, exit status 2."""
    r = run_recipe(["--output-dir", tmp_path / "out", "--backbone", "resnet19"], timeout=120)
    lines = [line for line in r.stderr.strip().splitlines() if "error" in line]
    assert r.returncode == 2 and len(lines) == 1 and "unknown backbone 'resnet19'" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "out" / "checkpoints").exists()


def final_weights(out):
    path = out / "checkpoints" / (out / "checkpoints" / "latest").read_text() / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=True)["module"]


@pytest.mark.slow  # three runs (~20 s); mid-epoch resume is exact in test_resume.py too
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """Weights, optimizer, schedule, RNG and the error-feedback residual all survive a stop + --resume."""
    args = [*QUICK, "--epochs", "2", "--compressor", "ef_sign"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_recipe([*args, "--output-dir", straight]).returncode == 0
    r = run_recipe([*args, "--output-dir", resumed, "--stop-after", "1"])
    assert r.returncode == 0 and "stopping after 1 epoch" in r.stdout, r.stderr[-2000:]
    assert not (resumed / "summary.json").exists()
    rank_state = torch.load(resumed / "checkpoints" / "epoch0000" / "rank0.pt", weights_only=True)
    assert rank_state["compressor"]["worker_error"].abs().max() > 0
    r = run_recipe([*args, "--output-dir", resumed, "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "bit-for-bit equal (fp32, CPU)"
