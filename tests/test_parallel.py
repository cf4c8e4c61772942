"""Parallel layouts on CPUs (torchrun, 2 gloo ranks): FSDP2 and Ulysses sequence parallelism train exactly what one
process trains with the same global batch, and checkpoints move between strategies and world sizes."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vsa_train.metrics import read_metrics
from vsa_train.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.frames=4", "data.height=8", "data.width=8", "train.eval_samples=4", "train.eval_timesteps=2",
        "train.log_every=1", "train.eval_every=100", "logger=none"]
VSA = ["attn=vsa", "attn.backend=torch"]
pytestmark = pytest.mark.slow


def _start(run_dir, *args, procs=1):
    """train.py in the background (one thread per process, so float sums are ordered alike); output: <run_dir>.log.
    Runs that do not depend on each other start together: one-process runs leave a core idle otherwise."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)] if procs > 1 else \
        [sys.executable]
    with open(f"{run_dir}.log", "w") as log:
        proc = subprocess.Popen([*launcher, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={run_dir}", *args],
                                stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    proc.log = Path(f"{run_dir}.log")
    return proc


def _done(proc):
    """Waits for a process from _start, asserting success; returns its output."""
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out = proc.log.read_text(errors="replace")
    assert proc.returncode == 0, out[-4000:]
    return out


def _train(run_dir, *args, procs=1):
    """train.py in a subprocess, asserting success; returns its output."""
    return _done(_start(run_dir, *args, procs=procs))


def _losses(run_dir):
    return [r["train/loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "train/loss" in r]


def test_sequence_parallel_forward_and_gradients_equal_one_process():
    """sp_size=2 against the plain model: loss, forward output and every parameter gradient, dense and VSA, on
    grids of 64, 96 and 45 tokens (45: odd, so one rank holds a zero pad token; 96 = 1.5 x 64: VSA edge tiles)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "workers" / "sp_equivalence.py")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    checks = re.findall(r"^(\w+\([\d, ]+\)) out (\S+) grad (\S+) missing \[\]$", proc.stdout, re.MULTILINE)
    forwards = re.findall(r"^(\w+\([\d, ]+\)) forward (\S+)$", proc.stdout, re.MULTILINE)
    assert len(checks) == len(forwards) == 6, proc.stdout
    for name, out, grad in checks:
        assert float(out) < 1e-5 and float(grad) < 1e-5, name
    for name, err in forwards:
        assert float(err) < 1e-5, name


@pytest.mark.parametrize("attn", ["dense", "vsa"])
def test_fsdp_then_one_process_equals_one_process(tmp_path, attn):
    """2-process FSDP (batch 1 each) for 3 steps, resumed by one process (batch 2) to 5 == one process, 5 steps."""
    moved, single = tmp_path / "moved", tmp_path / "single"
    attn = VSA if attn == "vsa" else ["attn=dense"]
    out = _train(moved, *attn, "train.batch_size=1", "train.max_steps=3", "parallel.strategy=fsdp", procs=2)
    state = json.loads((RunDir(moved).checkpoints.dirs()[-1] / "state.json").read_text())
    # each rank prints the whole model's fingerprint, not its shard's: the same number, the checkpoint's weights' sum
    prints = dict(re.findall(r"rank (\d)/2: finished at step 3, weights fingerprint (\S+)", out))
    weights = load_file(str(RunDir(moved).checkpoints.dirs()[-1] / "model.safetensors"))
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"], out[-2000:]
    assert float(prints["0"]) == pytest.approx(sum(w.double().sum().item() for w in weights.values()), rel=1e-9)
    assert (state["strategy"], state["processes"], state["global_batch"]) == ("fsdp", 2, 2)
    rows = [r for r in read_metrics(moved / "metrics.jsonl") if "TFLOP/s" in r]
    # FLOPs count per sample (the global batch), throughput per device divides by the devices
    assert rows and all(r["TFLOP/s/device"] == pytest.approx(r["TFLOP/s"] / 2) for r in rows)
    assert rows[-1]["samples"] == 3 * 2  # steps x global batch (1 per rank x 2 ranks), not x processes again
    for proc in [_start(moved, *attn, "train.batch_size=2", "train.max_steps=5"),  # at once: one process each
                 _start(single, *attn, "train.batch_size=2", "train.max_steps=5")]:
        _done(proc)
    assert _losses(moved) == pytest.approx(_losses(single), rel=1e-5)
    assert len(_losses(moved)) == 5


def test_one_process_then_fsdp_and_sequence_parallel(tmp_path):
    """One process for 2 steps, then 2-process FSDP with sp_size=2 (one data-parallel group, batch 2) to 4."""
    moved, single = tmp_path / "moved", tmp_path / "single"
    for proc in [_start(moved, *VSA, "train.batch_size=2", "train.max_steps=2"),  # at once: one process each
                 _start(single, *VSA, "train.batch_size=2", "train.max_steps=4")]:
        _done(proc)
    _train(moved, *VSA, "train.batch_size=2", "train.max_steps=4", "parallel.strategy=fsdp",
           "parallel.sp_size=2", procs=2)
    assert _losses(moved) == pytest.approx(_losses(single), rel=1e-5)
    # an FSDP run's checkpoint serves sample.py and train.init_from like any other
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "s.mp4"
    init = _start(tmp_path / "init", *VSA, "train.max_steps=1", f"train.init_from={moved}")
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"checkpoint={moved}", "prompt=a red circle",
                           "steps=2", f"out={out}"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and out.stat().st_size > 0, proc.stderr[-3000:]
    assert "initialised from" in _done(init)


def test_leaving_keeps_the_gloo_group_alive_until_exit(tmp_path):
    """leave_together shuts the default group down but keeps its object: freeing a gloo group joins its workers
    while holding the GIL, which deadlocked two-process CPU runs at their end (vsa_train/distributed.py)."""
    import torch.distributed as dist
    from vsa_train import distributed

    class Ranks:  # the one Accelerator method leave_together uses
        waited = 0

        def wait_for_everyone(self):
            self.waited += 1
            dist.barrier()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    group, ranks = dist.group.WORLD, Ranks()
    distributed.leave_together(ranks)
    assert ranks.waited == 1 and not dist.is_initialized()
    assert distributed._RETIRED[-1] is group  # freed at interpreter exit, not when the trainer drops the model
    distributed.leave_together(ranks)  # a second end (a stop after end_training) is a no-op
    assert ranks.waited == 1
