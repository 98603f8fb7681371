"""Smooth-AT (SmoothAdv) on Fashion-MNIST: adversarial training of a randomized-smoothing base classifier.

    deepspeed --num_gpus 2 recipes/smooth_at.py --output-dir runs/smooth_at           # 2 ranks
    python recipes/smooth_at.py --train-limit 2000 --epochs 1 --noise-copies 1        # 1 process
    python recipes/certify.py --checkpoint runs/smooth_at                             # then certify

The attack (``smooth_pgd_l2``) runs PGD-L2 against the soft smoothed classifier over m noise
draws; the objective (``smooth``) is the cross-entropy over m noisy copies of each adversarial
example. Each rank expands its own micro-batch to m x micro, so m x the global batch grows with
the ranks. Defaults: sigma 0.25, L2 eps 0.5, 2 steps of 2 eps / steps, m 4 (Salman et al. 2019
use m in 1..8 and 1..10 steps); ``--eps 0`` is Gaussian data augmentation (Cohen et al. 2019).
``robust_acc`` in the summary is PGD-L2 on the base classifier; certified accuracy of the
smoothed classifier comes from ``recipes/certify.py``.
"""
from dat_ds import cli, dist
from dat_ds.trainer import train


def parser():
    # --sigma and --noise-copies are settings of the smooth attack and loss: the flags come with them
    return cli.parser(__doc__.splitlines()[0], dataset="fashion_mnist", backbone="resnet18", attack="smooth_pgd_l2",
                      loss="smooth", eps=0.5, steps=2, sigma=0.25, noise_copies=4, epochs=5,
                      output_dir="runs/smooth_at")


def main():
    args = parser().parse_args()
    cfg = cli.train_config(args)
    if "sigma" not in cfg.attack_kwargs and "sigma" not in cfg.loss_kwargs:
        raise ValueError(f"--attack {args.attack} with --loss {args.loss} uses no noise; "
                         f"pick --attack smooth_pgd_l2 and/or --loss smooth")
    summary = train(cfg)
    if dist.is_main():
        cli.print_summary(summary)
        print(f"sigma {args.sigma:g}, noise copies m = {args.noise_copies}; RA is PGD-L2 on the base classifier")
        print(f"summary written to {args.output_dir}/summary.json; certify with "
              f"recipes/certify.py --checkpoint {args.output_dir}")


if __name__ == "__main__":
    cli.run(main)
