"""DAT on CIFAR-10/100 with PreAct-ResNet-18 / WideResNet-28-10 class backbones.

    deepspeed --hostfile hostfile recipes/cifar_dat.py --data-dir ~/data            # CIFAR-10
    deepspeed recipes/cifar_dat.py --data-dir ~/data --dataset cifar100 --backbone wrn28_10
    python recipes/cifar_dat.py --data-dir ~/data --train-limit 1000 --epochs 1     # 1 process

--data-dir holds the standard python batches (cifar-10-batches-py/ or cifar-100-python/).
Defaults: PGD-10 at eps 8/255, step 2/255 (Madry et al.), random crop + flip, LAMB with
layerwise adaptive LR (ds_configs/lamb_fp32.json; lamb_bf16.json on GPUs), its peak LR scaled by
sqrt(global batch / 128) (the config's lr_rule).
"""
from dat_ds import cli, dist
from dat_ds.trainer import train


def parser():
    return cli.parser(__doc__.splitlines()[0], dataset="cifar10", backbone="preactresnet18", eps=8 / 255,
                      alpha=None, steps=None, eval_steps=10, epochs=100, output_dir="runs/cifar_dat")


def main():
    args = parser().parse_args()
    if args.dataset not in ("cifar10", "cifar100"):
        raise ValueError(f"--dataset must be cifar10 or cifar100 for this recipe, got {args.dataset!r}")
    summary = train(cli.train_config(args))
    if dist.is_main():
        cli.print_summary(summary)


if __name__ == "__main__":
    cli.run(main)
