"""Encode videos into VAE latents + text embeddings (safetensors shards + index.json) for `data=latents`.

    python scripts/encode_latents.py --vae VAE_DIR --out latents/clips data=videos data.frames=17 \
        data.height=128 data.width=128                    # captions through the built-in caption encoder
    python scripts/encode_latents.py --vae VAE_DIR --text-encoder T5_DIR --out latents/hf data=hf data.path=DS
    python scripts/encode_latents.py --vae Wan-AI/Wan2.1-T2V-1.3B-Diffusers --vae-subfolder vae \
        --text-encoder Wan-AI/Wan2.1-T2V-1.3B-Diffusers --text-encoder-subfolder text_encoder \
        --tokenizer-subfolder tokenizer --dtype bf16 --out latents/wan data=videos ...
    accelerate launch --num_processes 4 scripts/encode_latents.py ...   # shards split across processes
    python train.py data=latents data.path=latents/clips

Options go before the Hydra overrides that pick and size the video source (`data=videos` or `data=hf`, as
for training). The VAE is a diffusers AutoencoderKLWan and the text encoder a transformers T5/UMT5-style
encoder, each a Hub id or local folder (`from_pretrained(id_or_path, subfolder=..., revision=...,
torch_dtype=...)`); index.json records them as {path, subfolder, revision, dtype} with Hub ids kept as ids
(local folders made absolute). Latents are normalised with the VAE config's latents_mean / latents_std.
The text length is the tokenizer's model_max_length (512 for UMT5; data.text_len when it sets none) unless
--max-length is given. With --text-encoder builtin and data.text_encoder set, data.text_encoder* is used. Clips are read with the data source's frame
sampling and resizing at a fixed middle window; bad inputs are skipped, named and recorded in the index.
Shard k holds clips [k * shard_size, (k + 1) * shard_size) and belongs to process k mod N; a shard file
that exists is complete (written under a temporary name, then renamed), so a re-run skips finished shards.
Each item's sha256 is stored in its shard's metadata; data=latents checks it whenever it reads the item.
"""
import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
from accelerate import PartialState
from hydra import compose, initialize_config_dir
from tqdm.auto import tqdm

from vsa_train.data import hf, videos
from vsa_train.data.encoders import ModelSpec, encoder_max_len, get_text_encoder, given_path
from vsa_train.data.latents import INDEX, encode_videos, load_vae, shard_info, write_shard

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
    clips = hf.load_clips(data_cfg) if data_cfg.source == "hf" else videos.list_clips(data_cfg)

    vae_spec, text_spec = model_specs(args, data_cfg)
    vae = load_vae(vae_spec, state.device)
    t_scale, s_scale = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    if (data_cfg.frames - 1) % t_scale or data_cfg.height % s_scale or data_cfg.width % s_scale:
        raise SystemExit(f"the VAE needs data.frames = 1 + {t_scale}k and height, width multiples of {s_scale}; got "
                         f"{data_cfg.frames} x {data_cfg.height} x {data_cfg.width}")
    if text_spec is None:
        encoder = videos.caption_encoder(data_cfg, clips)
    else:
        max_len = args.max_length or encoder_max_len(text_spec, data_cfg.text_len)
        encoder = get_text_encoder(text_spec, max_len=max_len, device=state.device)

    n_shards = math.ceil(len(clips) / args.shard_size)
    mine = [k for k in range(state.process_index, n_shards, state.num_processes)
            if not (out / f"shard_{k:05d}.safetensors").exists()]
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{len(clips)} clips -> {n_shards} shards in {out}; {state.num_processes} processes, "
              f"{len(mine)} shards to do on process 0 (finished shards are skipped)", flush=True)
    state.wait_for_everyone()
    start = time.perf_counter()
    total = sum(len(range(k * args.shard_size, min((k + 1) * args.shard_size, len(clips)))) for k in mine)
    pbar = tqdm(total=total, desc=f"encode[{state.process_index}]", unit="clip", position=state.process_index)
    for k in mine:
        shard = clips[k * args.shard_size: (k + 1) * args.shard_size]
        latents, captions, skipped, pending = [], [], [], []
        for i, clip in enumerate(shard):
            try:
                pending.append(videos.load_clip(clip, data_cfg, start=0.5))
                captions.append(clip.caption)
            except videos.BadInput as e:
                log.warning("skipping %s: %s", clip.name, e)
                skipped.append(f"{clip.name}: {e}")
            if len(pending) == args.batch_size or (i == len(shard) - 1 and pending):
                latents.append(encode_videos(vae, torch.stack(pending).to(state.device)).cpu())
                pending = []
            pbar.update(1)
        if not captions:
            log.warning("shard %d: no usable clips", k)
            continue
        text, text_mask = encoder.encode(captions)
        write_shard(out / f"shard_{k:05d}.safetensors", torch.cat(latents), text, text_mask, captions, skipped)
    pbar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        write_index(out, vae_spec, text_spec, data_cfg, encoder, n_shards)
        print(f"encoded in {time.perf_counter() - start:.1f} s; index: {out / INDEX}", flush=True)
    if text_spec is not None:
        encoder.release(drop=True)
    return out / INDEX


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


def write_index(out: Path, vae_spec: ModelSpec, text_spec: ModelSpec | None, data_cfg, encoder,
                n_shards: int) -> None:
    """index.json from the shard headers: shapes, dtypes, counts, skipped inputs, and how they were made."""
    shards = [shard_info(out / f"shard_{k:05d}.safetensors") for k in range(n_shards)
              if (out / f"shard_{k:05d}.safetensors").exists()]
    if not shards:
        raise SystemExit("no shard holds a usable clip; see the warnings above")
    first = shards[0]
    index = {
        "latent_shape": first["latent_shape"], "latent_dtype": first["latent_dtype"],
        "text_shape": first["text_shape"], "text_dtype": first["text_dtype"],
        "count": sum(s["count"] for s in shards),
        "shards": [{"file": s["file"], "count": s["count"], "checksums": s["checksums"]} for s in shards],
        "skipped": [name for s in shards for name in s["skipped"]],
        "vae": vae_spec.to_dict(),
        "latent_norm": "(posterior mode - vae.config.latents_mean) / vae.config.latents_std",
        "text_encoder": "builtin" if text_spec is None else text_spec.to_dict(),
        "video": {k: data_cfg.get(k) for k in ("frames", "height", "width", "stride", "fps")},
    }
    if text_spec is None:
        index.update(vocab=sorted(w for w in encoder.index), text_seed=data_cfg.seed)
    (out / INDEX).write_text(json.dumps(index, indent=1))


if __name__ == "__main__":
    main()
