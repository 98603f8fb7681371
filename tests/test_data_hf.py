"""``--dataset hf:NAME_OR_PATH`` on files written in the formats users have: a ``save_to_disk``
folder and parquet files (a folder and a glob)."""
import json
from collections import Counter

import numpy as np
import pytest

from conftest import ROOT, run_recipe
from dat_ds.data import DataError, bad_samples, load_dataset, train_loader

datasets = pytest.importorskip("datasets")
QUICK = ["--backbone", "test_resnet", "--stem", "native", "--eval-steps", "1", "--epochs", "1",
         "--deepspeed_config", ROOT / "tests" / "configs" / "tiny_lamb.json"]


def images(n, size=12, mode="RGB", seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(n)]


def split(n_per_class, classes=3, size=12, mode="RGB", columns=("image", "label"), class_label=True, seed=0):
    """A class-sorted split: ``n_per_class`` images of each class."""
    labels = np.repeat(np.arange(classes), n_per_class).tolist()
    label_feature = datasets.ClassLabel(names=[f"c{i}" for i in range(classes)]) if class_label else \
        datasets.Value("int64")
    features = datasets.Features({columns[0]: datasets.Image(), columns[1]: label_feature})
    return datasets.Dataset.from_dict({columns[0]: images(len(labels), size, mode, seed), columns[1]: labels},
                                      features=features)


def saved(tmp_path, **splits):
    path = tmp_path / "saved"
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


def test_save_to_disk_folder_labels_shapes_stats_and_stratified_limits(tmp_path):
    path = saved(tmp_path, train=split(8), test=split(4, seed=1))
    info = load_dataset(f"hf:{path}", eval_limit=6, train_limit=9, cache_dir=str(tmp_path / "cache"))
    assert (info.num_classes, info.in_chans, info.img_size) == (3, 3, 12)
    assert Counter(info.test.labels.tolist()) == {0: 2, 1: 2, 2: 2}  # class-sorted: stratified, not class 0
    assert Counter(info.train.labels.tolist()) == {0: 3, 1: 3, 2: 3}
    x, y = info.test[0]
    assert x.shape == (3, 12, 12) and 0 <= x.min() and x.max() <= 1 and y == 0
    pixels = np.stack([np.asarray(im, dtype=np.float64) / 255 for im in images(24)])  # the training images
    assert np.allclose(info.mean, pixels.mean((0, 1, 2)), atol=1e-4)  # 24 images < 1,000: all measured
    assert np.allclose(info.std, pixels.std((0, 1, 2)), atol=1e-4)
    given = load_dataset(f"hf:{path}", mean="0.5,0.5,0.5", std=[0.25, 0.25, 0.25])
    assert given.mean == (0.5,) * 3 and given.std == (0.25,) * 3


def test_parquet_folder_and_glob_with_named_columns(tmp_path):
    pq = tmp_path / "pq"
    (pq / "data").mkdir(parents=True)
    kw = dict(mode="L", columns=("img", "target"), class_label=False)
    split(5, **kw).to_parquet(str(pq / "data" / "train-00000-of-00001.parquet"))
    split(2, seed=1, **kw).to_parquet(str(pq / "data" / "validation-00000-of-00001.parquet"))
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match="cannot tell the label column among img, target; name it with --label-col"):
        load_dataset(f"hf:{pq}", cache_dir=cache)
    for spec in (str(pq), str(pq / "data" / "*.parquet")):
        info = load_dataset(f"hf:{spec}", label_column="target", cache_dir=cache)
        assert (info.num_classes, info.in_chans, len(info.train), len(info.test)) == (3, 1, 15, 6)
        assert info.test[0][0].shape == (1, 12, 12) and info.meta()["dataset_settings"]["label_column"] == "target"
    with pytest.raises(DataError, match="'nope' is not a column"):
        load_dataset(f"hf:{pq}", label_column="nope", cache_dir=cache)


def test_split_names_detected_or_given(tmp_path):
    path = saved(tmp_path, fit=split(2), holdout=split(1))
    with pytest.raises(DataError, match="no split 'train'; it has fit, holdout .*--hf-split"):
        load_dataset(f"hf:{path}")
    info = load_dataset(f"hf:{path}", hf_split="fit,holdout")
    assert len(info.train) == 6 and len(info.test) == 3
    with pytest.raises(ValueError, match="--hf-split takes TRAIN,TEST"):
        load_dataset(f"hf:{path}", hf_split="fit")
    with pytest.raises(DataError, match="hf:.*nowhere: cannot load"):
        load_dataset(f"hf:{tmp_path / 'nowhere'}", cache_dir=str(tmp_path / "cache"))


def test_hf_files_stay_untouched_and_cache_goes_to_cache_dir(tmp_path):
    from test_data_images import make_read_only, snapshot
    data = tmp_path / "data"
    (data / "pq").mkdir(parents=True)
    split(3).to_parquet(str(data / "pq" / "train.parquet"))
    split(1).to_parquet(str(data / "pq" / "test.parquet"))
    datasets.DatasetDict(train=split(3), test=split(1)).save_to_disk(str(data / "saved"))
    before = snapshot(data)
    make_read_only(data)
    try:
        for spec in (data / "pq", data / "saved"):
            info = load_dataset(f"hf:{spec}", cache_dir=str(tmp_path / "cache"))
            assert len(info.train) == 9 and info.train[0][0].shape == (3, 12, 12)
    finally:
        for p in [data, *data.rglob("*")]:
            p.chmod(0o755)
    assert snapshot(data) == before
    assert any((tmp_path / "cache").rglob("*.arrow"))  # the parquet conversion went to the cache


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_image_in_hf_dataset_is_skipped_and_counted(tmp_path, capfd, workers):
    ds = split(4)
    rows = ds.cast_column("image", datasets.Image(decode=False)).to_dict()
    rows["image"][5] = {"bytes": b"\xff\xd8\xff garbage", "path": None}
    bad = datasets.Dataset.from_dict(rows, features=ds.features)
    path = saved(tmp_path, train=bad, test=split(1))
    info = load_dataset(f"hf:{path}")
    loader = train_loader(info.train, 3, 0, 1, seed=0, num_workers=workers)
    loader.sampler.set_epoch(0)
    assert [len(y) for _, y in loader] == [3] * 4 and bad_samples(info.train) == 1
    assert f"skipping unreadable image hf:{path} train row 5" in capfd.readouterr().err


def test_train_run_through_a_recipe(tmp_path):
    path = saved(tmp_path, train=split(24, size=16), test=split(8, size=16, seed=1))
    out = tmp_path / "run"
    r = run_recipe([*QUICK, "--dataset", f"hf:{path}", "--output-dir", out, "--train-limit", "64",
                    "--eval-limit", "24"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == f"hf:{path}" and summary["eval_samples"] == 24
    assert 0 <= summary["robust_acc"] <= summary["clean_acc"] <= 1


def test_a_hidden_test_split_is_passed_over(tmp_path):
    hidden = datasets.Dataset.from_dict({"image": images(3), "label": [-1, -1, -1]},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "label": datasets.Value("int64")}))
    path = saved(tmp_path, train=split(2, class_label=False), test=hidden,
                 validation=split(1, class_label=False))
    info = load_dataset(f"hf:{path}")
    assert len(info.test) == 3 and sorted(info.test.labels.tolist()) == [0, 1, 2] and info.num_classes == 3


def test_hf_setting_flags_reach_the_dataset_from_the_command_line():
    """``--label-column`` and ``--hf-split`` are settings of the ``hf:`` family, whatever its name or path."""
    from dat_ds import cli
    args = cli.parser("test").parse_args(["--dataset", "hf:some/folder", "--label-column", "fine", "--hf-split",
                                          "validation"])
    assert cli.train_config(args).dataset_kwargs == {"label_column": "fine", "hf_split": "validation"}
