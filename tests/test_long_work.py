"""Long work that could look hung (issue 29, item 4): evaluation, the eval set's inputs, the build and the first step
print their progress and an estimate; a stop signal (Ctrl-C) during the build or an evaluation stops the launch
there as at the end of a step, without a traceback. CPU, tiny model."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from vsa_train import periodic, progress, trainer
from vsa_train.metrics import read_metrics
from vsa_train.preemption import REQUEUE_EXIT_CODE
from vsa_train.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.frames=4", "data.height=8", "data.width=8", "train.batch_size=2", "train.eval_samples=4",
        "train.eval_timesteps=2", "train.eval_batch_size=1", "train.log_every=1", "train.eval_every=100",
        "logger=none"]


def _cfg(run_dir, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=[*TINY, f"run_dir={run_dir}", *overrides])


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_eta_speaks_for_long_work_only_at_a_readable_rate():
    lines, clock = [], _Clock()
    eta = progress.Eta("eval", "batches", lines.append, clock=clock)
    clock.now = 0.1
    eta(1, 32)  # 3.2 s in all: short work says nothing
    assert lines == []
    eta = progress.Eta("eval", "batches", lines.append, clock=clock)
    for done in range(1, 33):
        clock.now += 95.0  # dit_1b on a CPU: ~95 s per eval batch
        eta(done, 32)
    assert lines[0] == "eval: 1/32 batches in 95.0s, ~49.1 min left"
    assert len(lines) == 31  # one per batch (each longer than EVERY_S), none at the last: the eval's own line ends it
    lines.clear()
    eta = progress.Eta("eval", "batches", lines.append, clock=clock)
    for done in range(1, 1001):
        clock.now += 1.0
        eta(done, 1000)
    assert 30 <= len(lines) <= 35  # the first, then one per EVERY_S seconds


def test_heartbeat_says_how_long_work_of_unknown_length_has_run():
    lines = []
    with progress.heartbeat(lines.append, "first step", every_s=0.05):
        time.sleep(0.3)
    count = len(lines)
    time.sleep(0.15)
    assert count >= 2 and len(lines) == count and lines[0].startswith("first step: ") and "so far" in lines[0]


def test_an_evaluation_reports_each_batch_and_stops_when_asked(tmp_path):
    from vsa_train.config_schema import typed
    from vsa_train.evaluation import evaluate
    from vsa_train.training_run import build_run, make_accelerator

    config = typed(_cfg(tmp_path / "run"))
    accelerator = make_accelerator(config)
    run = build_run(config, accelerator)
    heard = []
    assert evaluate(run.model, run.eval_set, accelerator, 1, report=lambda *p: heard.append(p)) is not None
    assert heard == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert evaluate(run.model, run.eval_set, accelerator, 1, stop=lambda: len(heard) > 5,
                    report=lambda *p: heard.append(p)) is None
    assert heard[4:] == [(1, 4), (2, 4)]  # asked after each batch: gave up after the second
    run.close()


def test_the_eval_set_reports_each_input_loaded():
    from vsa_train.data.batching import BadInput, eval_batch

    def load(i, position):
        if i == 1:
            raise BadInput("damaged")
        return {"video": torch.zeros(3, 1, 2, 2), "caption": str(i), "text": torch.zeros(2, 4),
                "text_mask": torch.ones(2, dtype=torch.bool)}

    heard = []
    batch = eval_batch(range(10), load, None, 3, report=lambda *p: heard.append(p))
    assert batch["caption"] == ["0", "2", "3"] and heard == [(1, 3), (2, 3), (3, 3)]


@pytest.fixture
def stop_signals_back():
    """exit_for_requeue leaves SIGTERM/USR1/USR2 ignored (the process is leaving): put them back after the test."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def test_ctrl_c_during_the_build_stops_before_the_launch_is_recorded(tmp_path, monkeypatch, capsys,
                                                                     stop_signals_back):
    real = trainer.build_run

    def interrupted(*args, **kwargs):
        run = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # the handler records it; the build's end is the next safe point
        return run

    monkeypatch.setattr(trainer, "build_run", interrupted)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        trainer.train(_cfg(run_dir, "train.max_steps=2"))
    assert exit_.value.code == REQUEUE_EXIT_CODE
    err = capsys.readouterr().err
    assert "stopped by SIGINT; nothing was trained or saved: re-running the same command starts the run" in err
    assert not (run_dir / "config.yaml").exists() and not RunDir(run_dir).checkpoints.dirs()
    assert not (run_dir / "run.lock").exists()


def test_ctrl_c_during_a_periodic_evaluation_saves_the_step_without_its_eval_row(tmp_path, monkeypatch, capsys,
                                                                               stop_signals_back):
    real, calls = periodic.evaluate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the step-2 eval (the first is step 0's): Ctrl-C during its first batch
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(periodic, "evaluate", interrupted)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        trainer.train(_cfg(run_dir, "train.max_steps=10", "train.eval_every=2"))
    assert exit_.value.code == REQUEUE_EXIT_CODE
    assert [p.name for p in RunDir(run_dir).checkpoints.dirs()] == ["step_00000002"]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/loss" in r] == [0]  # step 2's eval was given up
    assert max(r["step"] for r in rows) == 2
    assert "stopped by SIGINT; resume from" in capsys.readouterr().err


def test_ctrl_c_at_the_first_evaluations_progress_line_stops_it_in_one_line(tmp_path):
    """As a user would: train.py with an eval set that takes a while; Ctrl-C once its progress line is printed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = [*TINY, "train.eval_samples=256", "train.eval_timesteps=32", "train.max_steps=2",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out = []
        for line in proc.stdout:  # "eval: 1/256 batches in 0.1s, ~25.5s left" (once the whole looks long)
            out.append(line)
            if line.startswith("eval: "):
                break
        assert any(line.startswith("eval: ") for line in out), "".join(out)[-3000:]
        signalled = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
        stopped_in = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = "".join(out) + rest
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.endswith("stopped by SIGINT; nothing was trained or saved: re-running the same command starts the "
                         "run (exit code 75)") and "Traceback" not in err
    assert "received SIGINT" in out and "step 0: eval/loss" not in out
    assert stopped_in < 15  # after the eval batch it was in, not the rest of the eval
    assert not RunDir(tmp_path / "run").checkpoints.dirs()
