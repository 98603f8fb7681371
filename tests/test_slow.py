"""Long end-to-end runs (make test-slow)."""
import json

import pytest

from conftest import ROOT, run_deepspeed

pytestmark = pytest.mark.slow


def test_two_rank_dat_pgd_learns_robustness(tmp_path):
    """DAT-PGD on 2 ranks: after one epoch on 12,000 images the PGD-10 accuracy is far above chance."""
    out = tmp_path / "run"
    r = run_deepspeed(ROOT / "recipes" / "fashion_mnist_dat.py",
                      ["--deepspeed_config", ROOT / "ds_configs" / "fashion_mnist_demo.json", "--backbone",
                       "test_resnet", "--stem", "native", "--train-limit", "12000", "--eval-limit", "1000",
                       "--epochs", "1", "--output-dir", out], timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["global_batch_size"] == 128
    assert s["clean_acc"] > 0.55 and s["robust_acc"] > 0.35, s
    assert s["bytes_sent_per_rank"] > 0 and s["comm_s"] > 0 and s["compute_s"] > s["comm_s"]
