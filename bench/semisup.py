"""Semi-supervised DAT vs DAT on the labeled part alone, 2 ranks under the deepspeed launcher.

Labels are kept for ``--labeled-fraction`` of the first ``--train-limit`` Fashion-MNIST training
images; the rest is the unlabeled pool. A standard teacher trained on the labeled images
pseudo-labels the pool, then two DAT runs of equal length (same updates, same seed) are
compared on the test set: labeled only (``--unlabeled-fraction 0``) and half of every batch
pseudo-labeled. Writes ``bench/results/semisup.json``.

    python bench/semisup.py                       # about 6 minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def launch(args: list, ranks: int, recipe: str = "semisup_dat.py") -> float:
    """Run ``recipes/<recipe>`` on ``ranks`` local ranks under the deepspeed launcher; returns the wall seconds."""
    from dat_ds.dist import free_port
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()),
           str(ROOT / "recipes" / recipe), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"run failed ({' '.join(cmd)}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/bench_semisup", help="run folders")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=20000)
    p.add_argument("--labeled-fraction", type=float, default=0.1)
    p.add_argument("--unlabeled-fraction", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=12,
                   help="DAT epochs (each as many updates as one over the labeled data)")
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="PGD steps of the training attack")
    p.add_argument("--eval-limit", type=int, default=1000)
    p.add_argument("--loss", default="madry", choices=("madry", "trades"))
    p.add_argument("--backbone", default="test_resnet")
    p.add_argument("--deepspeed-config", default=str(ROOT / "ds_configs" / "fashion_mnist_demo.json"))
    a = p.parse_args()
    out = Path(a.out)
    common = ["--dataset", "fashion_mnist", "--backbone", a.backbone, "--stem", "native",
              "--train-limit", a.train_limit, "--labeled-fraction", a.labeled_fraction,
              "--eval-limit", a.eval_limit, "--epochs", a.epochs,
              "--steps", a.steps, "--eval-steps", 10, "--loss", a.loss, "--deepspeed_config", a.deepspeed_config]
    runs = {"labeled only": ["--unlabeled-fraction", 0, "--output-dir", out / "labeled_only"],
            "labeled + pseudo-labeled": ["--unlabeled-fraction", a.unlabeled_fraction, "--teacher-epochs",
                                         a.teacher_epochs, "--output-dir", out / "pseudo"]}
    rows = []
    for name, extra in runs.items():
        wall = launch(common + extra, a.ranks)
        s = json.loads((Path(extra[-1]) / "summary.json").read_text())
        pl = s.get("pseudo_labels") or {}
        rows.append({"run": name, "labeled": s["labeled_samples"], "pseudo_labeled": s["pseudo_labeled_samples"],
                     "unlabeled_fraction": s["unlabeled_fraction"], "TA": s["clean_acc"], "RA": s["robust_acc"],
                     "pseudo_label_agreement": pl.get("agreement_with_true_labels"),
                     "updates": s["epochs"] * (s["labeled_samples"] // s["global_batch_size"]),
                     "compute_s": s["compute_s"], "wall_s": wall})
        print(f"{name}: TA {s['clean_acc']:.4f}  RA {s['robust_acc']:.4f}  ({wall:.0f} s)", flush=True)
    import deepspeed
    lab, semi = rows
    payload = {
        "title": "Semi-supervised DAT (robust self-training) vs DAT on the labeled data alone, Fashion-MNIST",
        "machine": {**machine(), "deepspeed": deepspeed.__version__},
        "settings": {"dataset": "fashion_mnist", "train_limit": a.train_limit, "labeled_fraction": a.labeled_fraction,
                     "backbone": a.backbone, "ranks": a.ranks, "deepspeed_config": Path(a.deepspeed_config).name,
                     "attack": f"pgd-{a.steps}", "eps": 0.1, "loss": a.loss, "epochs": a.epochs,
                     "teacher_epochs": a.teacher_epochs, "eval": f"pgd-10 on the first {a.eval_limit} test images"},
        "rows": rows,
        "notes": [f"RA with pseudo-labeled data minus labeled only: {100 * (semi['RA'] - lab['RA']):+.1f} points "
                  f"(TA {100 * (semi['TA'] - lab['TA']):+.1f}); same updates, same seed, one run each.",
                  "An epoch is len(labeled) / global batch updates in both runs (Carmon et al.'s convention), so "
                  "the pseudo-labeled run sees half as many labeled samples per epoch.",
                  "The teacher is a standard model trained on the labeled images only; agreement is the share of "
                  "pseudo-labels equal to the held-back true labels."],
    }
    print(table(list(rows[0]), [list(r.values()) for r in rows]))
    print(f"written to {save('semisup', payload)}")


if __name__ == "__main__":
    main()
