"""Encode videos into VAE latents + text embeddings (safetensors shards + index.json) for `data=latents`.

    python scripts/encode_latents.py --vae VAE_DIR --out latents/clips data=videos data.frames=17 \
        data.height=128 data.width=128                    # captions through the built-in caption encoder
    python scripts/encode_latents.py --vae VAE_DIR --text-encoder T5_DIR --out latents/hf data=hf data.path=DS
    python scripts/encode_latents.py --vae Wan-AI/Wan2.1-T2V-1.3B-Diffusers --vae-subfolder vae \
        --text-encoder Wan-AI/Wan2.1-T2V-1.3B-Diffusers --text-encoder-subfolder text_encoder \
        --tokenizer-subfolder tokenizer --dtype bf16 --out latents/wan data=videos ...
    python scripts/encode_latents.py --vae VAE_DIR --out latents/mixed data=videos data.manifest=clips.csv \
        'data.buckets=[[17,128,128],[17,128,224],[33,96,160]]'   # bucketed: one bucket per shard
    accelerate launch --num_processes 4 scripts/encode_latents.py ...   # shards split across processes
    python train.py data=latents data.path=latents/clips

Options go before the Hydra overrides that pick and size the video source (`data=videos` or `data=hf`, as
for training). The VAE is a diffusers AutoencoderKLWan and the text encoder a transformers T5/UMT5-style
encoder, each a Hub id or local folder (`from_pretrained(id_or_path, subfolder=..., revision=...,
torch_dtype=...)`); index.json records them as {path, subfolder, revision, dtype} with Hub ids kept as ids
(local folders made absolute). Latents are normalised with the VAE config's latents_mean / latents_std.
The text length is the tokenizer's model_max_length (512 for UMT5; data.text_len when it sets none) unless
--max-length is given. With --text-encoder builtin and data.text_encoder set, data.text_encoder* is used.
Clips are read with the data source's frame sampling and resizing at a fixed middle window; bad inputs are
skipped, named and recorded in the index.

Without data.buckets every clip is encoded at data.frames x height x width, and shard k (shard_<k>.safetensors)
holds clips [k * shard_size, (k + 1) * shard_size). With data.buckets (a list or a rule, as for training) each clip
goes to its bucket as training assigns it (buckets.assign: least crop, never upscaled beyond data.max_upscale; the
processes probe a share of the clips each and pool the results), is read at that bucket's shape and encoded; a
safetensors tensor has one shape, so each shard holds one bucket: bucket by bucket, its clips in list order,
shard_size at a time, shard_<F>x<H>x<W>_<j>.safetensors. A clip that fits no bucket (or cannot be probed) is
skipped, named and recorded in the index like a bad input. Every bucket must suit the VAE (Wan's: frames 1 + 4k,
sides multiples of 8). index.json lists each bucket's pixel and latent shape and its shards with their
counts (vsa_train/data/latent_format.py); data=latents then trains bucketed on them.
Shards are numbered in that fixed order and shard k belongs to process k mod N; a shard file that exists is
complete (written under a temporary name, then renamed), so a re-run with the same arguments skips finished shards.
Each item's sha256 is stored in its shard's metadata; data=latents checks it whenever it reads the item.
"""
import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from hydra import compose, initialize_config_dir
from tqdm.auto import tqdm

from vsa_train.data import hf, listing, videos
from vsa_train.data.buckets import bucket_shapes
from vsa_train.data.encoders import ModelSpec, encoder_max_len, get_text_encoder, given_path
from vsa_train.data.latent_format import INDEX, shard_info, write_shard
from vsa_train.data.latents import encode_videos, load_vae

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("encode_latents")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="AutoencoderKLWan: Hub id or local folder")
    p.add_argument("--vae-subfolder", default=None, help="e.g. vae (in a diffusers repo)")
    p.add_argument("--vae-revision", default=None, help="Hub branch, tag or commit")
    p.add_argument("--text-encoder", default="builtin",
                   help="'builtin' or a transformers encoder (T5/UMT5...): Hub id or local folder")
    p.add_argument("--text-encoder-subfolder", default=None, help="e.g. text_encoder (in a diffusers repo)")
    p.add_argument("--tokenizer-subfolder", default=None, help="e.g. tokenizer; default: the text encoder's")
    p.add_argument("--text-encoder-revision", default=None, help="Hub branch, tag or commit")
    p.add_argument("--dtype", default="fp32", help="weights of both models: fp32 | bf16 | fp16")
    p.add_argument("--vae-dtype", default=None, help="overrides --dtype for the VAE")
    p.add_argument("--text-encoder-dtype", default=None, help="overrides --dtype for the text encoder")
    p.add_argument("--max-length", type=int, default=None,
                   help="text tokens (default: the tokenizer's model_max_length, else data.text_len)")
    p.add_argument("--out", required=True, help="output directory (index.json + shard_*.safetensors)")
    p.add_argument("--shard-size", type=int, default=256, help="clips per shard")
    p.add_argument("--batch-size", type=int, default=4, help="clips per VAE forward")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=videos data.manifest=FILE")
    return p.parse_args(argv)


def load_config(overrides):
    """The data config as training composes it (configs/train.yaml + overrides)."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="train", overrides=list(overrides))
    if cfg.data.source not in ("videos", "hf"):
        raise SystemExit(f"encode_latents reads video files: pick data=videos or data=hf, not data={cfg.data.name}")
    return cfg.data


def main(argv=None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data_cfg = load_config(args.overrides)
    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: torchrun on CPUs gives MULTI_CPU (gloo)
    out = Path(args.out)
    clips = hf.load_clips(data_cfg) if data_cfg.source == "hf" else listing.list_clips(data_cfg)

    vae_spec, text_spec = model_specs(args, data_cfg)
    vae = load_vae(vae_spec, state.device)
    shapes = pixel_shapes(data_cfg, vae)
    if text_spec is None:
        encoder = videos.caption_encoder(data_cfg, clips)
    else:
        max_len = args.max_length or encoder_max_len(text_spec, data_cfg.text_len)
        encoder = get_text_encoder(text_spec, max_len=max_len, device=state.device)
    fits, unfit = assign_buckets(clips, data_cfg, shapes, state)
    plan = shard_plan(fits, shapes if data_cfg.get("buckets") is not None else None, args.shard_size)
    mine = [shard for k, shard in enumerate(plan) if k % state.num_processes == state.process_index
            and not (out / shard.file).exists()]
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        fitting = f" ({len(unfit)} unusable or fitting no bucket)" if unfit else ""
        print(f"{len(clips)} clips{fitting} -> {len(plan)} shards in {out}; {state.num_processes} processes, "
              f"{len(mine)} shards to do on process 0 (finished shards are skipped)", flush=True)
    state.wait_for_everyone()
    start = time.perf_counter()
    writer = ShardWriter(out, clips, data_cfg, vae, encoder, args.batch_size, state.device)
    pbar = tqdm(total=sum(len(s.clips) for s in mine), desc=f"encode[{state.process_index}]", unit="clip",
                position=state.process_index)
    for shard in mine:
        writer.write(shard, shapes[shard.bucket], pbar)
    pbar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        write_index(out, vae, vae_spec, text_spec, data_cfg, encoder, plan, shapes, unfit)
        print(f"encoded in {time.perf_counter() - start:.1f} s; index: {out / INDEX}", flush=True)
    if text_spec is not None:
        encoder.release(drop=True)
    return out / INDEX


def pixel_shapes(data_cfg, vae) -> tuple[tuple[int, int, int], ...]:
    """The pixel shapes clips are encoded at: data.buckets, else the one (frames, height, width); SystemExit naming
    those the VAE cannot encode."""
    shapes = bucket_shapes(data_cfg.get("buckets")) or ((data_cfg.frames, data_cfg.height, data_cfg.width),)
    t_scale, s_scale = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    bad = [list(s) for s in shapes if (s[0] - 1) % t_scale or s[1] % s_scale or s[2] % s_scale]
    if bad and data_cfg.get("buckets") is None:
        raise SystemExit(f"the VAE needs data.frames = 1 + {t_scale}k and height, width multiples of {s_scale}; got "
                         f"{' x '.join(map(str, bad[0]))}")
    if bad:
        raise SystemExit(f"the VAE needs each bucket's frames = 1 + {t_scale}k and height, width multiples of "
                         f"{s_scale}; data.buckets {bad} are not")
    return shapes


@dataclass(frozen=True)
class Shard:
    """One shard file to write: the clips (indices into the clip list) it encodes, all at bucket `bucket`'s shape."""

    file: str
    bucket: int
    clips: list[int]


def assign_buckets(clips, data_cfg, shapes, state) -> tuple[list[int | None], list[str]]:
    """Each clip's bucket (videos.bucket_of: buckets.assign, as training assigns; None: unusable or fitting none)
    and the reasons ("name: reason") of those that have none. Each process probes every N-th clip and all share
    the results. Without data.buckets every clip is bucket 0, unprobed (a bad one is found when it is read)."""
    if data_cfg.get("buckets") is None:
        return [0] * len(clips), []
    probed = []
    for i in range(state.process_index, len(clips), state.num_processes):
        try:
            probed.append((i, videos.bucket_of(clips[i], data_cfg, shapes), ""))
        except videos.BadInput as e:
            probed.append((i, None, f"{clips[i].name}: {e}"))
    probed = sorted(gather_object(probed))
    unfit = [why for _, _, why in probed if why]
    for why in unfit if state.is_main_process else ():  # every process holds them all: named once
        log.warning("skipping %s", why)
    return [bucket for _, bucket, _ in probed], unfit


def shard_plan(fits: list[int | None], shapes, shard_size: int) -> list[Shard]:
    """Every shard, in a fixed order (shard k belongs to process k mod N): bucket by bucket, each bucket's clips in
    list order, `shard_size` at a time; named shard_<k>.safetensors without buckets (`shapes` None: shard k holds
    clips [k * shard_size, (k + 1) * shard_size)), else shard_<F>x<H>x<W>_<j>.safetensors, the bucket's j-th."""
    plan = []
    for b in range(len(shapes or [None])):
        members = [i for i, fit in enumerate(fits) if fit == b]
        for j in range(math.ceil(len(members) / shard_size)):
            tag = "" if shapes is None else "x".join(map(str, shapes[b])) + "_"
            plan.append(Shard(f"shard_{tag}{j:05d}.safetensors", b, members[j * shard_size: (j + 1) * shard_size]))
    return plan


class ShardWriter:
    """Encodes the clips of a shard (read at its bucket's shape by the video source's own code) and writes it."""

    def __init__(self, out: Path, clips, data_cfg, vae, encoder, batch_size: int, device):
        self.out, self.clips, self.data_cfg, self.vae, self.encoder = out, clips, data_cfg, vae, encoder
        self.batch_size, self.device = batch_size, device

    def write(self, shard: Shard, shape, pbar) -> None:
        """Latents of the shard's usable clips at `shape` (a bad one is skipped, named, recorded in the shard)."""
        latents, captions, kept, skipped, pending = [], [], [], [], []
        for n, i in enumerate(shard.clips):
            clip = self.clips[i]
            try:
                pending.append(videos.load_clip(clip, self.data_cfg, start=0.5, shape=shape))
                captions.append(clip.caption)
                kept.append(i)
            except videos.BadInput as e:
                log.warning("skipping %s: %s", clip.name, e)
                skipped.append(f"{clip.name}: {e}")
            if len(pending) == self.batch_size or (n == len(shard.clips) - 1 and pending):
                latents.append(encode_videos(self.vae, torch.stack(pending).to(self.device)).cpu())
                pending = []
            pbar.update(1)
        if not captions:
            log.warning("%s: no usable clips", shard.file)
            return
        text, text_mask = self.encoder.encode(captions)
        write_shard(self.out / shard.file, torch.cat(latents), text, text_mask, captions, skipped, clips=kept)


def model_specs(args, data_cfg) -> tuple[ModelSpec, ModelSpec | None]:
    """The VAE's and the text encoder's spec (None: the built-in caption encoder) from the options."""
    vae = ModelSpec(given_path(args.vae), subfolder=args.vae_subfolder, revision=args.vae_revision,
                    dtype=args.vae_dtype or args.dtype)
    if args.text_encoder == "builtin" and data_cfg.get("text_encoder"):  # as the pixel data would train
        return vae, ModelSpec(given_path(data_cfg.text_encoder), subfolder=data_cfg.get("text_encoder_subfolder"),
                              tokenizer_subfolder=data_cfg.get("tokenizer_subfolder"),
                              revision=data_cfg.get("text_encoder_revision"),
                              dtype=args.text_encoder_dtype or data_cfg.get("text_encoder_dtype") or args.dtype)
    if args.text_encoder == "builtin":
        return vae, None
    return vae, ModelSpec(given_path(args.text_encoder), subfolder=args.text_encoder_subfolder,
                          tokenizer_subfolder=args.tokenizer_subfolder, revision=args.text_encoder_revision,
                          dtype=args.text_encoder_dtype or args.dtype)


def write_index(out: Path, vae, vae_spec: ModelSpec, text_spec: ModelSpec | None, data_cfg, encoder,
                plan: list[Shard], shapes, unfit: list[str]) -> None:
    """index.json from the shard headers: shapes, dtypes, counts, skipped inputs, and how they were made; with
    data.buckets each bucket's pixel and latent shape and its shards (latent_format.py)."""
    infos = [(shard, shard_info(out / shard.file)) for shard in plan if (out / shard.file).exists()]
    if not infos:
        raise SystemExit("no shard holds a usable clip; see the warnings above")
    first = infos[0][1]
    index = {
        "latent_dtype": first["latent_dtype"], "text_shape": first["text_shape"], "text_dtype": first["text_dtype"],
        "count": sum(info["count"] for _, info in infos),
        "skipped": unfit + [name for _, info in infos for name in info["skipped"]],
        "vae": vae_spec.to_dict(),
        "latent_norm": "(posterior mode - vae.config.latents_mean) / vae.config.latents_std",
        "text_encoder": "builtin" if text_spec is None else text_spec.to_dict(),
        "video": {k: data_cfg.get(k) for k in ("frames", "height", "width", "stride", "fps")},
    }
    if data_cfg.get("buckets") is None:
        index.update(latent_shape=first["latent_shape"], shards=[_entry(info) for _, info in infos])
    else:
        index["video"].update(buckets=[list(s) for s in shapes], max_upscale=data_cfg.get("max_upscale", 1.0))
        index["buckets"] = bucket_entries(vae, shapes, infos)
    if text_spec is None:
        index.update(vocab=sorted(w for w in encoder.index), text_seed=data_cfg.seed)
    (out / INDEX).write_text(json.dumps(index, indent=1))


def _entry(info: dict) -> dict:
    """A shard's entry in index.json."""
    return {"file": info["file"], "count": info["count"], "checksums": info["checksums"]}


def bucket_entries(vae, shapes, infos: list[tuple[Shard, dict]]) -> list[dict]:
    """index.json's buckets, in data.buckets' order: each one's pixel and latent shape, item count and shards (with
    their items' clip indices)."""
    buckets = []
    for b, shape in enumerate(shapes):
        shards = [dict(_entry(info), clips=info["clips"]) for shard, info in infos if shard.bucket == b]
        buckets.append({"shape": list(shape), "latent_shape": latent_shape(vae, shape),
                        "count": sum(s["count"] for s in shards), "shards": shards})
    return buckets


def latent_shape(vae, shape) -> list[int]:
    """[C, T, H, W] of the latent of a [frames, height, width] video (every bucket's, also one no clip fits)."""
    frames, height, width = shape
    t, s = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    return [vae.config.z_dim, 1 + (frames - 1) // t, height // s, width // s]


if __name__ == "__main__":
    main()
