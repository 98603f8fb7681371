"""Robustness evaluation of a trained checkpoint: clean accuracy, PGD with restarts, eps and steps sweeps, AutoAttack.

    python recipes/evaluate.py --checkpoint runs/fmnist                       # 1 process
    deepspeed --num_gpus 2 recipes/evaluate.py --checkpoint runs/fmnist       # 2 ranks, same numbers

``--checkpoint`` takes a training run's ``--output-dir`` (its newest checkpoint), its
``checkpoints/`` folder, a tag folder such as ``checkpoints/best``, or a
``mp_rank_00_model_states.pt`` file. The model, dataset, normalization and eps come from the
checkpoint. ``--split holdout`` evaluates the training images the run held out (its ``--holdout``)
instead of the test set: choose between runs under a strong attack there, and read the test set
once, for the one chosen. Outputs go to ``<run>/eval``: ``eval_summary.json``, ``per_sample.csv``,
``ra_vs_eps.png`` and ``ra_vs_steps.png``.
"""
import argparse
import functools
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from dat_ds import attacks, cli, dist
from dat_ds.checkpoint_io import find_checkpoint, load_model, run_dir
from dat_ds.data import dataset_names, load_dataset
from dat_ds.evaluate import NORMS, AutoAttackSpec, PGDSpec, plot_sweep, sample_table
from dat_ds.metrics import write_json_atomic
from dat_ds.progress import EvalProgress
from dat_ds.transfer import as_trained

EPS_SWEEP = (0, 0.25, 0.5, 1, 1.5, 2)  # multiples of --eps (the DAT paper's Figure 3)
STEPS_SWEEP = (1, 2, 5, 10, 20, 50)


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="run folder, its checkpoints/ folder, a tag folder or a model-states file")
    p.add_argument("--output-dir", default=None, help="where the results go (default: <run folder>/eval)")
    g = p.add_argument_group("model and data (default: what the checkpoint records)")
    g.add_argument("--backbone", default=None,
                   help="rebuild the model as this backbone instead (NAME, timm:NAME or transformers:PATH; "
                        "default: the checkpoint's)")
    g.add_argument("--weights", default="ema", choices=("ema", "raw"),
                   help="ema: the weights' moving average when the run kept one (ds_config \"ema\"), else the "
                        "weights; raw: the optimizer's weights")
    g.add_argument("--stem", default=None, choices=("auto", "small", "native"),
                   help="rebuild with this stem instead (default: the checkpoint's)")
    g.add_argument("--dataset", default=None,
                   help="evaluate on this dataset instead (default: the checkpoint's): " + " | ".join(dataset_names()))
    g.add_argument("--data-dir", default=None,
                   help="folder holding the dataset files (default: the dataset's own place; CIFAR and imagefolder "
                        "need it)")
    g.add_argument("--split", default="test", choices=("test", "holdout"),
                   help="test: the dataset's test set; holdout: the training images the run held out (its --holdout), "
                        "for choosing between runs without reading the test set")
    g.add_argument("--eval-limit", type=int, default=None, metavar="N",
                   help="use only the first N samples of --split (default: all)")
    g.add_argument("--classes", default=None, metavar="IDS",
                   help="class subset, e.g. 0-4 (default: the checkpoint's --classes when --dataset is its dataset)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="samples per batch; batches are dealt to ranks in turn (default: the run's --eval-batch-size, "
                        "so the PGD column at its --eval-steps reproduces the run's reported RA; 256 without one)")
    g.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes per rank")
    g = p.add_argument_group("threat model and attacks")
    g.add_argument("--norm", default=None, choices=NORMS, help="threat model (default: the training attack's norm)")
    g.add_argument("--eps", type=cli.number, default=None, help="radius, e.g. 8/255 (default: the training eps)")
    g.add_argument("--pgd-steps", type=int, nargs="+", default=[10, 50], metavar="K", help="PGD-K evaluations")
    g.add_argument("--restarts", type=int, nargs="+", default=[1], metavar="R",
                   help="random restarts: one value for all --pgd-steps, or one per entry")
    g.add_argument("--alpha", type=cli.number, default=None, help="PGD step size (default 2.5 eps / K)")
    g.add_argument("--eps-sweep", type=cli.number, nargs="*", default=None, metavar="EPS",
                   help=f"PGD-K (first --pgd-steps) at each eps; default --eps x {EPS_SWEEP}; no values: off")
    g.add_argument("--steps-sweep", type=int, nargs="*", default=list(STEPS_SWEEP), metavar="K",
                   help=f"PGD at --eps with each number of steps (default {' '.join(map(str, STEPS_SWEEP))}); "
                        "no values: off")
    g.add_argument("--autoattack", action=argparse.BooleanOptionalAction, default=True,
                   help="AutoAttack (pyautoattack) at --eps")
    g.add_argument("--autoattack-version", default="standard", choices=("standard", "plus", "rand"),
                   help="AutoAttack's attack set: standard: APGD-CE, APGD-T, FAB-T, Square; plus: adds APGD-DLR and "
                        "untargeted FAB, 5 restarts each; rand: APGD-CE and APGD-DLR averaged over 20 draws (EOT), "
                        "for randomized models")
    g.add_argument("--seed", type=int, default=None,
                   help="seeds the attacks' random starts, per batch, not per rank (default: the run's --seed, as its "
                        "per-epoch check used; 0 without one)")
    g = p.add_argument_group("logging")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    g.add_argument("--wandb-project", default="dat-ds", help="W&B project")
    g.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS",
                   help="progress lines on stderr (rank 0): each evaluation's start and end on the first batch, "
                        "then at most one start every SECONDS and the end of any evaluation that took longer (5)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help=argparse.SUPPRESS)
    return p


def run_defaults(args, meta: dict) -> None:
    """``--seed`` and ``--batch-size`` not given: the ones the training run evaluated with."""
    recorded = meta.get("eval", {})
    if args.seed is None:
        args.seed = recorded.get("seed", 0)
    if args.batch_size is None:
        args.batch_size = recorded.get("batch_size", 256)


def make_specs(args, meta: dict) -> dict:
    """Every evaluation the flags ask for, as specs; bad values raise ValueError."""
    limits = [("--batch-size", args.batch_size, 1), ("--eval-limit", args.eval_limit, 1), ("--seed", args.seed, 0)]
    limits += [("--pgd-steps", k, 1) for k in args.pgd_steps] + [("--restarts", r, 1) for r in args.restarts]
    limits.append(("--progress-every", args.progress_every, 0))
    for flag, value, low in limits:
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if len(args.restarts) not in (1, len(args.pgd_steps)):
        raise ValueError(f"--restarts takes one value or one per --pgd-steps entry ({len(args.pgd_steps)}), "
                         f"got {len(args.restarts)}")
    norm = args.norm or (attacks.ATTACKS.get(meta["attack"]).norm if meta.get("attack") in attacks.ATTACKS
                         else "linf")
    eps = args.eps if args.eps is not None else float(meta["eps"])
    restarts = args.restarts * len(args.pgd_steps) if len(args.restarts) == 1 else args.restarts
    sweep = args.eps_sweep if args.eps_sweep is not None else [
        round(m * eps, 12) for m in EPS_SWEEP if norm == "l2" or m * eps <= 1]
    pgd = functools.partial(PGDSpec, alpha=args.alpha, norm=norm)
    return {"pgd": [pgd(eps, k, restarts=r) for k, r in zip(args.pgd_steps, restarts)],
            "eps_sweep": [pgd(e, args.pgd_steps[0]) for e in sweep],
            "steps_sweep": [pgd(eps, k) for k in args.steps_sweep],
            "autoattack": [AutoAttackSpec(eps, norm, args.autoattack_version)] if args.autoattack else [],
            "norm": norm, "eps": eps}


def device_name(device: torch.device) -> str:
    """What evaluated: ``cuda: NVIDIA H200`` or ``cpu``."""
    return f"cuda: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def holdout_split(meta: dict, run: Path) -> dict:
    """How the run held out training images: ``{"samples": n, "train_limit": ...}``, from the
    checkpoint, else from the run folder's ``config.json`` where it gave ``--holdout`` itself;
    ValueError where it held out none or cannot say which."""
    if meta.get("placement"):
        raise ValueError("--split holdout: this run held out images from each machine's own folder "
                         "(--data-placement local); they are not in one dataset to evaluate here")
    held = meta.get("holdout")
    config = run / "config.json"
    if held is None and config.is_file():
        recorded = json.loads(config.read_text())
        if recorded.get("holdout") is not None:
            held = {"samples": recorded["holdout"], "train_limit": recorded.get("train_limit")}
    if held is None:
        raise ValueError("--split holdout: the checkpoint does not record its held-out split, nor does its run "
                         "folder's config.json; evaluate the test set")
    if not held["samples"]:
        raise ValueError("--split holdout: the run held out no training images (--holdout 0)")
    return held


def check_data(data, meta: dict) -> None:
    want = (meta["num_classes"], meta["in_chans"], meta["img_size"])
    got = (data.num_classes, data.in_chans, data.img_size)
    if want != got:
        raise ValueError(f"dataset {data.name} has {got[0]} classes of {got[1]} x {got[2]} px images, but the "
                         f"checkpoint's model takes {want[0]} classes of {want[1]} x {want[2]} px")


def summarize(table, specs: dict, settings: dict) -> dict:
    """``eval_summary.json``: every figure with its settings."""
    at_eps = [s.name for s in specs["pgd"] + specs["autoattack"]]
    worst = torch.stack([table.correct[n] for n in at_eps], 1).all(1) if at_eps else table.correct["clean"]
    aa = specs["autoattack"]
    return {"clean_acc": table.acc("clean"), "eval_samples": len(table.labels),
            "pgd": [s.record(table.acc(s.name)) for s in specs["pgd"]],
            "eps_sweep": [s.record(table.acc(s.name)) for s in specs["eps_sweep"]],
            "steps_sweep": [s.record(table.acc(s.name)) for s in specs["steps_sweep"]],
            "autoattack": aa[0].record(table.acc(aa[0].name)) if aa else None,
            "worst_case_acc": worst.double().mean().item() if len(worst) else 0.0,
            "columns": {s.name: s.record(table.acc(s.name)) for s in _unique(specs)}, **settings}


def _unique(specs: dict) -> list:
    return list(dict.fromkeys(specs["pgd"] + specs["eps_sweep"] + specs["steps_sweep"] + specs["autoattack"]))


def write_outputs(out: Path, summary: dict, table) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table.write_csv(out / "per_sample.csv")
    for key, x, path in (("eps_sweep", "eps", "ra_vs_eps.png"), ("steps_sweep", "steps", "ra_vs_steps.png")):
        if summary[key]:
            plot_sweep(sorted(summary[key], key=lambda r: r[x]), x, out / path,
                       f"PGD robust accuracy vs {x} ({summary['norm']})")
    write_json_atomic(out / "eval_summary.json", summary)


def log_wandb(out: Path, summary: dict, project: str) -> None:
    import wandb
    run = wandb.init(project=project, dir=str(out), name=f"eval-{Path(summary['run_dir']).name}", job_type="eval",
                     config={k: v for k, v in summary.items() if not isinstance(v, (list, dict))})
    rows = [[n, r["eps"], r["robust_acc"]] for n, r in summary["columns"].items()]
    figures = {"evaluations": wandb.Table(columns=["name", "eps", "robust_acc"], data=rows)}
    figures.update({p.stem: wandb.Image(str(p)) for p in sorted(out.glob("ra_vs_*.png"))})
    run.log(figures)
    run.summary.update({"clean_acc": summary["clean_acc"], "worst_case_acc": summary["worst_case_acc"],
                        **{f"robust_acc/{n}": r["robust_acc"] for n, r in summary["columns"].items()}})
    run.finish()


def print_report(summary: dict, out: Path) -> None:
    rows = [("checkpoint", summary["checkpoint"]), (f"{summary['split']} samples", f"{summary['eval_samples']} on "
             f"{summary['world_size']} rank(s), {summary['eval_s']:.1f} s"), ("clean", summary["clean_acc"])]
    rows += [(f"PGD-{r['steps']} x{r['restarts']}  {r['norm']} eps {r['eps']:.4g}", r["robust_acc"])
             for r in summary["pgd"]]
    if summary["autoattack"]:
        aa = summary["autoattack"]
        rows.append((f"AutoAttack {aa['version']}  {aa['norm']} eps {aa['eps']:.4g}", aa["robust_acc"]))
    rows.append(("worst case at eps", summary["worst_case_acc"]))
    width = max(len(k) for k, _ in rows)
    print("\n" + "-" * (width + 24))
    for k, v in rows:
        print(f"{k:<{width}}  {f'{100 * v:.2f} %' if isinstance(v, float) else v}")
    print("-" * (width + 24) + f"\noutputs in {out}", flush=True)


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    model_file = find_checkpoint(args.checkpoint)
    model, meta = load_model(model_file, args.backbone, args.stem, args.weights)
    run_defaults(args, meta)
    specs = make_specs(args, meta)
    same = args.dataset in (None, meta["dataset"])
    if args.split == "holdout" and not same:
        raise ValueError(f"--split holdout: the held-out images are the run's own dataset's ({meta['dataset']}), "
                         f"not {args.dataset}'s")
    held = holdout_split(meta, run_dir(model_file)) if args.split == "holdout" else None
    data = load_dataset(args.dataset or meta["dataset"], args.data_dir, train_limit=held and held["train_limit"],
                        eval_limit=None if held else args.eval_limit, img_size=meta["img_size"],
                        classes=args.classes or (meta.get("classes") if same else None),
                        **(meta.get("dataset_settings", {}) if same else {}))
    if held:  # the run's held-out training images, the ones its per-epoch check read, as the set evaluated
        data = replace(data, test=data.train.split_off(held["samples"])[1].subset(args.eval_limit))
    data = as_trained(data, meta) if same else data  # a fine-tuning run's --upsample, as it trained
    check_data(data, meta)
    if "RANK" in os.environ:  # under a launcher; one process needs no process group
        dist.init()
    device = dist.device()
    t0 = time.perf_counter()
    table = sample_table(model.to(device), data.test, _unique(specs), device, args.batch_size, args.seed,
                         args.num_workers, progress=EvalProgress(args.progress_every))
    out = Path(args.output_dir) if args.output_dir else run_dir(model_file) / "eval"
    settings = {"checkpoint": str(model_file), "run_dir": str(run_dir(model_file)), "model": meta,
                "dataset": data.name, "split": args.split, "classes": data.classes and list(data.classes),
                "norm": specs["norm"], "weights": meta.get("weights", "raw"),
                "eps": specs["eps"], "seed": args.seed,
                "batch_size": args.batch_size, "world_size": dist.world_size(), "device": device_name(device),
                "eval_s": time.perf_counter() - t0}
    summary = summarize(table, specs, settings)
    if dist.is_main():
        write_outputs(out, summary, table)
        if args.wandb:
            log_wandb(out, summary, args.wandb_project)
        print_report(summary, out)
    dist.barrier()
    return summary


if __name__ == "__main__":
    cli.run(main)
