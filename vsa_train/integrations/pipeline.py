"""VSAVideoPipeline: text-to-video with an exported VideoDiT, Euler flow sampling with classifier-free guidance.

An export carries this file as its pipeline code (vsa_train/integrations/remote_code.py), so it imports no vsa_train
module and names its components by their diffusers base classes: the transformer and text encoder come from their
own folders' code. See vsa_train/integrations/diffusers.py for the time convention (scheduler sigma = our t).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

OUTPUT_TYPES = ("np", "pil", "pt", "latent")


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler of our rectified flow, every export's (VideoDiT and Wan): sigma = t, timestep = 1000 t, no
    shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


@dataclass
class VSAVideoPipelineOutput(BaseOutput):
    """frames: [B, T, H, W, 3] float in [0, 1] ("np"), B lists of T PIL images ("pil"), [B, T, 3, H, W] in [0, 1]
    ("pt"), or the model-space samples [B, C, T, H, W] ("latent")."""

    frames: np.ndarray | list[list[PIL.Image.Image]] | torch.Tensor


class VSAVideoPipeline(DiffusionPipeline):
    """Text-to-video with a VideoDiTTransformer: Euler flow sampling with classifier-free guidance."""

    model_cpu_offload_seq = "text_encoder->transformer"
    _optional_components = ["text_encoder"]

    def __init__(self, transformer: ModelMixin, scheduler: FlowMatchEulerDiscreteScheduler,
                 text_encoder: ModelMixin | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder)
        self.video_processor = VideoProcessor(vae_scale_factor=1)  # pixels in [-1, 1] -> frames in [0, 1]

    def encode_prompt(self, prompt, embeds, mask, batch: int | None = None,
                      what: str = "prompt") -> tuple[torch.Tensor, torch.Tensor]:
        """(text [B, L, D], mask [B, L] bool) from prompts through the text encoder, or the embeddings given; a
        single prompt is repeated to `batch`."""
        if embeds is not None:
            mask = mask if mask is not None else torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
            if batch is not None and embeds.shape[0] not in (1, batch):
                raise ValueError(f"{what}_embeds has {embeds.shape[0]} rows for {batch} prompts: give one or one per "
                                 "prompt")
            n = batch or embeds.shape[0]
            return embeds.expand(n, -1, -1), mask.expand(n, -1)  # [B, L, D], [B, L]
        if prompt is None:
            raise ValueError(f"give a {what} or {what}_embeds")
        if self.text_encoder is None:
            raise ValueError(f"this pipeline has no text encoder (a latents run): pass {what}_embeds/{what}_mask")
        prompts = [prompt] * (batch or 1) if isinstance(prompt, str) else list(prompt)
        if batch is not None and len(prompts) != batch:
            raise ValueError(f"{what} has {len(prompts)} entries for {batch} prompts: give one or one per prompt")
        return self.text_encoder.encode(prompts)

    def prepare_latents(self, shape, generator, seed: int | None, device) -> torch.Tensor:
        """The initial noise [B, C, T, H, W] float32 from `generator` (one, or one per video), else from `seed`."""
        if generator is None:
            generator = torch.Generator().manual_seed(
                seed if seed is not None else int(np.random.SeedSequence().entropy % 2**63))
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(f"generator is a list of {len(generator)} for {shape[0]} videos: give one or one per "
                             "video")
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 30, guidance_scale: float = 5.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, seed: int | None = None,
                 num_frames: int | None = None, height: int | None = None, width: int | None = None,
                 prompt_embeds: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, negative_prompt_mask: torch.Tensor | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "np", return_dict: bool = True):
        """Videos for `prompt` (or `prompt_embeds` [B, L, text_dim] with `prompt_mask` [B, L]).

        Guidance is v_neg + guidance_scale * (v_text - v_neg) (none at guidance_scale 1), v_neg the velocity for
        `negative_prompt` (or its embeddings), else for an all-masked caption: no text at all, as in training's
        caption dropout. The initial noise [B, C, T, H, W] is drawn (on the generator's device) from `generator`
        (one, or one per video), else from torch.Generator().manual_seed(seed) (as vsa_train.sampling.generate and
        sample.py); `latents` gives it directly. Size defaults to the training video shape.
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        cfg = self.transformer.config
        if output_type != "latent" and not cfg.pixel_space:
            raise ValueError("this model generates VAE latents: use output_type='latent' and decode them with the "
                             "VAE of the run's latent index")
        device, dtype = self._execution_device, self.transformer.dtype
        text, text_mask = self.encode_prompt(prompt, prompt_embeds, prompt_mask)  # [B, L, D], [B, L]
        B = text.shape[0]
        guided = guidance_scale != 1.0
        if guided:  # [text; negative] in one batch
            if negative_prompt is None and negative_prompt_embeds is None:  # the all-masked caption
                neg, neg_mask = torch.zeros_like(text), torch.zeros_like(text_mask)
            else:
                neg, neg_mask = self.encode_prompt(negative_prompt, negative_prompt_embeds, negative_prompt_mask,
                                                   batch=B, what="negative_prompt")  # [B, L', D], [B, L']
            text, text_mask = _pad_cat(text, text_mask, neg, neg_mask)  # [2B, L, D], [2B, L]
        if latents is None:
            T, H, W = cfg.video_shape
            shape = (B, cfg.in_channels, num_frames or T, height or H, width or W)
            latents = self.prepare_latents(shape, generator, seed, device)  # [B, C, T, H, W]
        x = latents.to(device)
        text, text_mask = text.to(device, dtype), text_mask.to(device)

        sigmas = torch.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]  # our Euler grid: t = sigma
        self.scheduler.set_timesteps(sigmas=sigmas.numpy(), device=device)
        self.scheduler.set_begin_index(0)
        for i in self.progress_bar(range(num_inference_steps)):
            t = self.scheduler.sigmas[i].expand(B)  # [B] flow time in [0, 1]
            if guided:
                v_text, v_neg = self.transformer(torch.cat([x, x]).to(dtype), torch.cat([t, t]), text,
                                                 text_mask).chunk(2)  # [B, C, T, H, W] each
                v = v_neg + guidance_scale * (v_text - v_neg)
            else:
                v = self.transformer(x.to(dtype), t, text, text_mask)  # [B, C, T, H, W]
            x = self.scheduler.step(v, self.scheduler.timesteps[i], x).prev_sample  # x + (sigma_next - sigma) v
        self.maybe_free_model_hooks()

        if output_type == "latent":
            frames = x
        else:  # pixels [B, 3, T, H, W] in [-1, 1] -> frames in [0, 1]
            frames = self.video_processor.postprocess_video(x.float().clamp(-1, 1).cpu(), output_type=output_type)
        return VSAVideoPipelineOutput(frames=frames) if return_dict else (frames,)


def _pad_cat(text, mask, neg, neg_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """[text; neg] [2B, L, D] and their masks [2B, L], the shorter side padded with masked zeros."""
    L = max(text.shape[1], neg.shape[1])
    pad = [(torch.nn.functional.pad(e, (0, 0, 0, L - e.shape[1])), torch.nn.functional.pad(m, (0, L - m.shape[1])))
           for e, m in ((text, mask), (neg.to(text.dtype), neg_mask.to(mask.dtype)))]
    return torch.cat([pad[0][0], pad[1][0]]), torch.cat([pad[0][1], pad[1][1]])
