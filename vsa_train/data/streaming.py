"""data.streaming=true: a `datasets` IterableDataset read row by row, never held whole in memory.

Ranks. Each data-parallel rank reads its own share of the training rows: whole shards (data files, or parts of
one) when the stream's shard count is a multiple of the world size (rank r takes the r-th contiguous block, so rank 0
starts with the first shard), else every world-th row (each rank reads all rows and decodes only its own).

Order and resume. A rank's rows repeat epoch after epoch, each epoch in stream order through a shuffle buffer of
data.shuffle_buffer rows seeded by (data.seed, rank, epoch) (0: stream order). A rank's k-th sample is its k-th row
of that sequence, or when that row is unusable the next usable one (as ItemStream replaces a bad item by the next
position's); batch b of rank r is samples b*B.. of rank r, at global positions (b * world + r) * B + j. A batch is so
a pure function of (dataset, seed, b, r): a resumed run (`start_batch`, from the checkpoint's data position: the one
way every source resumes) skips b*B rows unread by the decoder and sees exactly what an uninterrupted run would.
Skipping reads those rows again (at most the current epoch's, once one epoch's length is known). Each loader
worker reads its rank's rows and decodes only its own batches' (the order does not depend on data.num_workers).
Exact means the same commit: data.revision=main may move between launches, so a resume on another commit than the
checkpoint's is refused (vsa_train/rundir.py; pin data.revision to the run's commit, or train.resume=force).

Eval. data.holdout=N holds the stream's first N rows out: they must lie in its first shard (checked), the eval set is
their first train.eval_samples usable clips (cycled if fewer), and training skips them (rank 0's share starts with
them). data.holdout=0 evaluates on the first usable rows of the stream, which training also sees (as data=videos).
"""
from __future__ import annotations

import itertools
import logging
from collections import deque

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import MissingInput
from .batching import BadInput, BadInputs, collate, eval_batch, make_loader
from .encoders import pixel_text_encoder
from .text import HashedCaptionEncoder
from .listing import text_cache_root
from .videos import load_item

log = logging.getLogger(__name__)

_READ = 64  # rows per read from the dataset (arrow batches, not videos)


def text_encoder(cfg):
    """A stream's caption encoder: data.text_encoder (embeddings cached as captions are met), else the built-in
    encoder over hashed words (its vocabulary would need every caption up front)."""
    if cfg.get("text_encoder"):
        return pixel_text_encoder(cfg, text_cache_root(cfg))
    return HashedCaptionEncoder(dim=cfg.text_dim, max_len=cfg.text_len, seed=cfg.seed)


def rows(ds):
    """The rows of a datasets IterableDataset as dicts. Through `.iter`, not `iter(ds)`: in a DataLoader worker the
    latter would keep only that worker's share of the shards, and the shares here are the stream's own."""
    for batch in ds.iter(batch_size=_READ):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def shuffled(items, size: int, rng: np.random.Generator):
    """`items` through a shuffle buffer of `size`: each item leaves from a random slot that the next one takes."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


class _Head:
    """The first rows of a stream as clips, read only as far as they are asked for (the eval set's candidates)."""

    def __init__(self, cfg, ds, read, name: str, limit: int | None = None):
        self.rows = enumerate(itertools.islice(rows(ds), limit))
        self.cfg, self.read, self.name, self.clips = cfg, read, name, []

    def indices(self):
        for i, row in self.rows:
            self.clips.append(self.read(f"{self.name}[{i}]", row))
            yield i

    def load(self, i: int, position):
        return load_item(self.clips[i], self.cfg, position)

    def __getitem__(self, i: int) -> str:
        """Row i's name (eval_batch's `names`)."""
        return self.clips[i].name


def _eval_set(cfg, ds, read, name: str, encoder, eval_samples: int, source: str, report, bad: BadInputs) -> dict:
    """The eval batch from the stream's head (module docstring, Eval)."""
    holdout = cfg.get("holdout", 0)
    if not holdout:
        log.warning("data.holdout=0: the eval loss is measured on the stream's first rows, which training also sees; "
                    "set data.holdout=N to hold the first N out")
    first_shard = ds.shard(num_shards=ds.num_shards, index=0) if holdout else ds
    head = _Head(cfg, first_shard, read, name, holdout or None)
    held = list(head.indices()) if holdout else head.indices()
    if holdout and len(held) < holdout:
        raise MissingInput(f"data.holdout={holdout}: streaming holds out the first rows of the stream's first shard, "
                           f"which has {len(held)} ({source})")
    return eval_batch(held, head.load, encoder, eval_samples, names=head, source=source, report=report, bad=bad)


class StreamBatches(IterableDataset):
    """Infinite stream of one rank's batches over a streamed dataset (module docstring); bad rows are skipped,
    named once (`bad`) and listed in the batch's `skipped`."""

    def __init__(self, cfg, ds, read, encoder, batch_size: int, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0, name: str = "the dataset", source: str = "the dataset"):
        self.cfg, self.ds, self.read, self.encoder, self.batch_size = cfg, ds, read, encoder, batch_size
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.name, self.source = name, source
        self.holdout, self.buffer, self.seed = cfg.get("holdout", 0), cfg.get("shuffle_buffer", 0), cfg.seed
        self.bad = BadInputs()

    def share(self):
        """This rank's rows for one epoch in stream order, as (name, row)."""
        world, rank = self.world_size, self.rank
        if world > 1 and self.ds.num_shards % world == 0:  # whole shards: a rank reads no other rank's rows
            part = self.ds.shard(num_shards=world, index=rank, contiguous=True)
            skip = self.holdout if rank == 0 else 0
            for k, row in itertools.islice(enumerate(rows(part)), skip, None):
                yield f"{self.name}[part {rank} of {world}, row {k}]", row
        else:
            for i, row in itertools.islice(enumerate(rows(self.ds)), self.holdout + rank, None, world):
                yield f"{self.name}[{i}]", row

    def epoch(self, e: int):
        if not self.buffer:
            return self.share()
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(3, self.rank, e)))
        return shuffled(self.share(), self.buffer, rng)

    def samples(self, first: int, length: list):
        """(k, name, row) for this rank's k-th row from k = `first` on, epoch after epoch; `length[0]` is set to
        the rows per epoch once one epoch was read (whole epochs are then skipped without reading them)."""
        k, e = 0, 0
        while True:
            if length[0] and first - k >= length[0]:
                whole = (first - k) // length[0]
                k, e = k + whole * length[0], e + whole
            count = 0
            for name, row in self.epoch(e):
                if k >= first:
                    yield k, name, row
                k, count = k + 1, count + 1
            if not count:
                raise MissingInput(f"rank {self.rank} of {self.world_size} has no rows of the stream "
                                   f"({self.source}): fewer rows than ranks")
            length[0], e = count, e + 1

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        B, length = self.batch_size, [None]
        upcoming = self.samples((self.start_batch + worker) * B, length)
        ahead, bad = deque(), set()  # rows read but not yet passed (k, clip); samples k found unusable
        for b in itertools.count(self.start_batch + worker, workers):
            first = (b * self.world_size + self.rank) * B
            items, skipped = [], []
            for j in range(B):
                k = b * B + j
                while ahead and ahead[0][0] < k:
                    ahead.popleft()
                q = k
                while True:
                    if length[0] is not None and q - k >= length[0]:
                        raise RuntimeError(f"none of rank {self.rank}'s rows is usable ({self.source}); see the "
                                           "warnings above")
                    while not ahead or ahead[-1][0] < q:
                        n, name, row = next(upcoming)
                        if n >= k:  # rows of other workers' batches are passed over unconverted
                            ahead.append((n, self.read(name, row)))
                    clip = ahead[q - ahead[0][0]][1]
                    if q not in bad:
                        try:
                            items.append(load_item(clip, self.cfg, first + j))
                            break
                        except BadInput as e:
                            bad.add(q)
                            self.bad.name(clip.name, e)
                            skipped.append(f"{clip.name}: {e}")
                    q += 1
            bad = {q for q in bad if q >= (b + 1) * B}
            yield dict(collate(items, self.encoder), skipped=skipped, position=torch.arange(first, first + B))


def build(cfg, ds, read, *, batch_size: int, eval_samples: int, rank: int = 0, world_size: int = 1,
          start_batch: int = 0, report=None, name: str = "the dataset", source: str = "the dataset"):
    """Train loader (this rank's share, from `start_batch` on) and the eval batch of a streamed dataset; `read`
    turns (name, row) into a Clip; `name` prefixes row names, `source` names the dataset in errors."""
    encoder = text_encoder(cfg)
    stream = StreamBatches(cfg, ds, read, encoder, batch_size, rank, world_size, start_batch, name, source)
    eval_set = _eval_set(cfg, ds, read, name, encoder, eval_samples, source, report, stream.bad)
    return make_loader(stream, cfg.num_workers, cfg.seed), eval_set
