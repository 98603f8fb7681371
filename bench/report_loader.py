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
    if data.get("decoders"):
        out += render_decoders(data["decoders"])
    if data.get("gpu_host"):
        out += render_gpu_host(data["gpu_host"])
    for i, (title, values) in enumerate((data.get("bars") or {}).items()):
        if values:
            out += [f"![{title}]({plot_bars(name, title, values, data, i)})", ""]
    return "\n".join(out)


def render_decoders(dec: dict, title: str = "Decoders: decode + RandomResizedCrop + flip per worker") -> list:
    """The decoders' table: images/s per worker and in one process, ratios to pil, workers needed;
    its notes; then, where measured, many workers at once and nvJPEG on the GPU."""
    rates = list(dec.get("gpu_rates", {}))
    headers = ["decoder", "px", "reduced", "img/s, one worker", "vs pil", "img/s in process", "vs pil"] + \
        [f"workers for {k}" for k in rates]
    rows = [[r["decoder"], str(r["img_size"]), f"{100 * r['reduced_share']:.0f}%", _cell(r["img_s_per_worker"]),
             _cell(r["vs_pil"], 2), _cell(r["in_process_img_s"]), _cell(r["in_process_vs_pil"], 2)] +
            [str(r.get("workers", {}).get(k, "-")) for k in rates] for r in dec["rows"]]
    out = [f"### {title}", "", md_table(headers, rows), ""]
    out += [f"* {note}" for note in dec.get("notes", []) + _same_work(dec["rows"])] + [""]
    if dec.get("many_workers"):
        out += [md_table(["decoder (224 px)", "workers", "img/s"],
                         [[r["decoder"], str(r["workers"]), _cell(r["img_s"])] for r in dec["many_workers"]]), ""]
    if dec.get("nvjpeg"):
        out += [md_table(["torchvision.io.decode_jpeg(device='cuda')", "px", "batch", "decode img/s",
                          "decode + crop img/s"],
                         [["nvJPEG", str(r["img_size"]), str(r["batch"]), _cell(r["decode_img_s"]),
                           _cell(r["decode_crop_img_s"])] for r in dec["nvjpeg"]]), ""]
    return out


def _same_work(rows: list) -> list:
    """A note where pil-draft did pil's work (under 1% of its crops reduced): their gap is the noise."""
    sizes = [str(r["img_size"]) for r in rows if r["decoder"] == "pil-draft" and r["reduced_share"] < 0.01]
    return [f"pil-draft decodes and resizes exactly as pil where no crop is reduced (all but under 1% of them at "
            f"{', '.join(sizes)} px here): the gap between those two rows is this measurement's noise."] \
        if sizes else []


def render_gpu_host(host: dict) -> list:
    """A ``--decoders-only`` run on a GPU's host, under this machine's."""
    out = render_decoders(host["decoders"], "The same on the GPU check's host (loader_bench.py --decoders-only)")
    return out[:2] + [machine_line(host.get("machine", {})), ""] + out[2:]
