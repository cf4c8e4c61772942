"""diffusers interop: trained runs as diffusers folders (`VSAVideoPipeline`), and VSA for diffusers' Wan models.

Exporting a run (scripts/export_diffusers.py RUN_DIR OUT_DIR [--no-ema], or `export_run`) writes

    OUT_DIR/model_index.json     the pipeline: VSAVideoPipeline with the components below
    OUT_DIR/transformer/         VideoDiTTransformer (config.json: model, attn, in_channels, text_dim, video_shape,
                                 sparsity_limit, pixel_space; diffusion_pytorch_model.safetensors)
    OUT_DIR/scheduler/           FlowMatchEulerDiscreteScheduler (num_train_timesteps=1000, shift=1.0)
    OUT_DIR/text_encoder/        CaptionTextEncoder, pixel data only (config.json: vocab, dim, max_len, seed;
                                 its embedding table as safetensors)

and `VSAVideoPipeline.from_pretrained(OUT_DIR)(prompt, num_inference_steps=30, guidance_scale=5.0, seed=0)`
returns the videos `vsa_train.sampling.generate` (and sample.py) gives for the same prompt, seed and steps.

Time convention. Our flow time t (x_t = (1 - t) x0 + t noise, v = noise - x0) *is* the scheduler's sigma: with
shift 1.0 the scheduler's `sigmas` are t and its `timesteps` are 1000 * t (the scale our time embedding applies to t
internally). The pipeline sets the scheduler's sigmas to torch.linspace(1, 0, steps + 1)[:-1] (the scheduler appends
the final 0), exactly our Euler grid (the scheduler's own default, linspace(1, 1/1000, steps), ends at 1/1000
instead), hands the transformer t = sigma in [0, 1] (not the 0..1000 timestep), and `scheduler.step` does
x + (sigma_next - sigma) * v, our Euler step. Guidance is v_null + scale * (v_text - v_null), the null caption an
all-masked one, both halves in one batch as in `euler_sample`.

Text encoder. Runs on pixel data (data=synthetic, videos, hf) condition on the built-in caption encoder
(vsa_train/data/text.py): a word vocabulary with seeded random unit embeddings, not a transformers model. The export
saves what rebuilds it: vocabulary, width, length and seed (JSON) plus the table itself (safetensors, no pickles).
Runs on latents (data=latents) are exported without text encoder: pass `prompt_embeds`/`prompt_mask` from the
encoder recorded in the latent index and take output_type="latent" (decode with that index's VAE).

The Wan half (apply_vsa, VSAWanAttnProcessor, VSAWanTransformer3DModel, set_sparsity_limit) lives in wan_vsa.py; a
run of model=wan (vsa_train/models/wan.py) exports as a stock WanPipeline folder, with VSA through remote code
(vsa_train/integrations/wan_export.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput

from ..data.text import CaptionEncoder
from ..models import DiTConfig, VideoDiT, is_wan
from ..models.wan_vsa import VSAWanAttnProcessor, VSAWanTransformer3DModel, apply_vsa, set_sparsity_limit

__all__ = ["CaptionTextEncoder", "VSAVideoPipeline", "VSAVideoPipelineOutput", "VSAWanAttnProcessor",
           "VSAWanTransformer3DModel", "VideoDiTTransformer", "apply_vsa", "export_run", "make_scheduler",
           "set_sparsity_limit"]


class VideoDiTTransformer(VideoDiT, ModelMixin, ConfigMixin):
    """vsa_train's VideoDiT as a diffusers model: the same module tree and state-dict keys, its config in
    config.json. forward(x [B, C, T, H, W], t [B] in [0, 1] (= the scheduler's sigma), text [B, L, text_dim],
    text_mask [B, L] bool) -> velocity [B, C, T, H, W]."""

    _no_split_modules = ["DiTBlock"]
    _supports_gradient_checkpointing = False  # VideoDiT has its own (model.grad_checkpointing in the config)

    @register_to_config
    def __init__(self, model: dict, attn: dict, in_channels: int, text_dim: int,
                 video_shape: tuple[int, int, int] | None = None, sparsity_limit: float = 1.0,
                 pixel_space: bool = True):
        VideoDiT.__init__(self, DiTConfig.from_cfg(model), attn, in_channels=in_channels, text_dim=text_dim)
        self.set_sparsity_limit(sparsity_limit)


class CaptionTextEncoder(ModelMixin, ConfigMixin):
    """The built-in caption encoder (vsa_train.data.text.CaptionEncoder) as a pipeline component: rebuilt from
    (vocab, dim, max_len, seed); its table and positions are buffers, so the saved safetensors hold them too."""

    @register_to_config
    def __init__(self, vocab: list[str], dim: int = 64, max_len: int = 24, seed: int = 0):
        super().__init__()
        enc = CaptionEncoder(list(vocab), dim=dim, max_len=max_len, seed=seed)
        self.register_buffer("table", enc.table.clone())  # [V + 1, dim], row 0 <unk>
        self.register_buffer("positions", enc.positions.clone())  # [max_len, dim]
        self._encoder = enc

    @classmethod
    def from_encoder(cls, enc: CaptionEncoder, seed: int) -> "CaptionTextEncoder":
        vocab = sorted(enc.index, key=enc.index.get)
        return cls(vocab=vocab, dim=enc.dim, max_len=enc.max_len, seed=seed)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (emb [B, max_len, dim] float32, mask [B, max_len] bool), as CaptionEncoder.encode."""
        enc = self._encoder
        enc.table, enc.positions = self.table.float().cpu(), self.positions.float().cpu()  # the loaded values
        return enc.encode(list(captions))

    def forward(self, captions: list[str]):
        return self.encode(captions)


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler of our rectified flow: sigma = t, timestep = 1000 t, no shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


@dataclass
class VSAVideoPipelineOutput(BaseOutput):
    """frames: [B, 3, T, H, W] in [-1, 1] ("pt"), [B, T, H, W, 3] float in [0, 1] ("np"), or model-space
    samples [B, C, T, H, W] ("latent")."""

    frames: torch.Tensor | np.ndarray


class VSAVideoPipeline(DiffusionPipeline):
    """Text-to-video with a VideoDiTTransformer: Euler flow sampling with classifier-free guidance."""

    model_cpu_offload_seq = "text_encoder->transformer"
    _optional_components = ["text_encoder"]

    def __init__(self, transformer: VideoDiTTransformer, scheduler: FlowMatchEulerDiscreteScheduler,
                 text_encoder: CaptionTextEncoder | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder)

    def _text(self, prompt, prompt_embeds, prompt_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(text [B, L, D], mask [B, L]) from the prompts through the text encoder, or the embeddings given."""
        if prompt_embeds is not None:
            mask = prompt_mask if prompt_mask is not None else torch.ones(prompt_embeds.shape[:2], dtype=torch.bool)
            return prompt_embeds, mask
        if prompt is None:
            raise ValueError("give a prompt or prompt_embeds")
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder (a latents run): pass prompt_embeds/prompt_mask")
        return self.text_encoder.encode([prompt] if isinstance(prompt, str) else list(prompt))

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, num_inference_steps: int = 30,
                 guidance_scale: float = 5.0, generator: torch.Generator | None = None, seed: int | None = None,
                 num_frames: int | None = None, height: int | None = None, width: int | None = None,
                 prompt_embeds: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pt", return_dict: bool = True):
        """Videos for `prompt` (or `prompt_embeds` [B, L, text_dim] with `prompt_mask` [B, L]).

        The initial noise [B, C, T, H, W] is drawn on the CPU from `generator`, else from
        torch.Generator().manual_seed(seed) (as vsa_train.sampling.generate), else from a fresh random seed;
        `latents` gives it directly. Size defaults to the training video shape.
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if output_type not in ("pt", "np", "latent"):
            raise ValueError(f"output_type must be 'pt', 'np' or 'latent', got {output_type!r}")
        cfg = self.transformer.config
        device = self.transformer.device
        dtype = next(self.transformer.parameters()).dtype
        text, text_mask = self._text(prompt, prompt_embeds, prompt_mask)  # [B, L, D], [B, L]
        B = text.shape[0]
        if latents is None:
            T, H, W = cfg.video_shape
            shape = (B, cfg.in_channels, num_frames or T, height or H, width or W)
            if generator is None:
                generator = torch.Generator().manual_seed(seed if seed is not None else int(np.random.SeedSequence().entropy % 2**63))
            latents = torch.randn(shape, generator=generator, device=generator.device)  # [B, C, T, H, W]
        x = latents.to(device)
        text, text_mask = text.to(device), text_mask.to(device)

        guided = guidance_scale != 1.0
        if guided:  # [text; null] in one batch: the null caption is all-masked (no text at all)
            text = torch.cat([text, torch.zeros_like(text)])  # [2B, L, D]
            text_mask = torch.cat([text_mask, torch.zeros_like(text_mask)])  # [2B, L]
        sigmas = torch.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]  # our Euler grid: t = sigma
        self.scheduler.set_timesteps(sigmas=sigmas.numpy(), device=device)
        self.scheduler.set_begin_index(0)
        for i in self.progress_bar(range(num_inference_steps)):
            t = self.scheduler.sigmas[i].expand(B)  # [B] flow time in [0, 1]
            if guided:
                v_text, v_null = self.transformer(torch.cat([x, x]).to(dtype), torch.cat([t, t]), text.to(dtype),
                                                  text_mask).chunk(2)
                v = v_null + guidance_scale * (v_text - v_null)
            else:
                v = self.transformer(x.to(dtype), t, text.to(dtype), text_mask)
            x = self.scheduler.step(v, self.scheduler.timesteps[i], x).prev_sample  # x + (sigma_next - sigma) v
        self.maybe_free_model_hooks()

        if output_type == "latent":
            frames = x
        else:
            if not cfg.pixel_space:
                raise ValueError("this model generates VAE latents: use output_type='latent' and decode them with "
                                 "the VAE of the run's latent index")
            frames = x.float().clamp(-1, 1).cpu()  # [B, 3, T, H, W]
            if output_type == "np":
                frames = ((frames + 1) / 2).permute(0, 2, 3, 4, 1).numpy()  # [B, T, H, W, 3] in [0, 1]
        return VSAVideoPipelineOutput(frames=frames) if return_dict else (frames,)


def export_run(run_dir, out_dir, ema: bool = True, **wan) -> Path:
    """Writes run `run_dir` (newest verified checkpoint, or a checkpoint dir) as a diffusers folder `out_dir`.

    EMA weights when the run kept them and `ema` is true (as sample.py). Returns out_dir. A model=wan run writes a
    WanPipeline folder (wan_export.export_wan, given `wan`: vae, text_encoder, transformer_only).
    """
    from omegaconf import OmegaConf

    from ..data import build_text_encoder, data_spec
    from ..models.vsa import VSAAttention
    from ..sampling import load_model

    model, cfg, ckpt = load_model(run_dir, device="cpu", ema=ema)
    out = Path(out_dir)
    if is_wan(cfg.model) or wan:  # a WanPipeline folder (wan_export.py; it refuses the options for other models)
        from .wan_export import export_wan

        export_wan(model, cfg, out, **wan)
        return _provenance(out, run_dir, ckpt, cfg, ema)
    spec = data_spec(cfg.data)
    limits = {m.limit for m in model.modules() if isinstance(m, VSAAttention)}
    transformer = VideoDiTTransformer(
        model=OmegaConf.to_container(cfg.model, resolve=True), attn=OmegaConf.to_container(cfg.attn, resolve=True),
        in_channels=spec.in_channels, text_dim=spec.text_dim, video_shape=list(spec.video_shape),
        sparsity_limit=limits.pop() if limits else 1.0, pixel_space=cfg.data.source != "latents")
    transformer.load_state_dict(model.state_dict())
    text_encoder = None
    if cfg.data.source != "latents":
        enc = build_text_encoder(cfg.data)
        if isinstance(enc, CaptionEncoder):
            text_encoder = CaptionTextEncoder.from_encoder(enc, seed=int(cfg.data.seed))
    pipe = VSAVideoPipeline(transformer=transformer.eval(), scheduler=make_scheduler(), text_encoder=text_encoder)
    pipe.save_pretrained(out)
    return _provenance(out, run_dir, ckpt, cfg, ema)


def _provenance(out: Path, run_dir, ckpt: Path, cfg, ema: bool) -> Path:
    """out/vsa_train_export.json: which run, checkpoint and weights (not read by the pipeline)."""
    from omegaconf import OmegaConf

    used_ema = ema and cfg.train.get("ema") is not None and (ckpt / "ema.safetensors").is_file()
    with open(out / "vsa_train_export.json", "w") as f:
        json.dump({"run_dir": str(Path(run_dir).resolve()), "checkpoint": str(ckpt), "ema": used_ema,
                   "data": OmegaConf.to_container(cfg.data, resolve=True)}, f, indent=2)
    return out
