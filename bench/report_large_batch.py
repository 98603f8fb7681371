"""The REPORT section of ``bench/results/large_batch.json``: the final table, the LR sweep and the
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
    m = data.get("machine", {})
    fig.text(0.01, 0.01, f"{m.get('cpu', '?')} x{m.get('cores', '?')}, GPU {m.get('gpu', 'none')}, "
             f"{m.get('date', '')}; {data.get('settings', {}).get('backbone')}", fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(name: str, data: dict) -> str:
    """Markdown for REPORT.md: table, notes, plot, then the sweep that chose each LR."""
    s = data.get("settings", {})
    m = data.get("machine", {})
    out = [f"## {data.get('title', name)}", "",
           f"`results/{name}.json` (runs in `results/{name}_runs/`); machine: {m.get('cpu', '?')}, "
           f"{m.get('cores', '?')} cores, GPU {m.get('gpu', 'none')}, {m.get('date', '')}", "",
           "settings: " + ", ".join(f"{k}={v}" for k, v in s.items()), ""]
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
