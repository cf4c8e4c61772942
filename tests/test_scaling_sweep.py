"""The scaling-law grids: they compose (locally and for SLURM; the one-GPU isoFLOP grid point by point), and the
tiny CPU twin of the one-GPU grid trains to its budgets with decaying schedules and is analysed."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from vsa_train.analysis.__main__ import main as analysis_main
from vsa_train.analysis.find import find_runs

ROOT = Path(__file__).resolve().parents[1]


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def test_grid_is_a_multirun_over_size_attention_and_budget():
    cfg = _compose("experiment=scaling_law", "hydra/launcher=slurm")
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert len(params.model.split(",")) >= 2 and params.attn.split(",") == ["dense", "vsa"]
    budgets = {_compose("experiment=scaling_law", f"point={p}").train.flops_budget for p in params.point.split(",")}
    assert len(budgets) >= 3 and min(budgets) >= 1e18 and max(budgets) / min(budgets) >= 10  # the paper's budgets
    assert "dit_1b" in params.model.split(",")
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.data.name == "synthetic_16k" and cfg.train.eval_every_flops > 0
    for model in params.model.split(","):  # every grid point composes
        for attn in params.attn.split(","):
            assert _compose("experiment=scaling_law", f"model={model}", f"attn={attn}").model.name == model


def _grid(experiment):
    """Every point of an isoFLOP experiment's sweep, composed: (size, attn, point) -> config."""
    params = _compose(f"experiment={experiment}").hydra.sweeper.params
    axes = {key: str(params[key]).split(",") for key in ("size", "attn", "point")}
    grid = {}
    for a in axes["attn"]:  # attn is a config group; size and point are values the rest interpolates from
        base = _compose(f"experiment={experiment}", f"attn={a}")
        for s in axes["size"]:
            for p in axes["point"]:
                cfg = base.copy()
                cfg.size, cfg.point = s, p
                grid[s, a, p] = cfg
    assert grid[s, a, p].model.hidden_size == _compose(f"experiment={experiment}", f"attn={a}", f"size={s}",
                                                       f"point={p}").model.hidden_size
    return grid


@pytest.mark.parametrize("experiment", ["scaling_law_h200", "scaling_law_tiny"])
def test_isoflop_grid_has_sizes_budgets_attentions_and_a_second_seed(experiment):
    grid = _grid(experiment)
    budgets = sorted({c.train.flops_budget for c in grid.values()})
    sizes = {(c.model.hidden_size, c.model.depth) for c in grid.values()}
    assert len(budgets) >= 3 and len(sizes) >= 3 and {a for _, a, _ in grid} == {"dense", "vsa"}
    middle = budgets[len(budgets) // 2]
    seeds = {(s, a, c.train.flops_budget, c.train.seed) for (s, a, _), c in grid.items()}
    assert {(b, seed) for _, _, b, seed in seeds} == {*((b, 0) for b in budgets), (middle, 1)}
    assert len(seeds) == len(grid)  # no two points train the same run
    for cfg in grid.values():
        assert cfg.optim.schedule in ("cosine", "wsd") and cfg.train.max_steps >= 10**7  # the budget ends it
        assert cfg.hydra.sweep.dir.endswith(f"{experiment}_{cfg.data.name}")
    if experiment == "scaling_law_h200":
        assert budgets[-1] >= 10 * budgets[0]  # a decade of compute
        assert all(c.data.name == "synthetic_16k" and c.model.hidden_size // c.model.num_heads == 64
                   for c in grid.values())  # 16K tokens, Triton's head dim


def test_tiny_grid_trains_to_its_budgets_and_is_analysed(tmp_path):
    """A 12-run slice of the tiny twin (its three sizes x both attentions x the low and middle budgets; the full
    24-run grid composes above): every run stops at the first step past its budget with its cosine at the
    floor, and the analysis gives a verdict, isoFLOP parabolas at both budgets and per-timestep rows."""
    sweep = tmp_path / "sweep"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=scaling_law_tiny", "point=low,mid",
                           f"hydra.sweep.dir={sweep}"], check=False, capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = _compose("experiment=scaling_law_tiny")
    interval, budgets = cfg.train.eval_every_flops, (cfg.grid.points.low.budget, cfg.grid.points.mid.budget)
    runs = find_runs([sweep])
    assert len(runs) == 12
    assert {(r.size, r.attn, r.budget, r.seed) for r in runs} == {
        (f"tiny_{s} ({w}x{d})", a, budget, 0) for s, w, d in (("s", 64, 1), ("m", 64, 2), ("l", 96, 2))
        for a in ("dense", "vsa") for budget in budgets}
    for run in runs:
        last = run.rows[-1]
        per_step = last["flops"] / last["step"]
        assert (last["step"] - 1) * per_step < run.budget <= last["flops"]  # stopped at the first step past it
        assert last["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio)  # decayed to its own end
        # eval at step 0, at the first step past each multiple of the interval, and at the last step
        crossings = [s for s in range(1, last["step"] + 1)
                     if math.floor(s * per_step / interval) > math.floor((s - 1) * per_step / interval)]
        assert [r["step"] for r in run.rows if "eval/loss" in r] == sorted({0, *crossings, last["step"]})
        assert {"eval/loss_t0.2500", "eval/loss_t0.7500"} <= last.keys()
    per_step = {(r.size, r.attn): r.rows[-1]["flops"] / r.rows[-1]["step"] for r in runs}
    assert all(per_step[size, "vsa"] < per_step[size, "dense"] for size, _ in per_step)  # sparse steps cost less

    out = tmp_path / "study"
    assert analysis_main([str(sweep), "--out", str(out), "--bootstrap", "200"]) == 0
    summary = (out / "summary.md").read_text()
    assert summary.count("**Verdict (all sizes):** ") == 1 and "FLOPs than dense" in summary
    section = summary.split("## IsoFLOP view")[1].split("\n## ")[0]
    isoflop = [line for line in section.splitlines() if line.startswith(("| dense | ", "| vsa | "))]
    assert len(isoflop) == 4 and not any("fewer than 3 sizes" in line for line in isoflop)  # 4 parabolas fitted
    assert "| 0.2500 | vsa |" in summary
    assert {p.name for p in out.iterdir()} == {"summary.md", "curves.png", "frontier.png", "isoflop.png",
                                               "frontier_t.png", "sizes.png"}
