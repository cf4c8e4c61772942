"""`python -m vsa_train.bench goals`: the goals in one table; a CPU smoke run, a failing unit, refused options."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vsa_train.bench import goals as bench

ROOT = Path(__file__).resolve().parents[2]
GOALS = 10
# One intra-op thread: the tiny rows run 3x faster so on a shared 2-core machine (see conftest's one_thread).
SMOKE_ENV = dict(os.environ, SMOKE="1", TRITON_INTERPRET="1", OMP_NUM_THREADS="1", WANDB_MODE="offline",
                 WANDB_SILENT="true")


def _run(*args, env=SMOKE_ENV, timeout=300):
    return subprocess.run([sys.executable, "-m", "vsa_train.bench", "goals", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _goal_table(stdout: str) -> list[list[str]]:
    """The cells of the final table's rows (everything after its heading, header and rule left out)."""
    lines = stdout.split("## Goals (smoke: numbers are not measurements)\n", 1)[1].splitlines()
    rows = [line for line in lines if line.startswith("| ")]
    assert rows[0] == "| goal | target | measured | met? |"
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows[1:]]


@pytest.mark.slow  # ~20-25 s on 2 shared cores
def test_smoke_run_prints_every_goal_and_keeps_them_when_one_unit_fails(tmp_path):
    env = dict(SMOKE_ENV, BENCH_GOALS_FAIL="step:dit_1b:vsa")
    proc = _run("--out", str(tmp_path), env=env)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    first = out.splitlines()[0]
    assert first.startswith("CPU smoke run") and "torch " in first and "triton " in first
    # each part's own tables, as the op and step benchmarks print them
    assert "### tiny: 512 tokens" in out and "## dq with offset keys" in out and "| dense SDPA |" in out
    assert out.count("## Training step: dense vs VSA, dit_tiny") == 4
    assert "FAILED step:dit_1b:vsa: RuntimeError: forced by BENCH_GOALS_FAIL" in out
    rows = _goal_table(out)
    assert len(rows) == GOALS and all(len(r) == 4 for r in rows)
    by_goal = {r[0]: r for r in rows}
    failed = by_goal["VSA/dense step-time ratio, dit_1b"]
    assert "failed: RuntimeError" in failed[2] and failed[3] == "-"
    # the other nine have numbers: the failed VSA row lost no other row, the dit_1b dense row included
    for goal, target, measured, met in rows:
        if goal != failed[0]:
            assert "failed" not in measured and "not run" not in measured, (goal, measured)
            assert measured.startswith("["), measured  # smoke: what ran in place of the GPU size
    assert "samples/s" in by_goal["dense dit_1b MFU, compiled, batch 2, synthetic_16k"][2]
    assert by_goal["VSA/dense step-time ratio, dit_120m"][3] in ("yes", "no")
    assert by_goal["dq error with offset keys, bf16, D=128: Triton fine stage (centred)"][3] in ("yes", "no")
    record = json.loads((tmp_path / "results.json").read_text())
    assert [g["measured"] for g in record["goals"]] == [r[2] for r in rows]
    assert record["status"] == {"step:dit_1b:vsa": "failed: RuntimeError"} and record["smoke"] is True
    # the numbers op.bench_size and accuracy.run_offset_checks return, not only print
    assert record["results"]["op:16k"]["VSA full op, tiled"]["fwd_bwd_speedup"] > 0
    assert {(r["D"], r["row"]) for r in record["results"]["dq"]} >= {(64, "fine, centred"), (128, "dense SDPA")}
    assert record["results"]["step:dit_1b:dense"]["overrides"] == ["model.grad_checkpointing=none"]


def test_budget_and_only_still_print_every_goal():
    proc = _run("--budget", "0", "--only", "op,dq")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _goal_table(proc.stdout)
    assert len(rows) == GOALS
    assert [r[2] for r in rows[:4] + rows[8:]] == ["[tiny: 512 tokens, D=64, fp32] not run (budget)"] * 4 + \
        ["[fp32] not run (budget)"] * 2
    assert all("not run (--only)" in r[2] for r in rows[4:8])


def test_bad_options_are_refused(capsys):
    for argv, error in ((["--dit1b-policy", "full"], "invalid choice: 'full'"),
                        (["--only", "op,train"], "a comma-separated subset of op,dq,step"),
                        (["--op-batch", "0"], "a whole number of at least 1"),
                        (["--op-batch", "two"], "a whole number of at least 1")):
        with pytest.raises(SystemExit) as exit_:
            bench.parse_args(argv)
        assert exit_.value.code == 2 and error in capsys.readouterr().err
    assert bench.parse_args(["--only", "step", "--dit1b-policy", "selective"]).only == ["step"]
    assert bench.parse_args([]).op_batch == 1 and bench.parse_args(["--op-batch", "4"]).op_batch == 4
    assert "batch 4" in bench.goals(4)[0][0] and "batch 1" in bench.goals()[3][0]


def test_goals_are_judged_on_the_eager_tiled_op_with_graphed_beside():
    row = {"fwd_bwd_ms": 1.0, "fwd_bwd_speedup": 4.4, "graphed_fwd_bwd_ms": 0.8, "graphed_fwd_bwd_speedup": 4.7}
    assert bench.op_speedup({"VSA full op, tiled": row}, 4.5) == ("4.40× eager, tiled op (graphed: 4.70×)", False)
    step = {"grad_checkpointing": "selective", "samples/s": 1.0, "step_ms": 2000.0, "batch": 2, "MFU": 0.51}
    measured, met = bench.mfu(step, 0.50)
    assert met and measured.startswith("51.0%") and "model.grad_checkpointing=selective, not none" in measured
    dtype = "float32" if bench.SMOKE else "bfloat16"
    dq = {(dtype, 64, "fine, centred"): (2.4e-3, 3e-3), (dtype, 64, "dense SDPA"): (2.2e-3, 2.2e-2)}
    assert bench.dq_error(dq, 64)[1] is True
    dq[(dtype, 64, "fine, centred")] = (4e-3, 3e-3)  # outputs worse than dense's rounding: not met
    assert bench.dq_error(dq, 64)[1] is False
