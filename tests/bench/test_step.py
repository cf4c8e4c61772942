"""`python -m vsa_train.bench step` times the trainer's own step: a CPU smoke run of two rows, and what it calls."""
import ast
import gzip
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from vsa_train import trainer

from vsa_train.bench import step as bench

ROOT = Path(__file__).resolve().parents[2]
STEP = [sys.executable, "-m", "vsa_train.bench", "step"]


def test_benchmark_uses_the_trainers_run_and_step_in_one_function():
    """The trainer is reached from `trainer_target` alone (the one place to re-point when the trainer changes):
    it builds the run and steps with the trainer's own functions."""
    tree = ast.parse(inspect.getsource(bench))
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "trainer"]
    assert len(imports) == 1 and {a.name for a in imports[0].names} >= {"build_run", "make_accelerator", "train_step"}
    target = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "trainer_target")
    assert imports[0] in list(ast.walk(target))
    assert len(inspect.getsource(bench.trainer_target).splitlines()) <= 60
    assert trainer.train_step.__name__ in {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    # Nothing of a step of its own: no loss, backward, clipping or optimizer in the benchmark.
    called = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
              for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert not called & {"flow_loss", "backward", "clip_grad_norm_", "AdamW", "zero_grad", "build_model"}


def test_smoke_run_times_two_rows(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([*STEP, "--smoke", "--rows", "dense:eager,vsa:eager:model.grad_checkpointing=full",
                           "--out", str(tmp_path), "--trace", str(tmp_path / "traces")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED" not in proc.stdout, proc.stdout[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["attn"], r["mode"]) for r in rows] == [("dense", "eager"), ("vsa", "eager")]
    # Each profiled step's Chrome trace (gzipped), readable by the gaps tool; ops of the step are in it.
    for name in ("1_dense_eager", "2_vsa_eager_model.grad_checkpointing_full"):
        trace = json.loads(gzip.decompress((tmp_path / "traces" / f"{name}.json.gz").read_bytes()))
        assert any(e.get("name") == "Optimizer.step#AdamW.step" for e in trace["traceEvents"])
    for r in rows:
        assert r["samples/s"] > 0 and r["step_ms"] > 0 and r["batch"] == r["global_batch"] == 2
        # TrainState.step only moves in vsa_train.trainer.train_step: 1 warm-up + 2 timed + 1 profiled step (--smoke)
        assert r["trainer_steps"] == 1 + 2 + 1
        assert r["profile"]["total_ms"] > 0
        assert r["first_step_s"] > 0 and r["build_s"] > 0 and r["warmup_s"] >= r["first_step_s"]
    dense, vsa = rows
    # a row's own overrides reach its config (and only its config)
    assert (dense["overrides"], dense["grad_checkpointing"]) == ([], "none")
    assert (vsa["overrides"], vsa["grad_checkpointing"]) == (["model.grad_checkpointing=full"], "full")
    assert dense["topk"] is None and dense["flops_per_sample"] == dense["flops_per_sample_dense"]
    assert 1 <= vsa["topk"] < vsa["tiles"] and vsa["flops_per_sample"] < vsa["flops_per_sample_dense"]
    assert "## Training step: dense vs VSA (final)" in proc.stdout and "| vsa | eager | model.grad_checkpointing=full | 2 |" in proc.stdout


def test_bad_rows_are_refused():
    proc = subprocess.run([*STEP, "--smoke", "--rows", "vsa:fast"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--rows must be attn:mode" in proc.stderr
