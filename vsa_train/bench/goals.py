"""The performance goals in one call: the VSA op, the dq check with offset keys and the training step, one table.

Runs, in one process, what each goal needs and nothing more, through the functions of the op and step
benchmarks (their own tables are printed as each part runs):
  op    op.bench_size at 16K tokens D=64 and 32K D=128 (B=1 or --op-batch, 12 heads, bf16, 87.5% sparse):
        fwd+bwd speed-up of the tiled full op over dense cuDNN SDPA, eager and CUDA-graphed, and the fine stage's
        effective TFLOP/s (the op benchmark's count), forward and forward+backward, at 32K;
  dq    accuracy.run_offset_checks in bf16 at D=64 and 128: the Triton fine stage's dq error with centred
        keys against dense SDPA's, and their output errors (vs float64);
  step  step.load_cfg + step.measure (the trainer's own training step, compiled, no profile step):
        dense and VSA at dit_120m (batch 4) and dit_1b (batch 2), synthetic_16k, 2 warm-up + --steps timed steps:
        dense MFU and the VSA/dense step-time ratio.
The last lines are one Markdown table, `| goal | target | measured | met? |`, one row per goal. A speed-up goal is
met on the eager tiled op (the graphed figure stands beside it); the fine-stage goals on eager TFLOP/s. A part
that raises prints `FAILED ...` and its goals say "failed: <ExceptionType>"; one that may not fit --budget is not
started ("not run (budget)"); SIGTERM (the shell's timeout) stops the run and still prints the table.

    python -u -m vsa_train.bench goals --out DIR                 # every goal, ~6 min on an H100/H200
    python -u -m vsa_train.bench goals --only op,dq              # the op's goals alone (no training step)
    python -u -m vsa_train.bench goals --only op --op-batch 4    # the op at the dit_120m step's batch
    python -u -m vsa_train.bench goals --dit1b-policy selective  # dit_1b dense needs ~87 GiB without checkpointing
    SMOKE=1 TRITON_INTERPRET=1 python -m vsa_train.bench goals   # CPU: tiny sizes, fp32 dq, dit_tiny eager
"""
import argparse
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..ops import KernelOptions
from . import accuracy, op, step
from .common import SMOKE, card, positive, require_device, versions

MODELS = {"dit_120m": 4, "dit_1b": 2}  # model: batch of the step goals
# Seconds a unit may take on an H100/H200, compilation included (cold caches): a unit that may not fit in
# --budget is not started, rather than cut by the caller's timeout.
ESTIMATE_S = {"op:16k": 40, "op:32k": 40, "dq": 20, "step:dit_120m": 45, "step:dit_1b": 80}
# "Outputs no worse": both outputs' errors are the bf16 rounding of the output (~2.3e-3 on the GPU), which moves
# by a few percent between kernels; a quarter more is still rounding, a real regression is several times more.
OUT_SLACK = 1.25
# What SMOKE=1 runs in place of each part's GPU sizes (the CPU interpreter's bf16 dot is garbage: fp32).
SMOKE_RAN = {"op": "tiny: 512 tokens, D=64, fp32", "dq": "fp32", "step": "dit_tiny, batch 2, eager"}
FAIL_ENV = "BENCH_GOALS_FAIL"  # comma-separated unit names that raise instead of running (the tests' forced failure)


class TimeLimit(BaseException):
    """SIGTERM arrived (the shell's timeout): stop measuring, print the table of what was measured."""


SIGTERM_STATE = {"measuring": False, "stopped": False}


def on_sigterm(signum, frame):
    """Cuts the unit being measured; between units (printing, saving) only stops the next from starting."""
    SIGTERM_STATE["stopped"] = True
    if SIGTERM_STATE["measuring"]:
        raise TimeLimit()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m vsa_train.bench goals", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", type=parts, default="op,dq,step", help="comma-separated parts: op, dq, step")
    p.add_argument("--dit1b-policy", choices=("none", "selective"), default="none",
                   help="model.grad_checkpointing of the dit_1b rows: the goal is none (~87 GiB); selective fits 80 GB")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per row (default 6; 2 with SMOKE=1)")
    p.add_argument("--op-batch", type=positive, default=1,
                   help="batch of the op rows (default 1; at 1 the 16K op is host-bound in eager mode)")
    p.add_argument("--rep", type=int, default=100, help="ms of timed runs per op measurement (do_bench rep)")
    p.add_argument("--budget", type=float, default=1e9, help="seconds; a unit that may not fit is not started")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="MFU's peak (989: H100/H200 dense bf16)")
    p.add_argument("--out", type=Path, default=None, help="writes results.json (goal table and parts) here")
    return p.parse_args(argv)


def parts(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    if not chosen or not set(chosen) <= {"op", "dq", "step"}:
        raise argparse.ArgumentTypeError(f"a comma-separated subset of op,dq,step, got {text!r}")
    return chosen


# --- the units: each returns what the goals read; a unit is the smallest thing --budget skips ---------------------

def op_unit(size: str, args, cache: dict) -> dict:
    """bench_size's rows at `size` (tiny under SMOKE: both sizes share one run)."""
    name = "tiny" if SMOKE else size
    if name not in cache:
        cache[name] = op.bench_size(name, profile=False, flex=False, rep_ms=args.rep, batch=args.op_batch)
    return cache[name]


def dq_unit() -> dict:
    """run_offset_checks at D=64 and 128: {(dtype, D, row): (out error, dq error)}."""
    dtype = torch.float32 if SMOKE else torch.bfloat16  # the interpreter's bf16 dot is garbage
    return accuracy.run_offset_checks([dtype], [KernelOptions()], labelled=False, dims=(64, 128))


def step_unit(model: str, attn: str, args) -> dict:
    """One step-benchmark row: the trainer's own step, compiled, timed, no profile step."""
    argv = ["--smoke"] if SMOKE else ["--model", model, "--batch", str(MODELS[model]), "--warmup", "2"]
    targs = step.parse_args([*argv, "--no-profile", "--peak-tflops", str(args.peak_tflops)])
    if args.steps:  # --smoke sets its own 2
        targs.steps = args.steps
    elif not SMOKE:
        targs.steps = 6
    extra = [f"model.grad_checkpointing={args.dit1b_policy}"] if model == "dit_1b" else []
    # CPU inductor takes ~15 s per dit_tiny row, beyond a smoke test: SMOKE runs the same rows eager.
    cfg = step.load_cfg(targs, attn, compiled=not SMOKE, row_overrides=extra)
    row = step.measure(cfg, targs)
    row["overrides"], row["model"] = extra, targs.model
    return row


def units(args) -> list[tuple[str, Callable[[], object]]]:
    cache = {}
    chosen = [("op:16k", lambda: op_unit("16k", args, cache)), ("op:32k", lambda: op_unit("32k", args, cache)),
              ("dq", dq_unit)]
    chosen += [(f"step:{m}:{a}", lambda m=m, a=a: step_unit(m, a, args)) for m in MODELS for a in ("dense", "vsa")]
    return [(name, fn) for name, fn in chosen if name.split(":")[0] in args.only]


def estimate(unit: str) -> float:
    return ESTIMATE_S.get(unit, ESTIMATE_S.get(unit.rsplit(":", 1)[0], 60))


def run_units(args, start: float, save) -> tuple[dict, dict]:
    """Runs the units in order: {unit: result} and {unit: why it has none} ("not run (budget)", "failed: X")."""
    results, status = {}, {}
    forced = set(filter(None, os.environ.get(FAIL_ENV, "").split(",")))
    todo = units(args)
    for i, (name, fn) in enumerate(todo):
        if SIGTERM_STATE["stopped"]:
            status.update({later: "not run (time limit)" for later, _ in todo[i:]})
            break
        spent = time.perf_counter() - start
        if spent + estimate(name) > args.budget:  # rather skip than be killed mid-unit
            print(f"skipped {name}: {spent:.0f} s of the {args.budget:.0f} s budget spent, it may take "
                  f"{estimate(name):.0f} s", flush=True)
            status[name] = "not run (budget)"
            continue
        t0 = time.perf_counter()
        try:
            SIGTERM_STATE["measuring"] = True
            if name in forced:
                raise RuntimeError(f"forced by {FAIL_ENV}")
            results[name] = fn()
            SIGTERM_STATE["measuring"] = False
        except TimeLimit:
            print(f"\nSIGTERM (time limit) in {name}: the table below has what was measured before it", flush=True)
            status[name] = "cut (time limit)"
        except Exception as e:  # noqa: BLE001 (one failing unit must not lose the others; its error is printed)
            SIGTERM_STATE["measuring"] = False  # from here on a SIGTERM only stops the next unit
            print(f"FAILED {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            status[name] = f"failed: {type(e).__name__}"
            del e
            step.free_cache()  # the failed unit's tensors were held by the traceback until now
        print(f"({name} took {time.perf_counter() - t0:.0f} s)", flush=True)
        if name.startswith("step:"):
            print_step_table(name.split(":")[1], results)
        save(results, status)
    return results, status


def print_step_table(model: str, results: dict) -> None:
    """The step benchmark's table of this model's rows so far (one table per model: its baseline is per setting)."""
    rows = [r for unit, r in results.items() if unit.startswith(f"step:{model}:")]
    if rows:
        print(f"\n## Training step: dense vs VSA, {rows[0]['model']} (step benchmark rows)\n\n"
              f"{step.table(rows, 'dense')}\n", flush=True)


# --- the goals: (goal, target, units it reads, cell(results) -> (measured, met or None)) --------------------------

def op_speedup(rows: dict, target: float):
    tiled = rows["VSA full op, tiled"]
    eager, graphed = tiled.get("fwd_bwd_speedup"), tiled.get("graphed_fwd_bwd_speedup")
    if eager is None:
        return f"eager: {tiled['fwd_bwd_ms']}", None
    graphed = f"{graphed:.2f}×" if graphed is not None else tiled["graphed_fwd_bwd_ms"]
    return f"{eager:.2f}× eager, tiled op (graphed: {graphed})", eager >= target


def fine_tflops(rows: dict, key: str, target: float):
    fine = rows["VSA fine stage"]
    eager, graphed = fine.get(f"{key}_tflops"), fine.get(f"graphed_{key}_tflops")
    if eager is None:
        return f"eager: {fine[f'{key}_ms']}", None
    graphed = f"{graphed:.0f}" if graphed is not None else fine[f"graphed_{key}_ms"]  # the op benchmark's count
    return f"{eager:.0f} TFLOP/s eager (graphed: {graphed})", eager >= target


def mfu(row: dict, target: float):
    note = "" if row["grad_checkpointing"] == "none" else \
        f"; model.grad_checkpointing={row['grad_checkpointing']}, not none as the goal says"
    detail = f"{row['samples/s']:.2f} samples/s, {row['step_ms']:.0f} ms/step, batch {row['batch']}{note}"
    if row["MFU"] is None:
        return f"n/a without CUDA ({detail})", None
    return f"{100 * row['MFU']:.1f}% ({detail})", row["MFU"] >= target


def step_ratio(dense: dict, vsa: dict, target: float):
    ratio = dense["step_ms"] / vsa["step_ms"]
    flops = dense["flops_per_sample"] / vsa["flops_per_sample"]
    note = "" if dense["grad_checkpointing"] == "none" else f"; model.grad_checkpointing={dense['grad_checkpointing']}"
    return (f"{ratio:.2f}× (dense {dense['step_ms']:.0f} ms, VSA {vsa['step_ms']:.0f} ms per step; executed-FLOPs "
            f"ratio {flops:.2f}×{note})"), ratio >= target


def dq_error(rows: dict, D: int):
    dtype = "float32" if SMOKE else "bfloat16"
    (fine_out, fine_dq), (dense_out, dense_dq) = rows[(dtype, D, "fine, centred")], rows[(dtype, D, "dense SDPA")]
    return (f"dq {fine_dq:.1e} vs dense {dense_dq:.1e} ({fine_dq / dense_dq:.2f}×); out {fine_out:.1e} vs "
            f"{dense_out:.1e}"), fine_dq <= 0.5 * dense_dq and fine_out <= OUT_SLACK * dense_out


def goals(op_batch: int = 1) -> list[tuple]:
    dq_target = f"dq ≤ ½ dense SDPA's; out ≤ dense's (×{OUT_SLACK:g}: rounding)"
    b = f"batch {op_batch}"
    return [
        (f"op fwd+bwd speed-up over cuDNN SDPA, 16K tokens D=64, {b}", "≥ 4.5× (eager, tiled)", ["op:16k"],
         lambda r: op_speedup(r["op:16k"], 4.5)),
        (f"op fwd+bwd speed-up over cuDNN SDPA, 32K tokens D=128, {b}", "≥ 6× (eager, tiled)", ["op:32k"],
         lambda r: op_speedup(r["op:32k"], 6.0)),
        (f"fine stage forward, 32K D=128, {b}", "≥ 450 TFLOP/s", ["op:32k"],
         lambda r: fine_tflops(r["op:32k"], "fwd", 450)),
        (f"fine stage forward+backward, 32K D=128, {b}", "≥ 400 TFLOP/s", ["op:32k"],
         lambda r: fine_tflops(r["op:32k"], "fwd_bwd", 400)),
        ("dense dit_120m MFU, compiled, batch 4, synthetic_16k", "≥ 45%", ["step:dit_120m:dense"],
         lambda r: mfu(r["step:dit_120m:dense"], 0.45)),
        ("dense dit_1b MFU, compiled, batch 2, synthetic_16k", "≥ 50% (no checkpointing)", ["step:dit_1b:dense"],
         lambda r: mfu(r["step:dit_1b:dense"], 0.50)),
        ("VSA/dense step-time ratio, dit_120m", "≥ 2.6×", ["step:dit_120m:dense", "step:dit_120m:vsa"],
         lambda r: step_ratio(r["step:dit_120m:dense"], r["step:dit_120m:vsa"], 2.6)),
        ("VSA/dense step-time ratio, dit_1b", "≥ 1.7× (no checkpointing)", ["step:dit_1b:dense", "step:dit_1b:vsa"],
         lambda r: step_ratio(r["step:dit_1b:dense"], r["step:dit_1b:vsa"], 1.7)),
        ("dq error with offset keys, bf16, D=64: Triton fine stage (centred)", dq_target, ["dq"],
         lambda r: dq_error(r["dq"], 64)),
        ("dq error with offset keys, bf16, D=128: Triton fine stage (centred)", dq_target, ["dq"],
         lambda r: dq_error(r["dq"], 128)),
    ]


def goal_rows(results: dict, status: dict, op_batch: int = 1) -> list[dict]:
    rows = []
    for goal, target, needs, cell in goals(op_batch):
        missing = [u for u in needs if u not in results]
        if missing:  # the first reason there is no number: failed, not run (budget, time limit), or not chosen
            why = status.get(missing[0], "not run (--only)")
            measured, met = why + (f" — {missing[0]}" if len(needs) > 1 else ""), None
        else:
            try:
                measured, met = cell(results)
            except Exception as e:  # noqa: BLE001 (a row whose numbers are missing must not lose the table)
                measured, met = f"failed: {type(e).__name__} (reading the results: {e})", None
        if SMOKE:  # the goal names the GPU size; say what ran instead
            measured = f"[{SMOKE_RAN[needs[0].split(':')[0]]}] {measured}"
        rows.append({"goal": goal, "target": target, "measured": measured,
                     "met": "-" if met is None else ("yes" if met else "no")})
    return rows


def goal_table(rows: list[dict]) -> str:
    lines = ["| goal | target | measured | met? |", "|---|---|---|---|"]
    return "\n".join(lines + [f"| {r['goal']} | {r['target']} | {r['measured']} | {r['met']} |" for r in rows])


def jsonable(results: dict) -> dict:
    """The dq rows are keyed by tuples: a list of records instead."""
    out = dict(results)
    if "dq" in out:
        out["dq"] = [{"dtype": d, "D": D, "row": row, "out": o, "dq": q} for (d, D, row), (o, q) in out["dq"].items()]
    return out


def main(argv=None):
    args = parse_args(argv)
    require_device("goals")
    start = time.perf_counter()
    measured_on = versions()
    print(card())
    print(f"parts {','.join(args.only)}, dit_1b policy {args.dit1b_policy}, steps {args.steps or (2 if SMOKE else 6)}, "
          f"op batch {args.op_batch}, rep {args.rep} ms, budget {args.budget:.0f} s", flush=True)
    signal.signal(signal.SIGTERM, on_sigterm)

    def save(results, status, rows=None):  # after every unit, so that a SIGKILL still leaves what was measured
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            record = {**measured_on, "args": {k: str(v) for k, v in vars(args).items()}, "goals": rows,
                      "status": status, "results": jsonable(results)}
            (args.out / "results.json").write_text(json.dumps(record, indent=1, default=str))

    results, status = run_units(args, start, save)
    rows = goal_rows(results, status, args.op_batch)
    save(results, status, rows)
    print(f"\n## Goals{' (smoke: numbers are not measurements)' if SMOKE else ''}\n\n{goal_table(rows)}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
