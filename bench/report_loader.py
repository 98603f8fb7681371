"""``bench/report.py``'s section for ``results/loader.json`` (``bench/loader_bench.py``): the readers
side by side, index time extrapolated to ImageNet and images/s per worker.

    from report_loader import render_loader   # in report.py: RENDERERS["loader"] = render_loader
"""
from __future__ import annotations

from report_common import machine_line, md_table, plot_bars, settings_line


def _cell(v, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render_loader(name: str, data: dict) -> str:
    """Markdown for the loader benchmark (``name`` is the results file's stem)."""
    headers = ["reader", "index s", "ms / 1k files", "1.28 M files (min)", "index vs torchvision",
               "img/s, 1 worker", "img/s, 2 workers", "img/s per worker, 2 workers"]
    rows = [[r["reader"], _cell(r["index_s"], 2), _cell(r["ms_per_1k_files"], 1),
             _cell(r["extrapolated_1.28M_s"] / 60, 1), _cell(r["vs_torchvision"], 2), _cell(r.get("img_s_1w")),
             _cell(r.get("img_s_2w")), _cell(r.get("img_s_per_worker_2w"))] for r in data["rows"]]
    out = [f"## {data.get('title', name)}", "",
           f"`results/{name}.json`; {machine_line(data.get('machine', {}))}", "",
           settings_line(data.get("settings", {})), "", md_table(headers, rows), ""]
    out += [f"* {note}" for note in data.get("notes", [])] + [""]
    for i, (title, values) in enumerate((data.get("bars") or {}).items()):
        if values:
            out += [f"![{title}]({plot_bars(name, title, values, data, i)})", ""]
    return "\n".join(out)
