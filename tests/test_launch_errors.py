"""Expected failures of a launch (issue 29, items 2 and 3): one line on stderr, a non-zero exit, no run directory
left behind; the traceback only under HYDRA_FULL_ERROR=1."""
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vsa_train.config_schema import ConfigError
from vsa_train.errors import LaunchError, MissingInput
from vsa_train.rundir import RunDirError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.frames=4", "data.height=8", "data.width=8", "train.batch_size=2", "train.eval_samples=2",
        "train.eval_timesteps=1", "train.eval_batch_size=2", "logger=none"]


def _train_py(*args, cwd, env=None):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], check=False, capture_output=True,
                          text=True, cwd=cwd, timeout=300, env=dict(os.environ, **(env or {})))


def _one_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_the_expected_failures_are_launch_errors_of_their_usual_kinds():
    assert issubclass(ConfigError, ValueError) and issubclass(RunDirError, RuntimeError)
    assert issubclass(MissingInput, FileNotFoundError)
    assert all(issubclass(cls, LaunchError) for cls in (ConfigError, RunDirError, MissingInput))
    err = pickle.loads(pickle.dumps(ConfigError(["a must be b, got c"])))  # a SLURM job's result is pickled
    assert err.problems == ["a must be b, got c"] and str(err) == "invalid config: a must be b, got c"


@pytest.mark.parametrize("overrides,line", [
    (["data=videos", "data.manifest=none.csv"], "invalid config: data.manifest='none.csv' does not exist"),
    (["data=videos", "data.folder=nowhere"], "invalid config: data.folder='nowhere' is not a directory"),
    (["data=hf", "data.path=none.parquet"], "invalid config: data.path='none.parquet' does not exist"),
])
def test_a_missing_data_input_is_one_line_before_any_directory(tmp_path, overrides, line):
    proc = _train_py(*overrides, *TINY, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and _one_line(proc) == line
    assert not (tmp_path / "run").exists()


def test_a_data_failure_found_while_building_removes_the_launchs_directory(tmp_path):
    """The manifest exists, but none of its rows is usable: found once the run is being built, after Hydra made
    the run directory; the launch takes it away again. HYDRA_FULL_ERROR=1 shows the traceback."""
    (tmp_path / "m.csv").write_text("path,caption\ngone.mp4,x\n")
    args = ("data=videos", "data.manifest=m.csv", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    proc = _train_py(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _one_line(proc) == ("no usable input for the eval set (m.csv); the first: gone.mp4: file not found (the "
                               "others in the warnings above)")
    assert not (tmp_path / "run").exists()
    proc = _train_py(*args, cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "MissingInput" in proc.stderr


def test_run_directory_refusals_are_one_line_and_keep_the_run(tmp_path):
    run_dir = tmp_path / "run"
    proc = _train_py(*TINY, "train.max_steps=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = sorted(p.name for p in run_dir.iterdir())
    proc = _train_py(*TINY, "train.max_steps=2", "train.batch_size=4", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2 and "was trained with global batch 2; this launch has 4" in _one_line(proc)
    # a live process of this host holds the lock; no SLURM job: the line names none
    lock = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": None, "started": time.time(),
            "token": "other"}
    (run_dir / "run.lock").write_text(json.dumps(lock))
    proc = _train_py(*TINY, "train.max_steps=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    line = _one_line(proc)
    assert proc.returncode == 2 and f"is in use by {socket.gethostname()} pid {os.getpid()}" in line
    assert "SLURM" not in line
    (run_dir / "run.lock").unlink()
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_a_multirun_jobs_expected_failure_is_named_without_a_traceback(tmp_path):
    """The sweep goes on; Hydra names the failed job and its one line, and exits non-zero."""
    (tmp_path / "m.csv").write_text("path,caption\ngone.mp4,x\n")
    sweep = tmp_path / "sweep"
    proc = _train_py("-m", "data=videos", "data.manifest=m.csv", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Error executing job with overrides" in proc.stderr
    assert "no usable input for the eval set (m.csv)" in proc.stderr
    assert not [p for p in sweep.iterdir() if p.is_dir()]  # the job's directory went with it


# ------------------------------------------------------------------------ item 2: key typos without a `+`

@pytest.mark.parametrize("args,line", [
    (["train.max_step=5"], "invalid config: unknown key train.max_step; did you mean train.max_steps?"),
    (["attn.sparsity=0.5"], "invalid config: attn.sparsity belongs to attn=vsa (also attn=tile_window, "
                            "attn=vsa_coarse_only, attn=vsa_fine_only), not attn=dense"),
])
def test_a_mistyped_key_gets_the_schemas_line_not_hydras_append_advice(tmp_path, args, line):
    proc = _train_py(*args, cwd=tmp_path)
    assert proc.returncode == 2 and _one_line(proc) == line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,found", [
    (["model.hiden_size=3"], ["unknown key model.hiden_size; did you mean model.hidden_size?"]),
    (["trian.max_steps=3"], ["unknown key trian; did you mean train?"]),
    (["data.folder=x"], ["data.folder belongs to data=videos (also data=hf), not data=synthetic"]),
    (["train.max_step=5", "optim.lrr=1"], ["unknown key train.max_step; did you mean train.max_steps?",
                                           "unknown key optim.lrr; did you mean optim.lr?"]),
    # fine, or left to others: the chosen option has it; `+key` (the schema's check); Hydra's keys; list indices;
    # a swept group (Hydra reports); a line that does not parse (Hydra reports)
    (["attn=vsa", "attn.sparsity=0.5"], []),
    (["experiment=dit120m_16k", "train.max_steps=3", "data.frames=4"], []),
    (["+train.max_step=5"], []),
    (["hydra.run.dir=x", "hydra.job.chdir=false"], []),
    (["model.patch_size.0=1"], []),
    (["-m", "attn=dense,vsa", "attn.sparsity=0.5"], []),
    (["train.max_step=[1"], []),
])
def test_command_line_keys_are_checked_against_the_composed_config(args, found):
    from vsa_train.config_schema import override_problems

    assert override_problems(args, ROOT / "configs") == found
