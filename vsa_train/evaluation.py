"""The eval loss (the comparison metric): fixed held-out videos x fixed timesteps x fixed noise."""
import torch
from accelerate import Accelerator

from .diffusion import flow_loss


def make_eval_set(batch: dict, num_timesteps: int, seed: int) -> dict:
    """The fixed protocol: held-out videos, evenly spaced t = (j + 0.5) / n, one fixed noise per (t, video)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_timesteps, *batch["video"].shape), generator=g)  # [n_t, N, C, T, H, W]
    timesteps = (torch.arange(num_timesteps, dtype=torch.float32) + 0.5) / num_timesteps
    return dict(batch, noise=noise, timesteps=timesteps)


@torch.no_grad()
def evaluate(model, eval_set: dict, accelerator: Accelerator, batch_size: int) -> float:
    """Mean flow loss over the eval set. Each rank takes every world-th video (equal shards); the sums are
    all-reduced, so the value does not depend on the number of processes."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    n = eval_set["video"].shape[0]
    mine = torch.arange(accelerator.process_index, n, accelerator.num_processes)
    total = torch.zeros((), device=device, dtype=torch.float64)
    # Eagerly under train.compile: compiling a second (no-grad, eval-batch) graph cost minutes on dit_120m, and
    # the extra shape would make dynamo recompile the training graph with dynamic shapes.
    with accelerator.autocast(), torch.compiler.set_stance("force_eager"):
        for chunk in mine.split(batch_size):
            video = eval_set["video"][chunk].to(device)
            text = eval_set["text"][chunk].to(device)
            text_mask = eval_set["text_mask"][chunk].to(device)
            for j, t in enumerate(eval_set["timesteps"].tolist()):
                noise = eval_set["noise"][j, chunk].to(device)
                loss = flow_loss(model, video, text, text_mask, t=torch.full((len(chunk),), t, device=device),
                                 noise=noise)
                total += loss.double() * len(chunk)
    model.train(was_training)
    total = accelerator.reduce(total, reduction="sum")
    return total.item() / (n * len(eval_set["timesteps"]))
