"""Every dataset declares the names of its classes, the checkpoint's meta records them, and an
exported model carries them (not "0".."9" for Fashion-MNIST's T-shirts and sneakers)."""
import json
import pickle

import numpy as np
import torch
from PIL import Image

from dat_ds.data import load_dataset
from dat_ds.models import create_model
from dat_ds.models.export import export_model
from test_data_hf import saved, split

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_idx_and_package_digits_name_their_classes():
    info = load_dataset("fashion_mnist", train_limit=20, eval_limit=20)
    assert list(info.class_names) == FASHION and info.meta()["class_names"] == FASHION
    subset = load_dataset("fashion_mnist", train_limit=20, eval_limit=20, classes="7,5,9")
    assert subset.meta()["class_names"] == ["Sneaker", "Sandal", "Ankle boot"]  # label i is the i-th listed class
    assert subset.meta()["classes"] == [7, 5, 9]
    assert list(load_dataset("digits").class_names) == [str(d) for d in range(10)]


def _cifar(root, meta_file, meta, batches, key):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in batches:
        with open(root / name, "wb") as f:  # the python batches' layout: bytes keys, as CIFAR's files unpickle
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), key: [0, 1, 2, 3]}, f)
    if meta is not None:
        with open(root / meta_file, "wb") as f:
            pickle.dump(meta, f)


def test_cifar_batches_carry_their_label_names(tmp_path):
    names10 = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _cifar(tmp_path / "a" / "cifar-10-batches-py", "batches.meta",
           {b"num_cases_per_batch": 10000, b"label_names": names10, b"num_vis": 3072},
           [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels")
    info = load_dataset("cifar10", str(tmp_path / "a"))
    assert info.meta()["class_names"] == [n.decode() for n in names10]
    names100 = [f"class{i}".encode() for i in range(100)]
    _cifar(tmp_path / "b" / "cifar-100-python", "meta",
           {b"fine_label_names": names100, b"coarse_label_names": [b"x"] * 20}, ["train", "test"], b"fine_labels")
    assert load_dataset("cifar100", str(tmp_path / "b"), classes="99,3").class_names == ("class99", "class3")
    _cifar(tmp_path / "c" / "cifar-10-batches-py", "batches.meta", None,
           [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels")
    assert load_dataset("cifar10", str(tmp_path / "c")).class_names is None  # no meta file: ids only


def test_imagefolder_and_hf_datasets_name_their_classes(tmp_path):
    for part in ("train", "val"):
        for cls in ("zebra", "ant"):
            (tmp_path / "folder" / part / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "folder" / part / cls / "0.png")
    assert load_dataset("imagefolder", str(tmp_path / "folder"), img_size=8).class_names == ("ant", "zebra")
    path = saved(tmp_path, train=split(2), test=split(1))
    assert load_dataset(f"hf:{path}").class_names == ("c0", "c1", "c2")  # the ClassLabel's names


def test_export_writes_the_recorded_class_names(tmp_path):
    info = load_dataset("fashion_mnist", train_limit=20, eval_limit=20)
    meta = {"backbone": "test_resnet", "stem": "native", **info.meta()}
    torch.manual_seed(0)
    model = create_model("test_resnet", 10, 1, 28, info.mean, info.std, stem="native").eval()
    manifest = export_model(model, meta, tmp_path)
    assert manifest["class_names"] == FASHION
    assert json.loads((tmp_path / "export.json").read_text())["class_names"] == FASHION
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["label_names"] == FASHION
