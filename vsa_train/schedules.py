"""What changes with the optimizer step: the learning rate and, for VSA, the topk in force (and its FLOPs)."""
import functools
import math

from omegaconf import DictConfig

from .flops import training_flops_per_sample
from .models import vsa_config


def lr_at(step: int, optim_cfg) -> float:
    """Linear warm-up over `warmup_steps` optimizer steps, then constant (the paper's schedule)."""
    if step < optim_cfg.warmup_steps:
        return optim_cfg.lr * (step + 1) / optim_cfg.warmup_steps
    return optim_cfg.lr


class SparsitySchedule:
    """The topk in force at each step of a VSA run (attn.schedule) and the FLOPs per sample it executes."""

    def __init__(self, cfg: DictConfig, spec):
        self.vsa = vsa_config(cfg.attn)  # None: dense attention, nothing scheduled
        self._flops = functools.lru_cache(functools.partial(
            training_flops_per_sample, cfg.model, cfg.attn, in_channels=spec.in_channels, text_dim=spec.text_dim,
            video_shape=spec.video_shape, text_len=spec.text_len))
        grid = [n // p for n, p in zip(spec.video_shape, cfg.model.patch_size)]
        self.tiles = math.prod(-(-g // t) for g, t in zip(grid, self.vsa.tile)) if self.vsa else None

    def topk(self, step: int) -> int | None:
        """Key tiles per query tile at optimizer step `step` (None for dense)."""
        return self.vsa.topk_in_force(self.tiles, self.vsa.sparsity_limit(step)) if self.vsa else None

    def flops_per_sample(self, step: int):
        return self._flops(topk=self.topk(step))

    def apply(self, step: int, *models):
        """Puts the schedule's limit of `step` in force in the models (the model, its EMA copy); returns its FLOPs."""
        if self.vsa is not None:
            for m in models:
                if m is not None:
                    m.set_sparsity_limit(self.vsa.sparsity_limit(step))
        return self.flops_per_sample(step)

    def row(self, step: int) -> dict:
        """Metrics of the selection in force at `step`: topk and sparsity = 1 - topk / tiles (none for dense)."""
        if self.vsa is None:
            return {}
        topk = self.topk(step)
        return {"topk": topk, "sparsity": 1 - topk / self.tiles}
