"""Semi-supervised DAT (robust self-training): labeled + pseudo-labeled batches, robust loss on both.

    # labels for 10% of Fashion-MNIST; the other 90% become the unlabeled pool
    deepspeed --num_gpus 2 recipes/semisup_dat.py --labeled-fraction 0.1 --output-dir runs/rst
    # the baseline: DAT on the labeled 10% alone, same number of updates
    deepspeed --num_gpus 2 recipes/semisup_dat.py --labeled-fraction 0.1 --unlabeled-fraction 0 --output-dir runs/lab
    # any folder of images as the pool (flat or class folders; labels ignored), a given teacher
    deepspeed --num_gpus 2 recipes/semisup_dat.py --unlabeled DIR --teacher runs/std --output-dir runs/rst_dir

Steps: (1) a standard model labels the pool: ``--teacher`` (any run's checkpoint), or one trained
here on the labeled data without attack (``--teacher-epochs``, into ``<output-dir>/teacher``);
(2) the pseudo-labels are written to ``--pseudo-labels`` (``.npz``: images, labels, confidence;
``.npz.json``: source, teacher, agreement with held-back labels) and reused when the file
exists; (3) DAT with ``round(--unlabeled-fraction x micro batch)`` pseudo-labeled samples in
every micro-batch, each rank drawing from its own shard of both pools. An epoch is as many
updates as one over the labeled data alone. Every training flag of the other recipes applies.
"""
import dataclasses
from pathlib import Path

from dat_ds import cli, dist
from dat_ds.checkpoint_io import find_checkpoint, load_model
from dat_ds.data import DataError, load_dataset
from dat_ds.metrics import write_json_atomic
from dat_ds.semisup import (PseudoLabels, agreement, check_pool_fits, hold_back_labels, load_pseudo_labels,
                            mixed_loader_fn, pseudo_label, read_image_folder, save_pseudo_labels)
from dat_ds.trainer import train


def parser():
    p = cli.parser(__doc__.splitlines()[0], dataset="fashion_mnist", backbone="resnet18", epochs=5,
                   output_dir="runs/semisup_dat")
    g = p.add_argument_group("semi-supervised")
    g.add_argument("--labeled-fraction", type=float, default=1.0,
                   help="keep the labels of this random share of the training set; the rest is the 'heldout' pool")
    g.add_argument("--unlabeled", default="heldout", metavar="heldout|DIR",
                   help="the unlabeled pool: the training images whose labels are held back, or a folder of images")
    g.add_argument("--unlabeled-fraction", type=float, default=0.5,
                   help="share of every micro-batch drawn from the pseudo-labeled pool (0: labeled data only)")
    g.add_argument("--pseudo-labels", default=None, metavar="FILE.npz",
                   help="pseudo-label file, reused if present (default: <output-dir>/pseudo_labels.npz)")
    g.add_argument("--teacher", default=None, metavar="CHECKPOINT",
                   help="standard model that labels the pool (default: one trained here on the labeled data, "
                        "into <output-dir>/teacher)")
    g.add_argument("--teacher-epochs", type=int, default=3, help="epochs of the teacher trained here (no attack)")
    g.add_argument("--min-confidence", type=float, default=0.0,
                   help="drop pseudo-labels whose teacher confidence is below this")
    return p


def train_teacher(cfg, data, epochs: int) -> Path:
    """A standard (natural) model on the labeled data; reused when ``<output-dir>/teacher`` is complete."""
    out = Path(cfg.output_dir) / "teacher"
    if not (out / "summary.json").is_file():
        # natural training: no attack, plain cross-entropy, so none of the run's attack or loss settings apply
        tcfg = dataclasses.replace(cfg, attack="none", attack_kwargs={}, loss="madry", loss_kwargs={},
                                   epochs=epochs, output_dir=str(out), holdout=0, stop_after=None, resume=False,
                                   eval_steps=1)  # its robustness is not the point
        summary = train(tcfg, data)
        if dist.is_main():
            print(f"teacher: TA {summary['clean_acc']:.4f} after {epochs} epochs on {len(data.train)} labeled "
                  f"images ({out})", flush=True)
    dist.barrier()
    return find_checkpoint(out, "--teacher")


def pseudo_labeled_pool(args, cfg, data, held_images, held_truth) -> PseudoLabels:
    if args.unlabeled == "heldout":
        source = (f"heldout:{cfg.dataset}:train_limit={cfg.train_limit}:labeled_fraction={args.labeled_fraction}"
                  f":seed={cfg.seed}")
    else:
        source = f"folder:{Path(args.unlabeled).resolve()}"
    path = Path(args.pseudo_labels or Path(cfg.output_dir) / "pseudo_labels.npz")
    if path.is_file():
        pool = load_pseudo_labels(path)
        if pool.meta.get("source") != source:
            raise DataError(f"--pseudo-labels {path} was made from {pool.meta.get('source')!r}, not {source!r}; "
                            f"remove it or name another file")
        return pool
    if args.unlabeled == "heldout":
        if len(held_images) == 0:
            raise ValueError("no unlabeled pool: set --labeled-fraction below 1, --unlabeled DIR, "
                             "or --unlabeled-fraction 0")
        images, truth = held_images, held_truth
    else:
        images, truth = read_image_folder(args.unlabeled, data.in_chans, data.img_size), None
    if args.teacher:
        teacher = find_checkpoint(args.teacher, "--teacher")
    else:
        teacher = train_teacher(cfg, data, args.teacher_epochs)
    model, tmeta = load_model(teacher)
    if (tmeta["in_chans"], tmeta["img_size"], tmeta["num_classes"]) != (data.in_chans, data.img_size,
                                                                        data.num_classes):
        raise ValueError(f"--teacher {teacher} takes {tmeta['in_chans']}x{tmeta['img_size']} px images into "
                         f"{tmeta['num_classes']} classes; {data.name} has {data.in_chans}x{data.img_size} px, "
                         f"{data.num_classes} classes")
    labels, confidence = pseudo_label(model, images, dist.device())
    pool = PseudoLabels(images, labels, confidence,
                        {"source": source, "teacher": str(teacher), "teacher_backbone": tmeta["backbone"],
                         "dataset": data.name, "agreement_with_true_labels": agreement(labels, truth)})
    if dist.is_main():
        save_pseudo_labels(path, pool)
        print(f"pseudo-labeled {len(pool)} images -> {path} (mean confidence "
              f"{float(confidence.mean()):.3f}, agreement with held-back labels "
              f"{pool.meta['agreement_with_true_labels']})", flush=True)
    dist.barrier()
    return pool


def main():
    args = parser().parse_args()
    cfg = cli.train_config(args)
    cfg.validate()
    if args.teacher_epochs < 1:
        raise ValueError(f"--teacher-epochs must be >= 1, got {args.teacher_epochs}")
    if not 0 <= args.unlabeled_fraction < 1:
        raise ValueError(f"--unlabeled-fraction must lie in [0, 1), got {args.unlabeled_fraction}")
    if not 0 <= args.min_confidence < 1:
        raise ValueError(f"--min-confidence must lie in [0, 1), got {args.min_confidence}")
    dist.init()
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.train_limit, cfg.eval_limit, cfg.img_size, cfg.classes)
    labeled, held_images, held_truth = hold_back_labels(data.train, args.labeled_fraction, cfg.seed)
    data = dataclasses.replace(data, train=labeled)
    pool = None
    if args.unlabeled_fraction > 0:
        pool = pseudo_labeled_pool(args, cfg, data, held_images, held_truth).confident(args.min_confidence)
        check_pool_fits(pool, data.in_chans, data.img_size, data.num_classes, "--pseudo-labels")
    summary = train(cfg, data, loader_fn=mixed_loader_fn(pool, args.unlabeled_fraction))
    if dist.is_main() and "clean_acc" in summary:
        summary.update(labeled_samples=len(labeled), pseudo_labeled_samples=len(pool) if pool else 0,
                       labeled_fraction=args.labeled_fraction, unlabeled_fraction=args.unlabeled_fraction,
                       min_confidence=args.min_confidence, pseudo_labels=pool.meta if pool else None)
        write_json_atomic(Path(cfg.output_dir) / "summary.json", summary)
        cli.print_summary(summary)


if __name__ == "__main__":
    cli.run(main)
