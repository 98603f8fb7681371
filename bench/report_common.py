"""What every renderer of ``bench/REPORT.md`` shares (``report.py`` and the ``report_*.py``
sections): where results and plots live, number and table formatting, the machine and settings
lines, and bar plots.

    from report_common import md_table, machine_line, settings_line, plot_bars
"""
from __future__ import annotations

from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS, PLOTS, REPORT = BENCH / "results", BENCH / "plots", BENCH / "REPORT.md"


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v)
    return "-" if v is None else str(v)


def md_table(headers, rows) -> str:
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_line(m: dict) -> str:
    if not m:
        return "machine: not recorded"
    parts = [f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores", f"GPU: {m.get('gpu', 'none')}",
             f"torch {m.get('torch', '?')}"]
    if "deepspeed" in m:
        parts.append(f"deepspeed {m['deepspeed']}")
    if "date" in m:
        parts.append(m["date"])
    if "load_avg_1m" in m:
        parts.append(f"load average {m['load_avg_1m']} at the end")
    return "machine: " + "; ".join(parts)


def settings_line(s: dict) -> str:
    return "settings: " + ", ".join(f"{k}={fmt(v)}" for k, v in s.items())


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def caption(data: dict) -> str:
    m = data.get("machine", {})
    return f"{m.get('cpu', '?')} x{m.get('cores', '?')}, GPU {m.get('gpu', 'none')}, {m.get('date', '')}"


def short_settings(data: dict, n: int = 8) -> str:
    keep = [(k, v) for k, v in data.get("settings", {}).items() if not isinstance(v, (list, dict)) or len(v) < 4]
    return ", ".join(f"{k}={fmt(v)}" for k, v in keep[:n])


def plot_bars(name: str, title: str, values: dict, data: dict, idx: int) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.barh(list(values), list(values.values()))
    ax.invert_yaxis()
    ax.set_xlabel(title)
    ax.set_title(data.get("title", name), fontsize=9)
    fig.text(0.01, 0.01, caption(data) + "; " + short_settings(data, 6), fontsize=6)
    return _save(fig, f"{name}_bars{idx}.png")


def _save(fig, filename: str) -> str:
    PLOTS.mkdir(exist_ok=True)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(PLOTS / filename, dpi=110)
    _plt().close(fig)
    return f"plots/{filename}"
