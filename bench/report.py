"""Render every ``bench/results/*.json`` into ``bench/REPORT.md`` and PNG plots in ``bench/plots/``.

Results files follow one schema::

    {"title": str, "machine": {...}, "settings": {...}, "rows": [dict, ...],
     "curves": {name: [[x, y], ...]}, "curves_ylabel": str, "bars": {plot title: {label: value}},
     "notes": [str, ...]}

``rows`` become a table (keys of the first row are the columns), ``curves`` a line plot,
``bars`` bar charts, ``notes`` a list under the table. The two older files (``step_cost.json``,
``compress.json``: ``{"table": {"headers", "rows"}}``) have renderers of their own. A results
file of any other name is rendered from the schema, after the known ones.

    python bench/report.py
"""
from __future__ import annotations

import json
import sys

from report_common import (BENCH, PLOTS, REPORT, RESULTS, _plt, _save, caption, fmt,  # noqa: F401
                           machine_line, md_table, plot_bars, settings_line, short_settings)
from report_faults import render_faults
from report_gpu import render_gpu
from report_large_batch import render as render_large_batch
from report_loader import render_loader

ORDER = ["gpu", "step_cost", "engine_overhead", "link", "compress", "large_batch", "accuracy", "quantization",
         "loader", "faults"]
TITLES = {"step_cost": "Step cost per training method (dat-ds vs a bare PyTorch loop)",
          "compress": "Gradient exchange per compressor (codec micro-benchmark, loopback)"}


def plot_curves(name: str, data: dict) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, pts in data["curves"].items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, [100 * y if max(ys) <= 1 else y for y in ys], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(data.get("curves_ylabel", "value") + " %")
    ax.set_title(data.get("title", name), fontsize=9)
    ax.legend(fontsize=7)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.text(0.01, 0.01, caption(data) + "; " + short_settings(data), fontsize=6)
    return _save(fig, f"{name}_curves.png")


def plot_split(name: str, data: dict) -> str:
    """Stacked compute / comm seconds per epoch (link benchmark)."""
    plt = _plt()
    raw = data["raw"]
    several = len({r.get("link") for r in raw}) > 1  # rows of several links: name each row's link
    labels = [r["label"] + (f" ({r.get('link')})" if several else "") for r in raw]
    fig, ax = plt.subplots(figsize=(6.4, 3.6 + (0.25 * len(raw) if several else 0)))
    compute = [r["compute_s"] / r["steps_per_epoch"] for r in raw]
    comm = [r["comm_s"] / r["steps_per_epoch"] for r in raw]
    ax.barh(labels, compute, label="computation")
    ax.barh(labels, comm, left=compute, label="communication")
    ax.invert_yaxis()
    ax.set_xlabel("seconds per step")
    ax.legend(fontsize=7)
    ax.set_title(data.get("title", name), fontsize=9)
    links = ", ".join(dict.fromkeys(r["link"] for r in raw)) if several else data["settings"].get("rate")
    fig.text(0.01, 0.01, caption(data) + f"; link {links}, {data['settings'].get('backbone')}", fontsize=6)
    return _save(fig, f"{name}_split.png")


def render_generic(name: str, data: dict) -> str:
    out = [f"## {data.get('title', name)}", "", f"`results/{name}.json`; {machine_line(data.get('machine', {}))}",
           "", settings_line(data.get("settings", {})), ""]
    rows = data.get("rows") or []
    if rows:
        headers = list(dict.fromkeys(k for r in rows for k in r))
        out += [md_table(headers, [[r.get(h) for h in headers] for r in rows]), ""]
    else:
        out += ["(no rows)", ""]
    for note in data.get("notes", []):
        out.append(f"* {note}")
    out.append("")
    if data.get("raw") and name == "link":
        out += [f"![compute/comm split]({plot_split(name, data)})", ""]
    for i, (title, values) in enumerate((data.get("bars") or {}).items()):
        if values:
            out += [f"![{title}]({plot_bars(name, title, values, data, i)})", ""]
    if data.get("curves"):
        out += [f"![curves]({plot_curves(name, data)})", ""]
    return "\n".join(out)


def render_legacy(name: str, data: dict) -> str:
    out = [f"## {TITLES.get(name, name)}", "", f"`results/{name}.json`; {machine_line(data.get('machine', {}))}",
           "", settings_line(data.get("settings", {})), "",
           md_table(data["table"]["headers"], data["table"]["rows"]), ""]
    if "load_average" in data:
        out += [f"load average before/after: {fmt(data['load_average'].get('before'))} / "
                f"{fmt(data['load_average'].get('after'))}", ""]
    if name == "step_cost":
        out += ["dat-ds vs bare: the framework's overhead over a bare PyTorch loop doing the same math "
                "(target: under 5%). target 0.7(k+1): the DAT paper's cost model of PGD-k relative to natural "
                "training.", ""]
        r = data["seconds_per_update"]
        values = {m: v["dat-ds"] / r["natural"]["dat-ds"] for m, v in r.items()}
        out += [f"![ratio to natural]({plot_bars(name, 'time per update / natural (dat-ds)', values, data, 0)})", ""]
    if name == "compress":
        out += render_codec(data.get("codec"), data)
        h = data["table"]["headers"]
        col = h.index("model vs fp32")
        values = {row[0]: float(row[col]) for row in data["table"]["rows"]}
        out += [f"![1 Gbit/s model]({plot_bars(name, 'modeled exchange time on 1 Gbit/s / fp32', values, data, 0)})",
                ""]
    return "\n".join(out)


def render_codec(codec, data: dict) -> list:
    """The one-thread codec table of ``compress.json`` (before/after, GB/s per core, ratio to a copy)."""
    if not codec:
        return []
    out = ["### Codec on one core: encode + decode, before and after, against a copy of the buffer", "",
           md_table(codec["table"]["headers"], codec["table"]["rows"]), ""]
    if codec.get("compile_seconds"):
        total = sum(codec["compile_seconds"].values())
        out += [f"First call of each compiled kernel in this run (inductor compiles it, or loads it from its "
                f"on-disk cache): {len(codec['compile_seconds'])} kernels, {total:.0f} s in all.", ""]
    results = codec["results"]
    values = {k: v["after_gbps_per_core"] for k, v in results.items()
              if k != "copy" and v.get("compressor") != "none"}      # none has no codec: nothing to time
    if values:
        title = "encode+decode GB/s per core (after)"
        out += [f"![codec GB/s per core]({plot_bars('compress', title, values, data, 1)})", ""]
    return out


def load_section(all_data: dict) -> str:
    busy = sorted(n for n, d in all_data.items()
                  if d.get("machine", {}).get("load_avg_1m", 0) > d.get("machine", {}).get("cores", 1e9))
    if not busy:
        return ""
    return (f"**Busy machine:** the load average exceeded the core count at the end of {', '.join(busy)}: other "
            "processes shared the cores, so absolute times (and ratios of phases that are not interleaved) carry "
            "noise of tens of percent. Rerun `make bench` on a quiet machine for timings to quote.")


def gpu_section(all_data: dict) -> str:
    gpus = {d.get("machine", {}).get("gpu", "none") for d in all_data.values()} - {"none", None}
    if gpus:
        return f"GPU results are included below (device: {', '.join(sorted(gpus))})."
    return ("**No GPU was available for these measurements.** Every figure below comes from CPU ranks (gloo); "
            "the step-cost table on a GPU and the 2-GPU-rank nccl path were not run. On a GPU machine, "
            "`make bench` records the GPU in every results file.")


def own_renderers() -> dict:
    """Results files whose tables have a renderer of their own, in ``bench/report_*.py``."""
    return {"faults": render_faults, "gpu": render_gpu, "large_batch": render_large_batch, "loader": render_loader}


def main():
    files = sorted(RESULTS.glob("*.json"))
    all_data = {f.stem: json.loads(f.read_text()) for f in files}
    names = [n for n in ORDER if n in all_data] + sorted(n for n in all_data if n not in ORDER)
    parts = ["# Benchmarks", "",
             "Generated by `make bench` (`python bench/report.py` re-renders it from `bench/results/*.json`). "
             "Every comparison in a table was measured side by side in one run on the machine it names; "
             "compare ratios, not absolute seconds, across machines.", "", gpu_section(all_data), "",
             load_section(all_data), "",
             "Contents: " + ", ".join(f"`{n}`" for n in names), ""]
    renderers = own_renderers()
    for n in names:
        data = all_data[n]
        try:
            if n in renderers:
                parts.append(renderers[n](n, data))
            else:
                parts.append(render_generic(n, data) if "rows" in data else render_legacy(n, data))
        except (KeyError, TypeError, ValueError) as err:
            parts.append(f"## {n}\n\n(could not render `results/{n}.json`: {err!r})\n")
    extra = BENCH / "REPORT_README_RESULTS.md"  # measured results quoted from runs of the recipes
    if extra.exists():
        parts += ["", extra.read_text().rstrip()]
    REPORT.write_text("\n".join(parts).rstrip() + "\n")
    print(f"written: {REPORT}")


if __name__ == "__main__":
    sys.exit(main())
