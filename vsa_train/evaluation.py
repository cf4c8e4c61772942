"""The eval loss (the comparison metric): fixed held-out videos x fixed timesteps x fixed noise.

The eval set depends on the data config, `train.eval_samples`, `train.eval_timesteps` and the data seed only:
never on the model, the attention, the batch size or the number of processes, so every run of a sweep is
measured on the same videos, timesteps and noise (tests/test_schedules.py checks it on two different runs).
"""
from typing import NamedTuple

import torch
from accelerate import Accelerator

from .diffusion import flow_loss


def make_eval_set(batch: dict, num_timesteps: int, seed: int) -> dict:
    """The fixed protocol: held-out videos, evenly spaced t = (j + 0.5) / n, one fixed noise per (t, video)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_timesteps, *batch["video"].shape), generator=g)  # [n_t, N, C, T, H, W]
    timesteps = (torch.arange(num_timesteps, dtype=torch.float32) + 0.5) / num_timesteps
    return dict(batch, noise=noise, timesteps=timesteps)


def timestep_label(t: float) -> str:
    """The name of a timestep bin in metric keys: t with 4 decimals (`eval/loss_t0.0625`), the same in every run."""
    return f"t{t:.4f}"


class EvalLoss(NamedTuple):
    """The mean flow loss over the eval set and the mean at each of its timesteps ({t: loss}, increasing t)."""

    mean: float
    per_t: dict

    def row(self, key: str = "eval/loss") -> dict:
        """Metric keys: `key` for the mean, `key_t0.0625`-style keys per timestep."""
        return {key: self.mean, **{f"{key}_{timestep_label(t)}": v for t, v in self.per_t.items()}}


@torch.no_grad()
def evaluate(model, eval_set: dict, accelerator: Accelerator, batch_size: int, layout=None, stop=None,
             report=None) -> EvalLoss | None:
    """Mean flow loss over the eval set, overall and per timestep. Each data-parallel rank takes every
    dp_size-th video (equal shards; the ranks of a sequence-parallel group take the same videos and compute the
    same loss); the float64 sums are all-reduced, so the values do not depend on the number of processes.
    `layout` (vsa_train/parallel.py) defaults to plain data parallelism over all processes. After each batch
    `report(done, total)` hears the progress and `stop()` is asked whether to give up (the ranks agree): None then."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    n = eval_set["video"].shape[0]
    timesteps = eval_set["timesteps"].tolist()
    dp_rank, dp_size, sp_size = ((layout.dp_rank, layout.dp_size, layout.sp_size) if layout is not None else
                                 (accelerator.process_index, accelerator.num_processes, 1))
    chunks = torch.arange(dp_rank, n, dp_size).split(batch_size)  # as many on every rank (equal shards)
    totals = torch.zeros(len(timesteps), device=device, dtype=torch.float64)  # loss sums per timestep
    # Eagerly under train.compile: compiling a second (no-grad, eval-batch) graph cost minutes on dit_120m, and
    # the extra shape would make dynamo recompile the training graph with dynamic shapes.
    with accelerator.autocast(), torch.compiler.set_stance("force_eager"):
        for done, chunk in enumerate(chunks, 1):
            video = eval_set["video"][chunk].to(device)
            text = eval_set["text"][chunk].to(device)
            text_mask = eval_set["text_mask"][chunk].to(device)
            for j, t in enumerate(timesteps):
                noise = eval_set["noise"][j, chunk].to(device)
                loss = flow_loss(model, video, text, text_mask, t=torch.full((len(chunk),), t, device=device),
                                 noise=noise)
                totals[j] += loss.double() * len(chunk)
            if report is not None:
                report(done, len(chunks))
            if stop is not None and done < len(chunks) and _any_rank(accelerator, stop()):
                model.train(was_training)
                return None
    model.train(was_training)
    totals = (accelerator.reduce(totals, reduction="sum") / sp_size).tolist()  # each video counted sp_size times
    return EvalLoss(mean=sum(totals) / (n * len(timesteps)), per_t={t: s / n for t, s in zip(timesteps, totals)})


def _any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any rank (a collective: every rank asks after the same batch)."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0
