"""Videos from a model: prompts -> Euler flow sampling with classifier-free guidance -> pixels (VAE for latents).

Shared by sample.py (from a checkpoint) and the trainer's `train.sample_every` hook.
"""
from pathlib import Path

import torch
from accelerate import Accelerator

from .checkpoint import load_weights, resolve_checkpoint
from .data import build_text_encoder, data_spec, decode
from .data.videos import write_video
from .diffusion import euler_sample
from .models import build_model, vsa_config
from .rundir import load_run_config


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


def load_model(checkpoint, device="cpu", ema: bool = True):
    """(model, run config, checkpoint dir) from a run directory (newest verified checkpoint) or a checkpoint dir.

    EMA weights are used when the run kept them (train.ema) and `ema` is true.
    """
    run_dir, ckpt = resolve_checkpoint(checkpoint)
    cfg = load_run_config(run_dir)
    spec = data_spec(cfg.data)
    model = build_model(cfg.model, cfg.attn, in_channels=spec.in_channels, text_dim=spec.text_dim,
                        load_weights=False)  # the checkpoint's weights replace a Wan folder's
    state, counters = load_weights(ckpt, ema=ema and cfg.train.get("ema") is not None)
    model.load_state_dict(state)
    if (vsa := vsa_config(cfg.attn)) is not None:  # the sparsity the run had reached (a ramp may not be done)
        model.set_sparsity_limit(vsa.sparsity_limit(counters["step"]))
    return model.to(device).eval(), cfg, ckpt


@torch.no_grad()
def save_samples(model, cfg, captions: list[str], step: int, accelerator: Accelerator) -> None:
    """Generates videos for `captions` (fixed noise) into run_dir/samples/step_<step>_<k>.mp4/.gif and to wandb.

    Every rank generates (an FSDP forward is collective); the main process writes and logs. `cfg`: the run's
    typed config (its train and data sections and run_dir).
    """
    tcfg = cfg.train
    was_training = model.training
    model.eval()
    with accelerator.autocast(), torch.compiler.set_stance("force_eager"):
        videos = generate(model, cfg.data, list(captions), tcfg.sample_steps, tcfg.sample_cfg_scale,
                          seed=tcfg.seed, encoder=build_text_encoder(cfg.data))
    model.train(was_training)
    if not accelerator.is_main_process:
        return
    files = [write_video(v, Path(cfg.run_dir) / "samples" / f"step_{step:08d}_{k}.mp4")[0]
             for k, v in enumerate(videos)]
    if any(t.name == "wandb" for t in accelerator.trackers):
        import wandb

        accelerator.log({"media/samples": [wandb.Video(str(f), caption=c) for f, c in zip(files, captions)]}, step=step)
