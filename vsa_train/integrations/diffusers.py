"""diffusers interop: trained runs as diffusers folders that stock diffusers loads, and VSA for diffusers' Wan models.

Exporting a VideoDiT run (scripts/export_diffusers.py RUN_DIR OUT_DIR [--no-ema], or `export_run`) writes

    OUT_DIR/model_index.json     the pipeline: ["vsa_train_integrations_pipeline", "VSAVideoPipeline"], its components
    OUT_DIR/vsa_train_integrations_pipeline.py   the pipeline's code (vsa_train/integrations/pipeline.py)
    OUT_DIR/transformer/         VideoDiTTransformer (config.json: model, attn, in_channels, text_dim, video_shape,
                                 sparsity_limit, pixel_space, auto_map; diffusion_pytorch_model.safetensors) and its
                                 code: vsa_train_integrations_dit_model.py and the vsa_train modules it needs
    OUT_DIR/scheduler/           FlowMatchEulerDiscreteScheduler (num_train_timesteps=1000, shift=1.0)
    OUT_DIR/text_encoder/        CaptionTextEncoder, pixel data only (config.json: vocab, dim, max_len, seed;
                                 its embedding table as safetensors) and its code
    OUT_DIR/README.md            the model card (vsa_train/integrations/model_card.py)
    OUT_DIR/vsa_train_export.json   which run, checkpoint and weights (read by nothing)

The code is this package's own source, copied and rewritten at export (vsa_train/integrations/remote_code.py), so
stock diffusers loads the folder where vsa_train is not installed, running only code the caller trusts:

    pipe = DiffusionPipeline.from_pretrained(OUT_DIR, trust_remote_code=True)
    frames = pipe("a red circle moving left to right", generator=torch.Generator().manual_seed(0)).frames[0]
    export_to_video(frames, "video.mp4", fps=8)          # frames [T, H, W, 3] float in [0, 1]

(`AutoModel.from_pretrained(OUT_DIR + "/transformer", trust_remote_code=True)` loads the transformer alone.) With
vsa_train installed, `VSAVideoPipeline.from_pretrained(OUT_DIR)` (below) loads it with this package's classes and
runs none of the folder's code. For the same prompt, seed and steps either gives the videos of
`vsa_train.sampling.generate` (and sample.py).

Time convention. Our flow time t (x_t = (1 - t) x0 + t noise, v = noise - x0) *is* the scheduler's sigma: with
shift 1.0 the scheduler's `sigmas` are t and its `timesteps` are 1000 * t (the scale our time embedding applies to t
internally). The pipeline sets the scheduler's sigmas to torch.linspace(1, 0, steps + 1)[:-1] (the scheduler appends
the final 0), exactly our Euler grid (the scheduler's own default, linspace(1, 1/1000, steps), ends at 1/1000
instead), hands the transformer t = sigma in [0, 1] (not the 0..1000 timestep), and `scheduler.step` does
x + (sigma_next - sigma) * v, our Euler step. Guidance is v_neg + scale * (v_text - v_neg), v_neg for the negative
prompt or else an all-masked caption, both halves in one batch as in `euler_sample`.

Text encoder. Runs on pixel data (data=synthetic, videos, hf) condition on the built-in caption encoder
(vsa_train/data/text.py): a word vocabulary with seeded random unit embeddings, not a transformers model. The export
saves what rebuilds it: vocabulary, width, length and seed (JSON) plus the table itself (safetensors, no pickles).
Runs on latents (data=latents) are exported without text encoder: pass `prompt_embeds`/`prompt_mask` from the
encoder recorded in the latent index and take output_type="latent" (decode with that index's VAE).

The Wan half (apply_vsa, VSAWanAttnProcessor, VSAWanTransformer3DModel, set_sparsity_limit) lives in wan_vsa.py; a
run of model=wan (vsa_train/models/wan.py) exports its diffusers transformer alone, OUT_DIR/transformer/.
"""
from __future__ import annotations

import json
from pathlib import Path

from diffusers import FlowMatchEulerDiscreteScheduler

from ..data.text import CaptionEncoder
from ..models import is_wan
from ..models.wan_vsa import VSAWanAttnProcessor, VSAWanTransformer3DModel, apply_vsa, set_sparsity_limit
from ..provenance import code_commit
from . import pipeline
from .caption_model import CaptionTextEncoder
from .dit_model import VideoDiTTransformer
from .model_card import exported_ema, write_model_card
from .pipeline import VSAVideoPipelineOutput
from .remote_code import write_code

__all__ = ["CaptionTextEncoder", "VSAVideoPipeline", "VSAVideoPipelineOutput", "VSAWanAttnProcessor",
           "VSAWanTransformer3DModel", "VideoDiTTransformer", "apply_vsa", "export_run", "make_scheduler",
           "set_sparsity_limit"]


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler of our rectified flow: sigma = t, timestep = 1000 t, no shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


class VSAVideoPipeline(pipeline.VSAVideoPipeline):
    """The exported pipeline with this package's classes: from_pretrained runs none of the folder's code."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> VSAVideoPipeline:
        """An export folder (or Hub repo) loaded by its components' from_pretrained (kwargs go to each: torch_dtype,
        revision, ...); DiffusionPipeline.from_pretrained would run the folder's pipeline code."""
        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        index = pipeline.VSAVideoPipeline.load_config(pretrained_model_name_or_path, **hub)
        path = pretrained_model_name_or_path
        transformer = VideoDiTTransformer.from_pretrained(path, subfolder="transformer", **kwargs)
        text_encoder = None
        if (index.get("text_encoder") or [None])[0] is not None:
            text_encoder = CaptionTextEncoder.from_pretrained(path, subfolder="text_encoder", **kwargs)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **hub)
        return cls(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder)


def export_run(run_dir, out_dir, ema: bool = True) -> Path:
    """Writes run `run_dir` (newest verified checkpoint, or a checkpoint dir) as a diffusers folder `out_dir`.

    EMA weights when the run kept them and `ema` is true (as sample.py). Returns out_dir. A model=wan run writes
    out_dir/transformer alone (WanTransformer3DModel, or VSAWanTransformer3DModel with its gates and VSA settings).
    Every export writes its model card, out_dir/README.md.
    """
    from omegaconf import OmegaConf

    from ..data import build_text_encoder, data_spec
    from ..models.vsa import VSAAttention
    from ..sampling import load_model

    model, cfg, ckpt = load_model(run_dir, device="cpu", ema=ema)
    out = Path(out_dir)
    if is_wan(cfg.model):  # the trained diffusers transformer alone, for a Wan pipeline folder (VAE, T5 are theirs)
        model.transformer.save_pretrained(out / "transformer")
        write_model_card(out, ckpt.parent.parent, ckpt, cfg, ema, _wan_how_to_load(out, model.transformer))
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
        if type(enc) is CaptionEncoder:  # rebuilt from its vocabulary: a subclass may tokenize otherwise
            text_encoder = CaptionTextEncoder.from_encoder(enc, seed=int(cfg.data.seed))
    pipe = VSAVideoPipeline(transformer=transformer.eval(), scheduler=make_scheduler(), text_encoder=text_encoder)
    pipe.save_pretrained(out)
    _ship_code(out, pipe)
    write_model_card(out, ckpt.parent.parent, ckpt, cfg, ema, _how_to_load(out, pixels=text_encoder is not None))
    return _provenance(out, run_dir, ckpt, cfg, ema)


def _ship_code(out: Path, pipe: VSAVideoPipeline) -> None:
    """The folder's own code (remote_code.py), named by model_index.json and by each component's auto_map."""
    commit = code_commit()
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [write_code(out, pipeline.VSAVideoPipeline, commit), "VSAVideoPipeline"]
    for name in ("transformer", "text_encoder"):
        component = getattr(pipe, name)
        if component is None:
            continue
        cls = type(component)
        module = write_code(out / name, cls, commit)
        index[name] = [module, cls.__name__]
        config_path = out / name / "config.json"
        config = json.loads(config_path.read_text())
        config["auto_map"] = {"AutoModel": f"{module}.{cls.__name__}"}  # AutoModel.from_pretrained(out/name)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _how_to_load(out: Path, pixels: bool) -> str:
    """The model card's loading example: stock diffusers, the folder's own code."""
    call = ('pipe("a red circle moving left to right", num_inference_steps=30, guidance_scale=5.0,\n'
            '             generator=torch.Generator().manual_seed(0)).frames[0]  # [T, H, W, 3] in [0, 1]\n'
            'export_to_video(video, "video.mp4", fps=8)' if pixels else
            'pipe(prompt_embeds=embeds, prompt_mask=mask, output_type="latent").frames\n'
            '# latents [B, C, T, H, W]: decode them with the VAE of the run\'s latent index')
    return f"""With diffusers alone (the folder carries its pipeline and model code; vsa_train need not be installed):

```python
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import export_to_video

pipe = DiffusionPipeline.from_pretrained("{out}", trust_remote_code=True)
video = {call}
```

With vsa_train installed, `vsa_train.integrations.diffusers.VSAVideoPipeline.from_pretrained("{out}")` loads it
with the package's own classes (no code from the folder runs).
"""


def _wan_how_to_load(out: Path, transformer) -> str:
    """The model card's loading example of a Wan export: its transformer, for a Wan pipeline folder."""
    cls = type(transformer).__name__
    module = "vsa_train.integrations.diffusers" if cls == "VSAWanTransformer3DModel" else "diffusers"
    return f"""The trained transformer of a Wan pipeline (its VAE and text encoder are Wan's own):

```python
from {module} import {cls}

transformer = {cls}.from_pretrained("{out / 'transformer'}")
```
"""


def _provenance(out: Path, run_dir, ckpt: Path, cfg, ema: bool) -> Path:
    """out/vsa_train_export.json: which run, checkpoint and weights (not read by the pipeline)."""
    from omegaconf import OmegaConf

    with open(out / "vsa_train_export.json", "w") as f:
        json.dump({"run_dir": str(Path(run_dir).resolve()), "checkpoint": str(ckpt),
                   "ema": exported_ema(cfg, ckpt, ema), "data": OmegaConf.to_container(cfg.data, resolve=True)},
                  f, indent=2)
    return out
