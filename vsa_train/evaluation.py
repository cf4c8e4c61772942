"""The eval loss (the comparison metric): fixed held-out videos x fixed timesteps x fixed noise.

The eval set depends on the data config, `train.eval_samples`, `train.eval_timesteps` and the data seed only:
never on the model, the attention, the batch size or the number of processes, so every run of a sweep is
measured on the same videos, timesteps and noise (tests/test_schedules.py checks it on two different runs). A
bucketed eval set is a list of single-bucket batches: `eval/loss` is then the mean over all its videos and
`eval/loss/<T>x<H>x<W>` each bucket's.
"""
from typing import NamedTuple

import torch
from accelerate import Accelerator

from .diffusion import flow_loss


def make_eval_set(batch: dict | list[dict], num_timesteps: int, seed: int) -> dict | list[dict]:
    """The fixed protocol: held-out videos, evenly spaced t = (j + 0.5) / n, one fixed noise per (t, video). A
    bucketed eval set (a list of single-bucket batches) gets its noise bucket after bucket from the one generator."""
    g = torch.Generator().manual_seed(seed)
    timesteps = (torch.arange(num_timesteps, dtype=torch.float32) + 0.5) / num_timesteps
    if isinstance(batch, dict):
        return _with_noise(batch, timesteps, g)
    return [_with_noise(b, timesteps, g) for b in batch]


def _with_noise(batch: dict, timesteps: torch.Tensor, g: torch.Generator) -> dict:
    """One batch of eval videos with its timesteps and its noise drawn from `g`."""
    noise = torch.randn((len(timesteps), *batch["video"].shape), generator=g)  # [n_t, N, C, T, H, W]
    return dict(batch, noise=noise, timesteps=timesteps)


def eval_groups(eval_set: dict | list[dict]) -> list[dict]:
    """The single-bucket batches of an eval set (a plain one is one group)."""
    return [eval_set] if isinstance(eval_set, dict) else list(eval_set)


def eval_captions(eval_set: dict | list[dict]) -> list[str]:
    """The captions of all eval videos, bucket after bucket."""
    return [c for group in eval_groups(eval_set) for c in group["caption"]]


def shape_label(shape) -> str:
    """The name of a video shape in metric keys: `4x16x16` (frames x height x width)."""
    return "x".join(str(int(n)) for n in shape)


def timestep_label(t: float) -> str:
    """The name of a timestep bin in metric keys: t with 4 decimals (`eval/loss_t0.0625`), the same in every run."""
    return f"t{t:.4f}"


class EvalLoss(NamedTuple):
    """The mean flow loss over the eval set, the mean at each of its timesteps ({t: loss}, increasing t) and, for a
    bucketed eval set, the mean of each bucket ({shape label: loss})."""

    mean: float
    per_t: dict
    per_bucket: dict | None = None

    def row(self, key: str = "eval/loss") -> dict:
        """Metric keys: `key` for the mean, `key_t0.0625`-style keys per timestep, `key/4x16x16`-style keys per
        bucket when there are several."""
        buckets = self.per_bucket if self.per_bucket and len(self.per_bucket) > 1 else {}
        return {key: self.mean, **{f"{key}_{timestep_label(t)}": v for t, v in self.per_t.items()},
                **{f"{key}/{label}": v for label, v in buckets.items()}}


@torch.no_grad()
def evaluate(model, eval_set: dict | list[dict], accelerator: Accelerator, batch_size: int, layout=None, stop=None,
             report=None) -> EvalLoss | None:
    """Mean flow loss over the eval set, overall and per timestep (and per bucket: a list of single-bucket batches
    is evaluated bucket after bucket; the overall means weigh every video alike). Each data-parallel rank takes every
    dp_size-th video of each bucket (equal shards; the ranks of a sequence-parallel group take the same videos and
    compute the same loss); the float64 sums are all-reduced, so the values do not depend on the number of
    processes. `layout` (vsa_train/parallel.py) defaults to plain data parallelism over all processes. After each
    batch `report(done, total)` hears the progress and `stop()` is asked whether to give up (the ranks agree): None
    then."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    groups = eval_groups(eval_set)
    timesteps = groups[0]["timesteps"].tolist()
    dp_rank, dp_size, sp_size = ((layout.dp_rank, layout.dp_size, layout.sp_size) if layout is not None else
                                 (accelerator.process_index, accelerator.num_processes, 1))
    # as many chunks on every rank (equal shards), each within one bucket
    chunks = [(g, chunk) for g, group in enumerate(groups)
              for chunk in torch.arange(dp_rank, group["video"].shape[0], dp_size).split(batch_size)]
    totals = torch.zeros(len(groups), len(timesteps), device=device, dtype=torch.float64)  # loss sums per bucket, t
    # Eagerly under train.compile: compiling a second (no-grad, eval-batch) graph cost minutes on dit_120m, and
    # the extra shape would make dynamo recompile the training graph with dynamic shapes.
    with accelerator.autocast(), torch.compiler.set_stance("force_eager"):
        for done, (g, chunk) in enumerate(chunks, 1):
            group = groups[g]
            video = group["video"][chunk].to(device)
            text = group["text"][chunk].to(device)
            text_mask = group["text_mask"][chunk].to(device)
            for j, t in enumerate(timesteps):
                noise = group["noise"][j, chunk].to(device)
                loss = flow_loss(model, video, text, text_mask, t=torch.full((len(chunk),), t, device=device),
                                 noise=noise)
                totals[g, j] += loss.double() * len(chunk)
            if report is not None:
                report(done, len(chunks))
            if stop is not None and done < len(chunks) and _any_rank(accelerator, stop()):
                model.train(was_training)
                return None
    model.train(was_training)
    return _eval_loss(accelerator.reduce(totals, reduction="sum") / sp_size, groups, timesteps)  # each video sp_size x


def _eval_loss(totals: torch.Tensor, groups: list[dict], timesteps: list[float]) -> EvalLoss:
    """EvalLoss from the all-reduced loss sums [buckets, timesteps]: overall means weigh every video alike."""
    sizes = [group["video"].shape[0] for group in groups]
    n, per_t = sum(sizes), totals.sum(0).tolist()  # one bucket: its row, as before buckets
    per_bucket = {shape_label(group["video"].shape[2:]): s / (size * len(timesteps))
                  for group, size, s in zip(groups, sizes, totals.sum(1).tolist())}
    return EvalLoss(mean=sum(per_t) / (n * len(timesteps)), per_t={t: s / n for t, s in zip(timesteps, per_t)},
                    per_bucket=per_bucket)


def _any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any rank (a collective: every rank asks after the same batch)."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0
