"""``bench/gpu_check.py --device cpu --quick``: the GPU check's code, run on the CPU so it never rots.

One quick run (a subprocess, tiny model) writes its results to a temporary file; the tests read
every section of it. The real results file, ``bench/results/gpu.json``, is never touched.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import clean_env
from dat_ds import compress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402
from report_gpu import render_gpu  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu.json"
    real = ROOT / "bench" / "results" / "gpu.json"
    before = real.stat().st_mtime_ns if real.exists() else None
    # without the one-rank world that in-process tests leave in this process's environment (its port is taken)
    env = clean_env({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"})
    trace = out.parent / "trace"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out), "--trace", str(trace)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (real.stat().st_mtime_ns if real.exists() else None) == before
    return json.loads(out.read_text()), proc.stdout


def positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_every_section_ran_without_error(quick):
    data, _ = quick
    assert set(data["sections"]) == {*gpu_check.SECTIONS, "trace"}
    for name, section in data["sections"].items():
        assert "error" not in section and "skipped" not in section, (name, section)
    assert data["machine"]["cpu"] and data["settings"]["device"] == "cpu"


def test_throughput_of_every_method_beside_the_bare_loop_within_the_sync_budget(quick):
    data, _ = quick
    (model,) = data["sections"]["throughput"]["models"]
    assert [m["method"] for m in model["methods"]] == [label for label, _, _ in gpu_check.METHODS]
    steps = data["settings"]["plan"]["steps"]
    for m in model["methods"]:
        assert "error" not in m, m
        assert all(positive(m[k]) for k in ("images_per_s", "bare_images_per_s", "ratio_to_bare", "time_vs_natural"))
        assert m["syncs_per_step"] == 0, m
        # one agreement per optimizer step, one read of the epoch's loss
        assert 1 <= m["host_reads_per_step"] <= 1 + 1 / (steps * m["updates_per_minibatch"]), m
        assert positive(sum(m["phases_s"].values()))
    assert {m["method"]: m["updates_per_minibatch"] for m in model["methods"]}["free-4"] == 4
    for m in model["methods"]:  # the step guard's price: the same steps with its synchronous agreement, without it
        for key in ("sync_guard_ratio_to_bare", "no_guard_ratio_to_bare"):
            assert positive(m.get(key)) == (m["method"] in gpu_check.GUARD_ABLATION), (key, m)
    overlap = model["conadv_overlap"]
    assert all(positive(overlap[k]) for k in ("attack_s", "update_s", "conadv_s"))
    assert math.isclose(overlap["overlap"], overlap["hidden_s"] / overlap["attack_s"])
    assert overlap["side_stream"] is False
    assert positive(model["peak_memory_gb"])


def test_codec_of_every_compressor(quick):
    codec = quick[0]["sections"]["codec"]
    assert [c["compressor"] for c in codec["compressors"]] == list(compress.names())
    assert positive(codec["copy_gbps"])
    for c in codec["compressors"]:
        assert positive(c["gbps"]) and positive(c["ratio_to_copy"]) and c["finite"], c


def test_dat_steps_with_every_compressor_over_the_process_group(quick):
    section = quick[0]["sections"]["nccl"]
    assert section["backend"] == "gloo" and section["world_size"] == 1  # the CPU stand-in for nccl
    assert [c["compressor"] for c in section["compressors"]] == list(compress.names())
    for c in section["compressors"]:
        assert "error" not in c, c
        assert positive(c["s_per_step"]) and c["finite"] and c["identical_across_ranks"], c
        assert c["bytes_per_step"] == 0  # one rank sends nothing


def test_lamb_matches_the_fused_kernels_formula_with_matched_settings(quick):
    lamb = quick[0]["sections"]["lamb"]
    assert positive(lamb["ours_ms"])
    assert lamb["ours_vs_formula_matched"]["same"], lamb
    assert math.isclose(lamb["ours_vs_formula_matched"]["norm_ratio"], 1, rel_tol=1e-4)
    assert "CUDA" in lamb["fused"]["skipped"]


def test_peak_memory_and_the_rendered_report(quick):
    data, stdout = quick
    memory = data["sections"]["memory"]
    assert positive(memory["peak_gb"]) and "throughput test_resnet" in memory["per_section_gb"]
    text = render_gpu("gpu", data)
    assert text in stdout
    for name in [*compress.names(), *(label for label, _, _ in gpu_check.METHODS)]:
        assert f"| {name} |" in text
    assert "failed" not in text


def test_a_failing_part_is_recorded_and_rendered():
    entry = gpu_check.guarded(lambda: 1 / 0, method="pgd-3")
    assert entry["method"] == "pgd-3" and entry["error"].startswith("ZeroDivisionError: division by zero")
    data = {"sections": {"codec": {"error": "RuntimeError: no kernel"},
                         "throughput": {"models": [{"model": "resnet50", "img_size": 224, "batch": 2,
                                                    "dtype": "bfloat16", "params_m": 25.6,
                                                    "methods": [entry]}]}}}
    text = render_gpu("gpu", data)
    assert "### codec: failed: RuntimeError: no kernel" in text
    assert "| pgd-3 | failed: ZeroDivisionError" in text
    assert "### nccl: not run" in text


def test_without_cuda_one_line_and_exit_0(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out


def test_cpu_without_quick_is_refused(capsys):
    assert gpu_check.main(["--device", "cpu"]) == 2
    assert "--device cpu needs --quick" in capsys.readouterr().err



def test_the_trace_profiles_dat_ds_with_and_without_the_guard_and_the_bare_loop(quick, tmp_path):
    data, stdout = quick
    runs = data["sections"]["trace"]["runs"]
    assert {(r["method"], r["impl"]) for r in runs} == {
        (m, impl) for m in ("natural", "pgd-3", "conadv")
        for impl in ("dat-ds", "dat-ds sync guard", "dat-ds no guard", "bare")}
    assert all(positive(r["wall_s_per_step"]) and r["device_busy"] is None for r in runs)  # no device on a CPU
    assert "### Profiled steps" in stdout and "| natural | dat-ds no guard |" in stdout


@pytest.mark.parametrize("given, built", [("9.0a", "9.0"), ("8.0;9.0a+PTX", "8.0;9.0+PTX"),
                                          ("7.5 8.0 9.0", "7.5;8.0;9.0"), ("10.0a;12.0f;9.0", "10.0;12.0;9.0"),
                                          ("9.0+PTX", "9.0+PTX")])
def test_arch_lists_are_rewritten_as_deepspeeds_jit_builder_reads_them(given, built):
    assert gpu_check.deepspeed_arch_list(given) == built


def test_a_bad_budget_is_refused_in_one_line(capsys):
    assert gpu_check.main(["--device", "cpu", "--quick", "--budget-s", "0"]) == 2
    assert capsys.readouterr().err.strip() == "gpu_check: --budget-s must be positive, got 0"
