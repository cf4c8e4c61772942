"""A model=wan run as a stock diffusers `WanPipeline` folder; trained with VSA, its transformer as remote code.

    OUT/model_index.json   WanPipeline: tokenizer and text_encoder (transformers), vae (AutoencoderKLWan),
                           scheduler (FlowMatchEulerDiscreteScheduler, shift 1, 1000 train timesteps), transformer
    OUT/transformer/       WanTransformer3DModel; with VSA VSAWanTransformer3DModel: its config adds the vsa_* keys
                           (the sparsity limit the run had reached too) and auto_map, and the folder carries its
                           code, vsa_train_models_wan_vsa.py and the vsa_train modules it needs (remote_code.py, as
                           every export's: VSA runs its PyTorch path there), named in model_index.json
    OUT/README.md          the model card (model_card.py) with how to load and sample it as trained (how_to_load)

The VAE and text encoder are the ones the run's latents were made with (data=latents: the {path, subfolder,
revision, dtype} specs in data.path/index.json), or `vae` / `text_encoder` given here (scripts/export_diffusers.py
--vae, --text-encoder), which replace them. A run on pixel data generates pixels, not latents, so it has no
WanPipeline; `transformer_only=True` writes OUT/transformer alone (any run). What is missing or does not fit (the
VAE's latent channels, the encoder's width) is a one-line error before anything is written.
"""
from __future__ import annotations

from pathlib import Path

from ..data import data_spec
from ..data.encoders import ModelSpec, get_text_encoder, load_vae, tokenizer_for
from ..data.latents import read_index
from ..errors import LaunchError, MissingInput
from ..models import is_wan
from ..models.wan_vsa import VSAWanTransformer3DModel, set_sparsity_limit
from .pipeline import make_scheduler
from .remote_code import flat_name, ship

CLASS = VSAWanTransformer3DModel.__name__
MODULE = flat_name(VSAWanTransformer3DModel.__module__)  # transformer/<MODULE>.py, as remote_code.ship names it

# How to sample as vsa_train does; what the stock WanPipeline does otherwise than our sampler (vsa_train.sampling).
PIPELINE_USAGE = """```python
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import export_to_video

pipe = DiffusionPipeline.from_pretrained("{folder}"{remote})
prompt = ["a red circle moving left to right"]
video = pipe(prompt, negative_prompt_embeds=torch.zeros(len(prompt), {text_len}, {text_dim}),
             max_sequence_length={text_len}, num_frames={frames}, height={height}, width={width},
             num_inference_steps=30, guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).frames[0]
export_to_video(video, "video.mp4", fps=8)
```

{remote_note}

Sampling as it was trained (vsa_train's sampler differs from WanPipeline's defaults in these):

- The unconditional branch of guidance is the empty caption as training dropped it: all text tokens zero. WanPipeline's
  default negative prompt is the text encoder's output for "" instead, not what this training used: pass
  `negative_prompt_embeds=torch.zeros(batch, {text_len}, {text_dim})` as above (or guidance_scale=1).
- Text is {text_len} tokens, zero-padded (Wan's cross-attention sees the padding): pass
  `max_sequence_length={text_len}` (WanPipeline's default is 512).
- The size trained on: {frames} frames of {height} x {width} (latents {latent}).
- Time: the scheduler's sigma is our flow time t and Wan's timestep is 1000 t; the output is the velocity
  noise - x0, stepped by Euler. The scheduler here (FlowMatchEulerDiscreteScheduler, shift 1.0) steps sigmas
  linspace(1, 1/1000, steps) then 0, where vsa_train steps linspace(1, 0, steps + 1): the same for 1 step, and
  close (not equal) for more. Wan's own UniPCMultistepScheduler with flow_shift also samples this model (a
  different solver and grid: other, not wrong, samples).
- The noise of `generator=torch.Generator().manual_seed(seed)` is the noise vsa_train's sampler draws for seed.
"""

REMOTE_NOTE = (f"The transformer runs Video Sparse Attention through remote code (transformer/{MODULE}.py and the "
               "vsa_train modules it needs: the package's own source, with VSA's PyTorch path and no Triton "
               "kernels): `trust_remote_code=True` loads it without vsa_train. A plain "
               "`WanTransformer3DModel.from_pretrained` of transformer/ runs dense attention without the trained "
               "gates (diffusers warns so in one line).")
DENSE_NOTE = "Dense attention: stock diffusers loads it without remote code."


def _recorded(cfg) -> tuple[dict, str]:
    """The run's latent index (empty for pixel data) and a name for where its VAE and text encoder are recorded."""
    if cfg.data.source != "latents":
        return {}, f"data={cfg.data.get('name', cfg.data.source)}"
    return read_index(cfg.data.path), f"{Path(cfg.data.path) / 'index.json'}"


def components(cfg, vae=None, text_encoder=None) -> tuple[ModelSpec, ModelSpec]:
    """(VAE spec, text encoder spec) of the pipeline: the arguments, else the run's latent index; MissingInput in
    one line naming what is missing."""
    index, where = _recorded(cfg)
    if not index and vae is None:
        raise MissingInput(f"a model=wan run on pixel data ({where}) generates pixels, not VAE latents: it has no "
                           "WanPipeline (train on data=latents), or export the transformer alone (--transformer-only)")
    vae_spec = ModelSpec.parse(vae if vae is not None else index["vae"]) if (vae or index.get("vae")) else None
    recorded = index.get("text_encoder")
    text = text_encoder if text_encoder is not None else (recorded if recorded not in (None, "builtin") else None)
    missing = ([] if vae_spec else ["a VAE (--vae)"]) + ([] if text else [
        f"a transformers text encoder (--text-encoder; {where} records "
        f"{'the built-in caption encoder' if recorded == 'builtin' else 'none'})"])
    if missing:
        raise MissingInput(f"cannot export a WanPipeline: no {' and no '.join(missing)}; or export the transformer "
                           "alone (--transformer-only)")
    return vae_spec, ModelSpec.parse(text)


def export_wan(model, cfg, out, vae=None, text_encoder=None, transformer_only: bool = False) -> str:
    """Writes the loaded model=wan run `model` (config `cfg`) as a WanPipeline folder `out` (see the module
    docstring); `vae` / `text_encoder`: a path, Hub id, spec dict or ModelSpec replacing the run's. Returns its model
    card's how-to-load text."""
    from diffusers import WanPipeline

    if not is_wan(cfg.model):
        raise LaunchError(f"--vae, --text-encoder and --transformer-only are for model=wan runs, not "
                          f"model={cfg.model.get('name')}")
    out = Path(out)
    transformer = model.transformer
    vsa = getattr(transformer, "_vsa_state", None) is not None
    if vsa:  # the limit the run had reached (a ramp may not be done), into the saved config
        set_sparsity_limit(transformer, transformer._vsa_state.limit)
    if transformer_only:
        transformer.save_pretrained(out / "transformer")
        _ship(out, vsa)
        return transformer_usage(out, vsa)
    vae_spec, text_spec = components(cfg, vae, text_encoder)
    spec = data_spec(cfg.data)
    vae_model = load_vae(vae_spec)
    if vae_model.config.z_dim != transformer.config.in_channels:
        raise LaunchError(f"the VAE {vae_spec.path} has {vae_model.config.z_dim} latent channels; the transformer "
                          f"takes {transformer.config.in_channels}")
    encoder = get_text_encoder(text_spec, max_len=spec.text_len)
    if encoder.dim != transformer.config.text_dim:
        raise LaunchError(f"the text encoder {text_spec.path} is {encoder.dim} wide; the transformer takes text of "
                          f"width {transformer.config.text_dim}")
    # the scheduler's sigma is our flow time t and WanPipeline gives Wan 1000 t, its timestep (models/wan.py)
    pipe = WanPipeline(tokenizer=tokenizer_for(text_spec), text_encoder=encoder.model, vae=vae_model,
                       scheduler=make_scheduler(), transformer=transformer)
    pipe.save_pretrained(out)
    _ship(out, vsa)  # model_index.json named our package's module, which needs vsa_train importable
    return pipeline_usage(out, spec, vae_model.config, vsa)


def _ship(out: Path, vsa: bool) -> None:
    """With VSA: the transformer's code beside it, named by its config and model_index.json (remote_code.py)."""
    if vsa:
        ship(out, {"transformer": VSAWanTransformer3DModel})


def pipeline_usage(out: Path, spec, vae_config, vsa: bool) -> str:
    """How to load and sample the WanPipeline folder `out` as it was trained (`spec`: the run's DataSpec)."""
    T, h, w = spec.video_shape
    ts, ss = vae_config.scale_factor_temporal, vae_config.scale_factor_spatial
    note = REMOTE_NOTE if vsa else f"{DENSE_NOTE} `WanPipeline.from_pretrained` loads the folder too."
    return PIPELINE_USAGE.format(folder=out, remote=", trust_remote_code=True" if vsa else "", remote_note=note,
                                 text_len=spec.text_len, text_dim=spec.text_dim, frames=1 + ts * (T - 1),
                                 height=ss * h, width=ss * w, latent=f"{spec.in_channels} x {T} x {h} x {w}")


def transformer_usage(out: Path, vsa: bool) -> str:
    """How to load the transformer written alone, for a Wan pipeline (its VAE and text encoder are Wan's own)."""
    folder = out / "transformer"
    cls, remote = ("AutoModel", ", trust_remote_code=True") if vsa else ("WanTransformer3DModel", "")
    own = f'`vsa_train.integrations.diffusers.{CLASS}.from_pretrained("{folder}")`'
    note = (f"{REMOTE_NOTE} With vsa_train installed, {own} loads it with the package's own class (no code from the "
            "folder runs)." if vsa else DENSE_NOTE)
    return f"""The trained transformer of a Wan pipeline (its VAE and text encoder are Wan's own):

```python
from diffusers import {cls}

transformer = {cls}.from_pretrained("{folder}"{remote})
```

{note}
"""
