"""Certify the smoothed classifier of a trained model (CERTIFY of Cohen et al. 2019) on the test set.

    python recipes/certify.py --checkpoint runs/smooth_at --skip 20 --n 10000        # 500 images
    deepspeed --num_gpus 2 recipes/certify.py --checkpoint runs/smooth_at --skip 20 --N 10000  # 2 ranks split the draws

``--checkpoint`` is a training run's output dir (its ``checkpoints/latest`` is used), a
``checkpoints/`` dir, or one tag dir such as ``runs/smooth_at/checkpoints/best``. The model is
rebuilt from the checkpoint's ``meta``; ``--sigma`` defaults to the training run's
``attack_kwargs.sigma`` (or ``loss_kwargs.sigma``) from its ``config.json``.

Writes to ``--output-dir`` (default ``<run dir>/certify``, rank 0 only): ``certify.tsv`` (one row
per image: index, label, prediction (-1 = abstain), radius, correct, seconds), ``certify_summary.json``
(certified accuracy at radii 0 .. 2 and the settings) and ``certify.png`` (certified accuracy vs radius).
"""
import argparse
import json
import os
import time
from pathlib import Path


from dat_ds import checkpoint_io, cli, dist, smoothing
from dat_ds.metrics import write_json_atomic
from dat_ds.transfer import as_trained

COLUMNS = ("index", "label", "prediction", "radius", "correct", "seconds")


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="run dir, its checkpoints/ dir, a checkpoint tag dir or a model-states file")
    p.add_argument("--sigma", type=cli.number, default=None, help="noise std (default: the training run's sigma)")
    # --N0/--N (Cohen et al.'s spelling) pass through the deepspeed launcher, which reads --n as
    # an abbreviation of its own --num_nodes/--num_gpus and stops with "ambiguous option".
    p.add_argument("--n0", "--N0", dest="n0", type=int, default=100, help="draws that pick the top class")
    p.add_argument("--n", "--N", dest="n", type=int, default=100_000,
                   help="draws that estimate its probability (under the deepspeed launcher write --N)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability of each certificate")
    p.add_argument("--batch-size", type=int, default=1000, help="noise draws per forward")
    p.add_argument("--eval-limit", type=int, default=None, metavar="N",
                   help="certify at most N images (default: every --skip-th test image)")
    p.add_argument("--skip", type=int, default=1, metavar="K", help="take every K-th test image (0, K, 2K, ...)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; image i uses the draws of (seed, i)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the dataset files (default: the dataset's own place; CIFAR and "
                        "imagefolder need it)")
    p.add_argument("--output-dir", default=None, help="where the results go (default: <run dir>/certify)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help=argparse.SUPPRESS)
    return p


def resolve_checkpoint(path: str):
    """``(model-states file, training run dir or None)`` for anything ``find_checkpoint`` accepts."""
    model_file = checkpoint_io.find_checkpoint(path)
    run = checkpoint_io.run_dir(model_file)
    return model_file, run if (run / "config.json").is_file() else None


def run_sigma(run_dir) -> float:
    """The training run's sigma from its config.json, or None."""
    if run_dir is None:
        return None
    config = json.loads((run_dir / "config.json").read_text())
    for key in ("attack_kwargs", "loss_kwargs"):
        if (config.get(key) or {}).get("sigma") is not None:
            return float(config[key]["sigma"])
    return None


def check_args(args) -> None:
    for name in ("skip", "eval_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    smoothing.check_certify_settings(args.sigma, args.n, args.alpha, args.batch_size, args.n0)


def certify_set(model, test, indices, args, device, writer=None, progress=None):
    """Certify ``test[i]`` for each index; every rank runs this together (the draws are split)."""
    rows = []
    for i in indices:
        x, y = test[i]
        t0 = time.perf_counter()
        pred, radius = smoothing.certify(model, x.to(device), args.sigma, args.n0, args.n, args.alpha,
                                         args.batch_size, seed=(args.seed, i))
        row = {"index": i, "label": int(y), "prediction": pred, "radius": radius, "correct": int(pred == int(y)),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        if writer is not None:
            writer.write("\t".join(f"{row[c]:.6f}" if isinstance(row[c], float) else str(row[c])
                                   for c in COLUMNS) + "\n")
            writer.flush()
        if progress is not None:
            progress.update(1)
    return rows


def summarize(rows, args, meta, model_file, seconds) -> dict:
    radii, correct = [r["radius"] for r in rows], [bool(r["correct"]) for r in rows]
    n = max(len(rows), 1)
    return {"certified_accuracy": smoothing.certified_accuracy(radii, correct),
            "average_certified_radius": sum(r * c for r, c in zip(radii, correct)) / n,
            "abstain_rate": sum(r["prediction"] == smoothing.ABSTAIN for r in rows) / n,
            "max_certifiable_radius": smoothing.radius_from_bound(args.alpha ** (1 / args.n), args.sigma),
            "samples": len(rows), "sigma": args.sigma, "n0": args.n0, "n": args.n, "alpha": args.alpha,
            "batch_size": args.batch_size, "seed": args.seed, "skip": args.skip, "eval_limit": args.eval_limit,
            "world_size": dist.world_size(), "checkpoint": str(model_file.parent), "backbone": meta["backbone"],
            "dataset": meta["dataset"], "seconds": seconds, "seconds_per_sample": seconds / n}


def plot(rows, summary, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    top = max(summary["max_certifiable_radius"], max(smoothing.RADII)) * 1.05
    grid = [top * i / 400 for i in range(401)]
    acc = smoothing.certified_accuracy([r["radius"] for r in rows], [bool(r["correct"]) for r in rows], grid)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(grid, list(acc.values()), drawstyle="steps-post")
    ax.axvline(summary["max_certifiable_radius"], color="grey", ls=":", lw=1,
               label="largest radius n draws can certify")
    ax.set(xlabel="L2 radius", ylabel="certified accuracy", ylim=(0, 1), xlim=(0, top),
           title=f"sigma {summary['sigma']:g}, n {summary['n']}, {summary['samples']} images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(summary: dict) -> None:
    print(f"\ncertified accuracy (sigma {summary['sigma']:g}, n {summary['n']}, alpha {summary['alpha']:g}, "
          f"{summary['samples']} images, {summary['world_size']} rank(s))")
    for r, a in summary["certified_accuracy"].items():
        print(f"  radius {r:>5}  {100 * a:6.2f} %")
    print(f"  ACR {summary['average_certified_radius']:.3f}, abstained {100 * summary['abstain_rate']:.1f} %",
          flush=True)


def main():
    args = parser().parse_args()
    model_file, run_dir = resolve_checkpoint(args.checkpoint)
    if args.sigma is None:
        args.sigma = run_sigma(run_dir)
        if args.sigma is None:
            raise ValueError(f"--sigma is required: {args.checkpoint} records no training sigma")
    check_args(args)
    model, meta = checkpoint_io.load_model(model_file)
    from dat_ds.data import load_dataset
    data = load_dataset(meta["dataset"], args.data_dir, img_size=meta["img_size"], classes=meta.get("classes"),
                        **meta.get("dataset_settings", {}))
    test = as_trained(data, meta).test  # a fine-tuning run's --upsample, as it trained
    indices = list(range(0, len(test), args.skip))[:args.eval_limit]
    out = Path(args.output_dir) if args.output_dir else (run_dir or model_file.parent) / "certify"

    dist.init()
    device = dist.device()
    model.to(device)
    writer = progress = None
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        writer = open(out / "certify.tsv", "w")
        writer.write("\t".join(COLUMNS) + "\n")
        from tqdm.auto import tqdm
        progress = tqdm(total=len(indices), desc="certify", dynamic_ncols=True, mininterval=5.0)
    t0 = time.perf_counter()
    try:
        rows = certify_set(model, test, indices, args, device, writer, progress)
    finally:
        if writer is not None:
            writer.close()
            progress.close()
    if dist.is_main():
        summary = summarize(rows, args, meta, model_file, time.perf_counter() - t0)
        write_json_atomic(out / "certify_summary.json", summary)
        plot(rows, summary, out / "certify.png")
        print_table(summary)
        print(f"written to {out}/: certify.tsv, certify_summary.json, certify.png")
    dist.barrier()


if __name__ == "__main__":
    cli.run(main)
