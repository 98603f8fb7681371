"""Semi-supervised DAT: pseudo-label files, mixed batches, rank shards, the recipe under the launcher."""
import json

import numpy as np
import pytest
import torch

from conftest import ROOT, refused_in_process, run_deepspeed, run_recipe
from dat_ds.data import DataError, TensorImages
from dat_ds.metrics import read_jsonl
from dat_ds.semisup import (MixedBatchSampler, MixedImages, PseudoLabels, hold_back_labels, load_pseudo_labels,
                            read_image_folder, save_pseudo_labels)

SCRIPT = ROOT / "tests" / "scripts" / "semisup_shards.py"
QUICK = ["--backbone", "test_resnet", "--stem", "native", "--train-limit", "640", "--eval-limit", "64",
         "--steps", "2", "--eval-steps", "2", "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json"]


def _pool(n=50, seed=0, shape=(1, 28, 28)):
    g = torch.Generator().manual_seed(seed)
    return PseudoLabels(torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (n,), generator=g), torch.rand(n, generator=g),
                        {"source": "test", "teacher": "t.pt"})


def test_pseudo_label_file_round_trip(tmp_path):
    pool = _pool()
    save_pseudo_labels(tmp_path / "pl.npz", pool)
    back = load_pseudo_labels(tmp_path / "pl.npz")
    assert torch.equal(back.images, pool.images) and torch.equal(back.labels, pool.labels)
    assert torch.equal(back.confidence, pool.confidence)
    assert back.meta["source"] == "test" and back.meta["teacher"] == "t.pt" and back.meta["count"] == 50
    with np.load(tmp_path / "pl.npz", allow_pickle=False) as z:  # plain arrays, readable without dat-ds
        assert sorted(z.files) == ["confidence", "images", "labels"] and z["images"].dtype == np.uint8
    sure = back.confident(0.5)
    assert len(sure) == int((pool.confidence >= 0.5).sum()) and bool((sure.confidence >= 0.5).all())
    assert torch.equal(sure.labels, pool.labels[pool.confidence >= 0.5])


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 1, 4, 4), np.uint8), "labels": np.zeros(2, np.int64)}, "lacks the arrays confidence"),
    ({"images": np.zeros((2, 1, 4, 4), np.float32), "labels": np.zeros(2, np.int64),
      "confidence": np.zeros(2, np.float32)}, "images is float32, expected uint8"),
    ({"images": np.zeros((2, 1, 4, 4), np.uint8), "labels": np.zeros(3, np.int64),
      "confidence": np.zeros(2, np.float32)}, "do not match"),
    ({"images": np.array([{"a": 1}], dtype=object), "labels": np.zeros(1, np.int64),
      "confidence": np.zeros(1, np.float32)}, "not a readable .npz"),
])
def test_bad_pseudo_label_files_are_refused(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_pseudo_labels(tmp_path / "bad.npz")


@pytest.mark.parametrize("fraction, micro", [(0.5, 16), (0.3, 20), (0.0, 8)])
def test_every_batch_mixes_at_the_set_fraction(fraction, micro):
    n_lab, pool = 200, _pool(120)
    labeled = TensorImages(torch.zeros(n_lab, 1, 28, 28, dtype=torch.uint8), torch.full((n_lab,), 11))
    data = MixedImages(labeled, TensorImages(pool.images, pool.labels))
    sampler = MixedBatchSampler(n_lab, len(pool), micro, fraction, rank=0, world_size=2, seed=5)
    want = round(fraction * micro)
    assert len(sampler) == n_lab // 2 // micro
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in sampler:
            x, y = data[batch]
            assert len(batch) == micro == len(y)
            assert sum(i >= n_lab for i in batch) == want and int((y != 11).sum()) == want
    sampler.set_epoch(1)
    again = MixedBatchSampler(n_lab, len(pool), micro, fraction, rank=0, world_size=2, seed=5)
    again.set_epoch(1)
    assert list(sampler) == list(again), "batches depend only on (seed, epoch): resuming replays them"


def test_mixed_loader_starts_part_way_into_an_epoch(fmnist):
    """A mid-epoch checkpoint resumes the mixed batches at the next one, without re-drawing the others."""
    from dat_ds.data import start_epoch
    from dat_ds.semisup import mixed_loader_fn
    labeled, pool = fmnist.test.subset(400), _pool(120)
    loader = mixed_loader_fn(pool, 0.5)(labeled, 16, 1, 2, 3)
    start_epoch(loader, 2)
    full = [y for _, y in loader]
    start_epoch(loader, 2, skip_batches=5)
    tail = [y for _, y in loader]
    assert len(full) == 12 and len(tail) == len(loader) == 7
    assert all(torch.equal(a, b) for a, b in zip(full[5:], tail))


def test_hold_back_labels_splits_without_overlap(fmnist):
    train = fmnist.train.subset(1000)
    labeled, images, truth = hold_back_labels(train, 0.1, seed=0)
    assert len(labeled) == 100 and len(images) == len(truth) == 900
    keys = torch.cat([labeled.images, images]).flatten(1)
    assert torch.unique(keys, dim=0).shape[0] == torch.unique(train.images.flatten(1), dim=0).shape[0]
    with pytest.raises(ValueError, match="--labeled-fraction must lie in"):
        hold_back_labels(train, 0.0, seed=0)


def test_pool_from_an_image_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    for i, sub in enumerate(("a", "b", "b")):
        (tmp_path / sub).mkdir(exist_ok=True)
        Image.fromarray(pix[i]).save(tmp_path / sub / f"{i}.png")
    images = read_image_folder(tmp_path, in_chans=1, img_size=28)
    assert images.shape == (3, 1, 28, 28) and torch.equal(images[:, 0], torch.from_numpy(pix))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        read_image_folder(tmp_path / "empty", 1, 28)


def test_two_ranks_draw_disjoint_shards_of_both_pools(tmp_path):
    pool = _pool(300, seed=1)
    save_pseudo_labels(tmp_path / "pl.npz", pool)
    r = run_deepspeed(SCRIPT, ["--pseudo-labels", tmp_path / "pl.npz", "--out", tmp_path / "out",
                               "--labeled", 600, "--micro", 20, "--fraction", 0.3, "--epochs", 3])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = (torch.load(tmp_path / "out" / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert a["world"] == b["world"] == 2 and a["batches"] == b["batches"] == 600 // 2 // 20
    seen = {0: set(), 1: set()}
    for ea, eb in zip(a["epochs"], b["epochs"]):
        assert all(ea["matches"]) and all(eb["matches"]), "batches hold the samples at the sampled indices"
        assert ea["labeled"].shape == (15, 14) and ea["pool"].shape == (15, 6)  # 6 = round(0.3 x 20) per batch
        for key in ("labeled", "pool"):
            assert set(ea[key].flatten().tolist()).isdisjoint(eb[key].flatten().tolist())
        seen[0] |= set(ea["pool"].flatten().tolist())
        seen[1] |= set(eb["pool"].flatten().tolist())
    assert seen[0].isdisjoint(seen[1]) and len(seen[0]) == len(seen[1]) == 150, "each rank owns half the pool"


def test_readme_command_trains_its_teacher_in_the_run(tmp_path):
    """The README's command without --teacher: a teacher trained here (no attack, none of the run's
    attack or loss settings), its pseudo-labels, then DAT on the mixed batches, in one process."""
    out = tmp_path / "rst"
    r = run_recipe([*QUICK, "--train-limit", "256", "--epochs", "1", "--labeled-fraction", "0.5",
                    "--teacher-epochs", "1", "--loss", "trades", "--output-dir", out],
                   script="recipes/semisup_dat.py", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    teacher = json.loads((out / "teacher" / "summary.json").read_text())
    assert teacher["attack"] == "none" and teacher["loss"] == "madry" and teacher["epochs"] == 1
    assert json.loads((out / "teacher" / "config.json").read_text())["attack_kwargs"] == {}
    side = json.loads((out / "pseudo_labels.npz.json").read_text())
    assert side["count"] == len(load_pseudo_labels(out / "pseudo_labels.npz")) == 128
    assert side["teacher"].startswith(str(out / "teacher"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labeled_samples"] == 128 and summary["pseudo_labeled_samples"] == 128
    assert summary["attack"] == "pgd" and summary["loss"] == "trades"


@pytest.mark.slow  # three trainings under the launcher: ~1-2 min on 2 cores
def test_recipe_trains_teacher_labels_pool_and_resumes_on_two_ranks(tmp_path):
    out = tmp_path / "rst"
    args = [*QUICK, "--labeled-fraction", "0.25", "--teacher-epochs", "1", "--loss", "trades",
            "--compressor", "sign_vote", "--output-dir", out]
    r = run_deepspeed(ROOT / "recipes" / "semisup_dat.py", [*args, "--epochs", "2", "--stop-after", "1"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    side = json.loads((out / "pseudo_labels.npz.json").read_text())
    pool = load_pseudo_labels(out / "pseudo_labels.npz")
    assert len(pool) == side["count"] == 480 and side["teacher"].startswith(str(out / "teacher"))
    assert 0 <= side["agreement_with_true_labels"] <= 1 and bool(((pool.confidence > 0) & (pool.confidence <= 1)).all())
    stamp = (out / "pseudo_labels.npz").stat().st_mtime_ns
    r = run_deepspeed(ROOT / "recipes" / "semisup_dat.py", [*args, "--epochs", "2", "--resume"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "pseudo_labels.npz").stat().st_mtime_ns == stamp, "the pseudo-label file is reused"
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [0, 1]
    assert rows[1]["global_step"] == 2 * rows[0]["global_step"] == 2 * (160 // 2 // 32)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["labeled_samples"] == 160
    assert summary["pseudo_labeled_samples"] == 480 and summary["loss"] == "trades"


@pytest.mark.parametrize("args, message", [
    (["--unlabeled-fraction", "1"], "--unlabeled-fraction must lie in [0, 1), got 1.0"),
    (["--unlabeled", "/nonexistent/pool"], "--unlabeled /nonexistent/pool: no such folder"),
])
def test_recipe_bad_input_exits_with_one_line(tmp_path, monkeypatch, capsys, args, message):
    code, lines, err = refused_in_process([*QUICK, "--output-dir", tmp_path / "out", *args], monkeypatch, capsys,
                                          script="recipes/semisup_dat.py")
    assert code == 2 and len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err
