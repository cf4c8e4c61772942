"""Precomputed latents: VAE latents and text embeddings in safetensors shards (scripts/encode_latents.py).

`data.path` holds `index.json` and `shard_*.safetensors` files (their format: latent_format.py): latent
[n, C, T, H, W] (normalised with the VAE's latents_mean / latents_std), text [n, L, D], text_mask [n, L], and the
captions and each item's sha256 in the metadata. The index records the VAE and text encoder used as {path,
subfolder, revision, dtype} dicts (Hub ids stay ids; older indexes hold bare paths, still read). The model's input
channels and video shape are the latent's, so patching follows the latent grid.

An index with buckets (encoded with data.buckets; one bucket per shard) trains as bucketed pixel data does
(buckets.py): one bucket per optimizer step, drawn from (seed, step) in proportion to the buckets' training items
(or data.bucket_weights, one per bucket of the index), exact resume from the stream position; DataSpec.buckets are
the buckets' latent (T, H, W), and the eval set is one batch per bucket. The buckets are the index's: data.buckets,
when set, must name the same ones (the pixel shapes they were encoded at, in order), else the run is refused.
data.holdout holds out the last items in the order of the clip list they were encoded from, as for the pixels.

A shard that cannot be used (missing, truncated, a tensor missing or of the wrong shape, unreadable
captions or checksums, fewer items than index.json says) does not stop a run: its affected items raise
BadInput naming the shard, so the stream skips and counts them (a bucketed one: the next item of its bucket
replaces each); so does an item whose bytes fail its checksum (checked each time it is read) or hold non-finite
values. Shards of an index written before checksums are read unchecked, with one warning. A missing or corrupt
index.json, or one naming a shard outside the folder (an absolute path, `..`, a symlink leading out), is an error
at start.
"""
import functools
import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .batching import BadInput, ItemStream, eval_batch, holdout_split, make_loader
from .buckets import bucket_shapes, build_buckets
from .encoders import ModelSpec, PretrainedTextEncoder, get_text_encoder, load_vae  # noqa: F401 -- re-exported
from .latent_format import INDEX, TENSORS, item_checksum, read_index, shard_groups
from .latent_format import shard_info, write_shard  # noqa: F401 -- re-exported (scripts/encode_latents.py, tests)
from .spec import DataSpec
from .text import CaptionEncoder

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ VAE
# load_vae(spec, device): a diffusers AutoencoderKLWan by Hub id or local folder (vsa_train/data/encoders.py)

def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent mean and std as [1, C, 1, 1, 1] tensors."""
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
    return mean, std


@torch.no_grad()
def encode_videos(vae, video: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, C, 1 + (F-1)/4, H/8, W/8] (posterior mode)."""
    raw = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode()
    mean, std = _stats(vae, raw)
    return ((raw - mean) / std).float()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, C, T, h, w] -> pixels [B, 3, F, H, W] in [-1, 1]."""
    z = latents.to(vae.device, vae.dtype)
    mean, std = _stats(vae, z)
    return vae.decode(z * std + mean).sample.float().clamp(-1, 1)


# -------------------------------------------------------------------------------------------- text encoders

def encoder_from_index(index: dict, device="cpu"):
    """The text encoder an index was written with: built-in (vocabulary in the index) or pretrained, recorded as
    a spec dict {path, subfolder, tokenizer_subfolder, revision, dtype} or (older indexes) a bare local path.
    A pretrained one is the process's shared instance, offloaded to the CPU between calls."""
    L, D = index["text_shape"]
    if index["text_encoder"] == "builtin":
        return CaptionEncoder(index["vocab"], dim=D, max_len=L, seed=index["text_seed"])
    return get_text_encoder(ModelSpec.parse(index["text_encoder"]), max_len=L, device=device, offload=True)


# ---------------------------------------------------------------------------------------------------- shards
# the files' format: latent_format.py (write_shard, shard_info, read_index, item_checksum)

class _Shard:
    """An open shard checked against the index: the file handle, its item count, captions and the items'
    checksums (None for a shard the index records without them)."""

    def __init__(self, path: Path, latent_shape: list, text_shape: list, checksums: bool):
        self.file = safe_open(str(path), framework="pt")  # raises on a truncated file
        missing = [t for t in TENSORS if t not in self.file.keys()]
        if missing:
            raise BadInput(f"no tensor {missing}")
        shapes = {t: self.file.get_slice(t).get_shape() for t in TENSORS}
        self.count = shapes["latent"][0]
        expected = {"latent": latent_shape, "text": text_shape, "text_mask": text_shape[:1]}
        for t, shape in shapes.items():
            if shape != [self.count, *expected[t]]:
                raise BadInput(f"tensor {t} of shape {shape}, the index says {[self.count, *expected[t]]}")
        try:
            self.captions = json.loads((self.file.metadata() or {})["captions"])
        except (KeyError, json.JSONDecodeError) as e:
            raise BadInput(f"captions unreadable ({type(e).__name__}: {e})") from None
        if not (isinstance(self.captions, list) and len(self.captions) == self.count
                and all(isinstance(c, str) for c in self.captions)):
            raise BadInput(f"captions are not a list of {self.count} strings")
        self.checksums = self._checksums() if checksums else None

    def _checksums(self) -> list[str]:
        """The items' checksums from the metadata; BadInput when they are missing or malformed."""
        try:
            checksums = json.loads(self.file.metadata()["checksums"])
        except (KeyError, json.JSONDecodeError) as e:
            raise BadInput(f"checksums unreadable ({type(e).__name__}: {e})") from None
        if not (isinstance(checksums, list) and len(checksums) == self.count):
            raise BadInput(f"checksums are not a list of {self.count}")
        return checksums


class LatentStore:
    """Random access to the items of all shards (files opened lazily, once per process or worker).

    A shard that fails to open or check is remembered as the reason, so it is not reopened for each item.
    """

    def __init__(self, root):
        self.root, self.index = Path(root), read_index(root)
        self.bucketed = "buckets" in self.index
        # in bucket order; each shard with its bucket and the latent shape it must hold
        self.shards = [dict(s, bucket=b, latent_shape=list(shape))
                       for b, (shape, shards) in enumerate(shard_groups(self.index)) for s in shards if s["count"] > 0]
        self.offsets = np.cumsum([0] + [s["count"] for s in self.shards])
        self._files: dict[int, _Shard | str] = {}  # shard k -> open shard, or why it is unusable
        unchecked = sum(not s.get("checksums") for s in self.shards)
        if unchecked:  # indexes written before checksums: still read, their damage found only if non-finite
            log.warning("%s: %d of %d shards have no checksums (encoded before checksums were recorded), so "
                        "changed bytes in them go unnoticed unless non-finite; re-encode them to check them",
                        self.root / INDEX, unchecked, len(self.shards))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        """(shard, item within it) of item i."""
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return k, int(i - self.offsets[k])

    def name(self, i: int) -> str:
        k, j = self._locate(i)
        return f"{self.shards[k]['file']}[{j}]"

    def buckets(self) -> list[int]:
        """Each item's bucket (0 for all without buckets)."""
        return [s["bucket"] for s in self.shards for _ in range(s["count"])]

    def clip_order(self) -> list[int]:
        """The items in the order of the clip list they were encoded from (a bucketed index records each item's
        clip; without buckets the shards are in clip order already)."""
        if not self.bucketed:
            return list(range(len(self)))
        clips = [c for s in self.shards for c in s["clips"]]
        return sorted(range(len(self)), key=clips.__getitem__)

    def _shard(self, k: int) -> _Shard:
        """Shard k, opened once; BadInput naming it (each time) when it cannot be used."""
        if k not in self._files:
            file = self.shards[k]["file"]
            path = self.root / file
            try:
                self._files[k] = _Shard(path, self.shards[k]["latent_shape"], list(self.index["text_shape"]),
                                        bool(self.shards[k].get("checksums")))
            except BadInput as e:
                self._files[k] = f"shard {file}: {e}"
            except Exception as e:  # noqa: BLE001 -- safetensors raises its own error type on damaged files
                what = "missing" if not path.is_file() else f"unreadable ({type(e).__name__}: {str(e)[:200]})"
                self._files[k] = f"shard {file}: {what}"
            if isinstance(self._files[k], str):
                log.warning("%s; its %d items are skipped", self._files[k], self.shards[k]["count"])
        shard = self._files[k]
        if isinstance(shard, str):
            raise BadInput(shard)  # a new exception each time: re-raising one would grow its traceback
        return shard

    def load(self, i: int, position: int | None = None, bucket: int | None = None) -> dict:
        """Item i as dict(video=latent, text, text_mask, caption); BadInput on a bad shard, a checksum mismatch
        or non-finite values.

        `position` and `bucket` (as ItemStream and BucketStream pass them) are unused: a latent has no window to
        choose, and its shape is its bucket's.
        """
        k, j = self._locate(i)
        shard = self._shard(k)
        if j >= shard.count:
            raise BadInput(f"shard {self.shards[k]['file']} holds {shard.count} items, {INDEX} says "
                           f"{self.shards[k]['count']}")
        try:
            stored = [shard.file.get_slice(t)[j: j + 1][0] for t in TENSORS]
        except Exception as e:  # noqa: BLE001 -- an I/O error on one item leaves the others usable
            raise BadInput(f"shard {self.shards[k]['file']} unreadable ({type(e).__name__}: {e})") from None
        # per item, not per file: hashing costs what reading the item costs, not a whole shard at first touch
        if shard.checksums and item_checksum(*stored, shard.captions[j]) != shard.checksums[j]:
            raise BadInput("checksum mismatch (the shard's bytes changed since it was encoded)")
        latent, text, text_mask = stored[0].float(), stored[1].float(), stored[2].bool()
        if not torch.isfinite(latent).all():
            raise BadInput("non-finite latent")
        if not torch.isfinite(text).all():
            raise BadInput("non-finite text embedding")
        return {"video": latent, "text": text, "text_mask": text_mask, "caption": shard.captions[j]}

    def __getstate__(self):  # open file handles do not travel to DataLoader workers
        return dict(self.__dict__, _files={})


# ---------------------------------------------------------------------------------------------- data source

def spec(cfg):
    """Channels and (T, H, W) of the latents (with buckets: each bucket's, the first the default), text width and
    length of the stored embeddings; ValueError when data.buckets or data.bucket_weights contradict the index."""
    index = read_index(cfg.path)
    shapes = [tuple(shape) for shape, _ in shard_groups(index)]
    _check_bucket_settings(cfg, index)
    L, D = index["text_shape"]
    buckets = tuple(shape[1:] for shape in shapes) if "buckets" in index else ()
    return DataSpec(in_channels=shapes[0][0], text_dim=D, text_len=L, video_shape=shapes[0][1:], buckets=buckets)


def _check_bucket_settings(cfg, index: dict) -> None:
    """ValueError unless data.buckets is unset or names the index's buckets (the pixel shapes encoded, in order)
    and data.bucket_weights, when set, has one weight per bucket of the index."""
    encoded = tuple(tuple(bucket["shape"]) for bucket in index.get("buckets", ()))
    given = bucket_shapes(cfg.get("buckets"))
    if given is not None and given != encoded:
        held = f"buckets {[list(s) for s in encoded]}" if encoded else "one shape, without buckets"
        raise ValueError(f"data.buckets={[list(s) for s in given]} contradicts the {INDEX} of these latents, encoded "
                         f"at {held}; data=latents trains on the index's: leave data.buckets unset")
    weights = cfg.get("bucket_weights")
    if weights is not None and len(weights) != len(encoded):
        raise ValueError(f"data.bucket_weights has {len(weights)} weights for the {len(encoded)} buckets of {INDEX}")


def build(cfg, *, batch_size: int, eval_samples: int, rank: int = 0, world_size: int = 1, start_batch: int = 0,
          report=None, grad_accum: int = 1):
    """data=latents: train loader over the shards (the last `data.holdout` items held out) and the eval batch;
    with buckets (`grad_accum` micro-batches a step, one bucket per step) one-bucket batches and an eval set per
    bucket (buckets.build_buckets)."""
    store = LatentStore(cfg.path)
    train, held = holdout_split(cfg, len(store))
    names, source = [store.name(i) for i in range(len(store))], str(cfg.path)
    if store.bucketed:
        order, buckets = store.clip_order(), store.buckets()
        return build_buckets(cfg, [b["shape"] for b in store.index["buckets"]], dict(enumerate(buckets)),
                             [order[p] for p in train], [order[p] for p in held], store.load, None,
                             batch_size=batch_size, eval_samples=eval_samples, rank=rank, world_size=world_size,
                             start_batch=start_batch, grad_accum=grad_accum, names=names, source=source,
                             report=report)
    stream = ItemStream(len(train), store.load, None, batch_size, cfg.seed, rank, world_size, start_batch, names,
                        source)
    eval_set = eval_batch(held, store.load, None, eval_samples, names=names, source=source, report=report,
                          bad=stream.bad)
    return make_loader(stream, cfg.num_workers, cfg.seed), eval_set


def text_encoder(cfg):
    return encoder_from_index(read_index(cfg.path), device="cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=2)
def _cached_vae(spec: ModelSpec, device: str):
    return load_vae(spec, device)


def decode(cfg, x: torch.Tensor) -> torch.Tensor:
    """Latents -> pixels through the VAE recorded in the index (a spec dict, or a bare path in older indexes)."""
    vae = _cached_vae(ModelSpec.parse(read_index(cfg.path)["vae"]), str(x.device))
    return decode_latents(vae, x)
