"""Command-line plumbing shared by the recipes: flags in, a plain ``TrainConfig`` out.

The library never sees ``argparse``; a recipe calls :func:`parser` with its own defaults,
then :func:`train_config` and :func:`run`. Bad input ends the process with one line on
stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from fractions import Fraction
from typing import Callable, Optional

from . import attacks, compress, objectives
from .data import DATASETS


def number(text: str) -> float:
    """A float that may be written as a fraction, e.g. ``8/255``."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def rank_list(text: str) -> tuple:
    """``"1,3"`` -> ``(1, 3)``."""
    try:
        return tuple(int(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ranks: {text!r}") from None


def parser(description: str, **defaults) -> argparse.ArgumentParser:
    """The contract every recipe keeps; ``defaults`` set the recipe's own starting values."""
    import deepspeed

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="fashion_mnist",
                   help=" | ".join(DATASETS))
    g.add_argument("--data-dir", default=None, help="folder holding the dataset files")
    g.add_argument("--train-limit", type=int, default=None, metavar="N", help="use only the first N training samples")
    g.add_argument("--eval-limit", type=int, default=None, metavar="N", help="use only the first N test samples")
    g.add_argument("--classes", default=None, metavar="IDS",
                   help="train and test on these classes only, e.g. 0-4 or 5,6,7,8,9 (labels become 0..k-1 in "
                        "the listed order; the checkpoint records the original ids)")
    g.add_argument("--img-size", type=int, default=None, help="input resolution (imagefolder)")
    g.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes per rank")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="resnet18", help="any timm model name")
    g.add_argument("--stem", default="auto", choices=("auto", "small", "native"),
                   help="small: 3x3 stride-1 stem for small images (auto: inputs <= 64 px); native: timm's stem")
    g = p.add_argument_group("attack (inner maximization)")
    g.add_argument("--attack", default="pgd", choices=attacks.names(),
                   help="training oracle: pgd, pgd_l2, fgsm_rs, free (Free-m), conadv (stale weights), noise, none")
    g.add_argument("--eps", type=number, default=0.1,
                   help="radius in [0,1] pixels (Linf, or L2 for pgd_l2), e.g. 8/255")
    g.add_argument("--alpha", type=number, default=None, help="step size (default: the attack's own rule)")
    g.add_argument("--steps", type=int, default=None,
                   help="attack steps (PGD-k; default 10), or the replays m of free (default 4)")
    g.add_argument("--tau", type=int, default=1, help="conadv: staleness of the attack's weights, in updates")
    g.add_argument("--bn-mode", default="eval", choices=attacks.BN_MODES, help="BatchNorm mode during the attack")
    g.add_argument("--eval-steps", type=int, default=10, help="PGD steps of the robust-accuracy check")
    g = p.add_argument_group("objective")
    g.add_argument("--loss", default="madry", choices=objectives.names(),
                   help="madry: CE(x_adv); mix: CE(x) + lam CE(x_adv); trades: CE(x) + beta KL(f(x)||f(x_adv))")
    g.add_argument("--lam", type=float, default=1.0, help="mix: weight of the robust loss")
    g.add_argument("--beta", type=float, default=6.0, help="trades: weight of the KL term")
    g = p.add_argument_group("held-out check (FGSM safety)")
    g.add_argument("--holdout", type=int, default=None,
                   help="training samples held out for a per-epoch PGD/FGSM check (default: for fgsm_rs "
                        "min(1000, 10%% of the training set), else 0); "
                        "the best epoch is kept in checkpoints/best and reported")
    g.add_argument("--no-early-stop", dest="early_stop", action="store_false",
                   help="keep training after catastrophic overfitting is detected")
    g.add_argument("--co-drop", type=float, default=0.2,
                   help="held-out PGD accuracy drop (from its best) that flags catastrophic overfitting")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=5)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="end this invocation after N epochs (the schedule still spans --epochs); --resume continues")
    g.add_argument("--eval-batch-size", type=int, default=256)
    g = p.add_argument_group("gradient communication")
    g.add_argument("--compressor", default="none", choices=compress.names(),
                   help="none: fp32 all-reduce; qsgd: b-bit QSGD; sign_vote: signSGD/Signum majority vote; "
                        "ef_sign: scaled sign with error feedback")
    g.add_argument("--bits", type=int, default=8, help="qsgd: bits per coordinate (1..8, or 16)")
    g.add_argument("--bucket-size", type=int, default=None, help="qsgd/ef_sign: values per norm/scale bucket")
    g.add_argument("--topology", default="one-sided", choices=compress.TOPOLOGIES,
                   help="one-sided: all-gather of compressed gradients; two-sided: parameter server "
                        "(every rank serves a 1/N shard and re-compresses the aggregate)")
    g.add_argument("--sign-momentum", type=float, default=0.0, help="sign_vote: momentum (Signum); 0 = signSGD")
    g.add_argument("--byzantine-ranks", type=rank_list, default=(), metavar="R1,R2",
                   help="experiments: ranks that send corrupted gradients")
    g.add_argument("--byzantine-mode", default=None, choices=compress.BYZANTINE_MODES,
                   help="flip (-g), random (noise of |g|), scale (-100 g)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default="runs/dat")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --output-dir (mid-epoch ones included)")
    g.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="also checkpoint every N optimizer steps inside an epoch (0: at epoch ends only)")
    g.add_argument("--max-nonfinite", type=int, default=10, metavar="N",
                   help="stop after N optimizer steps in a row were skipped for a non-finite loss or gradient "
                        "(0: never stop)")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    g.add_argument("--wandb-project", default="dat-ds")
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help=argparse.SUPPRESS)
    deepspeed.add_config_arguments(p)
    p.set_defaults(deepspeed_config="ds_configs/lamb_fp32.json")
    p.set_defaults(**defaults)
    return p


def train_config(args: argparse.Namespace):
    from .trainer import TrainConfig
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def run(fn: Callable[[], Optional[dict]]) -> None:
    """Run a recipe's main; expected failures become one line on stderr and exit code 2."""
    from .data import DataError
    from .engine import ConfigError
    from .guard import NonFiniteError, StopRequested
    prog = os.path.basename(sys.argv[0])
    try:
        fn()
    except (ValueError, DataError, ConfigError, FileNotFoundError) as err:
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFiniteError as err:
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(3)
    except StopRequested as err:
        print(f"{prog}: {err}", file=sys.stderr, flush=True)
        sys.exit(128 + err.signum)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the newest complete checkpoint is kept (--resume continues)", file=sys.stderr)
        sys.exit(130)


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def print_summary(summary: dict) -> None:
    """The end-of-run table: clean accuracy (TA) and PGD robust accuracy (RA)."""
    if "clean_acc" not in summary:  # the run stopped early on request (--stop-after)
        return
    rows = [("backbone", summary["backbone"]), ("attack (train)", summary["attack"]),
            ("eps", f"{summary['eps']:.4g}"), ("ranks x micro batch", f"{summary['world_size']} x "
            f"{summary['micro_batch_size']} = {summary['global_batch_size']}"),
            ("epochs", summary["epochs"]), ("test samples", summary["eval_samples"]),
            ("TA  clean accuracy", f"{100 * summary['clean_acc']:.2f} %"),
            (f"RA  {summary['eval_attack']} accuracy", f"{100 * summary['robust_acc']:.2f} %"),
            ("compute / comm", f"{summary['compute_s']:.1f} s / {summary['comm_s']:.2f} s")]
    width = max(len(k) for k, _ in rows)
    print("\n" + "-" * (width + 24))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("-" * (width + 24))
    print(f"full robustness suite (PGD sweeps, AutoAttack): python recipes/evaluate.py --checkpoint "
          f"{summary['output_dir']}", flush=True)
