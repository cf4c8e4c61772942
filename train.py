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
the settings>, printed at start); raise train.max_steps to train further. See README.md.
"""
import contextlib
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vsa_train.config_schema import ConfigError, register, remove_if_empty, typed
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
    # read into its typed sections, which checks a multirun job (local or SLURM) with its sweep values; a job that
    # fails leaves no empty job directory.
    try:
        config = typed(cfg)
    except ConfigError:
        if HydraConfig.initialized():
            remove_if_empty(HydraConfig.get().runtime.output_dir)
        raise  # the sweep's other jobs still run; Hydra reports this one as failed
    with _run_log(config):
        train(config)


if __name__ == "__main__":
    register()  # the typed sections in Hydra's ConfigStore (schema/<section>/<class>)
    main()
