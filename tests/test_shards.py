"""Shards (dat_ds.data.shards): the converter on a real image folder, streaming on 2 gloo ranks, and
exact sample accounting when an epoch interrupted inside is resumed (recorded sample ids)."""
import os

import numpy as np
import pytest
import torch

from conftest import ROOT, run_deepspeed, run_recipe
from stopping import read_ids, stop_inside_the_epoch
from dat_ds.data import DataError, load_dataset, read_batch, start_epoch, train_loader
from dat_ds.data.shards import ShardLoader, write_shards
from dat_ds.engine import ConfigError
from test_data_images import add_bad_images, write_folder

CONVERTER = "recipes/make_shards.py"


class Recorded(ShardLoader):
    """The loader, also keeping each minibatch's source positions."""
    def unpack(self, batch):
        self.ids.append(batch["index"].tolist())
        return super().unpack(batch)


def recorded(split, batch_size, num_workers=0, seed=0):
    loader = train_loader(split, batch_size, 0, 1, seed, num_workers)
    loader.__class__, loader.ids = Recorded, []
    return loader


def epoch_ids(loader, epoch, skip_batches=0):
    loader.ids = []
    start_epoch(loader, epoch, skip_batches)
    batches = [(x, y) for x, y in loader]
    return loader.ids, batches


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes of JPEGs and one class of PNGs (train/ and val/), plus two unreadable files."""
    root = write_folder(tmp_path_factory.mktemp("src") / "images", classes=3, n_train=10, n_val=3, size=24)
    write_folder(root, classes=4, n_train=10, n_val=3, size=24, fmt="PNG")  # class3: PNG (0-2 get PNGs too)
    bad = add_bad_images(root / "train")
    return root, bad


@pytest.fixture(scope="module")
def converted(folder, tmp_path_factory):
    root, bad = folder
    out = tmp_path_factory.mktemp("shards") / "set"
    r = run_recipe(["--dataset", "imagefolder", "--data-dir", root, "--img-size", "24", "--out", out,
                    "--chunk-size", "7", "--seed", "3"], script=CONVERTER)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_converter_writes_every_readable_image_and_training_reads_them_back(folder, converted):
    root, bad = folder
    out, r = converted
    src = load_dataset("imagefolder", str(root), img_size=24)
    data = load_dataset("shards", str(out))
    n_good = len(src.train) - len(bad)
    assert (data.num_classes, data.in_chans, data.img_size) == (4, 3, 24)
    assert data.class_names == src.class_names == ("class0", "class1", "class2", "class3")
    assert len(data.train) == n_good and len(data.test) == len(src.test)
    assert len(list((out / "train").glob("chunk-*.bin"))) == -(-n_good // 7)
    assert all(f"skipping unreadable image {p}" in r.stderr for p in bad)
    # the test split: the files' own bytes in their order, read by random access (Pillow's decode)
    from PIL import Image

    from dat_ds.data.folder import image_transforms
    test_tf = image_transforms(24)[1]
    x_src = torch.stack([test_tf(Image.open(p).convert("RGB")) for p in src.test.paths]).float() / 255
    x, y = read_batch(data.test, range(len(data.test)))
    assert torch.equal(x, x_src) and y.tolist() == src.test.labels.tolist()
    # the training split: every readable sample once per epoch (ragged end aside), with its own label
    loader = recorded(data.train, 4)
    ids, batches = epoch_ids(loader, 0)
    flat = [i for b in ids for i in b]
    bad_ids = {int(np.flatnonzero(src.train.paths == str(p))[0]) for p in bad}
    assert len(flat) == len(set(flat)) == n_good // 4 * 4 and not set(flat) & bad_ids
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == [int(src.train.labels[i]) for i in flat]
    assert batches[0][0].dtype == torch.uint8 and batches[0][0].shape == (4, 3, 24, 24)
    assert flat != sorted(flat), "written in a seeded random order"


def test_converter_refuses_a_folder_with_files_and_writes_nothing(folder, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = run_recipe(["--dataset", "imagefolder", "--data-dir", folder[0], "--out", out], script=CONVERTER)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "exists and is not an empty folder" in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and os.listdir(out) == ["keep.txt"]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pass_started_inside_an_epoch_reads_exactly_the_rest(converted, workers):
    data = load_dataset("shards", str(converted[0]))
    loader = recorded(data.train, 4, workers)
    for epoch in (0, 1):
        full, _ = epoch_ids(loader, epoch)
        rest, _ = epoch_ids(loader, epoch, skip_batches=3)
        assert rest == full[3:]
    assert full != epoch_ids(loader, 0)[0], "a new order every epoch"


def test_loader_position_round_trips_and_refuses_another_topology(converted):
    data = load_dataset("shards", str(converted[0]))
    loader = train_loader(data.train, 4, 0, 1, seed=0, num_workers=0)
    start_epoch(loader, 1, 2)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["samples"] == 12
    again = train_loader(data.train, 4, 0, 1, seed=0)
    again.load_state_dict(state)
    with pytest.raises(ConfigError, match="trainer resumes at epoch 1, sample 8"):
        start_epoch(again, 1, 2)
        next(iter(again))
    with pytest.raises(ConfigError, match="1 rank.s. x 2 loader worker.s., micro batch 4.*this run has 1 rank.s. x 0"):
        train_loader(data.train, 4, 0, 1, seed=0, num_workers=0).load_state_dict({**state, "num_workers": 2})


def test_streamed_split_refuses_cuts_only_the_converter_makes(converted):
    for kw, flag in (({"train_limit": 5}, "--train-limit"), ({"classes": "0-1"}, "--classes")):
        with pytest.raises(DataError, match=f"{flag} cannot cut the streamed training split"):
            load_dataset("shards", str(converted[0]), **kw)
    with pytest.raises(DataError, match="dataset.json"):
        load_dataset("shards", str(converted[0] / "train"))


# --- 2 gloo ranks: training from shards, stopped inside an epoch, resumed --------------------------

RECIPE = ROOT / "recipes" / "fashion_mnist_dat.py"
N = 640  # 2 ranks x 32 = 64 per step: 10 steps, a checkpoint every 2


@pytest.fixture(scope="module")
def fmnist_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("fmnist") / "shards"
    write_shards(load_dataset("fashion_mnist", train_limit=N, eval_limit=32), str(out), chunk_size=50)
    return out


def run_args(data):
    return ["--plugin", ROOT / "tests" / "scripts" / "shard_ids.py", "--dataset", "shards_ids", "--data-dir", data,
            "--backbone", "test_resnet", "--stem", "native", "--steps", "1", "--eval-steps", "1", "--epochs", "1",
            "--save-every", "2", "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json"]


@pytest.mark.slow  # two 2-rank runs; test_elastic stops and resumes mid-epoch in the fast suite
def test_two_ranks_stopped_inside_an_epoch_resume_with_exactly_the_samples_not_yet_trained(fmnist_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "ids"
    env = {"DAT_DS_ID_LOG": str(log)}
    args = [*run_args(fmnist_shards), "--output-dir", out]
    done = stop_inside_the_epoch(RECIPE, args, env)
    before = {rank: batches[:done] for rank, batches in read_ids(log).items()}
    for p in log.parent.glob(log.name + ".rank*"):
        p.unlink()
    r = run_deepspeed(RECIPE, [*args, "--resume"], env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = read_ids(log)
    assert sorted(before) == sorted(after) == ["ids.rank0", "ids.rank1"]
    steps = N // 64
    assert 0 < done < steps and all(len(after[k]) == steps - done for k in after), (done, after)
    trained = [i for k in before for b in before[k] for i in b]
    resumed = [i for k in after for b in after[k] for i in b]
    assert len(set(trained)) == len(trained) == done * 64
    assert not set(trained) & set(resumed), "a sample trained twice"
    assert len(set(resumed)) == len(resumed) and set(trained) | set(resumed) == set(range(N)), "a sample dropped"


@pytest.mark.slow  # a third launch
def test_an_epoch_interrupted_inside_is_refused_on_another_number_of_ranks(fmnist_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "ids"
    args = [*run_args(fmnist_shards), "--output-dir", out]
    stop_inside_the_epoch(RECIPE, args, {"DAT_DS_ID_LOG": str(log)})
    r = run_deepspeed(RECIPE, [*args, "--resume"], num_ranks=1, env={"DAT_DS_ID_LOG": str(log)}, timeout=600)
    errors = [line for line in (r.stdout + r.stderr).splitlines() if ": error: " in line]
    assert r.returncode == 2 and len(errors) == 1 and "read by 2 rank(s)" in errors[0], r.stderr[-2000:]
