"""Generic batching over N indexable items: the shuffled infinite train stream, the fixed eval batch, the loader.

A source supplies `load(i, position) -> dict(video, caption[, text, text_mask])` that raises BadInput for an
item it cannot use; the stream skips that item and lists it in the batch's `skipped` ("name: reason"), which the
trainer counts as `data/skipped`. Each bad input is named once (`BadInputs`, one record per build), the first time
it is met, by the eval set, the stream or, for a loader worker's, the trainer when the batch arrives.
"""
import itertools
import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import MissingInput

log = logging.getLogger(__name__)


class BadInput(Exception):
    """An item that cannot be trained on (the message says why)."""


class BadInputs:
    """The bad inputs one build of a data source has named: each once, the first time it is met. The eval set and
    the stream meet the same items; a loader worker names none (its copy of this record would repeat the other
    workers'), the trainer names a worker's as their batch arrives (`training_run.Run.met_bad_inputs`)."""

    def __init__(self):
        self.named: set[str] = set()

    def name(self, name: str, reason) -> None:
        if get_worker_info() is None and name not in self.named:
            self.named.add(name)
            log.warning("skipping %s: %s", name, reason)


class ItemStream(IterableDataset):
    """Infinite stream of batches over N items, reshuffled every epoch; bad items are skipped and reported.

    Batch b of rank r holds stream positions (b * world + r) * B + j. Position p is item perm_e[p mod N] of
    epoch e = p // N; an unusable item is replaced by the next position's, so a batch is a pure function of
    (seed, b, r) whatever the workers (exact resume; `start_batch` skips consumed batches). `load(i, p)`
    returns the item as dict(video, caption[, text, text_mask]) or raises BadInput; each bad item is reported
    once per worker; `bad` names each once (shared with the eval set of the same build). `source` names the data
    (manifest, folder, dataset) in errors.
    """

    def __init__(self, n: int, load, encoder, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0, names=None, source: str = "the data source"):
        self.n, self.load, self.encoder, self.batch_size, self.seed = n, load, encoder, batch_size, seed
        self.rank, self.world_size, self.start_batch, self.names = rank, world_size, start_batch, names
        self.source, self.bad = source, BadInputs()
        self._epoch, self._perm = None, None

    def _item(self, p: int) -> int:
        epoch = p // self.n
        if self._epoch != epoch:  # one permutation per epoch, not per item (N may be millions)
            rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(epoch,)))
            self._epoch, self._perm = epoch, rng.permutation(self.n)
        return int(self._perm[p % self.n])

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        bad: set[int] = set()
        for b in itertools.count(self.start_batch + worker, workers):
            first = (b * self.world_size + self.rank) * self.batch_size
            items, skipped = [], []
            for p in range(first, first + self.batch_size):
                # n positions may straddle two epochs' permutations (missing a usable item); 2n hold a whole epoch
                for q in range(p, p + 2 * self.n + 1):
                    if q == p + 2 * self.n:
                        raise RuntimeError(f"none of the {self.n} inputs is usable ({self.source}); "
                                           "see the warnings above")
                    i = self._item(q)
                    if i in bad:
                        continue
                    try:
                        items.append(self.load(i, q))
                    except BadInput as e:
                        bad.add(i)
                        name = self.names[i] if self.names else str(i)
                        self.bad.name(name, e)
                        skipped.append(f"{name}: {e}")
                        continue
                    break
            yield dict(collate(items, self.encoder), skipped=skipped,
                       position=torch.arange(first, first + self.batch_size))


def collate(items: list[dict], encoder) -> dict:
    """Items dict(video, caption[, text, text_mask]) -> a batch; text is encoded here unless precomputed."""
    captions = [item["caption"] for item in items]
    if "text" in items[0]:
        text = torch.stack([item["text"] for item in items])
        text_mask = torch.stack([item["text_mask"] for item in items])
    else:
        text, text_mask = encoder.encode(captions)
    return {"video": torch.stack([item["video"] for item in items]), "text": text, "text_mask": text_mask,
            "caption": captions}


def eval_batch(indices, load, encoder, eval_samples: int, names=None, source: str = "the data source",
               report=None, bad: BadInputs | None = None) -> dict:
    """The fixed eval set: the first `eval_samples` usable items of `indices` (cycled if fewer), bad ones skipped
    and named through `bad` (the stream's record of the same build); `report(done, total)` hears each item loaded
    (decoding videos can take minutes: the trainer prints an estimate)."""
    items, bad, first_bad = [], bad or BadInputs(), None
    for i in indices:
        if len(items) == eval_samples:
            break
        try:
            items.append(load(i, None))
        except BadInput as e:
            first_bad = first_bad or f"{names[i] if names else i}: {e}"
            bad.name(names[i] if names else str(i), e)
            continue
        if report is not None:
            report(len(items), eval_samples)
    if not items:  # the first failure names the file as looked for: a wrong base folder shows at once
        first = f"; the first: {first_bad} (the others in the warnings above)" if first_bad else ""
        raise MissingInput(f"no usable input for the eval set ({source}){first}")
    return collate([items[k % len(items)] for k in range(eval_samples)], encoder)


def make_loader(stream: IterableDataset, num_workers: int, seed: int) -> DataLoader:
    """A DataLoader over a stream of ready batches (its own generator leaves the global RNG to the trainer)."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None,
                      generator=torch.Generator().manual_seed(seed))


def holdout_split(cfg, n: int) -> tuple[range, range]:
    """(train, eval) item ranges: the last `data.holdout` items are eval-only; 0 evaluates on training items."""
    holdout = cfg.get("holdout", 0)
    if not 0 <= holdout < n:
        raise ValueError(f"data.holdout={holdout} must be in [0, {n}) for {n} items")
    if not holdout:
        log.warning("data.holdout=0: the eval loss is measured on training items (for videos, their middle "
                    "windows); set data.holdout=N to hold the last N out")
        return range(n), range(n)
    return range(n - holdout), range(n - holdout, n)
