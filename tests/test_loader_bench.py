"""The loader benchmark end to end on a tiny generated folder, and its report section."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow  # about half a minute: imports datasets and builds its cache twice
def test_loader_bench_generates_once_measures_every_reader_and_renders(tmp_path):
    out, cache = tmp_path / "loader.json", tmp_path / "jpegs"
    cmd = [sys.executable, str(ROOT / "bench" / "loader_bench.py"), "--cache", str(cache), "--classes", "3",
           "--per-class", "4", "--images", "8", "--workers", "1", "--repeats", "1", "--decoder-images", "8",
           "--rounds", "2", "--img-sizes", "64", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    jpegs = sorted(cache.rglob("*.JPEG"))
    from PIL import Image
    assert len(jpegs) == 12 and all(160 <= min(Image.open(p).size) <= max(Image.open(p).size) <= 500 for p in jpegs)
    data = json.loads(out.read_text())
    rows = {row["reader"]: row for row in data["rows"]}
    readers = {"torchvision ImageFolder", "HF imagefolder, first load", "dat-ds imagefolder (torchvision scan)"}
    assert readers <= set(rows)
    tv = rows["torchvision ImageFolder"]
    assert tv["vs_torchvision"] == 1 and tv["img_s_1w"] > 0
    assert abs(tv["extrapolated_1.28M_s"] - tv["index_s"] * 1_281_167 / 12) < 1e-6 * tv["extrapolated_1.28M_s"]
    assert "cores" in data["machine"] and any("load average" in note for note in data["notes"])
    decoders = {row["decoder"]: row for row in data["decoders"]["rows"]}
    assert {"pil", "pil-draft", "simplejpeg"} <= set(decoders)
    assert decoders["pil"]["vs_pil"] == 1 and all(row["img_s_per_worker"] > 0 and row["img_size"] == 64
                                                  for row in decoders.values())
    assert 0 <= decoders["simplejpeg"]["reduced_share"] <= 1 and "workers" not in decoders["pil"]  # rates: 224 px
    r2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and "generated in 0 s" in r2.stdout  # the folder is cached
    sys.path.insert(0, str(ROOT / "bench"))
    from report_loader import render_loader
    data["bars"] = {}
    text = render_loader("loader", data)
    assert "| torchvision ImageFolder |" in text and f"{tv['img_s_1w']:.0f}" in text
    assert "### Decoders" in text and "| simplejpeg | 64 |" in text
