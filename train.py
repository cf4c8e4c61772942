"""Pretrain a video DiT with dense attention or VSA and log loss against training FLOPs.

    python train.py                                   # CPU demo: dit_tiny on small synthetic videos
    python train.py model=dit_120m data=synthetic_16k # one GPU (bf16 autocast); add train.compile=true
    accelerate launch train.py experiment=dit120m_16k # one GPU, or as many as `accelerate config` says
    accelerate launch --num_processes 8 train.py model=dit_1b attn=dense data=synthetic_16k   # DDP, 8 GPUs
    accelerate launch --config_file fsdp.yaml train.py model=dit_1b ...                        # FSDP
    torchrun --nproc_per_node 8 train.py model=dit_410m data=synthetic_16k                     # DDP via torchrun
    python train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu model=dit_60m,dit_120m   # SLURM sweep
    python train.py model=dit_1b train.dry_run=true   # parameters and FLOPs per sample, no weights allocated

Re-running a command resumes from the latest checkpoint in its run_dir (runs/<exp>_<attn>_<data>_s<seed>_<hash of
the settings>, printed at start); raise train.max_steps to train further. A failure you fix from its message (a bad
value or key, a missing input, a run directory that refuses the launch) prints one line and exits 2, leaving no run
directory; HYDRA_FULL_ERROR=1 shows its traceback (vsa_train/errors.py). See README.md.
"""
import contextlib
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vsa_train.config_schema import ConfigError, JobFailed, override_problems, register, remove_if_empty, typed
from vsa_train.errors import LaunchError
from vsa_train.trainer import train


def _export_slurm_ranks() -> None:
    """Under submitit on SLURM (one task per GPU), exposes RANK/WORLD_SIZE/... as torch.distributed expects."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


class _Tee:
    """stdout that also appends to a file (the run's own lines: run_dir, params, eval losses, the end)."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _run_log(config):
    """Rank 0's stdout also goes to run_dir/train.log, where Hydra's file handler writes every INFO log line (Hydra's
    directory is the run directory: vsa_train.rundir.HydraRunDir); the console shows warnings and errors of libraries
    only (configs/train.yaml, hydra.job_logging). A dry run writes no file."""
    if not HydraConfig.initialized() or int(os.environ.get("RANK", "0")) != 0 or config.train.dry_run:
        yield
        return
    with open(Path(config.run_dir) / f"{HydraConfig.get().job.name}.log", "a", buffering=1, encoding="utf-8") as file:
        stdout, sys.stdout = sys.stdout, _Tee(sys.stdout, file)
        try:
            yield
        finally:
            sys.stdout = stdout


@hydra.main(config_path="configs", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    _export_slurm_ranks()
    # configs/train.yaml's hydra.callbacks checked a single run before Hydra made its directory; here the config is
    # read into its typed sections, which checks a multirun job (local or SLURM) with its sweep values.
    try:
        config = typed(cfg)
        with _run_log(config):
            train(config)
    except BaseException as err:
        _remove_stub()
        if isinstance(err, (LaunchError, KeyboardInterrupt)):
            _report(err)
        raise


def _remove_stub() -> None:
    """A launch that stopped before the trainer accepted it leaves no directory (rank 0 removes Hydra's, if it
    holds nothing but log files: config_schema.remove_if_empty)."""
    if HydraConfig.initialized() and int(os.environ.get("RANK", "0")) == 0:
        remove_if_empty(HydraConfig.get().runtime.output_dir)


def _report(err: BaseException) -> None:
    """An expected failure (errors.LaunchError) or a Ctrl-C as one line on stderr and exit 2 (Ctrl-C: 130); a
    multirun job's LaunchError goes to Hydra as JobFailed, which names the job and lets the sweep's other jobs run.
    Returns (the caller re-raises with its traceback) under HYDRA_FULL_ERROR=1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    if isinstance(err, KeyboardInterrupt):
        print(f"{err or 'interrupted (Ctrl-C)'}; re-running the same command resumes from the last checkpoint",
              file=sys.stderr, flush=True)
        raise SystemExit(130)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise JobFailed(str(err)) from None
    print(err, file=sys.stderr, flush=True)
    raise SystemExit(2)


def _check_overrides() -> None:
    """A key=value whose key the config lacks (a typo, or a key of another group option) gets the schema's line
    ("did you mean", "belongs to attn=vsa") before Hydra composes: Hydra's own advice is to append it with +."""
    found = override_problems(sys.argv[1:], Path(__file__).resolve().parent / "configs")
    if found:
        print(ConfigError(found), file=sys.stderr, flush=True)
        raise SystemExit(2)


if __name__ == "__main__":
    register()  # the typed sections in Hydra's ConfigStore (schema/<section>/<class>)
    _check_overrides()
    main()
