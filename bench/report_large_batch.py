"""The REPORT section of ``bench/results/large_batch.json``: time to robustness and the equal-epoch
curve first (RA against epochs, one line per method), then the 3-epoch table, the LR sweep and the
plot of robust accuracy against global batch per optimizer (the DAT paper's Figure 2).

``bench/report.py`` calls :func:`render` for the ``large_batch`` results file.
"""
from __future__ import annotations

from pathlib import Path

PLOTS = Path(__file__).resolve().parent / "plots"
COLUMNS = [("method", "method"), ("optimizer", "optimizer"), ("global_batch_size", "global batch"),
           ("epochs", "epochs"), ("seeds", "seeds"), ("peak_lr", "peak LR"), ("updates", "updates"),
           ("clean_acc_mean", "TA %"), ("robust_acc_mean", "RA PGD-10 %"), ("robust_acc_std", "RA std"),
           ("test_samples", "test n"), ("autoattack_acc_mean", "AA %"), ("autoattack_samples", "AA n"),
           ("wall_s", "wall s / run")]
PERCENT = {"clean_acc_mean", "robust_acc_mean", "robust_acc_std", "autoattack_acc_mean", "val_robust_acc",
           "val_clean_acc"}


def cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key in PERCENT:
        return f"{100 * value:.1f}"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table(rows: list, columns: list) -> str:
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(k, r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def save_figure(fig, data: dict, path: Path) -> bool:
    """Name the machine and backbone under the figure, write it to ``path`` and close it."""
    import matplotlib.pyplot as plt
    m = data.get("machine", {})
    fig.text(0.01, 0.01, f"{m.get('cpu', '?')} x{m.get('cores', '?')}, GPU {m.get('gpu', 'none')}, "
             f"{m.get('date', '')}; {data.get('settings', {}).get('backbone')}", fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot(data: dict, path: Path) -> bool:
    """RA (PGD-10, mean over seeds, std as error bars) against global batch, one line per optimizer
    and attack; AT's small-batch point sits at the left of every line of its optimizer."""
    epochs = data.get("settings", {}).get("epochs")
    rows = [r for r in data.get("rows", []) if not r.get("ema") and r.get("epochs", epochs) == epochs]
    if not rows:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    fig, axes = plt.subplots(1, len(attacks), figsize=(5.2 * len(attacks), 3.8), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        mine = [r for r in rows if r["attack"] == attack]
        small = min(r["global_batch_size"] for r in mine)
        at_sgd = next((r for r in mine if r["global_batch_size"] == small and r["optimizer"] == "SGD"), None)
        if at_sgd:  # the goal: within 2 points of AT (momentum SGD at the small batch)
            ax.axhspan(100 * at_sgd["robust_acc_mean"] - 2, 100 * at_sgd["robust_acc_mean"], color="0.9",
                       label="AT-SGD - 2 points")
        for i, opt in enumerate(o for o in ("LAMB", "SGD", "LSGD") if any(r["optimizer"] == o for r in mine)):
            pts = sorted((r for r in mine if r["optimizer"] == opt), key=lambda r: r["global_batch_size"])
            if pts[0]["global_batch_size"] != small and at_sgd:
                # no small-batch run of its own (LSGD at the small batch is AT-SGD): start at AT-SGD's point
                pts.insert(0, at_sgd)
            ax.errorbar([r["global_batch_size"] for r in pts], [100 * r["robust_acc_mean"] for r in pts],
                        yerr=[100 * (r["robust_acc_std"] or 0) for r in pts], marker="o", capsize=3, label=opt,
                        color=f"C{i}", alpha=0.85)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch")
        ax.set_ylabel("RA (PGD-10) %")
        ax.set_title(f"{attack} training", fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, data, path)


CURVE_COLUMNS = [("method", "method"), ("optimizer", "optimizer"), ("global_batch_size", "global batch"),
                 ("epochs", "epochs"), ("updates", "updates"), ("seeds", "seeds"), ("peak_lr", "peak LR"),
                 ("clean_acc_mean", "TA %"), ("clean_acc_std", "TA std"), ("robust_acc_mean", "RA PGD-10 %"),
                 ("robust_acc_std", "RA std"), ("test_samples", "test n"), ("autoattack_acc", "AA %"),
                 ("autoattack_pgd_acc", "PGD-10 % on AA's images"),
                 ("autoattack_pgd50_acc", "PGD-50x5 % on AA's images"), ("autoattack_seeds", "AA seeds"),
                 ("autoattack_samples", "AA n"),
                 ("autoattack_device", "AA run on"), ("wall_s", "wall s / run")]
TTR_COLUMNS = [("target", "target: AT's RA at"), ("target_ra", "target RA %"), ("method", "method"),
               ("global_batch_size", "global batch"), ("epochs", "epochs to reach"), ("ra", "RA there %"),
               ("this_ranks", "ranks"), ("this_hours", "hours, this machine's cores"),
               ("this_speedup", "speed-up vs AT on 1"), ("this_exchange_share", "exchange share of a step"),
               ("h200_hours", "hours, H200s"), ("h200_speedup", "H200 speed-up vs AT on 1"),
               ("h200_exchange_share", "H200 exchange share")]
PERCENT |= {"plain_val_robust_acc", "clean_acc", "robust_acc", "plain_robust_acc",
            "clean_acc_std", "target_ra", "ra", "autoattack_acc", "autoattack_pgd_acc", "autoattack_pgd50_acc",
            "this_exchange_share",
            "h200_exchange_share", "val_pgd50_acc", "plain_val_pgd50_acc", "plain_clean_acc",
            "plain_autoattack_acc", "pgd50_acc", "plain_pgd50_acc"}


def plot_curve(data: dict, path: Path) -> bool:
    """Left: PGD-10 RA against epochs, one line per method (mean over seeds, std as error bars),
    ConAdv as points. Right: the same RA against the time model's hours on this machine's cores
    (AT on one rank, DAT on the model's ranks), in minutes."""
    curve = data.get("curve", [])
    if not curve:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 3.9))
    labels = list(dict.fromkeys((r["method"], r["optimizer"]) for r in curve))
    for i, (method, opt) in enumerate(labels):
        pts = sorted((r for r in curve if (r["method"], r["optimizer"]) == (method, opt)), key=lambda r: r["epochs"])
        label = f"{method.split('-')[0]}-{opt} @ {pts[0]['global_batch_size']}" + (
            " (ConAdv)" if pts[0]["attack"] == "conadv" else "")
        style = dict(marker="s" if pts[0]["attack"] == "conadv" else "o", capsize=3, color=f"C{i}", label=label,
                     linestyle="none" if pts[0]["attack"] == "conadv" else "-")
        ys = [100 * r["robust_acc_mean"] for r in pts]
        err = [100 * (r["robust_acc_std"] or 0) for r in pts]
        axes[0].errorbar([r["epochs"] for r in pts], ys, yerr=err, **style)
        aa = [r for r in pts if r.get("autoattack_acc") is not None]
        if aa:  # AutoAttack on the first AA n images, hollow, below its PGD-10 point
            axes[0].scatter([r["epochs"] for r in aa], [100 * r["autoattack_acc"] for r in aa], marker="v",
                            facecolors="none", edgecolors=f"C{i}", zorder=3,
                            label=f"{label}: AutoAttack ({aa[0]['autoattack_samples']} images)")
        if pts[0].get("modelled_hours", {}).get("this") is not None:
            axes[1].errorbar([60 * r["modelled_hours"]["this"] for r in pts], ys, yerr=err,
                             **{**style, "label": f"{label} on {pts[0]['modelled_ranks']} rank(s)"})
    axes[0].set_xlabel("epochs (each row its own schedule); triangles: AutoAttack")
    axes[1].set_xlabel("modelled minutes to train (this machine's per-rank cost, 1 Gbit/s link)")
    for ax in axes:
        ax.set_ylabel("RA (PGD-10) %")
        ax.legend(fontsize=7)
    return save_figure(fig, data, path)


def _per_image_ms(h: dict) -> str:
    by_batch = h.get("s_per_image_by_batch")
    if not by_batch:
        return f"{1000 * h['s_per_image']:.3f} ms"
    rows = sorted(by_batch.items(), key=lambda item: int(item[0]))  # JSON keeps the batches as strings
    return ", ".join(f"{1000 * s:.3f} ms at global batch {b}" for b, s in rows)


def render_curve(name: str, data: dict) -> list:
    """Time to robustness (the headline) and the equal-epoch curve."""
    curve, ttr = data.get("curve", []), data.get("time_to_robustness", {})
    if not curve:
        return []
    out = ["### Time to robustness", "",
           f"Wall-clock to reach AT's PGD-10 RA (AT-SGD's, and AT-LAMB's where it ran; batch "
           f"{data['settings']['at_batch']}, one rank) with DAT on "
           f"{ttr.get('ranks')} ranks at 8x the batch. A model from measured parts, not a run on {ttr.get('ranks')} "
           "machines: epochs to reach = the first of the curve's epoch counts whose mean test RA is at least the "
           "target (so an upper bound at the grid's resolution); a step = the per-rank compute of its images "
           "(measured per image; on this machine from the curve's own runs, on H200s from `gpu.json`'s PGD-3 step "
           "of preactresnet18, the curve's epochs ratio borrowed) plus a ring all-reduce of the fp32 gradients, "
           f"2(W-1)/W x 4 bytes x parameters over {ttr.get('link_bits_per_s', 0) / 1e9:.3f} Gbit/s "
           f"({ttr.get('link_source')}); no overlap of exchange and compute, no latency term. The targets are "
           "PGD-10 figures: where the curve notes below compare the longest rows under AutoAttack, read them "
           "before these speed-ups.", "",
           table(ttr.get("rows", []), TTR_COLUMNS), "",
           "Machines of the model: " + "; ".join(
               f"{h['name']}: {h['model']}, {_per_image_ms(h)} per training image, "
               f"{h['params'] / 1e6:.2f} M parameters ({h['source']})" for h in ttr.get("hardware", [])), "",
           "### Equal-epoch curve", "",
           "Every row trained by the current code from scratch with its own LR schedule for its epoch count "
           "(LRs from the sweep below), PGD-3 training, the validation-best weights evaluated by "
           "`recipes/evaluate.py` (PGD-10 on the test images; AutoAttack on the first AA n for the AA seeds of the "
           "longest AT-SGD and DAT-LAMB rows, the mean over them, beside PGD-10 on the same images; AA run on: "
           "the machine of that evaluation, fp32 on either, which changes rounding, not the attack).", "",
           table(curve, CURVE_COLUMNS), ""]
    out += [f"* {n}" for n in data.get("curve_notes", [])] + [""]
    if data.get("remedies"):
        out += ["Remedies tried on DAT-LAMB (one row each, against the plain run of the same seed and epochs). "
                "PGD-50 with 5 restarts on every held-out training image decides (`recipes/evaluate.py --split "
                "holdout`; PGD-10 flatters large-batch LAMB, see the AutoAttack rows above); a remedy that wins there "
                "gets AutoAttack on the curve's AutoAttack images, beside the plain run's. The test figures are "
                "reported, not chosen on:", "",
                table(data["remedies"], [("remedy", "remedy"), ("what", "change"), ("reference", "reference"),
                                         ("seed", "seed"), ("epochs", "epochs"),
                                         ("val_pgd50_acc", "val PGD-50x5 %"), ("plain_val_pgd50_acc", "plain %"),
                                         ("val_robust_acc", "val PGD-10 %"), ("plain_val_robust_acc", "plain %"),
                                         ("clean_acc", "TA %"), ("plain_clean_acc", "plain %"),
                                         ("robust_acc", "RA PGD-10 %"), ("plain_robust_acc", "plain %"),
                                         ("autoattack_acc", "AA %"), ("plain_autoattack_acc", "plain %"),
                                         ("cpu_vs_plain", "training CPU s x plain"),
                                         ("judged_by", "judged by"), ("wins", "wins"),
                                         ("val_mcnemar_p", "val McNemar p"),
                                         ("autoattack_mcnemar_p", "AA McNemar p")]), ""]
        out += [f"* {n}" for n in data.get("remedy_notes", [])] + [""]
    if plot_curve(data, PLOTS / f"{name}_curve.png"):
        out += [f"![RA vs epochs and modelled minutes](plots/{name}_curve.png)", ""]
    rerun = ", ".join(dict.fromkeys(f"{r['method'].split('-')[0]}-{r['optimizer']}" for r in curve
                                    if r["attack"] == "pgd"))
    out += ["### The 3-epoch study", "",
            "The tables below come from the earlier 3-epoch study, whose runs were trained before BatchNorm "
            "statistics were pooled across ranks and before an epoch ended on an optimizer step; the curve "
            f"above re-ran these of its methods with the current code: {rerun}.", ""]
    return out


def render(name: str, data: dict) -> str:
    """Markdown for REPORT.md: table, notes, plot, then the sweep that chose each LR."""
    s = data.get("settings", {})
    m = data.get("machine", {})
    out = [f"## {data.get('title', name)}", "",
           f"`results/{name}.json` (runs in `results/{name}_runs/`); machine: {m.get('cpu', '?')}, "
           f"{m.get('cores', '?')} cores, GPU {m.get('gpu', 'none')}, {m.get('date', '')}", "",
           "settings: " + ", ".join(f"{k}={v}" for k, v in s.items()), ""]
    out += render_curve(name, data)
    rows = data.get("rows", [])
    out += [table(rows, COLUMNS) if rows else "(no evaluated final runs yet)", ""]
    out += [f"* {n}" for n in data.get("notes", [])] + [""]
    if plot(data, PLOTS / f"{name}.png"):
        out += [f"![RA vs global batch](plots/{name}.png)", ""]
    sweep = data.get("sweep", [])
    if sweep:
        out += ["LR sweep (PGD training, seed 0; validation split, not the test set):", "",
                table(sweep, [("method", "method"), ("global_batch_size", "global batch"), ("lr_mult", "lr x"),
                              ("peak_lr", "peak LR"), ("val_clean_acc", "val TA %"),
                              ("val_robust_acc", "val RA %"), ("updates", "updates"), ("wall_s", "wall s")]), ""]
    return "\n".join(out)
