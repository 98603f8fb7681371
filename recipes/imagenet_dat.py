"""DAT on ImageNet with ResNet-50: the DAT paper's main setting.

    deepspeed --hostfile hostfile recipes/imagenet_dat.py --data-dir /data/imagenet
    deepspeed recipes/imagenet_dat.py --data-dir /data/imagenet --attack fgsm_rs   # DAT-FGSM
    deepspeed --hostfile hostfile recipes/imagenet_dat.py --dataset hf:imagenet-1k   # a Hugging Face copy

--data-dir holds train/<class>/*.JPEG and val/<class>/*.JPEG (the ImageFolder layout), indexed
in memory with torchvision's folder scan (nothing is written there: read-only storage works).
--train-limit / --eval-limit / --holdout draw class-stratified subsets; an unreadable image is
named on stderr, replaced by the next one and counted. Defaults: PGD-4 at eps 2/255 (the DAT
code's choice), 224 px, LAMB with layerwise adaptive LR in bf16
(ds_configs/imagenet_lamb_bf16.json), 5 warm-up epochs then piecewise decay, and label smoothing
0.1 of the training targets: the remedy bench/large_batch.py found for DAT-LAMB at 8x the batch
(it won on held-out PGD-50 x 5 and under AutoAttack for both seeds). `--label-smoothing 0` trains on
plain cross-entropy, as the DAT paper did.
"""
from dat_ds import cli, dist
from dat_ds.trainer import train


def parser():
    return cli.parser(__doc__.splitlines()[0], dataset="imagefolder", backbone="resnet50", eps=2 / 255,
                      alpha=None, steps=None, eval_steps=10, epochs=30, img_size=224, num_workers=8,
                      eval_batch_size=128, deepspeed_config="ds_configs/imagenet_lamb_bf16.json",
                      label_smoothing=0.1, output_dir="runs/imagenet_dat")


def main():
    args = parser().parse_args()
    if args.steps is None and args.attack in ("pgd", "pgd_l2"):
        args.steps = 4  # the DAT code's ImageNet choice
    summary = train(cli.train_config(args))
    if dist.is_main():
        cli.print_summary(summary)


if __name__ == "__main__":
    cli.run(main)
