"""The Fashion-MNIST recipe with the fault settings (used by the fault tests and bench/fault_bench.py).

    deepspeed --num_gpus 2 tests/scripts/fault_train.py --comm-timeout 15 --save-retries 0 [recipe flags]

``--comm-timeout`` and ``--save-retries`` are passed to ``TrainConfig`` whether or not the
recipe's own parser has them yet.
"""
import argparse
import sys

from dat_ds import cli
from dat_ds.trainer import train

faults_flags = argparse.ArgumentParser(add_help=False)
faults_flags.add_argument("--comm-timeout", type=float, default=None)
faults_flags.add_argument("--save-retries", type=int, default=None)


def main():
    extra, rest = faults_flags.parse_known_args()
    args = cli.parser("fault tests", dataset="fashion_mnist", eps=0.1, output_dir="runs/faults").parse_args(rest)
    cfg = cli.train_config(args)
    for name, value in vars(extra).items():
        if value is not None:
            setattr(cfg, name, value)
    train(cfg)


if __name__ == "__main__":
    sys.argv[0] = "fashion_mnist_dat.py"
    cli.run(main)
