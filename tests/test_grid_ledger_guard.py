"""What a cluster and a careless user do to a grid's ledger (vsa_train/grid): two runners on one results folder
run each point once, a dead runner's claim is taken over, a SIGTERM stops the runner's runs and lets their points
go, and runs made with other settings (a changed experiment, other overrides) are refused, never mixed in."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vsa_train.grid import ledger, runner
from vsa_train.grid.__main__ import main as grid_main

from test_grid import ROOT, TINY, _args


def _cli(results: Path, work: Path, only: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vsa_train.grid", "run", "study_16k", str(results), "--work", str(work),
            "--lanes", "1", "--time", "300", "--only", only, "--", *TINY, *extra]


def test_two_runners_on_one_ledger_run_each_point_once(tmp_path):
    results = tmp_path / "results"
    procs = [subprocess.Popen(_cli(results, tmp_path / f"work{i}", "dit_60m_dense_low*"), cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    started = [line.split(":")[0] for out in outs for line in out.splitlines() if ": started (" in line]
    assert sorted(started) == ["dit_60m_dense_low", "dit_60m_dense_low_s1"], outs  # each once, by one of the two
    for name in started:
        assert ledger.read_record(results, name)["finished"]
    assert not list((results / ledger.CLAIMS).glob("*.lock"))  # every claim let go


def test_a_live_claim_is_skipped_and_a_dead_runners_claim_taken_over(tmp_path, capsys):
    args = _args(tmp_path, only=["dit_60m_dense_low*"], lanes=1)
    points = ledger.grid_points(args.experiment, args.configs, args.extra)
    results = Path(args.results)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a live runner on this host
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for name, pid in (("dit_60m_dense_low", other.pid), ("dit_60m_dense_low_s1", dead.pid)):
            path = ledger.claim_path(results, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "token": "x"}))
        assert grid_main(["status", "study_16k", str(results), "--", *TINY]) == 0
        assert f"claimed by {socket.gethostname()} pid {other.pid}" in capsys.readouterr().out
        lines = []
        assert runner.run(points, args, lines.append) == 0
    finally:
        other.kill()
    assert any("dit_60m_dense_low: being run by another runner; skipped" in line for line in lines), lines
    assert ledger.read_record(results, "dit_60m_dense_low") is None
    assert ledger.read_record(results, "dit_60m_dense_low_s1")["finished"]  # its runner was gone


def test_sigterm_stops_the_runs_and_lets_their_points_go(tmp_path):
    results, work = tmp_path / "results", tmp_path / "work"
    proc = subprocess.Popen(_cli(results, work, "dit_60m_dense_mid", "train.flops_budget=1e12"), cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lock = work / "dit_60m_dense_mid" / "run.lock"  # the trainer's own lock names its pid
    deadline = time.monotonic() + 240
    while not lock.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert lock.exists(), proc.communicate()[0]
    trainer = json.loads(lock.read_text())["pid"]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0 and "dit_60m_dense_mid: NOT kept" in out, out
    try:
        os.kill(trainer, 0)
        alive = Path(f"/proc/{trainer}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except ProcessLookupError:
        alive = False
    assert not alive  # the trainer (its own session) did not outlive its runner
    assert not ledger.claim_path(results, "dit_60m_dense_mid").exists()
    assert ledger.read_record(results, "dit_60m_dense_mid") is None


def _save(cfg, path: Path) -> None:
    OmegaConf.save(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), path)  # as the trainer writes it


def _finished_run(results: Path, point, cfg) -> None:
    run = results / "runs" / point.name
    run.mkdir(parents=True)
    _save(cfg, run / "config.yaml")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "flops": point.budget, "samples": 6, "samples/s": 1.0,
                                                   "eval/loss": 0.5}) + "\n")
    (run / "record.json").write_text(json.dumps({"finished": True, "wall_s": 9.0, "executed_flops": point.budget,
                                                 "commit": "c", "card": "cpu", "final_eval_loss": 0.5}))


def _resolvable(cfg):
    """The point's config without the keys that need a running Hydra (run_dir's resolver): the trainer writes
    config.yaml resolved, and the ledger compares the run's settings only."""
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("run_dir", "hydra")])


def test_runs_made_with_other_settings_are_refused_and_shown(tmp_path, capsys):
    args = _args(tmp_path, only=["dit_60m_dense_low_s1"], lanes=1)
    points = {p.name: p for p in ledger.grid_points(args.experiment, args.configs, args.extra)}
    results = Path(args.results)
    same, changed = points["dit_60m_dense_low"], points["dit_60m_vsa_low"]
    _finished_run(results, same, _resolvable(same.config))
    other = _resolvable(changed.config)
    other.optim.lr = 1e-3  # the experiment's recipe as it was when this run was made
    _finished_run(results, changed, other)
    assert ledger.other_settings(list(points.values()), results) == {"dit_60m_vsa_low": "optim.lr 0.001 -> 0.0006"}
    lines = []
    assert runner.run(list(points.values()), args, lines.append) == 2
    assert not any(": started" in line for line in lines) and any("refused" in line for line in lines), lines
    assert grid_main(["status", "study_16k", str(results), "--", *TINY]) == 0
    out = capsys.readouterr().out
    assert "| dit_60m_vsa_low | 3e+09 | done (c), OTHER SETTINGS |" in out and "optim.lr 0.001 -> 0.0006" in out
    assert "| dit_60m_dense_low | 3e+09 | done (c) |" in out
    # another budget is another run too; a hostile config.yaml is named, never loaded as code
    (results / "runs" / "dit_60m_vsa_low" / "config.yaml").write_text("!!python/object/apply:os.system ['echo pwned']")
    assert "does not load" in ledger.other_settings(list(points.values()), results)["dit_60m_vsa_low"]
    budget = _resolvable(same.config)
    budget.train.flops_budget = 1e10
    _save(budget, results / "runs" / "dit_60m_dense_low" / "config.yaml")
    assert "train.flops_budget 10000000000.0 -> 3000000000.0" in \
        ledger.other_settings(list(points.values()), results)["dit_60m_dense_low"]


def test_the_committed_study_is_one_recipe():
    """The committed ledger's runs, made on several commits, have the settings the experiment gives them today."""
    points = ledger.grid_points("study_16k", ROOT / "configs",  # as scripts/gpu/grid.sh runs them
                                ["train.compile=true", "train.compile_cache=/tmp/vsa_compile_cache"])
    assert ledger.other_settings(points, ROOT / "docs" / "study" / "study_16k") == {}


@pytest.mark.parametrize("text, seconds", [("1-02:03:04", 93784), ("02:03:04", 7384), ("05:30", 330), ("45", 2700),
                                           ("0:00", 0), ("UNLIMITED", None), ("NOT_SET", None), ("", None),
                                           ("1-x", None), ("1:2:3:4", None)])
def test_slurm_durations_read_as_squeue_prints_them(text, seconds):
    assert runner.slurm_seconds(text) == seconds


def test_time_auto_is_the_jobs_time_left_less_the_runners_end(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(SystemExit, match="SLURM_JOB_ID is not set"):
        runner.job_time_left()
    squeue = tmp_path / "squeue"  # what squeue -h -j JOB -o %L prints
    squeue.write_text("#!/bin/sh\necho \"$SQUEUE_SAYS\"\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SQUEUE_SAYS", "1:10:00")
    assert runner.job_time_left() == 4200 - runner.JOB_END_S
    for says, why in (("UNLIMITED", "no time limit"), ("00:50", "50 s left")):
        monkeypatch.setenv("SQUEUE_SAYS", says)
        with pytest.raises(SystemExit, match=why):
            runner.job_time_left()
    monkeypatch.setenv("SQUEUE_SAYS", "1:10:00")
    assert grid_main(["plan", "study_16k", str(tmp_path), "--time", "auto", "--lanes", "2"]) == 0
    assert "calls of 4140 s" in capsys.readouterr().out
    for bad in ("banana", "0", "-5", "nan"):
        with pytest.raises(SystemExit):
            grid_main(["plan", "study_16k", str(tmp_path), "--time", bad])
