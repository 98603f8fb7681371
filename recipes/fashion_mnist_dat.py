"""DAT-PGD on Fashion-MNIST: the demo and the quickest end-to-end check.

    deepspeed --num_gpus 2 recipes/fashion_mnist_dat.py --output-dir runs/fmnist   # 2 ranks
    python recipes/fashion_mnist_dat.py --train-limit 2000 --epochs 1             # 1 process

Defaults follow the DAT paper's small-image setting: PGD-10, eps 0.1, step 2.5 eps / 10, LAMB with
layerwise adaptive LR (ds_configs/lamb_fp32.json: 32 images per rank, peak LR 0.025 at global batch
128 and sqrt(global batch / 128) times that elsewhere: the LR bench/large_batch.py chose on a
validation split at batch 128 and at 1024 alike; warm-up 1 epoch but at most 10% of the run, so a
short run is not all warm-up). On 2 ranks, `--epochs 1 --train-limit 3000` (46 steps at global
batch 64) ends at TA 43.6 % on the 10,000 test images; 64 images per rank (23 steps) reached 39.1 %.
"""
from dat_ds import cli, dist
from dat_ds.trainer import train


def parser():
    return cli.parser(__doc__.splitlines()[0], dataset="fashion_mnist", backbone="resnet18", eps=0.1,
                      alpha=None, steps=None, epochs=5, output_dir="runs/fashion_mnist_dat")


def main():
    args = parser().parse_args()
    summary = train(cli.train_config(args))
    if dist.is_main():
        cli.print_summary(summary)
        print(f"summary written to {args.output_dir}/summary.json")


if __name__ == "__main__":
    cli.run(main)
