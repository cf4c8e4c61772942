"""`python -m vsa_train.bench op` on the CPU (SMOKE=1, Triton interpreter): --batch, --pairs, --check, refusals."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, SMOKE="1", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")


def _run(*args):
    return subprocess.run([sys.executable, "-m", "vsa_train.bench", "op", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_bad_batch_is_refused():
    proc = _run("--sizes", "tiny", "--batch", "0")
    assert proc.returncode == 2 and "argument --batch: a whole number of at least 1, got '0'" in proc.stderr


@pytest.mark.slow  # ~30 s: the checks and both loop variants in the interpreter, at batch 2
def test_batch_checks_and_pairs_label_rows():
    proc = _run("--sizes", "tiny", "--no-flex", "--batch", "2", "--rep", "1", "--check", "fp32", "--pairs", "0,1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("### tiny:"))
    assert ", B=2," in header  # every row at that batch
    lines = proc.stdout.splitlines()
    for pairs in (0, 1):  # full op, full op tiled, fine stage: once per loop variant; dense once
        assert sum(line.startswith("| VSA") and f"(pairs={pairs})" in line for line in lines) == 3, proc.stdout
    assert sum(line.startswith("| dense") for line in lines) == 1
    assert "all within limits" in proc.stdout
    for label in ("| fine (pairs=0) |", "| full (pairs=1) |", "| VSA full op, tiled (pairs=0) |",
                  "| VSA fine stage (pairs=1) |", "fine, uncentred (pairs=0) |"):
        assert label in proc.stdout, label


def test_bad_pairs_are_refused():
    proc = _run("--pairs", "2")
    assert proc.returncode == 2 and "a comma-separated list of 0 and 1" in proc.stderr


def test_unknown_tool_prints_the_tools():
    proc = subprocess.run([sys.executable, "-m", "vsa_train.bench", "nope"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "op,step,goals,skew,gaps,launch,host" in proc.stderr
