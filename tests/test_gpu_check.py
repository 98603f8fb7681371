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
    assert not any("sync_guard_ratio_to_bare" in m for m in model["methods"])  # the guard section has it
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


def test_the_tuned_anchor_for_every_method_with_flops_and_no_gpu_figure_on_a_cpu(quick):
    data, stdout = quick
    tuned = data["sections"]["tuned"]
    assert [m["method"] for m in tuned["methods"]] == [label for label, _, _ in gpu_check.METHODS]
    assert tuned["compile_backend"] == "eager" and tuned["gpu_figure"] is False and tuned["peak_tflops"] is None
    flops = {}
    for m in tuned["methods"]:
        assert "error" not in m, m
        assert all(positive(m[k]) for k in ("untuned_images_per_s", "tuned_images_per_s", "dat_ds_images_per_s",
                                            "ratio_to_tuned", "untuned_ratio_to_tuned", "gflops_per_image"))
        assert m["tuned_mfu"] is None and m["dat_ds_mfu"] is None  # no peak known for a CPU
        flops[m["method"]] = m["gflops_per_image"]
    # counted, not assumed: each PGD step adds a forward and an input backward, Free-m replays m times
    assert flops["natural"] < flops["fgsm_rs"] < flops["pgd-3"] < flops["pgd-10"]
    assert 4 < flops["free-4"] / flops["natural"] < 4.2  # plus the input gradient of the first convolution
    assert "### The anchor: dat-ds against a tuned PyTorch loop" in stdout and "**Not a GPU figure**" in stdout
    assert tuned["anchor_attack"] == "frozen weights" and "understate the anchor" not in stdout


def test_the_bf16_peak_comes_from_the_device_name(monkeypatch):
    from gpu.tuned import bf16_peak_flops
    assert bf16_peak_flops(torch.device("cpu")) is None
    for name, peak in (("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert bf16_peak_flops(torch.device("cuda")) == peak, name


def test_the_deferred_guard_reads_the_host_once_per_epoch_the_synchronous_once_per_step(quick):
    data, stdout = quick
    section = data["sections"]["guard"]
    steps = data["settings"]["plan"]["steps"]
    assert [m["method"] for m in section["methods"]] == list(gpu_check.GUARD_ABLATION)
    for m in section["methods"]:
        assert all(positive(m[f"{k}_ratio_to_bare"]) for k in ("deferred", "synchronous", "no_guard")), m
        assert positive(m["deferred_vs_synchronous"])
        assert m["deferred_host_reads_per_step"] == 1 / steps  # the epoch's loss, read once
        assert m["synchronous_host_reads_per_step"] == 1 + 1 / steps
        assert m["deferred_syncs_per_step"] == m["synchronous_syncs_per_step"] == 0
    assert "### The step guard: deferred agreement beside the synchronous one" in stdout


def test_the_batch_sweep_and_powersgd_grouped_against_per_tensor(quick):
    data, stdout = quick
    sweep = data["sections"]["sweep"]
    assert [b["batch"] for b in sweep["batches"]] == list(data["settings"]["plan"]["sweep"])
    for b in sweep["batches"]:
        assert positive(b["natural_images_per_s"]) and positive(b["pgd-3_images_per_s"]) and positive(
            b["peak_memory_gb"]), b
    ps = data["sections"]["powersgd"]
    assert [r["matrix_rank"] for r in ps["ranks"]] == [1, 4] and ps["matrices"] >= ps["shapes"] > 0
    for r in ps["ranks"]:
        assert positive(r["grouped_gbps"]) and positive(r["per_tensor_gbps"]) and r["same_result"], r
        assert 0 <= r["max_rel_diff"] < 1e-4 and r["steps"] > 1 and math.isfinite(r["max_rel_diff_after_steps"]), r
    assert "### Micro-batch sweep" in stdout and "### PowerSGD: matrices grouped by shape" in stdout


def test_sections_missing_from_an_older_gpu_results_file_read_not_yet_measured():
    text = render_gpu("gpu", {"settings": {"device": "cuda"}, "sections": {}})
    for key in ("tuned", "guard", "sweep", "powersgd"):
        assert f"### {key}: not yet measured on a GPU" in text
    assert "### nccl: not run" in text


def test_methods_restrict_the_timed_methods_and_an_unknown_one_is_refused(capsys):
    from gpu.harness import plan_methods
    plan = gpu_check.make_plan(torch.device("cpu"), quick=True)
    assert [m[0] for m in plan_methods(plan)] == [label for label, _, _ in gpu_check.METHODS]
    plan.methods = ("pgd-3", "natural")
    assert [m[0] for m in plan_methods(plan)] == ["natural", "pgd-3"]  # the check's order, not the flag's
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--device", "cpu", "--quick", "--methods", "pgd-7"])
    assert exit_info.value.code == 2 and "pgd-7" in capsys.readouterr().err


def test_merge_keeps_the_sections_this_run_does_not_measure_marked_with_their_date(tmp_path):
    old = {"machine": {"date": "2026-11-30 01:31 UTC", "gpu": "NVIDIA H200", "torch": "2.11.0+cu130"},
           "sections": {"lamb": {"model": "resnet50", "params_m": 23.5, "settings": {}, "rows": []},
                        "codec": {"stale": True}, "memory": {"peak_gb": 1.0}}}
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(old))
    plan = gpu_check.make_plan(torch.device("cpu"), quick=True)
    run = gpu_check.Run(plan, torch.device("cpu"), path, True, ["codec", "memory"])
    run.keep(path)
    kept = run.data["sections"]
    assert set(kept) == {"lamb"}  # codec is measured again, memory is summed up again
    assert kept["lamb"]["measured"] == {"date": "2026-11-30 01:31 UTC", "gpu": "NVIDIA H200",
                                        "torch": "2.11.0+cu130"}
    path.write_text("{not json")
    with pytest.raises(SystemExit, match="--merge cannot read"):
        run.keep(path)


def test_a_kept_section_says_when_it_was_measured():
    data = {"settings": {"device": "cuda"}, "sections": {"guard": {
        "model": "resnet50", "batch": 128, "dtype": "bfloat16", "methods": [],
        "measured": {"date": "2026-11-30 01:31 UTC", "gpu": "NVIDIA H200", "torch": "2.11"}}}}
    text = render_gpu("gpu", data)
    assert "Measured in an earlier run of the check: 2026-11-30 01:31 UTC, NVIDIA H200, torch 2.11." in text


def test_the_bare_loops_attack_freezes_the_weights_as_a_tuned_loop_does():
    """A compiled model's backward graph computes the weights' gradients whenever they require them,
    so the anchor's attack must freeze them (as dat-ds does), or the tuned loop pays for gradients no
    one reads; afterwards they require gradients again and none was left on them."""
    from gpu.harness import frozen_attack

    from dat_ds import attacks
    from dat_ds.models import create_model
    torch.manual_seed(0)
    model = create_model("test_resnet", 10, in_chans=1, img_size=16, stem="native").train()
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append((m.training, [p.requires_grad for p in m.parameters()])))
    x, y = torch.rand(4, 1, 16, 16), torch.randint(0, 10, (4,))
    x_adv = frozen_attack(model, x, y, attacks.create("pgd", eps=0.1, steps=2, alpha=0.05))
    assert len(seen) == 2 and all(not training and not any(grads) for training, grads in seen)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(x_adv, x)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
