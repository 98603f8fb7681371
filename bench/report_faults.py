"""``bench/report.py``'s section for ``results/faults.json`` (``bench/fault_bench.py``): one row per
injected fault with its exit code, time to detection, what was lost and how the resume ended.

    from report_faults import render_faults   # in report.py: RENDERERS["faults"] = render_faults
"""
from __future__ import annotations

from report_common import machine_line, settings_line

HEADERS = ["fault", "exit", "detected after", "job ended after", "lost (since the last checkpoint)", "resume",
           "the line"]


def _seconds(v) -> str:
    return "-" if v is None else f"{v:.1f} s"


def _row(r: dict) -> list:
    if r.get("detected_s") is None and "note" in r:
        return [r["fault"], "-", "-", "-", "-", "-", r["note"]]
    lost = "-" if r.get("lost_s") is None else f"{r['lost_s']:.1f} s (~{r['lost_steps']:.1f} steps)"
    line = r.get("line", "").replace("|", "/")
    return [r["fault"], str(r.get("exit_code", "-")), _seconds(r.get("detected_s")), _seconds(r.get("job_end_s")),
            lost, r.get("resume", "-"), f"`{line}`" if line else "-"]


def render_faults(name: str, data: dict) -> str:
    """Markdown for the fault table (``name`` is the results file's stem)."""
    rows = [_row(r) for r in data.get("rows", [])]
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    out = [f"## {data.get('title', name)}", "",
           f"`results/{name}.json`; {machine_line(data.get('machine', {}))}", "",
           settings_line(data.get("settings", {})), "", *lines, ""]
    out += [f"* {note}" for note in data.get("notes", [])] + [""]
    return "\n".join(out)
