"""accelerate launch's own settings (issue 30, item 4): train.mixed_precision=auto follows a precision the launcher
was asked for, an explicit one that contradicts it is refused, options the trainer does not honour are refused
before any directory is made, and a resume compares the precision a launch resolves to.

The launcher's settings reach the process as accelerate launch sets them (accelerate/utils/launch.py): environment
variables, and its own command line (here given as the argument list `launcher_args` would read)."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.state import AcceleratorState
from hydra import compose, initialize_config_dir

from vsa_train import trainer
from vsa_train.config_schema import ConfigCheck
from vsa_train.launcher import (LauncherError, Precision, launch_arguments, launch_problems, launcher_args,
                                resolve_precision)
from vsa_train.rundir import RunDirError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.frames=4", "data.height=8", "data.width=8", "train.batch_size=2", "train.eval_samples=2",
        "train.eval_timesteps=1", "train.eval_batch_size=2", "train.eval_every=100", "logger=none"]
# What accelerate launch exports to the processes it starts, whatever was asked (prepare_simple_launcher_cmd_env).
LAUNCHED = {"ACCELERATE_USE_CPU": "False", "ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_DYNAMO_MODE": "default",
            "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False", "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "False"}


def _train(mixed_precision="auto", grad_accum=1):
    return SimpleNamespace(mixed_precision=mixed_precision, grad_accum=grad_accum)


def _launched(precision: str, **more) -> dict:
    return {**LAUNCHED, "ACCELERATE_MIXED_PRECISION": precision, **more}


@pytest.mark.parametrize("argv,args", [
    (["/usr/bin/python3", "/venv/bin/accelerate", "launch", "--mixed_precision", "bf16", "train.py"],
     ["--mixed_precision", "bf16", "train.py"]),
    (["/venv/bin/accelerate-launch", "train.py"], ["train.py"]),
    (["python", "-m", "accelerate.commands.launch", "--cpu", "train.py"], ["--cpu", "train.py"]),
    (["/venv/bin/accelerate", "config"], None),                 # another accelerate command
    (["python", "train.py", "accelerate", "launch"], None),     # the words as a script's arguments
    (["torchrun", "--nproc_per_node", "2", "train.py"], None),
])
def test_the_launchers_command_line_is_recognised(argv, args):
    assert launch_arguments(argv) == args


def test_a_process_not_started_by_accelerate_launch_finds_no_launcher():
    assert launcher_args() is None  # pytest's parents are no accelerate launch


@pytest.mark.parametrize("setting,environ,launcher,expected", [
    # auto follows a precision the launcher was asked for ...
    ("auto", _launched("bf16"), ["--mixed_precision", "bf16", "train.py"],
     Precision("bf16", "accelerate launch --mixed_precision")),
    ("auto", _launched("no"), ["--mixed-precision=no", "train.py"],
     Precision("no", "accelerate launch --mixed_precision")),
    ("auto", {"ACCELERATE_MIXED_PRECISION": "fp16"}, None, Precision("fp16", "ACCELERATE_MIXED_PRECISION")),
    # ... not accelerate's default, which it sets as `no` when nothing asked (or its default config file's)
    ("auto", _launched("no"), ["--num_processes", "1", "train.py"], Precision("no", "auto: CPU")),
    ("auto", _launched("bf16"), ["train.py"], Precision("no", "auto: CPU")),
    ("auto", {}, None, Precision("no", "auto: CPU")),
    # a launcher whose command line this system does not show: only a value other than the default was asked for
    ("auto", _launched("bf16"), None, Precision("bf16", "accelerate launch")),
    ("auto", _launched("no"), None, Precision("no", "auto: CPU")),
    # an explicit train.mixed_precision as set (a contradiction is launch_problems' to refuse)
    ("bf16", _launched("bf16"), ["--mixed_precision", "bf16", "t.py"], Precision("bf16", "train.mixed_precision")),
    ("fp16", _launched("no"), ["t.py"], Precision("fp16", "train.mixed_precision")),
])
def test_the_precision_and_where_it_came_from(setting, environ, launcher, expected):
    assert resolve_precision(setting, environ, launcher, cuda=False) == expected


def test_auto_on_cuda_is_bf16_unless_the_launcher_asked_for_another():
    assert resolve_precision("auto", {}, None, cuda=True) == Precision("bf16", "auto: CUDA")
    assert resolve_precision("auto", _launched("no"), ["t.py"], cuda=True) == Precision("bf16", "auto: CUDA")
    no = resolve_precision("auto", _launched("no"), ["--mixed_precision", "no", "t.py"], cuda=True)
    assert str(no) == "no (accelerate launch --mixed_precision)"


def test_a_config_file_asks_for_a_precision_only_if_it_names_one(tmp_path):
    with_it, without = tmp_path / "bf16.yaml", ROOT / "accelerate_configs" / "ddp.yaml"
    with_it.write_text(without.read_text() + "mixed_precision: bf16\n")
    asked = resolve_precision("auto", _launched("bf16"), ["--config_file", str(with_it), "t.py"], cuda=False)
    assert asked == Precision("bf16", f"accelerate launch --config_file {with_it}")
    # the repository's files name none: auto decides, bf16 on GPUs and fp32 on a CPU DDP run
    assert resolve_precision("auto", _launched("no"), ["--config_file", str(without), "t.py"],
                             cuda=False) == Precision("no", "auto: CPU")
    problems = launch_problems(_train("no"), _launched("bf16"), ["--config_file", str(with_it), "t.py"])
    assert problems == [f"train.mixed_precision=no contradicts accelerate launch --config_file {with_it} "
                        "(ACCELERATE_MIXED_PRECISION=bf16): set one of them, or both the same "
                        "(train.mixed_precision=auto follows the launcher)"]


@pytest.mark.parametrize("setting,environ,launcher,refused", [
    ("no", _launched("bf16"), ["--mixed_precision", "bf16", "t.py"], True),
    ("bf16", {"ACCELERATE_MIXED_PRECISION": "fp16"}, None, True),           # exported by the user
    ("bf16", _launched("bf16"), ["--mixed_precision", "bf16", "t.py"], False),  # both say the same
    ("bf16", _launched("no"), ["t.py"], False),                                # accelerate's default asked nothing
    ("auto", _launched("fp16"), ["--mixed_precision", "fp16", "t.py"], False),
])
def test_an_explicit_precision_against_the_launchers_is_refused(setting, environ, launcher, refused):
    problems = launch_problems(_train(setting), environ, launcher)
    assert bool(problems) == refused
    if refused:
        assert len(problems) == 1 and problems[0].startswith(f"train.mixed_precision={setting} contradicts ")


@pytest.mark.parametrize("variable,value,instead", [
    ("ACCELERATE_USE_FSDP", "true", "parallel.strategy=fsdp"),
    ("ACCELERATE_USE_DEEPSPEED", "true", "parallel.strategy=fsdp"),
    ("ACCELERATE_USE_MEGATRON_LM", "true", "parallel.sp_size"),
    ("ACCELERATE_USE_PARALLELISM_CONFIG", "true", "parallel.sp_size"),
    ("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR", "train.compile=true"),
    ("ACCELERATE_MIXED_PRECISION", "fp8", "train.mixed_precision"),
    ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4", "train.grad_accum=4"),
])
def test_launcher_options_the_trainer_does_not_honour_are_refused_with_what_to_use(variable, value, instead):
    problems = launch_problems(_train(), {**LAUNCHED, variable: value}, ["t.py"])
    assert len(problems) == 1 and variable in problems[0] and instead in problems[0], problems
    assert launch_problems(_train(), LAUNCHED, ["t.py"]) == []  # what every accelerate launch sets is fine
    # accelerate's accumulation that says what train.grad_accum says is honoured
    assert launch_problems(_train(grad_accum=4), {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, None) == []


def test_several_refusals_are_one_line_each():
    err = LauncherError(launch_problems(_train("no"), {**_launched("bf16"), "ACCELERATE_USE_FSDP": "1"}, None))
    lines = str(err).splitlines()
    assert lines[0] == "2 launcher settings refused:" and len(lines) == 3


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=[*TINY, *overrides], return_hydra_config=True)


def test_the_config_check_refuses_before_hydra_makes_the_directory(monkeypatch, capsys):
    """ConfigCheck.on_run_start runs before Hydra creates hydra.run.dir: the refusal comes from there."""
    cfg = _compose()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(SystemExit) as stop:
        ConfigCheck().on_run_start(cfg)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("accelerate launch --use_fsdp (ACCELERATE_USE_FSDP=true) is not supported")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    ConfigCheck().on_run_start(cfg)  # nothing else refused


def test_train_py_refuses_accelerates_fsdp_in_one_line_without_a_directory(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=dict(os.environ, ACCELERATE_USE_FSDP="true"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "parallel.strategy=fsdp" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps the first Accelerator's precision for the process: this test's bf16 must not stay."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _run(run_dir, *overrides):
    AcceleratorState._reset_state(reset_partial_state=True)  # each launch its own process, as train.py's
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return trainer.train(compose(config_name="train", overrides=[*TINY, f"run_dir={run_dir}", *overrides]))


def test_a_resume_compares_the_resolved_precision(tmp_path, monkeypatch, capsys, fresh_accelerate_state):
    """The config may say auto in both launches while the launcher's precision changed (refused, forced only), or
    auto and an explicit value that resolve to the same (resumed)."""
    run_dir = tmp_path / "run"
    _run(run_dir, "train.max_steps=1")  # auto on a CPU: no
    assert "precision: no (auto: CPU)" in capsys.readouterr().out
    _run(run_dir, "train.max_steps=2", "train.mixed_precision=no")  # the same precision, said explicitly
    assert "resumed from" in capsys.readouterr().out
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # exported by the user: auto follows it
    with pytest.raises(RunDirError, match=r"step_00000002 was trained in no precision; this launch resolves bf16 "
                                          r"\(ACCELERATE_MIXED_PRECISION\)"):
        _run(run_dir, "train.max_steps=3")
    _run(run_dir, "train.max_steps=3", "train.resume=force")
    assert "precision: bf16 (ACCELERATE_MIXED_PRECISION)" in capsys.readouterr().out
    history = [json.loads(line) for line in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert [h["changed"] for h in history] == [{}, {}, {"mixed_precision": ["no", "bf16"]}]
    _run(run_dir, "train.max_steps=4")  # the run is bf16 now: the same launch resumes it
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.slow
def test_a_real_accelerate_launch_sets_the_precision_and_a_requeue_must_keep_it(tmp_path):
    """accelerate launch itself (one CPU process): its --mixed_precision is the run's; a requeue with the same flag
    resumes, another one is refused in one line (accelerate's -q: its own traceback left out) and changes nothing."""
    run_dir = tmp_path / "run"

    def launch(precision, steps):
        command = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1",
                   "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", precision,
                   str(ROOT / "train.py"), *TINY, f"train.max_steps={steps}", f"run_dir={run_dir}"]
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)

    proc = launch("bf16", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[:2] == [f"run_dir: {run_dir}",
                                            "precision: bf16 (accelerate launch --mixed_precision)"]
    proc = launch("bf16", 2)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-3000:]
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    proc = launch("no", 3)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].endswith("step_00000002 was trained in bf16 precision; this launch resolves no (accelerate launch "
                             "--mixed_precision): launch it as before (the same train.mixed_precision and accelerate "
                             "launch --mixed_precision), use another run_dir, or train.resume=force.")
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before
