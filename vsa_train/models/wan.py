"""model=wan: a diffusers `WanTransformer3DModel` trained by the same trainer as VideoDiT (configs/model/wan.yaml).

`WanConfig` is the `model` group of a Wan; it imports no diffusers, so flops.py and config_schema.py read it. With
`path` set the shape is the folder's config.json, else the config's keys (a random-init model). `WanVideoModel`
wraps the transformer behind VideoDiT's call: forward(x [B, C, T, H, W], t [B] in [0, 1], text [B, L, text_dim],
text_mask [B, L] bool) -> velocity [B, C, T, H, W]; `attn=vsa` installs `wan_vsa.apply_vsa` in it.

Conventions, those of diffusers' WanPipeline with FlowMatchEulerDiscreteScheduler: our flow time t is the
scheduler's sigma (x_t = (1 - t) x0 + t noise, its `scale_noise`) and Wan's `timestep` is 1000 t. Wan's output is
dx/dsigma = noise - x0 (the scheduler steps x + (sigma_next - sigma) output), the velocity our flow loss
(vsa_train/diffusion.py) targets, so it is returned unchanged. Wan takes no text mask; WanPipeline pads its T5
embeddings with zeros, so masked tokens are zeroed here and the null caption of guidance (all masked) is zero text.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from ..fields import ConfigError, Section, choice, flag, int_list, integer, positive, read_or_raise, text

SHAPE = ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "freq_dim", "patch_size",
         "cross_attn_norm", "qk_norm", "eps", "rope_max_seq_len")  # diffusers' names; from the folder with a path
CHECKPOINTING = ("none", "full")  # diffusers checkpoints every block or none


def is_wan(model_cfg) -> bool:
    """Whether a `model` config is a diffusers Wan (name wan or wan_<anything>) rather than a VideoDiT."""
    name = str(model_cfg.name if isinstance(model_cfg, Section) else model_cfg.get("name") or "")
    return name == "wan" or name.startswith("wan_")


@functools.lru_cache(maxsize=None)
def folder_config(path: str, subfolder: str | None = None) -> dict:
    """config.json of a local WanTransformer3DModel folder, with a clear error for anything else."""
    folder = Path(path) / (subfolder or "")
    if not (folder / "config.json").is_file():
        hint = (" (a pipeline folder: set model.subfolder=transformer)"
                if (folder / "model_index.json").is_file() else "")
        raise FileNotFoundError(f"no config.json in {folder}{hint}")
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") not in ("WanTransformer3DModel", "VSAWanTransformer3DModel"):
        raise ValueError(f"{folder} holds a {config.get('_class_name')!r}, not a WanTransformer3DModel")
    if config.get("image_dim") is not None or config.get("added_kv_proj_dim") is not None:
        raise ValueError(f"{folder} is an image-to-video Wan (image_dim={config.get('image_dim')}); only "
                         "text-to-video transformers are supported")
    if config.get("out_channels") not in (None, config.get("in_channels", 16)):
        raise ValueError(f"{folder} predicts {config['out_channels']} channels from {config.get('in_channels')}; the "
                         "flow loss needs as many out as in")
    return config


@dataclass(frozen=True)
class WanConfig(Section):
    """The keys of configs/model/wan.yaml (diffusers' names for the shape); in_channels/text_dim: the folder's."""

    name: str = text()
    path: str | None = text(None, optional=True)
    subfolder: str | None = text(None, optional=True)
    num_layers: int = integer(12)
    num_attention_heads: int = integer(12)
    attention_head_dim: int = integer(64)
    ffn_dim: int = integer(3072)
    freq_dim: int = integer(256)
    patch_size: tuple[int, int, int] = int_list(3, 1, (1, 2, 2), "3 positive integers [t, h, w]")
    cross_attn_norm: bool = flag(True)
    qk_norm: str | None = text("rms_norm_across_heads", optional=True)
    eps: float = positive(1e-6)
    rope_max_seq_len: int = integer(1024)
    grad_checkpointing: str = choice("none", CHECKPOINTING, "one of none, full for model=wan (diffusers "
                                                            "checkpoints every block or none)")
    in_channels: int | None = None  # set from a folder only: a random model takes the data's
    text_dim: int | None = None

    @classmethod
    def from_cfg(cls, model_cfg) -> "WanConfig":
        """The config from a dict or DictConfig (or itself), with `path` the shape of the folder's config.json;
        ConfigError listing every bad key or value."""
        return read_or_raise(cls, model_cfg, "model")

    def validate(self) -> list[str]:
        if self.attention_head_dim % 2:
            return [f"model.attention_head_dim must be even (rotary embedding), got {self.attention_head_dim}"]
        if self.path is None:
            return []
        try:
            folder = folder_config(str(self.path), self.subfolder)
        except (OSError, ValueError) as e:
            return [f"model.path={self.path!r}: {e}"]
        if "patch_size" in folder and self.patch_size != tuple(folder["patch_size"]):
            return [f"model.patch_size={list(self.patch_size)} differs from the patch size {folder['patch_size']} of "
                    f"model.path={self.path}: set model.patch_size={folder['patch_size']}"]
        return []

    def complete(self) -> "WanConfig":
        """With `path`: the folder's shape, input channels and text width."""
        if not self.path:
            return self
        folder = folder_config(str(self.path), self.subfolder)
        shape = {k: tuple(folder[k]) if k == "patch_size" else folder[k] for k in SHAPE if k in folder}
        return replace(self, **shape, in_channels=folder.get("in_channels", 16), text_dim=folder.get("text_dim", 4096))

    # What the trainer, flops.py and progress.py read of any model config (DiTConfig's names)
    hidden_size = property(lambda self: self.num_attention_heads * self.attention_head_dim)
    depth = property(lambda self: self.num_layers)
    num_heads = property(lambda self: self.num_attention_heads)
    head_dim = property(lambda self: self.attention_head_dim)
    mlp_hidden = property(lambda self: self.ffn_dim)

    def diffusers_kwargs(self, in_channels: int, text_dim: int) -> dict:
        """WanTransformer3DModel(**kwargs) of a random-init model of this shape."""
        shape = {k: getattr(self, k) for k in SHAPE}
        return dict(shape, patch_size=tuple(self.patch_size), in_channels=in_channels, out_channels=in_channels,
                    text_dim=text_dim)


def attn_problems(cfg: WanConfig, attn_cfg) -> list[str]:
    """Why an `attn` config cannot run in Wan: its processor is the VSA op (coarse + fine, top-k, coarse gate)."""
    from .attention import vsa_config

    vcfg = vsa_config(attn_cfg)
    if vcfg is None:
        return []
    bad = []
    if not vcfg.uses_op or not vcfg.gate_coarse or vcfg.gate_fine:
        bad.append(f"attn={vcfg.name} (coarse={vcfg.coarse}, fine={vcfg.fine}, select={vcfg.select}, gate_coarse="
                   f"{vcfg.gate_coarse}, gate_fine={vcfg.gate_fine}) is not supported with model=wan: its processor "
                   "is the VSA op with the coarse gate only (attn=vsa or attn=dense)")
    if vcfg.dense_layers:
        bad.append(f"attn.dense_layers={list(vcfg.dense_layers)} is not supported with model=wan (VSA goes into "
                   "every block): allowed: []")
    return bad


def data_problems(cfg: WanConfig, in_channels: int, text_dim: int, data: str = "the data") -> list[str]:
    """Why a Wan folder cannot train on the data: its input channels and text width differ from the data's."""
    if not cfg.path or (cfg.in_channels, cfg.text_dim) == (in_channels, text_dim):
        return []
    return [f"model.path={cfg.path} takes {cfg.in_channels} input channels and text of width {cfg.text_dim}; "
            f"{data} gives {in_channels} and {text_dim} (for a pretrained Wan train on its VAE latents and text "
            f"encoder: data=latents)"]


class WanVideoModel(nn.Module):
    """A WanTransformer3DModel behind VideoDiT's call (see the module docstring for t, v and the text mask)."""

    def __init__(self, transformer: nn.Module, cfg: WanConfig):
        super().__init__()
        self.transformer, self.cfg = transformer, cfg

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer's blocks: what regional compilation (train.compile=true) and FSDP wrap one by one."""
        return self.transformer.blocks

    def set_sparsity_limit(self, limit: float) -> None:
        """The sparsity schedule's limit in force for every VSA processor (no-op for dense attention)."""
        if getattr(self.transformer, "_vsa_state", None) is not None:
            self.transformer._vsa_state.limit = float(limit)

    def forward(self, x, t, text, text_mask=None) -> torch.Tensor:
        """x [B, C, T, H, W], t [B] in [0, 1], text [B, L, text_dim], text_mask [B, L] bool or None."""
        if text_mask is not None:
            text = text * text_mask[..., None].to(text.dtype)  # [B, L, text_dim], masked tokens zero
        return self.transformer(x, 1000 * t, text, return_dict=False)[0]  # [B, C, T, H, W]


def build_wan(cfg: WanConfig, attn_cfg, *, in_channels: int, text_dim: int, load_weights: bool = True):
    """The wrapped Wan: the folder's weights (unless on the meta device or load_weights is false) or a random-init
    one of the config's shape; VSA processors and zero gates for sparse attention."""
    with torch.device("cpu"):  # a first import under a meta default device would leave module tensors on meta
        from diffusers import WanTransformer3DModel

        from .wan_vsa import VSAWanTransformer3DModel, apply_vsa
    from .attention import vsa_config

    if bad := data_problems(cfg, in_channels, text_dim):
        raise ConfigError(bad)
    vcfg = vsa_config(attn_cfg)
    vsa = {} if vcfg is None else dict(sparsity=vcfg.sparsity, topk=vcfg.topk, tile=vcfg.tile, backend=vcfg.backend)
    if cfg.path and load_weights and torch.get_default_device().type != "meta":
        cls = WanTransformer3DModel if vcfg is None else VSAWanTransformer3DModel
        extra = {f"vsa_{k}": v for k, v in vsa.items()}  # a plain folder's missing gates start at zero
        transformer = cls.from_pretrained(cfg.path, subfolder=cfg.subfolder, torch_dtype=torch.float32, **extra)
    else:  # a random model, or the folder's shape without its weights (meta device: parameter counts, dry run)
        transformer = WanTransformer3DModel(**cfg.diffusers_kwargs(in_channels, text_dim))
    if vcfg is not None:
        apply_vsa(transformer, **vsa)  # settings of this run's attn config (also over a VSA folder's own)
    if cfg.grad_checkpointing == "full":
        transformer.enable_gradient_checkpointing()
    return WanVideoModel(transformer.train(), cfg)
