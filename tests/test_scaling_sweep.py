"""The scaling-law grid: it composes (locally and for SLURM), and its tiny variant trains and is analysed on the CPU."""
import math
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from vsa_train.analysis.__main__ import main as analysis_main
from vsa_train.analysis.runs import find_runs

ROOT = Path(__file__).resolve().parents[1]


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def test_grid_is_a_multirun_over_size_attention_and_budget():
    cfg = _compose("experiment=scaling_law", "hydra/launcher=slurm")
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert len(params.model.split(",")) >= 2 and params.attn.split(",") == ["dense", "vsa"]
    assert len(str(params["train.flops_budget"]).split(",")) >= 2
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.data.name == "synthetic_16k" and cfg.train.eval_every_flops > 0
    for model in params.model.split(","):  # every grid point composes
        for attn in params.attn.split(","):
            assert _compose("experiment=scaling_law", f"model={model}", f"attn={attn}").model.name == model


def test_tiny_grid_trains_to_its_budgets_and_is_analysed(tmp_path):
    sweep = tmp_path / "sweep"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=scaling_law_tiny",
                           f"hydra.sweep.dir={sweep}"], check=False, capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = _compose("experiment=scaling_law_tiny")
    interval = cfg.train.eval_every_flops
    runs = find_runs([sweep])
    assert len(runs) == 8  # 2 depths x {dense, vsa} x 2 budgets
    assert {(r.size, r.attn, r.budget) for r in runs} == {
        (f"dit_tiny (128x{d})", a, b) for d in (1, 2) for a in ("dense", "vsa") for b in (4e9, 8e9)}
    for run in runs:
        last = run.rows[-1]
        per_step = last["flops"] / last["step"]
        assert (last["step"] - 1) * per_step < run.budget <= last["flops"]  # stopped at the first step past it
        # eval at step 0, at the first step past each multiple of the interval, and at the last step
        crossings = [s for s in range(1, last["step"] + 1)
                     if math.floor(s * per_step / interval) > math.floor((s - 1) * per_step / interval)]
        assert [r["step"] for r in run.rows if "eval/loss" in r] == sorted({0, *crossings, last["step"]})
    per_step = {(r.size, r.attn): r.rows[-1]["flops"] / r.rows[-1]["step"] for r in runs}
    assert all(per_step[size, "vsa"] < per_step[size, "dense"] for size, _ in per_step)  # sparse steps cost less

    out = tmp_path / "study"
    assert analysis_main([str(sweep), "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    assert "| dense |" in summary and "| vsa |" in summary and "needs" in summary
