import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from dat_ds.data import (DataError, HFImages, ShardSampler, TensorImages, load_dataset, parse_classes,
                         random_crop_flip, read_idx, train_loader)


def write_idx(path, array, compress=True):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(raw)


def make_mnist_dir(root, n_train=64, n_test=32, compress=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n), compress)
    return root


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_round_trip(tmp_path, compress):
    make_mnist_dir(tmp_path, compress=compress)
    info = load_dataset("fashion_mnist", str(tmp_path))
    assert len(info.train) == 64 and len(info.test) == 32
    x, y = info.train.__getitems__([0, 5])
    raw = read_idx(tmp_path / f"train-images-idx3-ubyte{'.gz' if compress else ''}")
    assert torch.allclose(x[1, 0], torch.from_numpy(raw[5].astype(np.float32)) / 255)
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and y.dtype == torch.int64


def test_real_fashion_mnist_is_complete(fmnist):
    assert len(fmnist.train) == 60000 and len(fmnist.test) == 10000
    assert fmnist.in_chans == 1 and fmnist.img_size == 28 and fmnist.num_classes == 10
    assert sorted(fmnist.test.labels.unique().tolist()) == list(range(10))


def test_truncated_idx_names_the_file(tmp_path):
    make_mnist_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.open(path).read()
    gzip.open(path, "wb").write(raw[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is truncated"):
        load_dataset("fashion_mnist", str(tmp_path))


def test_corrupt_gzip_names_the_file(tmp_path):
    make_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read .*t10k-labels-idx1-ubyte.gz"):
        load_dataset("fashion_mnist", str(tmp_path))


def test_missing_files_are_listed(tmp_path):
    make_mnist_dir(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion_mnist", str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("fashion_mnist", str(tmp_path / "nowhere"))


def write_cifar10(root, n_per_batch=20):
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n_per_batch).tolist(),
                 b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"{i}.png".encode() for i in range(n_per_batch)]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return d


def test_cifar10_python_batches(tmp_path):
    d = write_cifar10(tmp_path)
    info = load_dataset("cifar10", str(tmp_path))
    assert len(info.train) == 100 and len(info.test) == 20 and info.num_classes == 10
    raw = pickle.load(open(d / "test_batch", "rb"), encoding="bytes")
    x, y = info.test.__getitems__([3])
    assert torch.equal((x[0] * 255).round().to(torch.uint8), torch.from_numpy(raw[b"data"][3].reshape(3, 32, 32)))
    assert y[0].item() == raw[b"labels"][3]


def test_cifar100_python_batches(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for name, n in (("train", 30), ("test", 10)):
        pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     b"fine_labels": rng.integers(0, 100, n).tolist(),
                     b"coarse_labels": rng.integers(0, 20, n).tolist()}, open(d / name, "wb"))
    info = load_dataset("cifar100", str(tmp_path))
    assert info.num_classes == 100 and len(info.train) == 30 and len(info.test) == 10


class Boom:
    def __reduce__(self):
        return (eval, ("__import__('os').system('echo pwned')",))


def test_cifar_pickle_with_code_is_refused(tmp_path):
    d = write_cifar10(tmp_path)
    pickle.dump({b"data": Boom(), b"labels": [0]}, open(d / "data_batch_3", "wb"))
    with pytest.raises(DataError, match="data_batch_3.*refusing to load builtins.eval"):
        load_dataset("cifar10", str(tmp_path))


def test_imagefolder_through_hf_datasets(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(image).save(tmp_path / split / cls / f"{i}.png")
    info = load_dataset("imagefolder", str(tmp_path), img_size=32)
    assert info.num_classes == 2 and len(info.train) == 6 and len(info.test) == 4
    x, y = info.test[0]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
    labels = sorted(int(info.test[i][1]) for i in range(4))
    assert labels == [0, 0, 1, 1]


def test_shards_are_disjoint_and_cover_everything():
    shards = [list(ShardSampler(103, r, 4)) for r in range(4)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(103))


def test_train_loader_shards_per_rank(fmnist):
    seen = []
    for rank in range(2):
        loader = train_loader(fmnist.train.subset(1000), 50, rank, 2, seed=0)
        loader.sampler.set_epoch(0)
        seen.append({i for i in loader.sampler})
        x, y = next(iter(loader))
        assert x.shape == (50, 1, 28, 28) and y.shape == (50,)
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 1000


def test_random_crop_flip_keeps_pixels():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(0)
    out = random_crop_flip(x, pad=4)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # every output row is a (possibly flipped, shifted) piece of the padded input
    same = [(torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))) for i in range(16)]
    assert not all(same)
    assert random_crop_flip(x, pad=0).sum() == x.sum()  # no padding: only flips


def test_limits_and_unknown_dataset(fmnist):
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="--train-limit must be >= 1"):
        load_dataset("fashion_mnist", train_limit=0)
    assert len(fmnist.train.subset(123)) == 123


# --- --classes -------------------------------------------------------------------------------

def test_parse_classes_ranges_lists_and_order():
    assert parse_classes(None) is None
    assert parse_classes("0-4") == (0, 1, 2, 3, 4)
    assert parse_classes("5,6,7,8,9") == (5, 6, 7, 8, 9)
    assert parse_classes(" 7, 0-2 ") == (7, 0, 1, 2)
    assert parse_classes([3, 1]) == (3, 1)


@pytest.mark.parametrize("spec, match", [("", "not a class id"), (",", "not a class id"), ("a", "not a class id"),
                                         ("4-2", "ascending range"), ("1,1", "more than once"),
                                         ("0-3,2", "more than once"), ([], "no class ids"), ("-1", "not a class")])
def test_parse_classes_rejects_bad_values(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_classes(spec)


def test_tensor_images_mask_and_remap():
    labels = torch.tensor([0, 5, 9, 3, 5, 7, 9, 1])
    images = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 1, 2, 2).contiguous()
    sub = TensorImages(images, labels).select_classes((9, 5))
    assert sub.labels.tolist() == [1, 0, 1, 0]  # 5 -> 1, 9 -> 0: the listed order
    assert sub.images[:, 0, 0, 0].tolist() == [1, 2, 4, 6]  # dataset order kept


def test_load_dataset_classes_both_splits_meta_and_limits(tmp_path):
    make_mnist_dir(tmp_path, n_train=200, n_test=100)
    full = load_dataset("fashion_mnist", str(tmp_path))
    info = load_dataset("fashion_mnist", str(tmp_path), classes="5-9", train_limit=10)
    assert info.num_classes == 5 and info.classes == (5, 6, 7, 8, 9)
    assert info.meta()["classes"] == [5, 6, 7, 8, 9] and info.meta()["num_classes"] == 5
    assert full.meta()["classes"] is None
    for split in ("train", "test"):
        orig = getattr(full, split).labels
        kept = orig[orig >= 5]
        got = getattr(info, split)
        if split == "test":
            assert torch.equal(got.labels, kept - 5)
            assert torch.equal(got.images, full.test.images[orig >= 5])
        else:  # the limit applies after the class filter
            assert torch.equal(got.labels, (kept - 5)[:10])


def test_load_dataset_classes_bad_ids(tmp_path):
    make_mnist_dir(tmp_path)
    with pytest.raises(ValueError, match="has classes 0-9; no class 10"):
        load_dataset("fashion_mnist", str(tmp_path), classes="8-10")
    with pytest.raises(ValueError, match="more than once"):
        load_dataset("fashion_mnist", str(tmp_path), classes="1,2,1")


def test_hf_images_select_classes():
    datasets = pytest.importorskip("datasets")
    from PIL import Image
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(6)],
                                     "label": [0, 1, 2, 0, 1, 2]})
    sub = HFImages(ds, lambda im: torch.tensor(im.getpixel((0, 0))[0])).select_classes((2, 0))
    assert len(sub) == 4
    assert [(int(x), y) for x, y in (sub[i] for i in range(4))] == [(0, 1), (2, 0), (3, 1), (5, 0)]
    assert len(sub.subset(2)) == 2 and sub.subset(2)[1][1] == 0


def test_cli_classes_reach_the_config_and_validate():
    from dat_ds import cli
    args = cli.parser("t").parse_args(["--classes", "0-4", "--backbone", "test_resnet"])
    cfg = cli.train_config(args)
    assert cfg.classes == "0-4"
    cfg.validate()
    cfg.classes = "3,3"
    with pytest.raises(ValueError, match="more than once"):
        cfg.validate()
