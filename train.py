"""Pretrain a video DiT with dense attention or VSA and log loss against training FLOPs.

    python train.py                                   # CPU demo: dit_tiny on small synthetic videos
    python train.py model=dit_120m data=synthetic_16k # one GPU (bf16 autocast); add train.compile=true
    accelerate launch train.py experiment=dit120m_16k # one GPU, or as many as `accelerate config` says
    accelerate launch --num_processes 8 train.py model=dit_1b attn=dense data=synthetic_16k   # DDP, 8 GPUs
    accelerate launch --config_file fsdp.yaml train.py model=dit_1b ...                        # FSDP
    torchrun --nproc_per_node 8 train.py model=dit_410m data=synthetic_16k                     # DDP via torchrun
    python train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu model=dit_60m,dit_120m   # SLURM sweep
    python train.py model=dit_1b train.dry_run=true   # parameters and FLOPs per sample, no weights allocated

Re-running a command resumes from the latest checkpoint in its run_dir (runs/<exp>_<attn>_<data>_s<seed>);
raise train.max_steps to train further. See README.md.
"""
import os

import hydra
from omegaconf import DictConfig

from vsa_train.trainer import train


def _export_slurm_ranks() -> None:
    """Under submitit on SLURM (one task per GPU), exposes RANK/WORLD_SIZE/... as torch.distributed expects."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


@hydra.main(config_path="configs", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    _export_slurm_ranks()
    train(cfg)


if __name__ == "__main__":
    main()
