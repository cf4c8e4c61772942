"""The run lifecycle as a cluster and a careless user treat it: changed flags, hostile files, damaged checkpoints,
torn metrics, non-finite losses, two writers, full disks and stop signals. CPU, tiny model (64 tokens)."""
import errno
import json
import statistics
import multiprocessing
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file

from vsa_train import rundir, runlock, trainer
from vsa_train.checkpoint import CheckpointError
from vsa_train.checkpoint import format as checkpoint_format  # the module that calls safetensors (patched)
from vsa_train.checkpoint import save as checkpoint  # the module that writes (patched below)
from vsa_train.checkpoint.format import verify, write_manifest
from vsa_train.metrics import read_metrics
from vsa_train.rundir import LOCK, RunDir, RunDirError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.frames=4", "data.height=8", "data.width=8", "train.batch_size=2", "train.eval_samples=4",
        "train.eval_timesteps=2", "train.log_every=1", "train.eval_every=100", "logger=none"]


def _cfg(run_dir, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=[*TINY, f"run_dir={run_dir}", *overrides])


def _run(run_dir, *overrides):
    return trainer.train(_cfg(run_dir, *overrides))


def _losses(run_dir):
    return {r["step"]: r["train/loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "train/loss" in r}


def _steps(run_dir):
    return [p.name for p in RunDir(run_dir).checkpoints.dirs()]


def _rewrite_manifest(ckpt: Path) -> None:
    """What an attacker who controls the run directory can do: make the manifest match the planted files."""
    write_manifest(ckpt, json.loads((ckpt / "manifest.json").read_text())["step"])
    assert verify(ckpt) is None


# --------------------------------------------------------------------------------------- hostile run directories

class Payload:
    """Unpickling this writes a marker file: proof that a loader ran code from the run directory."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


@pytest.mark.parametrize("layout", ["ours", "accelerate"])
def test_no_code_runs_from_a_hostile_checkpoint(tmp_path, layout):
    run = tmp_path / "run"
    _run(run, "train.max_steps=2", "train.ema=0.9")
    ckpt = RunDir(run).checkpoints.dirs()[-1]
    marker = tmp_path / "marker"
    bomb = pickle.dumps(Payload(marker))
    names = [p.name for p in ckpt.iterdir()]
    if layout == "accelerate":  # the files an earlier (accelerate save_state) layout would be loaded from
        names += ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin",
                  "pytorch_model.bin", "scheduler.bin"]
    for name in names:
        if name != "manifest.json":
            (ckpt / name).write_bytes(bomb)
    if layout == "ours":
        _rewrite_manifest(ckpt)
    else:
        (ckpt / "manifest.json").unlink()

    with pytest.raises((CheckpointError, ValueError)):  # resume: refused (not a safetensors / JSON file)
        _run(run, "train.max_steps=4", "train.ema=0.9")
    with pytest.raises((CheckpointError, ValueError)):  # weights for another run
        _run(tmp_path / "other", "train.max_steps=1", f"train.init_from={run}")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"checkpoint={run}", "prompt=x", "steps=1",
                           f"out={tmp_path / 's.mp4'}"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert not marker.exists()


# ----------------------------------------------------------------------------------------- changed flags

def test_resume_refuses_a_changed_trajectory_and_leaves_the_run_as_it_was(tmp_path):
    _run(tmp_path, "train.max_steps=2")
    config = (tmp_path / "config.yaml").read_bytes()
    rows = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(RunDirError) as err:
        _run(tmp_path, "train.max_steps=4", "model.hidden_size=64", "optim.lr=1e-3")
    assert "model.hidden_size: run has 128, this launch 64" in str(err.value)
    assert "optim.lr: run has 0.0006, this launch 0.001" in str(err.value)
    with pytest.raises(RunDirError, match=r"global batch 2; this launch has 4"):
        _run(tmp_path, "train.max_steps=4", "train.batch_size=4")
    assert (tmp_path / "config.yaml").read_bytes() == config  # untouched: sample.py still rebuilds the model
    assert (tmp_path / "metrics.jsonl").read_bytes() == rows
    assert _steps(tmp_path) == ["step_00000002"]
    # what does not change the trajectory stays allowed
    _run(tmp_path, "train.max_steps=3", "train.log_every=2", "data.num_workers=0")
    assert _steps(tmp_path)[-1] == "step_00000003"


def test_forced_resume_is_recorded(tmp_path):
    _run(tmp_path, "train.max_steps=2")
    _run(tmp_path, "train.max_steps=3", "optim.lr=1e-3", "train.resume=force")
    history = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert [h["forced"] for h in history] == [False, True]
    assert history[1]["changed"] == {"optim.lr": [0.0006, 0.001]} and history[1]["resumed_from"] == "step_00000002"
    assert OmegaConf.load(tmp_path / "config.yaml").optim.lr == 0.001  # the config now in force
    with pytest.raises(RunDirError, match="train.resume=never"):
        _run(tmp_path, "train.max_steps=4", "optim.lr=1e-3", "train.resume=never")


def _history(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "config_history.jsonl").read_text().splitlines()]


def test_forced_resume_applies_the_optimizer_settings(tmp_path):
    """optimizer.load_state_dict brings back the checkpoint's betas and weight decay: the forced ones must win."""
    _run(tmp_path, "train.max_steps=2")
    _run(tmp_path, "train.max_steps=3", "optim.betas=[0.5,0.6]", "optim.weight_decay=0.5", "train.resume=force")
    groups = json.loads((RunDir(tmp_path).checkpoints.dirs()[-1] / "optimizer.json").read_text())["param_groups"]
    assert [(g["betas"], g["weight_decay"]) for g in groups] == [([0.5, 0.6], 0.5), ([0.5, 0.6], 0.0)]
    assert _history(tmp_path)[1]["changed"] == {"optim.betas": [[0.9, 0.95], [0.5, 0.6]],
                                                "optim.weight_decay": [0.01, 0.5]}


def test_forced_global_batch_is_recorded_and_one_that_misses_the_data_position_is_named(tmp_path):
    _run(tmp_path, "train.max_steps=2")  # 2 steps of 2 samples: the data stands at sample 4
    _run(tmp_path, "train.max_steps=3", "train.batch_size=4", "train.resume=force")  # now at sample 8
    last = _history(tmp_path)[1]
    assert last["forced"] is True and last["changed"] == {"global_batch": [2, 4]}
    with pytest.raises(RunDirError) as err:
        _run(tmp_path, "train.max_steps=4", "train.batch_size=3", "train.resume=force")
    message = str(err.value)
    assert "\n" not in message and "sample 8" in message and "train.batch_size=3" in message
    assert "train.batch_size=2" in message  # the largest one below that continues at sample 8
    assert len(_history(tmp_path)) == 2


def test_refused_launch_leaves_the_run_directory_byte_identical(tmp_path):
    """Through train.py: Hydra's .hydra/ record is written only once the launch is accepted."""
    run = tmp_path / "run"
    out, _ = _launch(run, "train.max_steps=2").communicate(timeout=120)
    assert (run / ".hydra" / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file(), out
    assert "train.max_steps=2" in (run / ".hydra" / "overrides.yaml").read_text()

    def files():
        return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}

    before = files()
    proc = _launch(run, "train.max_steps=4", "model.hidden_size=64")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "model.hidden_size: run has 128, this launch 64" in out
    assert files() == before


def test_a_changed_eval_set_is_refused_unless_forced_and_then_recorded(tmp_path):
    """The eval curve is one set's: train.eval_samples / eval_timesteps decide it (eval_batch_size only chunks it)."""
    _run(tmp_path, "train.max_steps=2")
    for key in ("train.eval_samples=2", "train.eval_timesteps=3"):
        with pytest.raises(RunDirError, match=rf"{key.split('=')[0]}: run has \d, this launch \d"):
            _run(tmp_path, "train.max_steps=3", key)
    _run(tmp_path, "train.max_steps=3", "train.eval_batch_size=2")  # the same set, in other chunks
    _run(tmp_path, "train.max_steps=4", "train.eval_timesteps=3", "train.resume=force")
    last = _history(tmp_path)[-1]
    assert last["forced"] is True and last["changed"] == {"train.eval_timesteps": [2, 3]}


def test_raising_max_steps_of_a_decaying_schedule_keeps_the_final_rate_and_says_so(tmp_path):
    """The docs' promise: steps past the run's end keep the final rate (no jump back up); the history says so."""
    cosine = ("optim.schedule=cosine", "optim.warmup_steps=0")
    _run(tmp_path, "train.max_steps=2", *cosine)
    _run(tmp_path, "train.max_steps=4", *cosine)
    lr = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if "lr" in r}
    assert lr[3] == lr[4] == lr[2] == pytest.approx(6e-4 * 0.1)
    last = _history(tmp_path)[-1]
    assert last["kept"] == {"lr_end_step": [2, 4]} and last["forced"] is False and last["changed"] == {}
    # forced: the launch's end wins, the decay starts over towards it (recorded as forced)
    _run(tmp_path, "train.max_steps=8", *cosine, "train.resume=force")
    lr = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if "lr" in r}
    assert lr[5] > lr[4]
    last = _history(tmp_path)[-1]
    assert last["forced"] is True and last["changed"] == {"lr_end_step": [2, 8]}


def test_a_changed_init_from_on_resume_is_refused_unless_forced_and_then_recorded(tmp_path):
    """A resumed run keeps its own weights: another train.init_from would be ignored, so it is not silently."""
    source, run = tmp_path / "source", tmp_path / "run"
    _run(source, "train.max_steps=1")
    _run(run, "train.max_steps=2")
    with pytest.raises(RunDirError, match=r"train.init_from: run has None, this launch '.*source'"):
        _run(run, "train.max_steps=3", f"train.init_from={source}")
    _run(run, "train.max_steps=3", f"train.init_from={source}", "train.resume=force")
    last = _history(run)[-1]
    assert last["forced"] is True and last["changed"] == {"train.init_from": [None, str(source)]}


def test_a_finished_run_says_so_and_opens_no_tracker_run(tmp_path, capsys):
    """Issue 29, item 5e: re-running a finished run trains nothing, writes nothing and says where its results are."""
    first = _run(tmp_path, "train.max_steps=2", "train.eval_every=2", "logger=wandb")
    capsys.readouterr()
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = _run(tmp_path, "train.max_steps=2", "train.eval_every=2", "logger=wandb")
    out = capsys.readouterr().out
    assert f"{tmp_path} is finished at step 2 (train.max_steps=2): final eval/loss {first['eval/loss']:.5f} " \
           f"(step 2); metrics in {tmp_path / 'metrics.jsonl'}. To train it further, raise train.max_steps." in out
    assert "resumed" not in out and "train:" not in out and again["step"] == 2
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == files  # no wandb run, no record
    # a run its FLOPs budget ended says that, and how to go on (in this directory, with a larger budget)
    budget = tmp_path / "budget"
    _run(budget, "train.max_steps=100", "train.flops_budget=1e9", "train.eval_every=100")
    capsys.readouterr()
    _run(budget, "train.max_steps=100", "train.flops_budget=1e9", "train.eval_every=100")
    out = capsys.readouterr().out
    assert re.search(r"is finished at step \d+ \(train.flops_budget=1.000e\+09 spent\): final eval/loss", out), out
    assert f"name it with run_dir={budget} and a larger train.flops_budget" in out


def test_a_new_budget_is_a_new_run_that_names_the_run_it_differs_from(tmp_path, capsys):
    """Issue 29, item 1: train.flops_budget is in the default directory's name; the new run says which run has the
    other budget and how to continue that one instead."""
    def default_dir(*overrides):  # runs/<...>_<hash>, as configs/train.yaml names it
        return tmp_path / f"dit_tiny_dense_synthetic_s0_{rundir.settings_hash(_cfg(tmp_path, *overrides))}"

    first = default_dir("train.flops_budget=1e9")
    _run(first, "train.max_steps=100", "train.flops_budget=1e9", "train.eval_every=100")
    second = default_dir("train.flops_budget=2e9")
    assert second != first and default_dir("train.flops_budget=1e9", "train.max_steps=7") == first
    capsys.readouterr()
    _run(second, "train.max_steps=1", "train.flops_budget=2e9")
    out = capsys.readouterr().out
    assert f"note: a new run (train.flops_budget is part of a run directory's name): {first} has " \
           f"train.flops_budget=1e+09, and otherwise these settings. To continue that run under this budget " \
           f"instead, add run_dir={first}" in out


def test_same_global_batch_other_split_resumes_at_the_same_sample(tmp_path):
    """batch 2 x accum 1 for 2 steps, then batch 1 x accum 2: the data continues where it stopped."""
    split, straight = tmp_path / "split", tmp_path / "straight"
    _run(split, "train.max_steps=2")
    _run(split, "train.max_steps=4", "train.batch_size=1", "train.grad_accum=2")
    _run(straight, "train.max_steps=4")
    state = json.loads((RunDir(split).checkpoints.dirs()[-1] / "state.json").read_text())
    assert state["samples"] == state["position"] == 8 and state["global_batch"] == 2
    # the same samples in the same steps: equal losses up to the order of the float sums
    a, b = _losses(split), _losses(straight)
    assert list(a) == [1, 2, 3, 4] and a[1] == b[1] and a[2] == b[2]
    assert a[3] == pytest.approx(b[3], rel=1e-5) and a[4] == pytest.approx(b[4], rel=1e-4)


# --------------------------------------------------------------------------------------------- integrity

def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    _run(tmp_path, "train.max_steps=4", "train.ckpt_every=2", "train.keep_checkpoints=3")
    old, new = RunDir(tmp_path).checkpoints.dirs()
    weights = new / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_00000004: model.safetensors has \d+ bytes"):
        _run(tmp_path, "train.max_steps=5")
    assert list(_losses(tmp_path)) == [1, 2, 3, 4, 5]  # resumed from step 2, the rows after it re-run
    (RunDir(tmp_path).checkpoints.dirs()[-1] / "optimizer.json").unlink()  # partly deleted
    assert "optimizer.json is missing" in verify(RunDir(tmp_path).checkpoints.dirs()[-1])
    for ckpt in RunDir(tmp_path).checkpoints.dirs():
        (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint .* verifies"):  # never silently start over
        _run(tmp_path, "train.max_steps=6")


@pytest.mark.parametrize("keep", [1, 2])
def test_retention_keeps_the_newest_checkpoint_that_verifies(tmp_path, keep):
    """Damaged checkpoints above the resume point neither count toward train.keep_checkpoints nor survive."""
    _run(tmp_path, "train.max_steps=6", "train.ckpt_every=2", "train.keep_checkpoints=3")
    for ckpt in RunDir(tmp_path).checkpoints.dirs()[3 - keep:]:  # keep=1: step 6; keep=2: steps 4 and 6
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        _run(tmp_path, f"train.max_steps={7 - 2 * keep}", f"train.keep_checkpoints={keep}")
    checkpoints = RunDir(tmp_path).checkpoints
    assert [c.name for c in checkpoints.verified(warn=False)][-1] == f"step_{7 - 2 * keep:08d}"
    assert all(verify(c) is None for c in checkpoints.dirs())  # the damaged ones were moved aside
    assert len(list((tmp_path / "checkpoints").glob(".damaged-*"))) == keep
    _run(tmp_path, "train.max_steps=8", f"train.keep_checkpoints={keep}")  # and the next launch resumes
    assert list(_losses(tmp_path)) == list(range(1, 9))


def test_missing_rng_state_warns_and_resumes(tmp_path):
    _run(tmp_path, "train.max_steps=2")
    (RunDir(tmp_path).checkpoints.dirs()[-1] / "rng_rank0.safetensors").unlink()
    with pytest.warns(UserWarning, match="rank 0: RNG state not restored .* no longer bit-exact"):
        _run(tmp_path, "train.max_steps=3")
    assert list(_losses(tmp_path)) == [1, 2, 3]


def test_torn_and_junk_metrics_lines_do_not_stop_a_resume(tmp_path):
    _run(tmp_path, "train.max_steps=2")
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'not json\n{"step": 3, "train/lo')  # junk, then a row torn by SIGKILL
    with pytest.warns(UserWarning, match="metrics.jsonl:4"):
        _run(tmp_path, "train.max_steps=3")
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]


def test_full_disk_names_the_path_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    _run(tmp_path, "train.max_steps=2")

    def full(tensors, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_tensors", full)
    with pytest.raises(OSError, match=r"cannot write .*tmp-step_00000003.*: disk full .*\(\d[\d,]* bytes free"):
        _run(tmp_path, "train.max_steps=3")
    assert _steps(tmp_path) == ["step_00000002"] and verify(RunDir(tmp_path).checkpoints.dirs()[-1]) is None
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_a_full_disk_in_a_background_save_stops_the_run_at_once_with_one_message(tmp_path, monkeypatch, capsys):
    _run(tmp_path, "train.max_steps=2")
    real = checkpoint_format.save_file

    def full(tensors, path, *args, **kwargs):  # what safetensors raises on a full disk
        if Path(path).name == "model.safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_format, "save_file", full)
    capsys.readouterr()
    with pytest.raises(OSError, match=r"cannot write .*tmp-step_00000003: disk full \(No space left on device\) "
                                      r"\(\d[\d,]* bytes free on that file system; writing it needs about [\d,]+ "):
        _run(tmp_path, "train.max_steps=20", "train.ckpt_every=3")
    said = "".join(capsys.readouterr())
    assert "checkpoint step 3 failed" in said and "No space left" not in said  # the error once: raised
    assert max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")) < 6  # stopped before the next save
    assert _steps(tmp_path) == ["step_00000002"] and verify(RunDir(tmp_path).checkpoints.dirs()[-1]) is None
    assert not list((tmp_path / "checkpoints").glob(".tmp-*")) and not (tmp_path / LOCK).exists()


# ----------------------------------------------------------------------------------------- non-finite loss

def _poison(monkeypatch, losses: dict):
    """Training step k (1-based calls with gradients) returns loss * losses[k] (nan, or a blow-up factor)."""
    calls = []
    real = trainer.flow_loss

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            factor = losses.get(len(calls), 1.0)
            if isinstance(factor, type):  # an exception class: a crash at that step
                raise factor(f"crash at training call {len(calls)}")
            return loss * factor
        return loss

    monkeypatch.setattr(trainer, "flow_loss", poisoned)
    return calls


def test_last_good_checkpoint_is_one_with_a_healthy_loss(tmp_path, monkeypatch):
    _poison(monkeypatch, {6: 1e5, 7: 1e5, 8: float("nan")})
    # Step 5 was saved after a healthy loss, but step 6's loss (from step 5's weights) exploded: step 4 is the
    # last one whose weights are healthy, and retention kept it (step 5 it did not need).
    with pytest.raises(FloatingPointError, match=r"at step 8.*Last healthy checkpoint: .*step_00000004"):
        _run(tmp_path, "train.max_steps=10", "train.ckpt_every=1", "train.keep_checkpoints=2")
    states = [json.loads((c / "state.json").read_text()) for c in RunDir(tmp_path).checkpoints.dirs()]
    assert [(s["step"], s["healthy"]) for s in states] == [(4, True), (6, False), (7, False)]


def test_rollback_skips_the_bad_batches_and_continues(tmp_path, monkeypatch):
    _poison(monkeypatch, {4: float("nan")})
    _run(tmp_path, "train.max_steps=6", "train.ckpt_every=2", "train.on_nonfinite=rollback")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]  # step 3 was rolled back and re-run once
    assert [r["train/rollbacks"] for r in rows[1:]] == [0, 0, 1, 1, 1, 1]
    state = json.loads((RunDir(tmp_path).checkpoints.dirs()[-1] / "state.json").read_text())
    assert state["samples"] == 12 and state["position"] == 16  # two steps' batches (3 and the bad 4th) skipped


def test_a_crash_after_a_rollback_resumes_on_the_new_trajectory(tmp_path, monkeypatch):
    """Checkpoints of the abandoned trajectory (above the rollback point) are gone before training goes on."""
    _poison(monkeypatch, {6: 1e5, 7: 1e5, 8: float("nan"), 9: RuntimeError})
    with pytest.raises(RuntimeError, match="crash at training call 9"):
        _run(tmp_path, "train.max_steps=10", "train.ckpt_every=1", "train.keep_checkpoints=2",
             "train.on_nonfinite=rollback")
    steps = [int(c.name[5:]) for c in RunDir(tmp_path).checkpoints.dirs()]
    back_to = max(steps)
    assert back_to <= 5 and not list((tmp_path / "checkpoints").glob(".discarded-*"))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(back_to + 1))
    monkeypatch.undo()
    _run(tmp_path, "train.max_steps=8")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(9))  # one trajectory: no step missing, none twice


def test_a_rollback_point_is_one_whose_weights_are_healthy(tmp_path, monkeypatch, capsys):
    """Update 5 blows the weights up (|w| x 1e6) after a healthy loss; step 6's loss, computed from them, is the
    evidence: the rollback goes to step 4, not to the diverged step 5 again and again."""
    _poison(monkeypatch, {6: float("nan")})
    clips, real_clip = [], trainer.clip_grad_norm

    def diverge(model, *args):
        clips.append(1)
        if len(clips) == 5:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1e6)
        return real_clip(model, *args)

    monkeypatch.setattr(trainer, "clip_grad_norm", diverge)
    _run(tmp_path, "train.max_steps=8", "train.ckpt_every=1", "train.on_nonfinite=rollback")
    assert "Rolled back to " in capsys.readouterr().out
    ckpt = RunDir(tmp_path).checkpoints.dirs()[-1]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 8 and state["rollbacks"] == 1
    weights = load_file(ckpt / "model.safetensors")
    assert max(w.abs().max().item() for w in weights.values()) < 1e3


def test_a_loss_drifting_up_slowly_turns_unhealthy_against_the_runs_best_median():
    """A loss rising 4% a step stays within 10x of its recent median (which drifts along) for ever; against the
    lowest median the run had, it turns unhealthy once 10x above it, and a resume keeps that reference."""
    from vsa_train.training_run import LossHealth

    health, losses, verdicts = LossHealth(factor=10.0), [1.0] * 20 + [1.04 ** k for k in range(1, 200)], []
    for step, loss in enumerate(losses, start=1):
        health.add(loss, step)
        verdicts.append(health.verdict(step))
        assert loss / statistics.median(health.losses) < 10  # what the recent median alone would say: healthy
    assert verdicts == [loss <= 10.0 for loss in losses] and health.best == 1.0
    resumed = LossHealth(factor=10.0)
    resumed.reset(list(health.losses), health.step, health.best)
    assert resumed.best == 1.0 and not any(list(resumed.verdicts)[LossHealth.MIN_LOSSES:])


def test_rollback_gives_up_after_max_rollbacks(tmp_path, monkeypatch):
    # Step 3 fails three times; each failure refutes step 2's weights, so each rollback returns to step 1.
    _poison(monkeypatch, {k: float("nan") for k in (3, 5, 7)})
    with pytest.raises(FloatingPointError, match="2 rollbacks of train.max_rollbacks=2 used"):
        _run(tmp_path, "train.max_steps=8", "train.ckpt_every=1", "train.on_nonfinite=rollback",
             "train.max_rollbacks=2")


# ------------------------------------------------------------------------------------------------- the lock

def test_a_live_writer_keeps_the_run_and_a_dead_one_does_not(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        with pytest.raises(RunDirError, match=rf"in use by {socket.gethostname()} pid {holder.pid}"):
            _run(tmp_path, "train.max_steps=1")
        assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match="stale lock .* its process no longer exists"):
        _run(tmp_path, "train.max_steps=1")
    assert not (tmp_path / LOCK).exists()  # released at the end
    # another host: alive while it refreshes the lock, stale after train.lock_stale_s
    (tmp_path / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(RunDirError, match="in use by elsewhere pid 1"):
        _run(tmp_path, "train.max_steps=2")
    old = time.time() - 3600
    os.utime(tmp_path / LOCK, (old, old))
    with pytest.warns(UserWarning, match="not refreshed for"):
        _run(tmp_path, "train.max_steps=2")


def _hold_lock(run_dir, stale_s, host, report, release):
    """A forked process holding run_dir's lock (as `host`), writing nothing, until `release` is set."""
    if host is not None:
        socket.gethostname = lambda: host
    try:
        with RunDir(run_dir).lock(stale_s):
            report.put("won")
            release.wait(60)
    except RunDirError as err:
        report.put(f"lost: {err}")


def _race_for_lock(run_dir, report, release):
    """`_hold_lock` by a launch that is slow between judging the lock stale and taking it over: every racer has
    judged before any acts, the interleaving in which a check-then-replace lets two launches win."""
    judge = runlock._stale_reason

    def slow(*args):
        reason = judge(*args)
        time.sleep(0.2)
        return reason

    runlock._stale_reason = slow
    _hold_lock(run_dir, 60, None, report, release)


def _forked(target, *args):
    proc = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def test_a_live_lock_is_kept_by_its_heartbeat_however_long_nothing_is_logged(tmp_path):
    ctx = multiprocessing.get_context("fork")
    report, release = ctx.Queue(), ctx.Event()
    holder = _forked(_hold_lock, tmp_path, 0.5, "elsewhere", report, release)  # another host: judged by age
    try:
        assert report.get(timeout=30) == "won"
        time.sleep(2)  # four times train.lock_stale_s without a metrics row
        with pytest.raises(RunDirError, match="in use by elsewhere"):
            with RunDir(tmp_path).lock(0.5):
                pass
    finally:
        release.set()
        holder.join(30)
    assert not (tmp_path / LOCK).exists()


def test_the_heartbeat_stops_on_release(tmp_path):
    with RunDir(tmp_path).lock(0.2):
        old = time.time() - 3600
        os.utime(tmp_path / LOCK, (old, old))
        time.sleep(0.3)
        assert time.time() - (tmp_path / LOCK).stat().st_mtime < 5  # refreshed while held
    assert not (tmp_path / LOCK).exists()
    assert not [t for t in threading.enumerate() if "run.lock" in t.name]
    (tmp_path / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1}))  # a later holder's
    old = time.time() - 3600
    os.utime(tmp_path / LOCK, (old, old))
    time.sleep(0.3)
    assert (tmp_path / LOCK).stat().st_mtime == old


def test_launches_racing_for_a_stale_lock_leave_one_writer(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for race in range(20):
        run_dir = tmp_path / str(race)
        run_dir.mkdir()
        (run_dir / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
        old = time.time() - 3600
        os.utime(run_dir / LOCK, (old, old))
        report, release = ctx.Queue(), ctx.Event()
        racers = [_forked(_race_for_lock, run_dir, report, release) for _ in range(3)]
        try:
            results = [report.get(timeout=60) for _ in racers]
        finally:
            release.set()
            for racer in racers:
                racer.join(30)
        assert results.count("won") == 1 and sum("in use by" in r for r in results) == 2, (race, results)


def test_a_lock_whose_pid_now_names_another_process_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stat = Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()
        started = int(stat[19])  # field 22: start time in clock ticks after boot
        record = {"host": socket.gethostname(), "pid": holder.pid, "pid_start": started}
        (tmp_path / LOCK).write_text(json.dumps(record))
        with pytest.raises(RunDirError, match=f"in use by {socket.gethostname()} pid {holder.pid}"):
            with RunDir(tmp_path).lock(900):
                pass
        (tmp_path / LOCK).write_text(json.dumps({**record, "pid_start": started - 1}))  # an earlier process's pid
        with pytest.warns(UserWarning, match="stale lock .* another process"):
            with RunDir(tmp_path).lock(900):
                assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------------- processes and signals

def _launch(run_dir, *args, torchrun=0, log=None):
    """train.py (or torchrun) in the background; its output in a pipe, or in the file `log` (several processes at once:
    a pipe nobody reads fills up and stops its writer)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun)] if torchrun else \
        [sys.executable]
    out = subprocess.PIPE if log is None else open(log, "w")
    try:
        return subprocess.Popen([*launcher, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={run_dir}", *args],
                                cwd=run_dir.parent, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    finally:
        if log is not None:
            out.close()  # the child holds its own copy


def _wait_for_step(run_dir, step, proc, timeout=120, log=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            out = Path(log).read_text(errors="replace") if log else proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"exited early (status {proc.returncode}):\n{out[-3000:]}")
        try:
            if any(r["step"] >= step for r in read_metrics(run_dir / "metrics.jsonl")):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


def _finish(proc, timeout, log=None):
    """Waits for a process started with `log`; returns its exit status and output (killed on a time-out)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode, Path(log).read_text(errors="replace") if log else ""


def _alive(pid):
    """The process exists and has not exited (a zombie, not yet reaped by its parent, has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


class _Lines:
    """A process's output (text pipe) read by a thread as it comes, so that a test can wait for a line."""

    def __init__(self, proc):
        self.proc, self.lines = proc, []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(text in line for line in list(self.lines)):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise AssertionError(f"no {text!r} in the output within {timeout} s:\n{self.text()[-3000:]}")

    def text(self):
        if self.proc.poll() is not None:
            self._thread.join(timeout=10)
        return "".join(self.lines)


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory):
    """One run per stop signal, all started at once (the processes share the cores instead of waiting for each other):
    each gets its signal after step 3 and exits; then all are resumed to one end step next to one uninterrupted run
    to that step. Returns, per signal: the first part's exit status and output, its checkpoints, its last step, and
    the resumed part's exit status and output; and the uninterrupted run's."""
    base = tmp_path_factory.mktemp("stop_signals")
    runs = {sig: base / sig.name for sig in STOP_SIGNALS}
    procs = {}
    for sig, run in runs.items():
        run.mkdir()
        procs[sig] = _launch(run, "train.max_steps=100000", "train.ckpt_every=100000", log=f"{run}.first.log")
    results = {}
    try:
        for sig, proc in procs.items():
            try:
                _wait_for_step(runs[sig], 3, proc, log=f"{runs[sig]}.first.log")
            except AssertionError as err:  # this signal's test fails with it; the others go on
                results[sig] = {"error": str(err)}
                continue
            proc.send_signal(sig)
        for sig, proc in procs.items():
            code, out = _finish(proc, 120, f"{runs[sig]}.first.log")
            metrics = runs[sig] / "metrics.jsonl"
            rows = read_metrics(metrics) if metrics.is_file() else []
            results.setdefault(sig, {}).update(code=code, out=out, checkpoints=_steps(runs[sig]),
                                               stopped=max((r["step"] for r in rows), default=0))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    n = max((r["stopped"] for r in results.values() if r.get("code") == 75), default=0) + 2
    straight = base / "straight"
    straight.mkdir()
    again = {sig: _launch(run, f"train.max_steps={n}", "train.ckpt_every=100000",  # same threads as the first part
                          log=f"{run}.again.log") for sig, run in runs.items() if results[sig].get("code") == 75}
    reference = _launch(straight, f"train.max_steps={n}", log=f"{straight}.log")
    for sig, proc in again.items():
        results[sig]["again"] = _finish(proc, 120, f"{runs[sig]}.again.log")
    return runs, results, straight, _finish(reference, 120, f"{straight}.log")


@pytest.mark.slow
@pytest.mark.xdist_group("stop_signals")  # one worker builds stopped_runs for all four
@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda sig: sig.name)
def test_stop_signal_saves_and_the_resume_is_exact(stopped_runs, sig):
    runs, results, straight, (code, out) = stopped_runs
    run, result = runs[sig], results[sig]
    assert "error" not in result, result["error"]
    assert result["code"] == 75, result["out"][-3000:]
    assert result["checkpoints"] == [f"step_{result['stopped']:08d}"]  # saved at the step it stopped, nothing lost
    assert code == 0, out[-3000:]
    code, out = result["again"]
    assert code == 0, out[-3000:]
    assert _losses(run) == _losses(straight)  # bit for bit


@pytest.mark.slow
def test_second_sigint_exits_at_once(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # Steps of ~2 s made of 50 tiny micro-batches: the second SIGINT arrives within the step of the first, and
    # the main thread is back in Python within milliseconds to run the handler. (Two SIGINTs that arrive during
    # one long C++ op reach Python as one, and the run would just save and exit 75.)
    proc = _launch(run, "train.max_steps=100000", "train.ckpt_every=100000", "train.grad_accum=50")
    try:
        _wait_for_step(run, 1, proc)
        lines = _Lines(proc)  # from here on the output is read as it comes (before it, it waits in the pipe)
        os.kill(proc.pid, signal.SIGINT)
        lines.wait_for("received SIGINT")  # the first was handled: the second is a second
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = lines.text()
    assert proc.returncode not in (0, 75), out[-2000:]
    assert "second SIGINT" in out and not _steps(run)


@pytest.mark.slow
def test_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Every rank saves the same step once and exits 75, the one without the signal too (under srun each task's
    status is the job's: one rank's 1 would keep SLURM from requeueing it)."""
    run = tmp_path / "run"
    run.mkdir()
    proc = _launch(run, "train.max_steps=100000", "train.ckpt_every=100000", torchrun=2)
    _wait_for_step(run, 3, proc)
    ranks = _children(proc.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGTERM)  # one rank only: the step flag all-reduce tells the other
    out, _ = proc.communicate(timeout=120)
    # torchrun itself exits 1 whenever a worker exits non-zero; its summary gives each worker's status.
    assert sorted(re.findall(r"^\s*exitcode\s+:\s+(-?\d+)", out, re.M)) == ["75", "75"], out[-3000:]
    assert "stopped by SIGTERM (received by another rank)" in out and "valid Signals" not in out, out[-3000:]
    assert len(RunDir(run).checkpoints.dirs()) == 1, out[-3000:]  # saved once
    ckpt = RunDir(run).checkpoints.dirs()[-1]
    assert (ckpt / "rng_rank0.safetensors").is_file() and (ckpt / "rng_rank1.safetensors").is_file(), out[-3000:]
    assert verify(ckpt) is None
    assert ckpt.name == f"step_{max(r['step'] for r in read_metrics(run / 'metrics.jsonl')):08d}"


@pytest.mark.slow
def test_elastic_restart_one_process_to_two(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = _launch(run, "train.max_steps=2", "train.batch_size=4")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    proc = _launch(run, "train.max_steps=4", "train.batch_size=2", torchrun=2)  # same global batch: 4
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    assert "saved by 1 processes, this launch has 2" in out  # the RNG cannot follow: said, not hidden
    state = json.loads((RunDir(run).checkpoints.dirs()[-1] / "state.json").read_text())
    assert (state["step"], state["samples"], state["position"], state["processes"]) == (4, 16, 16, 2)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_frozen_rank_ends_the_job_within_the_timeout(tmp_path):
    """A rank stops answering (SIGSTOP): the other one's collective times out after train.dist_timeout_s and it
    exits with an error, and torchrun fails the job. (torchrun itself gives a stopped rank 30 s after its SIGTERM
    before it sends SIGKILL; that wait is torchrun's, so the test sends the SIGKILL once the live rank is gone.)"""
    run = tmp_path / "run"
    run.mkdir()
    proc = _launch(run, "train.max_steps=100000", "train.ckpt_every=100000", "train.dist_timeout_s=10", torchrun=2)
    _wait_for_step(run, 2, proc)
    ranks = _children(proc.pid)
    assert len(ranks) == 2
    live, frozen = ranks
    os.kill(frozen, signal.SIGSTOP)
    start = time.time()
    try:
        while _alive(live) and time.time() - start < 120:
            time.sleep(0.1)
        waited = time.time() - start
        os.kill(frozen, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        for pid in [frozen, *_children(proc.pid)]:
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert waited < 120, "the live rank still runs 120 s after the other one froze"
    assert proc.returncode != 0


@pytest.mark.slow
def test_two_launches_on_one_run_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    first = _launch(run, "train.max_steps=100000", "train.ckpt_every=100000")
    try:
        _wait_for_step(run, 2, first)
        second = _launch(run, "train.max_steps=100000")
        out, _ = second.communicate(timeout=120)
        assert second.returncode != 0 and "is in use by" in out, out[-2000:]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps == list(range(len(steps)))  # one writer: no duplicated rows


def test_analysis_reads_a_run_whose_dir_was_set_on_the_command_line(tmp_path):
    from vsa_train.analysis.find import find_runs

    _run(tmp_path / "anywhere", "train.max_steps=2", "train.eval_every=1")
    (found,) = find_runs([tmp_path])
    assert found.attn == "dense" and len(found.evals()) == 2


def test_stop_hands_the_signal_to_the_handler_it_replaced():
    """Under submitit, its USR2 handler (requeue the SLURM job) runs after our checkpoint is written."""
    from vsa_train.preemption import REQUEUE_EXIT_CODE, StopSignals

    called = []
    # exit_for_requeue leaves SIGTERM/USR1/USR2 ignored (the process is leaving): put them back for this one
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    signal.signal(signal.SIGUSR2, lambda sig, frame: called.append(sig))
    try:
        with StopSignals(announce=lambda message: None) as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.requested() and not called  # nothing happens until the step is saved
            with pytest.raises(SystemExit) as exit_:
                stop.exit_for_requeue("step_00000007")
        assert called == [signal.SIGUSR2] and exit_.value.code == REQUEUE_EXIT_CODE
        assert signal.getsignal(signal.SIGUSR2) is not stop._handle  # restored
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_rank_without_the_signal_stops_for_the_one_the_ranks_agreed_on():
    """Rank 0 of a job whose rank 1 got SIGUSR2: it exits 75 too, and submitit's handler (which requeues from
    rank 0) is called with that signal."""
    from vsa_train.preemption import REQUEUE_EXIT_CODE, StopSignals

    called = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    signal.signal(signal.SIGUSR2, lambda sig, frame: called.append(sig))
    try:
        with StopSignals(announce=lambda message: None) as stop:
            assert not stop.requested()
            with pytest.raises(SystemExit) as exit_:
                stop.exit_for_requeue("step_00000007", signal.SIGUSR2)
        assert called == [signal.SIGUSR2] and exit_.value.code == REQUEUE_EXIT_CODE
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # on its way out: the launcher's SIGTERM is moot
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
