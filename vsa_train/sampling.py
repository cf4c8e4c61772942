"""Videos from a model: prompts -> Euler flow sampling with classifier-free guidance -> pixels (VAE for latents).

Shared by sample.py (from a checkpoint) and the trainer's `train.sample_every` hook (`save_samples`: fixed prompts
and seeds from the config, so every run of a sweep samples the same prompts from the same noise).
"""
import json
import re
from pathlib import Path

import torch
from accelerate import Accelerator

from .checkpoint import load_weights, resolve_checkpoint
from .data import build_text_encoder, data_spec, decode
from .data.video_io import write_video
from .diffusion import euler_sample
from .files import atomic_write
from .models import build_model, vsa_config
from .rundir import load_run_config


@torch.no_grad()
def generate(model, data_cfg, captions: list[str], steps: int, cfg_scale: float, seed: int = 0,
             encoder=None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel videos [B, 3, T, H, W] in [-1, 1] for `captions`, from `noise` [B, C, T, H, W] if given, else from
    one generator seeded `seed` for the batch."""
    device = next(model.parameters()).device
    spec = data_spec(data_cfg)
    encoder = encoder or build_text_encoder(data_cfg)
    text, text_mask = encoder.encode(captions)                                  # [B, L, D], [B, L]
    if noise is None:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(captions), spec.in_channels, *spec.video_shape), generator=g)  # [B, C, T, H, W]
    x = euler_sample(model, noise.to(device), text.to(device), text_mask.to(device), steps, cfg_scale)
    return decode(data_cfg, x.float()).cpu()                                    # [B, 3, T', H', W']


def prompt_noise(spec, seeds: list[int], shape=None) -> torch.Tensor:
    """Initial noise [len(seeds), C, T, H, W] of `shape` (T, H, W) (default: the data's), each video's from its own
    seed on the host: a prompt's noise depends on its seed alone (not on the other prompts, the device or the run's
    RNG)."""
    shape = tuple(spec.video_shape if shape is None else shape)
    return torch.stack([torch.randn((spec.in_channels, *shape), generator=torch.Generator().manual_seed(s))
                        for s in seeds])


def slug(prompt: str, limit: int = 60) -> str:
    """A file-name form of a prompt: its first words, lower case, joined by _ ("sample" if it has none)."""
    return "_".join(re.findall(r"[a-z0-9]+", prompt.lower()))[:limit].rstrip("_") or "sample"


def sample_path(run_dir, index: int, prompt: str, step: int) -> Path:
    """run_dir/samples/<index>_<prompt's words>/step_<step>.mp4: one folder per prompt, its videos by step."""
    return Path(run_dir) / "samples" / f"{index}_{slug(prompt)}" / f"step_{step:08d}.mp4"


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
def save_samples(model, cfg, prompts: list[str], seeds: list[int], step: int, accelerator: Accelerator) -> list[Path]:
    """Generates a video per prompt from the noise of its seed (`prompt_noise`) into `sample_path` (.mp4 and .gif)
    and logs them to wandb under media/samples, each captioned by its prompt; returns the mp4 files (main process).

    Every rank generates (an FSDP forward is collective); the main process writes and logs. One prompt at a time: a
    prompt's video does not depend on the others in the list. `cfg`: the run's typed config (its train and data
    sections and run_dir). Videos have train.sample_shape, else the data's shape (a bucketed run's first bucket).
    """
    tcfg, encoder = cfg.train, build_text_encoder(cfg.data)
    noise = prompt_noise(data_spec(cfg.data), seeds, tcfg.sample_shape)  # at train.sample_shape (default: the data's)
    was_training = model.training
    model.eval()
    with accelerator.autocast(), torch.compiler.set_stance("force_eager"):
        videos = [generate(model, cfg.data, [prompt], tcfg.sample_steps, tcfg.sample_cfg_scale, encoder=encoder,
                           noise=noise[k:k + 1])[0] for k, prompt in enumerate(prompts)]
    model.train(was_training)
    if not accelerator.is_main_process:
        return []
    files = [write_video(v, sample_path(cfg.run_dir, k, p, step))[0] for k, (v, p) in enumerate(zip(videos, prompts))]
    # The whole prompt and its seed beside the folders, whose names keep only a prompt's first words.
    index = [{"folder": f.parent.name, "prompt": p, "seed": s} for f, p, s in zip(files, prompts, seeds)]
    atomic_write(Path(cfg.run_dir) / "samples" / "prompts.json", json.dumps(index, indent=1) + "\n")
    if any(t.name == "wandb" for t in accelerator.trackers):
        import wandb

        accelerator.log({"media/samples": [wandb.Video(str(f), caption=p) for f, p in zip(files, prompts)]}, step=step)
    return files
