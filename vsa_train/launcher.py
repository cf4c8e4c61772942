"""What the launcher asks of a training process, read before anything is written (config_schema.ConfigCheck, then
the trainer again): the mixed precision (`resolve_precision`) and the launcher options the trainer does not honour
(`launch_problems`).

`accelerate launch` hands its settings to the processes it starts as environment variables (accelerate's
utils/launch.py: prepare_simple_launcher_cmd_env, prepare_multi_gpu_env, prepare_deepspeed_cmd_env).
ACCELERATE_MIXED_PRECISION is always among them, `no` where nothing asked for a precision (commands/launch.py,
_validate_launch_command), so whether one was asked for is read from the launcher's own command line (the process
that started this one), parsed by accelerate's parser:

    --mixed_precision X                      asked for: train.mixed_precision=auto follows it
    --config_file F, F sets mixed_precision  asked for: followed
    neither                                  accelerate's default ("no", or its default config file's): not followed,
                                             auto decides (the same command trains the same on every machine)
    the variable without accelerate launch   asked for (exported by the user): followed

train.mixed_precision=no|bf16|fp16 against another precision the launcher was asked for is refused: two settings
disagree, and either one silently winning would surprise whoever wrote the other.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import LaunchError

PRECISION_VAR = "ACCELERATE_MIXED_PRECISION"
ACCUMULATION_VAR = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"
LAUNCH_MARK = "ACCELERATE_DYNAMO_BACKEND"  # accelerate launch sets it for every process it starts, asked or not
ANCESTORS = 3  # how far up the process tree the launcher is looked for (it is the parent under accelerate 1.x)


def _on(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes")


# accelerate launch's settings that the trainer does not honour, as the started process sees them:
# (variable, whether its value asks for it, the launcher option, what to use instead).
UNSUPPORTED = (
    ("ACCELERATE_USE_FSDP", _on, "--use_fsdp",
     "vsa_train shards with its own FSDP2 (accelerate's plugin would wrap the root only): set "
     "parallel.strategy=fsdp and launch without it (e.g. --config_file accelerate_configs/fsdp.yaml)"),
    ("ACCELERATE_USE_DEEPSPEED", _on, "--use_deepspeed",
     "use parallel.strategy=fsdp (weights, gradients and optimizer state sharded) or parallel.strategy=ddp"),
    ("ACCELERATE_USE_MEGATRON_LM", _on, "--use_megatron_lm", "use parallel.strategy and parallel.sp_size"),
    ("ACCELERATE_USE_PARALLELISM_CONFIG", _on, "--use_parallelism_config",
     "use parallel.strategy and parallel.sp_size"),
    ("ACCELERATE_DYNAMO_BACKEND", lambda v: v.strip().lower() not in ("", "no"), "--dynamo_backend",
     "use train.compile=true (one DiT block, reused by all) or train.compile=model"),
    (PRECISION_VAR, lambda v: v.strip().lower() == "fp8", "--mixed_precision fp8",
     "use no, bf16 or fp16 (train.mixed_precision)"),
)


class LauncherError(LaunchError):
    """Launcher settings (accelerate launch options, ACCELERATE_* variables) the trainer does not honour, or that
    contradict the config; one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(self.problems[0] if n == 1 else
                         f"{n} launcher settings refused:\n  " + "\n  ".join(self.problems))

    def __reduce__(self):  # pickled with its problems (a SLURM job's result travels pickled)
        return type(self), (self.problems,)


@dataclass(frozen=True)
class Precision:
    """The mixed precision a run trains in and where that came from (the run's first lines say both)."""

    value: str   # no | bf16 | fp16
    source: str  # "train.mixed_precision", "accelerate launch --mixed_precision", "auto: CUDA", ...

    def __str__(self) -> str:
        return f"{self.value} ({self.source})"


@dataclass(frozen=True)
class LauncherPrecision:
    """ACCELERATE_MIXED_PRECISION and who asked for it: `asked` names the setting, None where it is accelerate's
    default (nobody asked)."""

    value: str
    asked: str | None


def launcher_precision(environ=None, launcher: list[str] | None | bool = True) -> LauncherPrecision | None:
    """The precision the launcher set (None: none set). `launcher`: the accelerate launch arguments that started
    this process (None: not started by one); True looks them up (`launcher_args`)."""
    environ = os.environ if environ is None else environ
    value = environ.get(PRECISION_VAR, "").strip().lower()
    if not value:
        return None
    args = launcher_args() if launcher is True else launcher
    if args is None:
        if LAUNCH_MARK not in environ:
            return LauncherPrecision(value, PRECISION_VAR)  # exported by the user
        # accelerate launch, whose command line this system does not show: only a value other than its default
        # was surely asked for
        return LauncherPrecision(value, "accelerate launch" if value != "no" else None)
    return LauncherPrecision(value, _asked_where(args))


def _asked_where(args: list[str]) -> str | None:
    """Where accelerate launch's arguments `args` ask for a precision (None: nowhere, accelerate's default)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # a line accelerate itself refused: it said so already
            parsed = launch_command_parser().parse_args(args)
    except SystemExit:
        return None
    if parsed.mixed_precision is not None:
        return "accelerate launch --mixed_precision"
    if parsed.config_file is not None:
        try:
            file_sets = load_config_from_file(parsed.config_file).mixed_precision is not None
        except Exception:  # noqa: BLE001 (accelerate read it to start us: assume it set the value)
            file_sets = True
        return f"accelerate launch --config_file {parsed.config_file}" if file_sets else None
    return None


@functools.cache
def launcher_args() -> list[str] | None:
    """The arguments after `accelerate launch` of the launcher that started this process (its parent, or a near
    ancestor); None where none did, or /proc does not show command lines."""
    pid = os.getppid()
    for _ in range(ANCESTORS):
        argv = _cmdline(pid)
        if argv is None:
            return None
        args = launch_arguments(argv)
        if args is not None:
            return args
        pid = _parent(pid)
        if pid is None or pid <= 1:
            return None
    return None


def launch_arguments(argv: list[str]) -> list[str] | None:
    """The arguments of `accelerate launch` in a process's command line `argv` (None: it is no accelerate launch):
    `accelerate launch ...`, `accelerate-launch ...` (either run by a Python interpreter, as their scripts are), or
    `python -m accelerate.commands.launch ...`; the words as a script's arguments do not count."""
    if len(argv) > 1 and Path(argv[0]).name.startswith("python"):
        if argv[1] == "-m":
            module, after = (argv[2], argv[3:]) if len(argv) > 2 else ("", [])
            return after if module == "accelerate.commands.launch" else (
                after[1:] if module == "accelerate.commands.accelerate_cli" and after[:1] == ["launch"] else None)
        argv = argv[1:]  # the script the interpreter runs
    name, after = Path(argv[0]).name if argv else "", argv[1:]
    if name == "accelerate-launch":
        return after
    return after[1:] if name == "accelerate" and after[:1] == ["launch"] else None


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def _parent(pid: int) -> int | None:
    try:  # /proc/<pid>/stat: "pid (comm) state ppid ...", comm may hold spaces and parentheses
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def cuda_device(environ=None) -> bool:
    """Whether the run's device is a GPU: CUDA is there and the launcher did not ask for the CPU
    (accelerate launch --cpu, ACCELERATE_USE_CPU, which accelerate follows)."""
    import torch

    environ = os.environ if environ is None else environ
    return torch.cuda.is_available() and not _on(environ.get("ACCELERATE_USE_CPU", ""))


def resolve_precision(setting: str, environ=None, launcher: list[str] | None | bool = True,
                      cuda: bool | None = None) -> Precision:
    """The precision of train.mixed_precision=`setting`: an explicit one as set; auto follows a precision the
    launcher was asked for, else bf16 on CUDA and no on CPU. (A conflict is `launch_problems`' to refuse: here the
    config's value wins.)"""
    if setting != "auto":
        return Precision(setting, "train.mixed_precision")
    asked = launcher_precision(environ, launcher)
    if asked is not None and asked.asked is not None and asked.value in ("no", "bf16", "fp16"):
        return Precision(asked.value, asked.asked)
    cuda = cuda_device(environ) if cuda is None else cuda
    return Precision("bf16", "auto: CUDA") if cuda else Precision("no", "auto: CPU")


def launch_problems(train, environ=None, launcher: list[str] | None | bool = True) -> list[str]:
    """One line per launcher setting the trainer does not honour or that contradicts the `train` section
    (sections.TrainConfig: its mixed_precision and grad_accum); each says what to use instead."""
    environ = os.environ if environ is None else environ
    found = []
    for var, asks, option, instead in UNSUPPORTED:
        value = environ.get(var)
        if value is not None and asks(value):
            found.append(f"accelerate launch {option} ({var}={value}) is not supported: {instead}")
    # accelerate's own accumulation (Accelerator.accumulate) is not what train_step does: only train.grad_accum is
    steps = environ.get(ACCUMULATION_VAR)
    if steps is not None and steps.strip() != str(train.grad_accum):
        found.append(f"{ACCUMULATION_VAR}={steps} (accelerate's gradient accumulation) is not used: set "
                     f"train.grad_accum={steps.strip()} instead, now train.grad_accum={train.grad_accum}")
    setting, asked = train.mixed_precision, launcher_precision(environ, launcher)
    if (setting != "auto" and asked is not None and asked.asked is not None and asked.value != "fp8"
            and asked.value != setting):
        found.append(f"train.mixed_precision={setting} contradicts {asked.asked} ({PRECISION_VAR}={asked.value}): "
                     f"set one of them, or both the same (train.mixed_precision=auto follows the launcher)")
    return found


def check_launch(train, environ=None) -> None:
    """Raises LauncherError naming every launcher setting `launch_problems` finds."""
    found = launch_problems(train, environ)
    if found:
        raise LauncherError(found)
