"""The W&B API key never reaches a file we write or the console."""
from conftest import ROOT, run_recipe

SECRET = "0123456789abcdef0123456789abcdef01234567"  # the shape of a W&B key (40 hex digits)


def test_wandb_key_is_never_written(tmp_path):
    out = tmp_path / "run"
    r = run_recipe(["--backbone", "test_resnet", "--stem", "native", "--train-limit", "128", "--eval-limit", "32",
                    "--steps", "1", "--eval-steps", "1", "--epochs", "1", "--deepspeed_config",
                    ROOT / "tests" / "configs" / "tiny_lamb.json", "--output-dir", out, "--wandb"],
                   env={"WANDB_API_KEY": SECRET, "WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert SECRET not in r.stdout and SECRET not in r.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "metrics.jsonl" for p in files) and any(p.suffix == ".wandb" for p in files)
    leaked = [str(p.relative_to(out)) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the key is in {leaked}"
