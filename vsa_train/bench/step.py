"""Training-step throughput, dense vs VSA, eager and torch.compile: one Markdown table, plus kernel profiles.

It times the trainer's own optimizer step (the one train.py runs) on a run built by the trainer itself
(`trainer_target`, the one function here that knows the trainer's API) from the composed Hydra config
(`train` with model=, data=, attn=, train.batch_size=--batch, train.compile=true|false by the row's mode,
logger=none, a one-batch eval set, then
the extra overrides, which win: train.compile=model, say, compiles the whole model instead): grad_accum
micro-steps of the flow-matching loss under accelerate's autocast (bf16 on CUDA through
train.mixed_precision=auto), backward, grad-norm clipping, the all-reduce of the finiteness flags, AdamW with
decay groups (fused on CUDA), EMA if train.ema is set, the lr and sparsity schedules. Only the data loader is
left out: one batch is drawn from the real data stream once, moved to the device once, and every step
repeats it (so this measures the model, not the video renderer). Every row builds a fresh
run (same seed), warms up (compilation included), then times `--steps` steps between two device
synchronisations; the run is freed (and dynamo reset) before the next row. The step counter starts at 0, so
an attn.schedule=ramp row runs at the ramp's first topk (the table says which). TFLOP/s count the executed
analytic FLOPs the trainer accounts for the timed steps (vsa_train/flops.py: topk in force, coarse stage,
gates); MFU is against `--peak-tflops` (989: H100 dense bf16). Speed-up = dense time / row time in the same
mode. One more step per row runs under torch.profiler: its top kernels (GPU time) and top aten ops (which SDPA
backend ran; copies) are printed. The table so far is printed after every row, so that a run cut short by a
time limit still leaves complete tables.

    python -m vsa_train.bench step --out DIR                   # dit_120m, synthetic_16k, batch 4
    python -m vsa_train.bench step --smoke --out DIR           # CPU: dit_tiny on a small video
    python -m vsa_train.bench step --model wan --rows dense:compile,vsa:compile --out DIR   # diffusers Wan, 120M
"""
import argparse
import gc
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from .common import CONFIGS
from .profiling import compile_phases, profile_step, profile_tables


@dataclass
class StepTarget:
    """What the step benchmarks read of a built training run (made by `trainer_target` alone)."""

    step: Callable[[], bool]          # one optimizer step of the trainer; False if it skipped the update
    batch: dict                       # the one batch every step repeats, on the device
    model: torch.nn.Module
    device: torch.device
    autocast: Callable                # the run's autocast context
    counters: Callable[[], tuple]     # (optimizer steps, samples, executed FLOPs, dense FLOPs) so far
    topk: Callable[[], int | None]    # the top-k in force at the next step (None: dense)
    facts: dict                       # precision, global_batch, tiles: what the table reports of the run
    close: Callable[[], None]         # frees the model, optimizer, EMA and data


def trainer_target(cfg) -> StepTarget:
    """The one function that knows the trainer's API (docs/design.md, 'The trainer'): builds a run as train.py
    does, then `Run.repeat_batch` (one batch of its stream on the device, the stream's workers shut down, every step
    repeating it). Re-point this function, and only it, when the trainer changes."""
    from ..config_schema import typed
    from ..trainer import build_run, make_accelerator, train_step

    config = typed(cfg)  # ConfigError listing every problem, as train.py's check
    run = build_run(config, make_accelerator(config))
    batch = run.repeat_batch()
    run.model.train()
    s = run.state
    return StepTarget(
        step=lambda: train_step(run).ok, batch=batch, model=run.model, device=run.accelerator.device,
        autocast=run.accelerator.autocast, counters=lambda: (s.step, s.samples, s.flops, s.flops_dense),
        topk=lambda: run.sparsity.topk(s.step), close=run.close,
        facts={"precision": run.accelerator.mixed_precision, "global_batch": run.global_batch,
               "tiles": run.sparsity.tiles})


def parse_args(argv=None):
    """The command line's options (or argv's: the goals benchmark builds its rows' options so)."""
    p = argparse.ArgumentParser(prog="python -m vsa_train.bench step", description=__doc__.splitlines()[0])
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
                        ".json.gz, n counting rows), and on a GPU the row prints where the device sat idle in it "
                        "(`python -m vsa_train.bench gaps`)")
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
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="train", overrides=[
            f"model={args.model}", f"data={args.data}", f"attn={attn}", f"train.batch_size={args.batch}",
            f"train.compile={str(compiled).lower()}", "logger=none", f"train.eval_samples={args.batch}",
            "train.eval_timesteps=1", *args.override, *row_overrides])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def steps(target: StepTarget, n: int) -> None:
    """n trainer steps; a non-finite one (which skips the update, so would time something else) fails the row."""
    for _ in range(n):
        if not target.step():
            raise FloatingPointError(f"non-finite loss or grad norm at step {target.counters()[0]}: the update was "
                                     f"skipped, the timing would be wrong")


def measure(cfg, args, name: str = "row") -> dict:
    """Builds the row's run, warms up, times, profiles one step (its trace: <name>.json.gz), frees the run."""
    t0 = time.perf_counter()
    target = trainer_target(cfg)
    try:
        row = _time(target, args, build_s=time.perf_counter() - t0)
        row.update(describe(cfg, target, args))
        row["MFU"] = row["TFLOP/s"] / args.peak_tflops if target.device.type == "cuda" else None
        trace = None if args.trace is None else args.trace / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.json.gz"
        row["profile"] = None if args.no_profile else profile_step(lambda: steps(target, 1), target.device,
                                                                   trace=trace)
        row["trainer_steps"] = target.counters()[0]  # optimizer steps taken: warm-up + timed + 1
        return row
    finally:
        target.close()
        torch._dynamo.reset()  # the next row compiles from scratch, its shapes unmarked by this row's
        free_cache()


def _time(target: StepTarget, args, build_s: float) -> dict:
    """The first step (compilation), the warm-up, then args.steps timed steps: times, rates, memory."""
    device = target.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    compile_phases(reset=True)
    t0 = time.perf_counter()
    steps(target, 1)  # compilation happens here: the time a user waits for the first step once the model is built
    sync(device)
    first_step_s, phases = time.perf_counter() - t0, compile_phases()
    steps(target, args.warmup - 1)
    sync(device)
    warmup_s = time.perf_counter() - t0
    _, *before = target.counters()
    topk = target.topk()  # in force at the first timed step (a ramp may move it later)
    t0 = time.perf_counter()
    steps(target, args.steps)
    sync(device)
    elapsed = time.perf_counter() - t0
    _, *after = target.counters()
    samples = after[0] - before[0]
    flops, flops_dense = (after[1] - before[1]) / samples, (after[2] - before[2]) / samples
    cuda = device.type == "cuda"
    return {"steps": args.steps, "build_s": build_s, "first_step_s": first_step_s, "warmup_s": warmup_s,
            "compile_phases": phases, "step_ms": 1e3 * elapsed / args.steps, "samples/s": samples / elapsed,
            "flops_per_sample": flops, "flops_per_sample_dense": flops_dense,
            "TFLOP/s": samples / elapsed * flops / 1e12, "topk": topk,
            # Between steps (gradients freed): weights, optimizer state, EMA. With one set of gradients, what a
            # step holds whatever its batch; the rest of the peak grows with the batch.
            "static_GiB": torch.cuda.memory_allocated() / 2**30 if cuda else None,
            "grad_GiB": sum(p.numel() * p.element_size() for p in target.model.parameters() if p.requires_grad) / 2**30,
            "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "reserved_GiB": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}


def describe(cfg, target: StepTarget, args) -> dict:
    """What the row ran: attention, mode, batch, precision, checkpointing."""
    return {"attn": cfg.attn.name, "mode": "compile" if cfg.train.compile else "eager", "batch": cfg.train.batch_size,
            **target.facts, "grad_checkpointing": cfg.model.get("grad_checkpointing", "none"),
            "compile": str(cfg.train.compile)}


def free_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


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


def parse_rows(text: str) -> list[list[str]]:
    rows = [r.strip().split(":") for r in text.split(",") if r.strip()]
    if not rows or any(len(r) < 2 or r[1] not in ("eager", "compile") or not all("=" in o for o in r[2:])
                       for r in rows):
        raise SystemExit(f"--rows must be attn:mode[:key=value...] with mode eager or compile, got {text!r}")
    return rows


def run_row(args, attn: str, mode: str, extra: list, n: int) -> dict | None:
    """One row measured and printed (with the table so far), or None if it failed (its error printed)."""
    name = " ".join([attn, mode, *extra])
    t0 = time.perf_counter()
    try:
        row = measure(load_cfg(args, attn, compiled=mode == "compile", row_overrides=extra), args, name=f"{n}_{name}")
    except Exception as e:  # noqa: BLE001 (one failing row must not lose the others; its error is printed)
        oom = isinstance(e, torch.OutOfMemoryError)
        print(f"FAILED {name}: {type(e).__name__}: {str(e)[:300 if oom else 2000]}", flush=True)
        del e
        free_cache()  # the failed row's tensors were held by the traceback until now
        return None
    row["overrides"] = extra
    print(f"\ndone {name}: {row['samples/s']:.2f} samples/s, {row['step_ms']:.1f} ms/step "
          f"(trainer step, {row['precision']} precision, global batch {row['global_batch']}), warm-up "
          f"{row['warmup_s']:.0f} s, row {time.perf_counter() - t0:.0f} s\n"
          f"first step {row['first_step_s']:.1f} s after a {row['build_s']:.1f} s build; compile phases (s): "
          f"{row['compile_phases']}\n\n{profile_tables(row)}", flush=True)
    return row


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.warmup < 1:
        raise SystemExit(f"--warmup must be at least 1 (the first step compiles), got {args.warmup}")
    if args.memory_cap_gib is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total))
    rows = parse_rows(args.rows)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"model {args.model}, data {args.data}, batch {args.batch}, {args.warmup} warm-up + {args.steps} timed "
          f"steps per row, overrides {args.override}", flush=True)
    results = []
    for attn, mode, *extra in rows:
        spent = time.perf_counter() - start
        if spent + (45 if mode == "compile" else 15) > args.budget:  # rather skip than be killed mid-row
            print(f"skipped {' '.join([attn, mode, *extra])}: {spent:.0f} s of the {args.budget:.0f} s budget spent",
                  flush=True)
            continue
        row = run_row(args, attn, mode, extra, len(results) + 1)
        if row is None:
            continue
        results.append(row)
        print(f"\nTable so far:\n\n{table(results, args.baseline)}", flush=True)
        if args.out:  # after every row, so that a timeout keeps what was measured
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n## Training step: dense vs VSA (final)\n\n{table(results, args.baseline)}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
