"""Write a dataset as shards that training streams (``--dataset shards``), for data larger than one disk.

    python recipes/make_shards.py --dataset imagefolder --data-dir /data/imagenet --out /data/imagenet-shards
    python recipes/make_shards.py --dataset hf:/data/my_set --out /data/my_set-shards

The source is any dataset dat-ds reads (an image folder with ``train/`` and ``val/`` class folders,
an ``hf:`` dataset, ``cifar10``, ``fashion_mnist``, ...), with its ``--classes`` and ``*-limit``
subsets. ``--out`` receives ``dataset.json`` and litdata chunks under ``train/`` and ``val/``
(:mod:`dat_ds.data.shards`): the images' own encoded bytes (no re-encoding; in-memory datasets as
PNG), the training split in a random order seeded by ``--seed``. Copy the folder to object storage
to stream it from there (``--data-dir s3://bucket/name``).
"""
import argparse

from dat_ds import cli
from dat_ds.data import load_dataset
from dat_ds.data.shards import write_shards

HF_SETTINGS = ("hf_split", "image_column", "label_column", "cache_dir", "mean", "std", "stats_samples")


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="imagefolder",
                   help="the source: imagefolder, hf:NAME_OR_PATH or any registered dataset (default: imagefolder)")
    p.add_argument("--data-dir", default=None,
                   help="the source's folder (imagefolder: train/ and val/ class folders; default: the dataset's "
                        "own place)")
    p.add_argument("--out", required=True, help="the new folder to write (must not exist, or be empty)")
    p.add_argument("--img-size", type=int, default=None,
                   help="the training resolution recorded for the shards (default: the source's)")
    p.add_argument("--classes", default=None, metavar="IDS", help="write only these classes, e.g. 0-4")
    p.add_argument("--train-limit", type=int, default=None, metavar="N", help="write only N training samples")
    p.add_argument("--eval-limit", type=int, default=None, metavar="N", help="write only N test samples")
    p.add_argument("--seed", type=int, default=0, help="seeds the order the training split is written in (default: 0)")
    p.add_argument("--chunk-bytes", default="64MB", help="bytes per chunk file (litdata's chunk_bytes; default: 64MB)")
    p.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="samples per chunk file instead of --chunk-bytes")
    g = p.add_argument_group("hf: sources (as the training recipes take them)")
    g.add_argument("--hf-split", default=None, help="TRAIN,TEST split names (default: train and the first test split)")
    g.add_argument("--image-column", default=None, help="the image column (default: the one Image feature)")
    g.add_argument("--label-column", default=None,
                   help="the label column (default: the ClassLabel column, else label or labels)")
    g.add_argument("--cache-dir", default=None, help="where Hugging Face datasets caches (default: HF_DATASETS_CACHE)")
    g.add_argument("--mean", default=None, help="per-channel mean, e.g. 0.5,0.5,0.5 (default: measured)")
    g.add_argument("--std", default=None, help="per-channel std (default: measured)")
    g.add_argument("--stats-samples", type=int, default=None, help="images the statistics are measured on")
    return p


def main():
    args = parser().parse_args()
    settings = {k: getattr(args, k) for k in HF_SETTINGS if getattr(args, k) is not None}
    if settings and not args.dataset.startswith("hf:"):
        raise ValueError(f"--{next(iter(settings)).replace('_', '-')} is a setting of hf: datasets, not of "
                         f"{args.dataset!r}")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    info = load_dataset(args.dataset, args.data_dir, args.train_limit, args.eval_limit, args.img_size, args.classes,
                        **settings)
    meta = write_shards(info, args.out, args.seed, args.chunk_bytes, args.chunk_size)
    print(f"wrote {meta.train_samples} training and {len(meta.val_labels)} test samples of {args.dataset} "
          f"({meta.num_classes} classes, {meta.img_size} px) to {args.out}; train with --dataset shards "
          f"--data-dir {args.out}")


if __name__ == "__main__":
    cli.run(main)
