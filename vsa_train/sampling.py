"""Videos from a model: prompts -> Euler flow sampling with classifier-free guidance -> pixels (VAE for latents).

Shared by sample.py (from a checkpoint) and the trainer's `train.sample_every` hook.
"""
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from .checkpoint import latest_checkpoint
from .data import build_text_encoder, data_spec, decode
from .diffusion import euler_sample
from .models import build_model, vsa_config

CONFIG = "config.yaml"  # the resolved run config, written by the trainer into run_dir


@torch.no_grad()
def generate(model, data_cfg, captions: list[str], steps: int, cfg_scale: float, seed: int = 0,
             encoder=None) -> torch.Tensor:
    """Pixel videos [B, 3, T, H, W] in [-1, 1] for `captions` (fixed noise from `seed`)."""
    device = next(model.parameters()).device
    spec = data_spec(data_cfg)
    encoder = encoder or build_text_encoder(data_cfg)
    text, text_mask = encoder.encode(captions)                                  # [B, L, D], [B, L]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(captions), spec.in_channels, *spec.video_shape), generator=g)  # [B, C, T, H, W]
    x = euler_sample(model, noise.to(device), text.to(device), text_mask.to(device), steps, cfg_scale)
    return decode(data_cfg, x.float()).cpu()                                    # [B, 3, T', H', W']


def load_run_config(run_dir) -> DictConfig:
    """The config a run trained with: run_dir/config.yaml (resolved by the trainer), else Hydra's record."""
    run_dir = Path(run_dir)
    for path in (run_dir / CONFIG, run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            return OmegaConf.load(path)
    raise FileNotFoundError(f"{run_dir} holds no {CONFIG} or .hydra/config.yaml: is it a run directory?")


def load_model(checkpoint, device="cpu", ema: bool = True):
    """(model, run config, checkpoint dir) from a run directory (latest checkpoint) or one checkpoint directory.

    EMA weights are used when the run kept them (train.ema) and `ema` is true.
    """
    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent.parent if (checkpoint / "model.safetensors").is_file() else checkpoint
    ckpt = checkpoint if (checkpoint / "model.safetensors").is_file() else latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    cfg = load_run_config(run_dir)
    spec = data_spec(cfg.data)
    model = build_model(cfg.model, cfg.attn, in_channels=spec.in_channels, text_dim=spec.text_dim)
    state = load_file(str(ckpt / "model.safetensors"))
    if ema and cfg.train.get("ema") is not None:
        # registered second, after TrainState (trainer.py): an AveragedModel state dict, "module." + names
        averaged = torch.load(ckpt / "custom_checkpoint_1.pkl", map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in averaged.items() if k.startswith("module.")}
    model.load_state_dict(state)
    if (vsa := vsa_config(cfg.attn)) is not None:  # the sparsity the run had reached (a ramp may not be done)
        step = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=True)["step"]  # TrainState
        model.set_sparsity_limit(vsa.sparsity_limit(step))
    return model.to(device).eval(), cfg, ckpt
