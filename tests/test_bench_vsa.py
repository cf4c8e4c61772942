"""scripts/bench_vsa.py on the CPU (SMOKE=1, Triton interpreter): the --batch option and its refusal of bad values."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_vsa.py"
ENV = dict(os.environ, SMOKE="1", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # ~20 s: three op rows in the interpreter
def test_batch_option_runs_every_row_at_that_batch():
    proc = _run("--sizes", "tiny", "--no-flex", "--batch", "2", "--rep", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("### tiny:"))
    assert ", B=2," in header
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| VSA") or line.startswith("| dense")]
    assert len(rows) == 4  # full op, full op tiled, fine stage, dense


def test_bad_batch_is_refused():
    proc = _run("--sizes", "tiny", "--batch", "0")
    assert proc.returncode == 2 and "argument --batch: a whole number of at least 1, got '0'" in proc.stderr
