"""Training-step throughput, dense vs VSA, eager and torch.compile: one Markdown table, plus kernel profiles.

It times `vsa_train.trainer.train_step`, the optimizer step train.py runs, on a run built by the trainer's own
`make_accelerator` + `build_run` from the composed Hydra config (`train` with model=, data=, attn=,
train.batch_size=--batch, train.compile=true|false by the row's mode, logger=none, a one-batch eval set, then
the extra overrides, which win: train.compile=model, say, compiles the whole model instead): grad_accum
micro-steps of the flow-matching loss under accelerate's autocast (bf16 on CUDA through
train.mixed_precision=auto), backward, grad-norm clipping, the all-reduce of the finiteness flags, AdamW with
decay groups (fused on CUDA), EMA if train.ema is set, the lr and sparsity schedules. Only the data loader is
left out: one batch is drawn from the real data stream once, moved to the device once, and `run.train_iter`
becomes `itertools.repeat` of it (so this measures the model, not the video renderer). Every row builds a fresh
run (same seed), warms up (compilation included), then times `--steps` steps between two device
synchronisations; the run is freed (and dynamo reset) before the next row. The step counter starts at 0, so
an attn.schedule=ramp row runs at the ramp's first topk (the table says which). TFLOP/s count the executed
analytic FLOPs the trainer accounts for the timed steps (vsa_train/flops.py: topk in force, coarse stage,
gates); MFU is against `--peak-tflops` (989: H100 dense bf16). Speed-up = dense time / row time in the same
mode. One more step per row runs under torch.profiler: its top kernels (GPU time) and top aten ops (which SDPA
backend ran; copies) are printed. The table so far is printed after every row, so that a run cut short by a
time limit still leaves complete tables.

    python scripts/bench_train_step.py --out DIR                        # dit_120m, synthetic_16k, batch 4
    python scripts/bench_train_step.py --smoke --out DIR                # CPU: dit_tiny on a small video
    python scripts/bench_train_step.py --model wan --rows dense:compile,vsa:compile --out DIR   # diffusers Wan, 120M
"""
import argparse
import gc
import itertools
import json
import re
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.profiler import ProfilerActivity, profile

from vsa_train.data import data_spec
from vsa_train.ops import warm
from vsa_train.trainer import build_run, check_config, make_accelerator, train_step

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import idle_gaps  # noqa: E402  (scripts/idle_gaps.py)


def parse_args(argv=None):
    """The command line's options (or argv's: scripts/bench_faster.py builds its rows' options so)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model config: dit_120m (dit_tiny with --smoke), wan, ...")
    p.add_argument("--data", default="synthetic_16k")
    p.add_argument("--rows", default="dense:eager,vsa:eager,vsa:compile,dense:compile",
                   help="attn:mode[:override...] in the order run (the most wanted row first, in case time runs "
                        "out); a row's own Hydra overrides follow its mode, e.g. "
                        "vsa:compile:model.grad_checkpointing=full:train.batch_size=8")
    p.add_argument("--baseline", default="dense", help="the attn config speed-ups are relative to")
    p.add_argument("--batch", type=int, default=4, help="train.batch_size (per process, per micro-step)")
    p.add_argument("--steps", type=int, default=25, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row (compilation happens here)")
    p.add_argument("--budget", type=float, default=1e9, help="seconds; a row that may not fit is skipped")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="caps this process's CUDA memory (torch.cuda.set_per_process_memory_fraction), e.g. 80 "
                        "to ask whether a row fits an 80 GB H100 on a larger card; a row that does not fit fails")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler step after each row")
    p.add_argument("--trace", type=Path, default=None,
                   help="folder: each row's profiled step's Chrome trace goes there (<n>_<attn>_<mode>[_overrides]"
                        ".json.gz, n counting rows), and on a GPU "
                        "the row prints where the device sat idle in it (scripts/idle_gaps.py)")
    p.add_argument("--out", type=Path, default=None, help="writes results.json here")
    p.add_argument("--smoke", action="store_true", help="CPU check: dit_tiny (or --model), 4x16x16 video, 2 steps")
    p.add_argument("override", nargs="*", help="extra Hydra overrides of the train config, e.g. attn.sparsity=0.9")
    args = p.parse_args(argv)
    args.model = args.model or ("dit_tiny" if args.smoke else "dit_120m")  # --smoke keeps an explicit --model
    if args.smoke:
        args.data, args.batch, args.steps, args.warmup = "synthetic", 2, 2, 1
        args.override = [*args.override, "data.frames=4", "data.height=16", "data.width=16"]
    return args


def load_cfg(args, attn: str, compiled: bool, row_overrides=()):
    """The `train` config a row's run is built from; the user's overrides, then the row's own, come last and win."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=[
            f"model={args.model}", f"data={args.data}", f"attn={attn}", f"train.batch_size={args.batch}",
            f"train.compile={str(compiled).lower()}", "logger=none", f"train.eval_samples={args.batch}",
            "train.eval_timesteps=1", *args.override, *row_overrides])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fixed_batch(run) -> dict:
    """One batch of the run's real data stream, on the device; the stream (and its workers) is then shut down
    and `run.train_iter` repeats this batch, so that train_step's host-to-device copies are no-ops."""
    device = run.accelerator.device
    batch = next(run.train_iter)
    # What train_step copies to the device goes there now; the rest (stream positions: its per-sample noise
    # draws read them on the host) stays as the loader gives it. Bad inputs met while loading are not repeated.
    batch = {k: v.to(device) if k in ("video", "text", "text_mask") else v for k, v in batch.items()
             if k != "skipped"}
    # Persistent DataLoader workers would keep rendering batches in the background while the steps are timed:
    # drop the iterator and the loader that holds it (the last reference shuts the workers down).
    run.train_iter = None
    run.data.train = None
    gc.collect()
    run.train_iter = itertools.repeat(batch)
    return batch


def steps(run, n: int) -> None:
    """n trainer steps; a non-finite one (which skips the update, so would time something else) fails the row."""
    for _ in range(n):
        result = train_step(run)
        if not result.ok:
            raise FloatingPointError(f"non-finite loss ({result.loss}) or grad norm ({result.grad_norm}) at step "
                                     f"{run.state.step + 1}: the update was skipped, the timing would be wrong")


def measure(cfg, args, name: str = "row") -> dict:
    """Builds the row's run, warms up, times, profiles one step (its trace: <name>.json.gz), frees the run."""
    check_config(cfg, data_spec(cfg.data))
    t0 = time.perf_counter()
    run = build_run(cfg, make_accelerator(cfg))
    try:
        return _measure(run, args, build_s=time.perf_counter() - t0, name=name)
    finally:
        free(run)


def _measure(run, args, build_s: float, name: str) -> dict:
    device, cfg = run.accelerator.device, run.cfg
    fixed_batch(run)
    run.model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    compile_phases(reset=True)
    t0 = time.perf_counter()
    steps(run, 1)  # compilation happens here: the time a user waits for the first step once the model is built
    sync(device)
    first_step_s = time.perf_counter() - t0
    phases = compile_phases()
    steps(run, args.warmup - 1)
    sync(device)
    warmup_s = time.perf_counter() - t0
    before = (run.state.samples, run.state.flops, run.state.flops_dense)
    topk = run.sparsity.topk(run.state.step)  # in force at the first timed step (a ramp may move it later)
    t0 = time.perf_counter()
    steps(run, args.steps)
    sync(device)
    elapsed = time.perf_counter() - t0
    # Between steps (gradients freed): weights, optimizer state, EMA. With one set of gradients, what a step
    # holds whatever its batch; the rest of the peak grows with the batch.
    static_gib = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None
    grad_gib = sum(p.numel() * p.element_size() for p in run.model.parameters() if p.requires_grad) / 2**30
    samples = run.state.samples - before[0]
    samples_per_s = samples / elapsed
    flops, flops_dense = (run.state.flops - before[1]) / samples, (run.state.flops_dense - before[2]) / samples
    row = {"attn": cfg.attn.name, "mode": "compile" if cfg.train.compile else "eager", "batch": cfg.train.batch_size,
           "global_batch": run.global_batch, "precision": run.accelerator.mixed_precision, "steps": args.steps,
           "build_s": build_s, "first_step_s": first_step_s, "warmup_s": warmup_s,
           "step_ms": 1e3 * elapsed / args.steps, "samples/s": samples_per_s,
           "flops_per_sample": flops, "flops_per_sample_dense": flops_dense, "TFLOP/s": samples_per_s * flops / 1e12,
           "topk": topk, "tiles": run.sparsity.tiles}
    row["MFU"] = row["TFLOP/s"] / args.peak_tflops if device.type == "cuda" else None
    row["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    row["reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None
    row["static_GiB"], row["grad_GiB"] = static_gib, grad_gib
    row["grad_checkpointing"] = cfg.model.get("grad_checkpointing", "none")
    row["compile"] = str(cfg.train.compile)
    row["compile_phases"] = phases
    trace = None if args.trace is None else args.trace / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.json.gz"
    row["profile"] = None if args.no_profile else profile_step(lambda: steps(run, 1), device, trace=trace)
    row["trainer_steps"] = run.state.step  # optimizer steps taken by vsa_train.trainer.train_step: warm-up + timed + 1
    return row


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


def free(run) -> None:
    """Releases a row's model, optimizer, EMA and batch before the next row is built."""
    warm.join()  # a row that failed before its first step may leave the kernel warm-up running
    run.accelerator.free_memory()
    run.model = run.optimizer = run.ema = run.train_iter = run.data = run.eval_set = None
    torch._dynamo.reset()  # the next row compiles from scratch, its shapes unmarked by this row's
    free_cache()


def free_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def profile_step(step, device, rows: int = 15, trace: Path | None = None) -> dict:
    """One step under torch.profiler: the top kernels by GPU time, and the top aten ops by the GPU time they launch;
    with a trace path, also its Chrome trace and (on a GPU) the idle-gap report of scripts/idle_gaps.py."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.key_averages()
    on_device = device.type == "cuda"
    idle = None
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))  # gzipped by its .gz suffix (a step's trace is tens of MB plain)
        if on_device:
            idle = idle_gaps.report(idle_gaps.idle_gaps(idle_gaps.load(str(trace))))

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


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def _setting(r: dict) -> tuple:
    """What a row shares with its baseline: the mode and the row's own overrides."""
    return r["mode"], tuple(r.get("overrides", ()))


def table(results: list[dict], baseline: str) -> str:
    lines = [("| attention | mode | row overrides | batch | step ms | samples/s | speed-up vs dense (same setting) "
              "| TFLOP/s executed | MFU % | FLOPs/sample executed (dense) | topk / tiles | peak GiB (reserved) "
              "| build s | first step s | warm-up s |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {_setting(r): r for r in results if r["attn"] == baseline}
    for r in results:
        b = base.get(_setting(r))
        speedup = b["step_ms"] / r["step_ms"] if b else None
        sel = "all" if r["topk"] is None else f"{r['topk']} / {r['tiles']}"
        reserved = f" ({r['reserved_GiB']:.1f})" if r.get("reserved_GiB") is not None else ""
        lines.append(f"| {r['attn']} | {r['mode']} | {' '.join(r.get('overrides', ())) or '-'} | {r['batch']} | "
                     f"{r['step_ms']:.1f} | {r['samples/s']:.2f} | {fmt(speedup, '.2f') + '×' if speedup else 'n/a'} | "
                     f"{r['TFLOP/s']:.3g} | "
                     f"{fmt(r['MFU'] and 100 * r['MFU'], '.1f')} | "
                     f"{r['flops_per_sample']:.3e} ({r['flops_per_sample_dense']:.3e}) | {sel} | "
                     f"{fmt(r['peak_GiB'], '.1f')}{reserved} | {r.get('build_s', 0):.0f} | "
                     f"{r.get('first_step_s', 0):.0f} | {r['warmup_s']:.0f} |")
    return "\n".join(lines)


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


def main():
    args = parse_args()
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # No TF32 for fp32 matmuls, as in train.py: VSA's coarse scores are fp32 so that top-k selections do not flip.
    if args.warmup < 1:
        raise SystemExit(f"--warmup must be at least 1 (the first step compiles), got {args.warmup}")
    if args.memory_cap_gib is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total))
    rows = [r.strip().split(":") for r in args.rows.split(",") if r.strip()]
    if not rows or any(len(r) < 2 or r[1] not in ("eager", "compile") or not all("=" in o for o in r[2:])
                       for r in rows):
        raise SystemExit(f"--rows must be attn:mode[:key=value...] with mode eager or compile, got {args.rows!r}")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"model {args.model}, data {args.data}, batch {args.batch}, {args.warmup} warm-up + {args.steps} timed "
          f"steps per row, overrides {args.override}", flush=True)
    results = []
    for attn, mode, *extra in rows:
        name = " ".join([attn, mode, *extra])
        spent = time.perf_counter() - start
        if spent + (45 if mode == "compile" else 15) > args.budget:  # rather skip than be killed mid-row
            print(f"skipped {name}: {spent:.0f} s of the {args.budget:.0f} s budget spent", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            row = measure(load_cfg(args, attn, compiled=mode == "compile", row_overrides=extra), args,
                          name=f"{len(results) + 1}_{name}")
        except Exception as e:  # noqa: BLE001 (one failing row must not lose the others; its error is printed)
            oom = isinstance(e, torch.OutOfMemoryError)
            print(f"FAILED {name}: {type(e).__name__}: {str(e)[:300 if oom else 2000]}", flush=True)
            del e
            free_cache()  # the failed row's tensors were held by the traceback until now
            continue
        row["overrides"] = extra
        results.append(row)
        print(f"\ndone {name}: {row['samples/s']:.2f} samples/s, {row['step_ms']:.1f} ms/step "
              f"(trainer step, {row['precision']} precision, global batch {row['global_batch']}), warm-up "
              f"{row['warmup_s']:.0f} s, row {time.perf_counter() - t0:.0f} s\n"
              f"first step {row['first_step_s']:.1f} s after a {row['build_s']:.1f} s build; compile phases (s): "
              f"{row['compile_phases']}\n\n{profile_tables(row)}\n\n"
              f"Table so far:\n\n{table(results, args.baseline)}", flush=True)
        if args.out:  # after every row, so that a timeout keeps what was measured
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n## Training step: dense vs VSA (final)\n\n{table(results, args.baseline)}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
