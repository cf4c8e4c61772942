"""The files of a latent folder (data=latents): safetensors shards and index.json, as scripts/encode_latents.py
writes them and vsa_train/data/latents.py reads them.

A shard holds latent [n, C, T, H, W], text [n, L, D] and text_mask [n, L], with the captions, the skipped inputs,
each item's sha256 (item_checksum) and the index of the clip each item was encoded from in its metadata. Its tensors
have one shape, so a shard holds one bucket.

index.json without buckets (one shape, and every index written before buckets): latent_shape [C, T, H, W],
text_shape [L, D], dtypes, count, shards [{file, count, checksums}] in clip order, skipped ["name: reason"], vae,
text_encoder, video (the pixel settings). With buckets (encoded with data.buckets) latent_shape and shards give way to
buckets [{shape [frames, height, width] (pixels), latent_shape [C, T, H, W], count, shards [{file, count, checksums,
clips (each item's clip index, for the clip order)}]}] in data.buckets' order, every bucket listed (one that no clip
fits: count 0, no shards); skipped then also holds the clips that fit no bucket.
"""
import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .buckets import positive_ints

INDEX = "index.json"
TENSORS = ("latent", "text", "text_mask")


def item_checksum(latent: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, caption: str) -> str:
    """sha256 of one item as stored: the bytes of its latent, text and text_mask (their shapes are the index's)
    and its caption."""
    digest = hashlib.sha256()
    for t in (latent, text, text_mask):
        digest.update(t.contiguous().view(torch.uint8).numpy())
    digest.update(caption.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def write_shard(path, latent: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, captions: list[str],
                skipped: list[str], clips: list[int] | None = None) -> None:
    """One shard with each item's checksum (and clip index, when given) in its metadata, written to a temporary
    name and renamed, so that a file that exists is complete."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tensors = {"latent": latent.contiguous(), "text": text.contiguous(), "text_mask": text_mask.contiguous()}
    checksums = [item_checksum(*(tensors[t][i] for t in TENSORS), c) for i, c in enumerate(captions)]
    metadata = {"captions": json.dumps(captions), "skipped": json.dumps(skipped), "checksums": json.dumps(checksums)}
    if clips is not None:
        metadata["clips"] = json.dumps(clips)
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def shard_info(path) -> dict:
    """Count, shapes, dtypes, skipped inputs, whether items carry checksums and their clip indices (None where not
    recorded), of a shard, from its header."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        latent, text = f.get_slice("latent"), f.get_slice("text")
        return {"file": Path(path).name, "count": latent.get_shape()[0], "latent_shape": latent.get_shape()[1:],
                "latent_dtype": latent.get_dtype(), "text_shape": text.get_shape()[1:],
                "text_dtype": text.get_dtype(), "skipped": json.loads(meta["skipped"]),
                "checksums": "checksums" in meta, "clips": json.loads(meta["clips"]) if "clips" in meta else None}


def shard_groups(index: dict) -> list[tuple[list, list]]:
    """(latent shape, shards) of each bucket of a checked index, in bucket order; one group for an index without
    buckets."""
    if "buckets" in index:
        return [(bucket["latent_shape"], bucket["shards"]) for bucket in index["buckets"]]
    return [(index["latent_shape"], index["shards"])]


def read_index(root) -> dict:
    """The index of a latent directory, with a clear error when it is missing, not JSON, or lacks or garbles a key."""
    path = Path(root) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"data.path={str(root)!r} has no {INDEX}; write one with scripts/encode_latents.py")
    try:
        index = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt ({e}); rewrite it with scripts/encode_latents.py") from None
    problem = _index_problem(index)
    if problem:
        raise ValueError(f"{path} {problem}; rewrite it with scripts/encode_latents.py")
    for _, shards in shard_groups(index):
        for shard in shards:
            _check_inside(path, shard["file"])
    return index


def _index_problem(index) -> str | None:
    """What is wrong with a parsed index.json (None: nothing)."""
    if not isinstance(index, dict) or "buckets" not in index:
        shards = index.get("shards") if isinstance(index, dict) else None
        if not _shards_ok(shards):
            return "has no valid 'shards' list of {file, count}"
        missing = [k for k in ("latent_shape", "text_shape") if k not in index]
        return f"lacks {missing}" if missing else None
    buckets = index["buckets"]
    if not (isinstance(buckets, list) and buckets):
        return "has no valid 'buckets' list"
    for b, bucket in enumerate(buckets):
        if not (isinstance(bucket, dict) and positive_ints(bucket.get("shape"), 3)
                and positive_ints(bucket.get("latent_shape"), 4)):
            return f"bucket {b} has no valid shape [frames, height, width] and latent_shape [C, T, H, W]"
        if not _shards_ok(bucket.get("shards"), clips=True):
            return f"bucket {b} has no valid 'shards' list of {{file, count, clips}}"
    return None if "text_shape" in index else "lacks ['text_shape']"


def _shards_ok(shards, clips: bool = False) -> bool:
    """Whether `shards` is a list of {file, count} (and clips: `count` clip indices, for a bucketed index)."""
    return isinstance(shards, list) and all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("count"), int)
        and (not clips or (isinstance(s.get("clips"), list) and len(s["clips"]) == s["count"]
                           and all(isinstance(c, int) for c in s["clips"])))
        for s in shards)


def _check_inside(index: Path, file: str) -> None:
    """ValueError unless shard `file` of `index`, with `..` and symlinks resolved, lies inside the index's folder.

    The index names what is opened, so it must not reach other files (an absolute path, `..`, or a symlink
    leading out); the folder itself may be a symlink, and symlinks between files inside it are followed.
    """
    root = index.parent
    try:
        real, real_root = (root / file).resolve(), root.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loops, NUL bytes
        raise ValueError(f"{index}: shard {file!r} cannot be resolved ({e})") from None
    if not real.is_relative_to(real_root):
        raise ValueError(f"{index}: shard {file!r} lies outside the latent folder {real_root} ({real})")
