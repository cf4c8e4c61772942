"""The study analysis on run files whose answer is known: frontier, power-law fit, FLOPs ratio, readers, CLI."""
import json
import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from vsa_train.analysis.__main__ import main
from vsa_train.analysis.report import analyze
from vsa_train.analysis.runs import find_runs, read_wandb_offline
from vsa_train.analysis.scaling import fit_power_law, flops_at_loss, pareto_frontier

A, B, C = 40.0, 0.12, 0.05  # the true frontier of the dense runs: L(F) = A·F^-B + C
RATIO = 2.5                 # the sparse runs reach any loss with 2.5x fewer FLOPs: L_vsa(F) = L(2.5·F)


def true_loss(flops, ratio=1.0):
    return A * (ratio * np.asarray(flops)) ** -B + C


def write_run(run_dir, attn, depth, rows, budget=None, configs=(".hydra/config.yaml",)):
    """A run directory as train.py leaves it: metrics.jsonl and the config at each of `configs` (relative)."""
    cfg = {"model": {"name": "dit_syn", "hidden_size": 64, "depth": depth}, "attn": {"name": attn},
           "train": {"flops_budget": budget}}
    for config in configs:
        (run_dir / config).parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(cfg), run_dir / config)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def synthetic_sweep(root, noise=0.002):
    """Five sizes per attention type; each size's curve touches the true frontier at its own compute optimum
    F_k and lies above it elsewhere (excess quadratic in log F), as learning curves of a size sweep do."""
    rng = np.random.default_rng(0)
    for attn, ratio in (("dense", 1.0), ("vsa", RATIO)):
        for k in range(5):
            optimum = 1e15 * 3**k
            flops = np.geomspace(optimum / 2, optimum * 2, 12)
            loss = true_loss(flops, ratio) * (1 + 0.01 * np.log(flops / optimum) ** 2)
            loss *= 1 + noise * rng.standard_normal(len(flops))
            rows = [{"step": 0, "flops": 0.0, "eval/loss": 2.0}]
            rows += [{"step": i + 1, "flops": float(f), "train/loss": float(v) * 1.1, "eval/loss": float(v)}
                     for i, (f, v) in enumerate(zip(flops, loss))]
            write_run(root / f"{attn}_d{k}", attn, depth=k + 1, rows=rows, budget=float(flops[-1]))


def test_fit_recovers_exact_power_law():
    flops = np.geomspace(1e14, 1e18, 20)
    fit = fit_power_law(flops, true_loss(flops))
    assert fit.a == pytest.approx(A, rel=1e-6) and fit.b == pytest.approx(B, rel=1e-6)
    assert fit.c == pytest.approx(C, rel=1e-5) and fit.rms_log < 1e-9
    assert fit.flops_at(float(true_loss(3e16))) == pytest.approx(3e16, rel=1e-6)
    assert math.isnan(fit.flops_at(0.99 * C))  # below the floor: never reached


def test_fit_refuses_too_few_points_and_rising_loss():
    with pytest.raises(ValueError, match="at least 4 points"):
        fit_power_law([1e15, 2e15, 4e15], [1.0, 0.9, 0.85])  # three points would fit any (a, b, c) exactly
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([0.0, 1e15, 2e15, 4e15], [1.0, 0.9, 0.8, 0.7])
    with pytest.raises(ValueError, match="does not fall like a power"):
        fit_power_law([1e15, 2e15, 4e15, 8e15], [0.7, 0.8, 0.9, 1.0])


def test_frontier_keeps_only_unbeaten_points():
    points = [(4.0, 0.5), (1.0, 1.0), (2.0, 1.2), (3.0, 0.7), (5.0, 0.6)]
    assert pareto_frontier(points) == [(1.0, 1.0), (3.0, 0.7), (4.0, 0.5)]
    frontier = [(1e15, 1.0), (1e17, 0.5)]
    assert flops_at_loss(frontier, 1.0) == pytest.approx(1e15)
    assert flops_at_loss(frontier, math.sqrt(0.5)) == pytest.approx(1e16)  # log-log midpoint
    assert math.isnan(flops_at_loss(frontier, 0.4))


def test_analysis_recovers_the_known_frontier_and_flops_ratio(tmp_path):
    synthetic_sweep(tmp_path / "runs")
    runs = find_runs([tmp_path / "runs"])
    assert len(runs) == 10 and {r.attn for r in runs} == {"dense", "vsa"}
    assert all(r.reached_budget for r in runs)
    result = analyze(runs, tmp_path / "out")
    for attn, ratio in (("dense", 1.0), ("vsa", RATIO)):
        fit, frontier = result["fits"][attn], result["frontiers"][attn]
        assert fit.b == pytest.approx(B, rel=0.1)
        flops = np.array([f for f, _ in frontier])
        np.testing.assert_allclose(fit.loss(flops), true_loss(flops, ratio), rtol=0.01)
    ratios = [r for r in result["ratios"] if r["attn"] == "vsa"]
    assert len(ratios) == 4
    for r in ratios:
        assert r["fit"] == pytest.approx(RATIO, rel=0.04)
        assert r["interpolated"] == pytest.approx(RATIO, rel=0.08)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| vsa |" in summary and "dit_syn (64x5)" in summary
    assert f"{ratios[0]['interpolated']:.2f}× fewer FLOPs than dense" in summary
    for png in ("frontier.png", "curves.png"):
        assert (tmp_path / "out" / png).stat().st_size > 10_000


def test_no_advantage_reads_as_ratio_one(tmp_path):
    """Two attention types with the same curves: the ratio is 1 (guards against a ratio built into the tool)."""
    flops = np.geomspace(1e15, 1e17, 10)
    for attn in ("dense", "vsa"):
        rows = [{"step": i + 1, "flops": float(f), "eval/loss": float(v)} for i, (f, v) in
                enumerate(zip(flops, true_loss(flops)))]
        write_run(tmp_path / attn, attn, depth=2, rows=rows)
    result = analyze(find_runs([tmp_path]), tmp_path / "out")
    assert all(r["fit"] == pytest.approx(1.0, rel=1e-4) for r in result["ratios"])
    assert all(r["interpolated"] == pytest.approx(1.0, rel=1e-9) for r in result["ratios"])


def test_reads_wandb_offline_runs(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    config = {"model": {"name": "dit_syn", "hidden_size": 64, "depth": 3}, "attn": {"name": "vsa"},
              "train": {"flops_budget": 1e17}}
    run = wandb.init(project="t", dir=str(tmp_path), config=config, mode="offline")
    rows = [{"step": i, "flops": i * 1e14, "eval/loss": 1.0 / (i + 1), "train/loss": 2.0} for i in range(1500)]
    for row in rows:  # enough rows to span several 32 KiB blocks of the log
        run.log(row, step=row["step"])
    run.finish()
    wandb.teardown()  # finish() can return before wandb's service has written the whole log; teardown waits
    offline = next((tmp_path / "wandb").glob("offline-run-*"))
    got_config, got_rows = read_wandb_offline(offline)
    assert got_config["model"] == config["model"] and got_config["attn"] == {"name": "vsa"}
    assert got_rows == rows
    (found,) = find_runs([tmp_path])  # no metrics.jsonl: the wandb run is the run
    assert found.path == tmp_path and found.attn == "vsa" and found.size == "dit_syn (64x3)"
    assert found.reached_budget and len(found.evals()) == 1499


def test_cli_writes_outputs_and_rejects_empty_dirs(tmp_path, capsys):
    synthetic_sweep(tmp_path / "runs")
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--fit-from", "1e15"]) == 0
    assert "10 runs" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"summary.md", "frontier.png", "curves.png"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "out2")])
    assert err.value.code == 2 and "no runs" in capsys.readouterr().err


def test_run_without_its_config_fails_clearly(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "flops": 0.0}\n')
    with pytest.raises(FileNotFoundError, match="cannot tell its attention") as err:
        find_runs([tmp_path])
    assert str(tmp_path) in str(err.value) and "config.yaml" in str(err.value)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("model: {name: m, hidden_size: 8, depth: 1}\n")
    with pytest.raises(ValueError, match="config lacks attn.name"):
        find_runs([tmp_path])
    (tmp_path / "config.yaml").write_text("model: {name: m, depth: '${hydra:runtime.choices.depth}'}\n")
    with pytest.raises(ValueError, match="config lacks model.hidden_size, model.depth, attn.name"):
        find_runs([tmp_path])  # config.yaml is read first; an unresolvable value counts as absent


ROWS = [{"step": 0, "flops": 0.0, "eval/loss": 2.0}, {"step": 1, "flops": 1e15, "eval/loss": 1.0}]


@pytest.mark.parametrize("configs", [("config.yaml",), ("config.yaml", ".hydra/config.yaml")])
def test_reads_runs_with_the_trainers_config_yaml(tmp_path, configs):
    """run_dir set on the command line: train.py's config.yaml, with or without Hydra's .hydra/ beside it."""
    write_run(tmp_path / "run", "vsa", depth=3, rows=ROWS, budget=1e15, configs=configs)
    (found,) = find_runs([tmp_path])
    assert (found.attn, found.size, found.budget, found.rows) == ("vsa", "dit_syn (64x3)", 1e15, ROWS)
    assert found.reached_budget


def test_config_yaml_wins_over_hydras_unresolved_record(tmp_path):
    """Both present: config.yaml (resolved) is read; .hydra/config.yaml alone still reads, ${hydra:...} and all."""
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text(
        "width: 96\nrun_dir: ${hydra:runtime.output_dir}\n"
        "model: {name: dit_syn, hidden_size: '${width}', depth: 2}\nattn: {name: dense}\n"
        "train: {flops_budget: '${hydra:job.override_dirname}'}\n")
    (found,) = find_runs([tmp_path])
    assert (found.attn, found.size, found.budget) == ("dense", "dit_syn (96x2)", None)
    OmegaConf.save(OmegaConf.create({"run_dir": str(tmp_path / "run"), "width": 96,
                                     "model": {"name": "dit_syn", "hidden_size": 96, "depth": 2},
                                     "attn": {"name": "vsa"}, "train": {"flops_budget": 5e14}}),
                   tmp_path / "run" / "config.yaml")
    (found,) = find_runs([tmp_path])
    assert (found.attn, found.size, found.budget) == ("vsa", "dit_syn (96x2)", 5e14)


def test_reads_runs_whose_metrics_have_junk(tmp_path):
    """A crashed run (torn last line) with a junk line: the good rows are read, each bad line warned about."""
    from vsa_train.metrics import MetricsWarning

    write_run(tmp_path / "run", "vsa", depth=3, rows=ROWS, configs=("config.yaml",))
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_bytes(b"\xff junk\n" + metrics.read_bytes() + b'{"step": 2, "fl')
    with pytest.warns(MetricsWarning) as caught:
        (found,) = find_runs([tmp_path])
    assert found.rows == ROWS
    assert [str(w.message).split(": ")[0] for w in caught] == [f"{metrics}:1", f"{metrics}:4"]
