"""What changes with the optimizer step: the learning rate and, for VSA, the topk in force (and its FLOPs).

Both are pure functions of (step, config, global batch), so a resumed run follows exactly the schedule an
uninterrupted one would have.

Learning rate (`optim.schedule`, docs/study.md 'Schedules'): a linear warm-up over `optim.warmup_steps` steps
from lr/warmup_steps to `optim.lr`, then

- `constant` (the default, the VSA paper's recipe): lr until the end;
- `cosine`: half a cosine from lr down to `optim.min_lr_ratio` x lr, reached at the last step of the run;
- `wsd` (warm-up, stable, decay): lr until the last `optim.decay_fraction` of the run, then a *linear* decay to
  `optim.min_lr_ratio` x lr, reached at the last step.

The run's end is `train.max_steps`, or, when `train.flops_budget` is set, the step at which the trainer's
cumulative executed FLOPs first reach the budget, whichever comes first. That step is found by adding up the
FLOPs of each step exactly as the trainer does (`SparsitySchedule.flops_per_sample(step).executed x global
batch`), so a VSA run whose sparsity ramps, and hence whose FLOPs per step change, still decays to the step at
which it stops. A step after the end keeps the final rate: each checkpoint keeps the end (`lr_end_step`), and a
resume goes on to it whatever train.max_steps or train.flops_budget now say (raised later: the run goes on at the
final rate; config_history.jsonl records the end kept), unless train.resume=force moves it (vsa_train/rundir.py).
"""
import functools
import math

from .flops import training_flops_per_sample
from .models import model_config, vsa_config
from .sections import OptimConfig, TrainConfig


def lr_at(step: int, optim_cfg, end_step: int | None = None) -> float:
    """The learning rate of optimizer step `step` (0-based) for a run whose last step is `end_step - 1`.

    `end_step` is only needed by the decaying schedules (cosine, wsd)."""
    lr, warmup = optim_cfg.lr, optim_cfg.warmup_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    schedule = optim_cfg.schedule  # one of sections.LR_SCHEDULES
    if schedule == "constant":
        return lr
    if end_step is None:
        raise ValueError(f"optim.schedule={schedule} decays towards the run's end: lr_at needs end_step")
    low = lr * optim_cfg.min_lr_ratio
    last = end_step - 1  # the last step the run takes: it gets exactly the minimum
    if schedule == "cosine":
        start = warmup
    else:  # wsd: decay over the last decay_fraction of the run (not into the warm-up)
        start = max(warmup, end_step - math.ceil(optim_cfg.decay_fraction * end_step))
    if step >= last:  # the last step (and any after it) gets the floor, however short the decay
        return low
    if step <= start:
        return lr
    progress = min(1.0, (step - start) / max(1, last - start))
    if schedule == "cosine":
        return low + (lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr + (low - lr) * progress


class SparsitySchedule:
    """The topk in force at each step of a VSA run (attn.schedule) and the FLOPs per sample it executes, per video
    shape: a bucketed run's batches differ in shape, and each shape has its own tiles, topk and FLOPs."""

    def __init__(self, model_cfg, attn_cfg, spec):
        """`model` and `attn` sections (typed, or mappings) and the data's spec (its shape is the default one)."""
        model_cfg = model_config(model_cfg)
        self.vsa = vsa_config(attn_cfg)  # None: dense attention, nothing scheduled
        self.patch = tuple(model_cfg.patch_size)
        self.shape = tuple(spec.video_shape)  # the data's single shape (a bucketed run: its first bucket)
        self._flops = functools.lru_cache(functools.partial(
            training_flops_per_sample, model_cfg, attn_cfg, in_channels=spec.in_channels, text_dim=spec.text_dim,
            text_len=spec.text_len))
        self.tiles = self.tiles_of(self.shape)
        self.draws = {self.shape: 1.0}  # shape -> its probability per step (a bucketed run: `draw`)

    def draw(self, shapes, probs) -> None:
        """A bucketed run's shapes and the probability of each per step (the bucket sampler's, known once the data
        is built): the expected FLOPs per step (`expected_flops`) weigh each shape's by it."""
        self.draws = {tuple(int(n) for n in shape): float(p) for shape, p in zip(shapes, probs) if p > 0}

    def expected_flops(self, step: int) -> float:
        """Executed training FLOPs of one sample at step `step`, expected over the shapes' draws (one shape: its
        own, exactly)."""
        return sum(p * self.flops_per_sample(step, shape).executed for shape, p in self.draws.items())

    def tiles_of(self, shape) -> int | None:
        """VSA tiles of a video shape (T, H, W) of the model input (None for dense)."""
        grid = [n // p for n, p in zip(shape, self.patch)]
        return math.prod(-(-g // t) for g, t in zip(grid, self.vsa.tile)) if self.vsa else None

    def topk(self, step: int, shape=None) -> int | None:
        """Key tiles per query tile at optimizer step `step` for videos of `shape` (default: the data's; None for
        dense): the model's own rule (VSAConfig.topk_in_force) on that shape's tiles."""
        tiles = self.tiles if shape is None else self.tiles_of(shape)
        return self.vsa.topk_in_force(tiles, self.vsa.sparsity_limit(step)) if self.vsa else None

    def flops_per_sample(self, step: int, shape=None):
        """Executed and dense training FLOPs of one sample of `shape` (default: the data's) at step `step`."""
        shape = self.shape if shape is None else tuple(int(n) for n in shape)
        return self._flops(video_shape=shape, topk=self.topk(step, shape))

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

    def steady_from(self) -> int:
        """A step from which the topk (and so the FLOPs per sample) no longer changes."""
        if self.vsa is None or self.vsa.schedule == "constant":
            return 0
        return self.vsa.ramp_interval * math.ceil(1.0 / self.vsa.ramp_rate)


def end_step(max_steps: int, flops_budget: float | None, sparsity: SparsitySchedule, global_batch: int,
             exact_steps: int = 5_000_000) -> int:
    """The number of optimizer steps the run takes: `max_steps`, or fewer when the FLOPs budget is reached first
    (the trainer stops after the first step whose cumulative executed FLOPs reach the budget). A bucketed run's
    steps differ in shape: each step counts the FLOPs expected over the buckets' draw proportions
    (`SparsitySchedule.draw`), so its decay ends at the step the budget is expected to end it.

    The FLOPs are added step by step in the trainer's order (so float rounding decides the same step), for up to
    `exact_steps` steps; beyond that, once the topk is steady, the remaining steps are a division (at most one
    step off, only for runs of millions of steps)."""
    if flops_budget is None:
        return max_steps
    flops, step = 0.0, 0
    while step < max_steps and flops < flops_budget:
        if step >= max(exact_steps, sparsity.steady_from()):
            per_step = sparsity.expected_flops(step) * global_batch
            return min(max_steps, step + math.ceil((flops_budget - flops) / per_step))
        flops += sparsity.expected_flops(step) * global_batch
        step += 1
    return step


class LRSchedule:
    """`optim.schedule` for one run: built once (the end step is computed here), then `schedule(step) -> lr`."""

    def __init__(self, optim: OptimConfig, train: TrainConfig, sparsity: SparsitySchedule, global_batch: int,
                 end: int | None = None):
        """`end`: the step the decay ends at, if the run already has one (a resume); else the config's."""
        self.optim = optim
        self.decays = optim.schedule != "constant"
        # constant never looks at the end: skip summing the FLOPs of every step
        if not self.decays:
            self.end_step = None
        else:
            self.end_step = end if end is not None else end_step(train.max_steps, train.flops_budget, sparsity,
                                                                  global_batch)

    def __call__(self, step: int) -> float:
        return lr_at(step, self.optim, self.end_step)
