"""``bench/report.py``'s section for ``results/gpu.json`` (``bench/gpu_check.py``): dat-ds against a
tuned loop (and MFU), training throughput against a bare loop, ConAdv's overlap, syncs per step,
the step guard's two agreements, the micro-batch sweep, codec GB/s, PowerSGD grouped against per
tensor, DAT steps over nccl, dat-ds's LAMB beside DeepSpeed's fused LAMB, and peak memory.
``gpu_check.py`` prints the same text. Sections a results file lacks because it predates them
read "not yet measured on a GPU".

    from report_gpu import render_gpu   # in report.py: the renderer of the "gpu" results file
"""
from __future__ import annotations

from typing import Callable, List, Optional


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
    return str(v)


def _table(headers: List[str], rows: List[list]) -> List[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "/") for c in r) + " |" for r in rows]
    return lines + [""]


def _rows(entries: list, key: str, cells: Callable[[dict], list], width: int) -> List[list]:
    """One row per entry; an entry that failed shows its error across the row."""
    out = []
    for e in entries:
        if "error" in e:
            out.append([e.get(key, "?"), f"failed: {e['error']}"] + [""] * (width - 2))
        else:
            out.append(cells(e))
    return out


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else 1e3 * seconds


def _problem(section: dict) -> Optional[str]:
    if "error" in section:
        return f"failed: {section['error']}"
    if "skipped" in section:
        return f"skipped: {section['skipped']}"
    return None


def throughput(section: dict) -> List[str]:
    out = ["### Training throughput: dat-ds against a bare PyTorch loop", "",
           "images/s of minibatches (Free-4 replays each minibatch 4 times); dat-ds / bare > 1 means dat-ds is "
           "faster; syncs and host reads per optimizer step counted over real steps (budget: 0 syncs, 1 host "
           "read per step plus one per epoch, none per step with the guard's deferred agreement); dat-ds runs its step "
           "guard as a training run does (see the settings line); sync guard: with the guard's synchronous agreement "
           "(one host read per step); no guard: without the guard (no non-finite check); all timed in the same "
           "rounds.", ""]
    for m in section.get("models", []):
        title = f"`{m.get('model')}`"
        if "error" in m:
            out += [f"{title}: failed: {m['error']}", ""]
            continue
        out += [f"{title} at {m['img_size']} px, batch {m['batch']}, {m['dtype']}, {_fmt(m['params_m'])} M parameters; "
                f"peak memory {_fmt(m.get('peak_memory_gb'))} GB", ""]
        # results from before the guard section kept its ablation in this table
        ablation = any("sync_guard_ratio_to_bare" in r for r in m["methods"])
        headers = ["method", "dat-ds img/s", "bare img/s", "dat-ds / bare",
                   *(["sync guard / bare", "no guard / bare"] if ablation else []),
                   "time vs natural", "syncs / step", "host reads / step", "updates / minibatch"]
        out += _table(headers, _rows(m["methods"], "method", lambda r: [
            r["method"], r["images_per_s"], r["bare_images_per_s"], r["ratio_to_bare"],
            *([r.get("sync_guard_ratio_to_bare"), r.get("no_guard_ratio_to_bare")] if ablation else []),
            r.get("time_vs_natural"), r["syncs_per_step"], r["host_reads_per_step"], r["updates_per_minibatch"]],
            len(headers)))
        out += conadv(m.get("conadv_overlap", {}))
    return out


def _not_gpu(section: dict) -> List[str]:
    if section.get("gpu_figure", True):
        return []
    return ["**Not a GPU figure**: a CPU run of the code paths (tiny model, torch.compile with dynamo's "
            f"`{section.get('compile_backend')}` backend).", ""]


def tuned(section: dict) -> List[str]:
    peak = section.get("peak_tflops")
    out = ["### The anchor: dat-ds against a tuned PyTorch loop", "",
           f"`{section['model']}` at {section['img_size']} px, batch {section['batch']}, {section['dtype']}; tuned: "
           f"channels-last, torch.compile ({section['compile_backend']}), same attack and LAMB; dat-ds with "
           f"`--channels-last on --compile on`; MFU = img/s x FLOPs per image / "
           + (f"{_fmt(peak)} TFLOP/s (dense bf16 peak)" if peak else "a bf16 peak (none known for this device)"),
           "", *_not_gpu(section)]
    if section.get("anchor_attack") != "frozen weights":
        out += ["*The loops' attacks in this run kept the weights requiring gradients: the compiled loop's "
                "backward computed them in every attack step, so its attack rows understate the anchor "
                "(the check now freezes them, as dat-ds does).*", ""]
    headers = ["method", "untuned img/s", "tuned img/s", "dat-ds img/s", "dat-ds / tuned", "untuned / tuned",
               "GFLOP / image", "MFU tuned", "MFU dat-ds"]
    return out + _table(headers, _rows(section["methods"], "method", lambda r: [
        r["method"], r["untuned_images_per_s"], r["tuned_images_per_s"], r["dat_ds_images_per_s"],
        r["ratio_to_tuned"], r["untuned_ratio_to_tuned"], r["gflops_per_image"], r.get("tuned_mfu"),
        r.get("dat_ds_mfu")], len(headers)))


def guard(section: dict) -> List[str]:
    out = ["### The step guard: deferred agreement beside the synchronous one", "",
           f"`{section['model']}`, batch {section['batch']}, {section['dtype']}; deferred: decided on the device, "
           "read one step later; synchronous: one host read per optimizer step; host reads per step include the "
           "epoch's one read of its loss.", ""]
    headers = ["method", "deferred / bare", "synchronous / bare", "no guard / bare", "deferred / synchronous",
               "host reads / step deferred", "host reads / step synchronous"]
    return out + _table(headers, _rows(section["methods"], "method", lambda r: [
        r["method"], r["deferred_ratio_to_bare"], r["synchronous_ratio_to_bare"], r["no_guard_ratio_to_bare"],
        r["deferred_vs_synchronous"], r["deferred_host_reads_per_step"], r["synchronous_host_reads_per_step"]],
        len(headers)))


def sweep(section: dict) -> List[str]:
    out = ["### Micro-batch sweep (dat-ds, channels-last and compiled)", "",
           f"`{section['model']}` at {section['img_size']} px, {section['dtype']}, torch.compile "
           f"({section['compile_backend']}).", ""]
    headers = ["batch", "natural img/s", "PGD-3 img/s", "peak memory GB"]
    return out + _table(headers, _rows(section["batches"], "batch", lambda r: [
        r["batch"], r["natural_images_per_s"], r["pgd-3_images_per_s"], r["peak_memory_gb"]], len(headers)))


def powersgd(section: dict) -> List[str]:
    out = ["### PowerSGD: matrices grouped by shape against one tensor at a time", "",
           f"`{section['model']}` gradient, {section['numel'] / 1e6:.1f} M values in {section['tensors']} tensors "
           f"({section['matrices']} matrices of {section['shapes']} shapes); encode + decode at world size 1, "
           "alternating. Same result: one step of each form from the same state, to rtol 1e-4 (where the diff "
           "columns are empty, the check compared after all its timed steps instead, where warm-started Q and the "
           "carried error compound rounding differences); max rel. diff: the largest difference over the largest "
           "entry.", ""]
    headers = ["rank", "grouped GB/s", "per tensor GB/s", "speed-up", "same result", "max rel. diff, 1 step",
               "max rel. diff, all steps"]
    return out + _table(headers, _rows(section["ranks"], "matrix_rank", lambda r: [
        r["matrix_rank"], r["grouped_gbps"], r["per_tensor_gbps"], r["speedup"], r["same_result"],
        r.get("max_rel_diff"), r.get("max_rel_diff_after_steps")], len(headers)))


def conadv(o: dict) -> List[str]:
    if not o:
        return []
    if "error" in o:
        return [f"ConAdv overlap: failed: {o['error']}", ""]
    where = "on a second CUDA stream" if o.get("side_stream") else "in sequence (CPU: no overlap expected)"
    return [f"ConAdv overlap ({where}): attack alone {_fmt(_ms(o['attack_s']))} ms, update alone "
            f"{_fmt(_ms(o['update_s']))} ms, ConAdv step {_fmt(_ms(o['conadv_s']))} ms: "
            f"{_fmt(_ms(o['hidden_s']))} ms hidden = **{100 * o['overlap']:.0f}%** of the attack's time.", ""]


def codec(section: dict) -> List[str]:
    headers = ["compressor", "encode+decode ms", "GB/s", "/ copy", "first call s", "compiled", "finite"]
    out = ["### Codecs on the device: encode + decode at world size 1", "",
           f"`{section['model']}` gradient, {section['numel'] / 1e6:.1f} M fp32 values in {section['tensors']} "
           f"tensors; a plain copy of the buffer runs at {_fmt(section['copy_gbps'])} GB/s (`none` has no codec: "
           f"at world size 1 it leaves the buffer as it is).", ""]
    out += _table(headers, _rows(section["compressors"], "compressor", lambda r: [
        r["compressor"], r["ms"], r["gbps"], r["ratio_to_copy"], r["first_call_s"], r["compiled"], r["finite"]],
        len(headers)))
    return out


def nccl(section: dict) -> List[str]:
    headers = ["compressor", "s / step", "vs none", "bytes / step", "comm share", "loss", "identical on all ranks"]
    out = [f"### DAT steps over {section['backend']}, world size {section['world_size']}", "",
           f"{section['steps']} PGD-{section['pgd_steps']} steps per compressor, `{section['model']}`, batch "
           f"{section['batch_per_rank']} per rank; peak memory {_fmt(section.get('peak_memory_gb'))} GB (rank 0).", ""]
    out += _table(headers, _rows(section["compressors"], "compressor", lambda r: [
        r["compressor"], r["s_per_step"], r.get("time_vs_none"), r["bytes_per_step"], r["comm_share"], r["loss"],
        r["identical_across_ranks"]], len(headers)))
    return out


def _match(c: Optional[dict]) -> str:
    if not c:
        return "-"
    return (f"{'same' if c['same'] else 'DIFFERENT'} (max diff {_fmt(c['rel_max_diff'])} of the largest entry, "
            f"norm ratio {_fmt(c['norm_ratio'], 4)}, cosine {_fmt(c['cosine'], 6)})")


def lamb(section: dict) -> List[str]:
    fused = section.get("fused", {})
    out = ["### LAMB: dat-ds's beside DeepSpeed's fused CUDA kernel", "",
           f"`{section['model']}`, {_fmt(section['params_m'])} M parameters, one optimizer step.", ""]
    rows = [["dat-ds `Lamb` (torch._foreach)", section["ours_ms"], "1"]]
    if "ms" in fused:
        rows.append(["DeepSpeed `FusedLamb`", fused["ms"], section.get("fused_speedup")])
    out += _table(["optimizer", "ms / step", "speed-up over dat-ds"], rows)
    problem = fused.get("error") or fused.get("skipped")
    if problem:
        out += [f"* DeepSpeed's FusedLamb: {problem}"]
    for k, words in (("matched", "matched settings"), ("defaults", "each optimizer's defaults")):
        out.append(f"* {words}, dat-ds vs the fused kernel's formula (in PyTorch): "
                   f"{_match(section.get(f'ours_vs_formula_{k}'))}")
        if f"vs_ours_{k}" in fused:
            out.append(f"* {words}, FusedLamb vs dat-ds: {_match(fused[f'vs_ours_{k}'])}; "
                       f"FusedLamb vs its formula: {_match(fused.get(f'vs_formula_{k}'))}")
    return out + ["", "matched: no bias correction and no clamp of the trust ratio, where both compute "
                  "`p -= lr |p| / |u| u`; defaults: dat-ds clamps |p| to [c_l, c_u] = [0, 10], FusedLamb clamps the "
                  "ratio to [0.01, 10] and scales the step by sqrt(1 - b2^t) / (1 - b1^t) after normalizing.", ""]


def memory(section: dict) -> List[str]:
    rows = [[k, v] for k, v in section.get("per_section_gb", {}).items()]
    total = section.get("device_total_gb")
    note = f" of {_fmt(total)} GB on the device" if total else ""
    return [f"### Peak memory ({section.get('kind')}){note}", ""] + _table(["section", "GB"], rows)


def trace(section: dict) -> List[str]:
    out = [f"### Profiled steps: `{section['model']}`, batch {section['batch']}", "",
           "wall time per optimizer step and the share of it in which the device ran a kernel or copy "
           "(PyTorch profiler; Chrome traces beside the results)", ""]
    rows = [[r["method"], r["impl"], _ms(r["wall_s_per_step"]), (r.get("device_busy") or {}).get("share")]
            for r in section["runs"]]
    return out + _table(["method", "loop", "ms / step", "device busy share"], rows)


RENDER = {"tuned": tuned, "throughput": throughput, "guard": guard, "sweep": sweep, "codec": codec,
          "powersgd": powersgd, "nccl": nccl, "lamb": lamb, "trace": trace, "memory": memory}
LATER = ("tuned", "guard", "sweep", "powersgd")  # sections results files from before them lack


GUARD = {None: "on the host, one read per step (measured before the deferred agreement existed)",
         "synchronous": "on the host, one read per step", "deferred": "on the device where the step allows it"}


def render_gpu(name: str, data: dict) -> str:
    """Markdown for ``results/{name}.json`` as ``bench/gpu_check.py`` writes it."""
    m = data.get("machine", {})
    s = data.get("settings", {})
    out = [f"## {data.get('title', name)}", "",
           f"`results/{name}.json`; machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores; GPU: "
           f"{m.get('gpu', 'none')}; torch {m.get('torch', '?')}; deepspeed {m.get('deepspeed', '?')}; "
           f"{m.get('date', '')}", "",
           f"settings: device {s.get('device')}, {'quick sizes' if s.get('quick') else 'full sizes'}, "
           f"{s.get('dtype')}, {s.get('gpus', 0)} GPU(s), kernels compile: {s.get('compile')}, "
           f"step guard's agreement: {GUARD.get(s.get('step_guard'), s.get('step_guard'))}; "
           f"{_fmt(data.get('wall_s'))} s in all", ""]
    for key, fn in RENDER.items():
        section = data.get("sections", {}).get(key)
        if section is None:
            if key in LATER and s.get("device") == "cuda":
                out += [f"### {key}: not yet measured on a GPU", ""]
            elif key != "trace":  # the trace runs only when asked
                out += [f"### {key}: not run", ""]
            continue
        problem = _problem(section)
        if problem:
            out += [f"### {key}: {problem}", ""]
            continue
        try:
            lines = fn(section)
            if section.get("measured"):  # kept by --merge from an earlier run
                when = section["measured"]
                lines[1:1] = ["", f"*Measured in an earlier run of the check: {when.get('date')}, {when.get('gpu')}, "
                                  f"torch {when.get('torch')}.*"]
            out += lines
        except (KeyError, TypeError, ValueError) as err:
            out += [f"### {key}: could not render ({err!r})", ""]
    return "\n".join(out).rstrip() + "\n"
