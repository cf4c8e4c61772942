"""wandb for sweeps: group, job type, name and tags; env over config; every key on the FLOPs axis; no key
collisions; one wandb run per launch (or rollback) holding exactly metrics.jsonl's rows, so a resumed run shows
no row of the crashed launch past its checkpoint; logger keys never move a run directory.

What the trainer sends to wandb is recorded at wandb's public `Run` methods (log, define_metric), in offline
mode, and compared with metrics.jsonl (the file the trainer writes): no wandb internals are read.
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from vsa_train import trainer
from vsa_train.metrics import read_metrics, wandb_init_kwargs, wandb_project

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.frames=4", "data.height=8", "data.width=8", "train.batch_size=2", "train.eval_samples=2",
        "train.eval_timesteps=2", "train.log_every=1", "logger=wandb", "logger.mode=offline"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _compose(*overrides, hydra=False):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)


@pytest.fixture
def spy(monkeypatch):
    """Records what the trainer hands to wandb: (run id, row, step) per log call, define_metric calls, inits."""
    record = {"log": [], "define": [], "init": []}
    real_log, real_define, real_init = wandb.Run.log, wandb.Run.define_metric, wandb.init

    def log(self, data, step=None, **kwargs):
        record["log"].append((self.id, dict(data), step))
        return real_log(self, data, step=step, **kwargs)

    def define_metric(self, name, *args, **kwargs):
        record["define"].append((name, kwargs))
        return real_define(self, name, *args, **kwargs)

    def init(*args, **kwargs):
        record["init"].append(kwargs)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb.Run, "log", log)
    monkeypatch.setattr(wandb.Run, "define_metric", define_metric)
    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the config's logger.mode=offline decides here
    yield record
    if wandb.run is not None:  # a test that crashed a run on purpose leaves it open
        wandb.run.finish()


def _rows_of(record, run_id):
    return [row for rid, row, _ in record["log"] if rid == run_id and "step" in row]


def test_sweep_job_gets_group_job_type_short_name_and_tags(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    overrides = ["experiment=scaling_law_tiny", "model.depth=1", "attn=dense", "train.flops_budget=4e9",
                 "logger=wandb", "train.log_every=5"]
    cfg = _compose(*overrides, hydra=True)
    HydraConfig.instance().set_config(cfg)  # what a Hydra job sees
    try:
        kwargs = wandb_init_kwargs(cfg, tmp_path)
    finally:
        HydraConfig.instance().cfg = None
    assert kwargs["group"] == "scaling_law_tiny_synthetic" and kwargs["job_type"] == "train"
    assert kwargs["name"] == "depth=1 dense flops_budget=4e9"  # experiment, logger and cadence keys left out
    assert kwargs["tags"] == ["model.depth=1", "attn=dense", "train.flops_budget=4e9"]
    assert kwargs["id"] == hashlib.sha1(str(tmp_path.resolve()).encode()).hexdigest()[:16]
    assert kwargs["mode"] == "offline" and kwargs["dir"] == str(tmp_path)
    # outside Hydra: the run directory's name; a third launch (two history lines before it) gets its own id
    (tmp_path / "config_history.jsonl").write_text("{}\n{}\n{}\n")
    plain = wandb_init_kwargs(_compose("logger=wandb", "logger.tags=[mine]"), tmp_path)
    assert plain["name"] == tmp_path.name and plain["tags"] == ["mine"] and plain["id"] == kwargs["id"] + "-r2"


def test_environment_wins_over_the_logger_config(monkeypatch, tmp_path):
    cfg = _compose("logger=wandb", "logger.mode=offline", "logger.project=from_config")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert wandb_project(cfg) == "from_config" and wandb_init_kwargs(cfg, tmp_path, [])["mode"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "from_env")
    assert wandb_project(cfg) == "from_env" and wandb_init_kwargs(cfg, tmp_path, [])["mode"] == "disabled"


def test_resume_starts_a_new_wandb_run_without_the_crashed_tail(tmp_path, spy, die_in_step):
    """Launch 1 checkpoints at step 2, logs step 3 and dies in step 4; launch 2 resumes from step 2. Its wandb
    run holds metrics.jsonl's rows exactly (steps 0..5, each once, in order): none of launch 1's step-3 row."""
    restore = die_in_step(4)
    cfg = ("train.max_steps=5", "train.ckpt_every=2", "train.eval_every=2", "train.sample_every=5",
           "train.sample_steps=1", "train.sample_count=1")
    with pytest.raises(KeyboardInterrupt):
        trainer.train(_compose(*TINY, f"run_dir={tmp_path}", *cfg))
    wandb.run.finish()  # the process would have died here; finish what wandb buffered
    restore()
    trainer.train(_compose(*TINY, f"run_dir={tmp_path}", *cfg))

    first, second = [kw["id"] for kw in spy["init"]]
    assert second == first + "-r1"
    crashed, final = _rows_of(spy, first), _rows_of(spy, second)
    assert [r["step"] for r in crashed] == [0, 1, 2, 3]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert final == rows  # the whole history, each row once: steps 0-2 re-logged from metrics.jsonl
    assert crashed[3]["samples/s"] != rows[3]["samples/s"]  # the tail row differs: it would have been caught
    assert all(step == row["step"] for rid, row, step in spy["log"] if rid == second and "step" in row)
    # every key on the FLOPs axis, eval minima in the summary, the sample videos under their own key
    assert ("*", {"step_metric": "flops"}) in spy["define"]
    assert ("eval/loss", {"step_metric": "flops", "summary": "min"}) in spy["define"]
    videos = [row for rid, row, _ in spy["log"] if rid == second and "media/samples" in row]
    assert len(videos) == 1 and all(isinstance(r.get("samples", 0), int) for r in final)
    assert {"eval/loss_t0.2500", "eval/loss_t0.7500"} <= rows[-1].keys()


def test_rollback_continues_in_a_new_wandb_run(tmp_path, spy, monkeypatch):
    """A rollback rewinds metrics.jsonl within a launch: the rows from there go to `<id>-b1`, re-logged first."""
    calls, real_loss = [], trainer.flow_loss

    def poisoned(*args, **kwargs):
        calls.extend([1] if torch.is_grad_enabled() else [])
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(trainer, "flow_loss", poisoned)
    trainer.train(_compose(*TINY, f"run_dir={tmp_path}", "train.max_steps=5", "train.ckpt_every=2",
                           "train.eval_every=100", "train.on_nonfinite=rollback"))
    ids = list(dict.fromkeys(rid for rid, _, _ in spy["log"]))
    assert len(ids) == 2 and ids[1] == ids[0] + "-b1"
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in _rows_of(spy, ids[0])] == [0, 1, 2, 3]
    assert _rows_of(spy, ids[1]) == rows and [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]


def test_logger_and_cadence_keys_do_not_move_the_run_directory(tmp_path):
    """One multirun over logger=none,wandb and two log cadences: all four jobs share one run directory."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "train.dry_run=true", "attn=dense",
                           "logger=none,wandb", "train.log_every=3,7",
                           f"hydra.sweep.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["attn=dense"]
