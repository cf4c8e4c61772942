"""Profiling of one training step: torch.compile's phases in the first step, top kernels and aten ops of one step,
and their Markdown tables."""
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from . import gaps


# torch.compile's phases in the first step (dynamo's timers, seconds summed over compiles): tracing plus everything
# below it, AOTAutograd's joint trace, inductor's forward and backward compiles, and the wait for their Triton
# kernels (async_compile.wait). What is left of the first step is running it, and our own Triton kernels'
# first-use compile and autotuning (TRITON_PRINT_AUTOTUNING=1 prints those).
PHASES = {"dynamo": "_compile.compile_inner", "aot_joint": "aot_trace_joint_graph",
          "inductor_fwd": "compile_fx.<locals>.fw_compiler_base", "inductor_bwd": "compile_fx.<locals>.bw_compiler",
          "triton_wait": "async_compile.wait"}


def compile_phases(reset: bool = False) -> dict:
    """Seconds per PHASES entry since the last reset (torch._dynamo.utils' process-wide timers)."""
    from torch._dynamo import utils

    if reset:
        utils.compilation_time_metrics.clear()
        return {}
    times = utils.compilation_time_metrics
    return {name: round(sum(times.get(key, [])), 2) for name, key in PHASES.items()}


def profile_step(step, device, rows: int = 15, trace: Path | None = None) -> dict:
    """One step under torch.profiler: the top kernels by GPU time, and the top aten ops by the GPU time they launch;
    with a trace path, also its Chrome trace and (on a GPU) the idle-gap report (gaps.py)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    on_device = device.type == "cuda"
    idle = None
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))  # gzipped by its .gz suffix (a step's trace is tens of MB plain)
        if on_device:
            idle = gaps.report(gaps.idle_gaps(gaps.load(str(trace))))

    def self_us(e):
        return getattr(e, "self_device_time_total", 0.0) if on_device else e.self_cpu_time_total

    def total_us(e):
        return getattr(e, "device_time_total", 0.0) if on_device else e.cpu_time_total

    kernels = [e for e in events if (e.device_type == torch.autograd.DeviceType.CUDA) == on_device and self_us(e) > 0]
    total = sum(self_us(e) for e in kernels) or 1.0
    top = sorted(kernels, key=self_us, reverse=True)[:rows]
    aten = sorted((e for e in events if e.key.startswith("aten::") and total_us(e) > 0), key=total_us, reverse=True)
    return {"clock": "GPU" if on_device else "CPU", "total_ms": total / 1e3,
            "kernels": [{"name": e.key, "ms": self_us(e) / 1e3, "share": self_us(e) / total, "calls": e.count}
                        for e in top],
            "aten": [{"name": e.key, "ms": total_us(e) / 1e3, "calls": e.count} for e in aten[:rows]],
            "idle": idle}


def profile_tables(r: dict) -> str:
    p = r["profile"]
    if p is None:
        return "(no profile: --no-profile)"
    out = [f"### {r['attn']}, {r['mode']}: one step, {p['total_ms']:.1f} ms of {p['clock']} kernel time",
           "", "| kernel | ms | share | calls |", "|---|---|---|---|"]
    out += [f"| `{k['name'][:110]}` | {k['ms']:.2f} | {100 * k['share']:.1f}% | {k['calls']} |" for k in p["kernels"]]
    out += ["", "| aten op (incl. the kernels it launches) | ms | calls |", "|---|---|---|"]
    out += [f"| `{a['name']}` | {a['ms']:.2f} | {a['calls']} |" for a in p["aten"]]
    if p.get("idle"):
        out += ["", "Where the GPU sat idle in that step:", "", p["idle"]]
    return "\n".join(out)
