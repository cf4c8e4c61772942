"""A training run, built whole and once: `build_run(config, accelerator)` -> `Run` (the model laid out by
`parallel`, EMA, optimizer, schedules, data stream, eval set and counters, restored from a checkpoint if given).
It writes no files; vsa_train/trainer.py runs it.

A benchmark times exactly the step train.py runs:

    config = typed(compose(config_name="train", overrides=[...]))   # vsa_train.config_schema.typed
    run = build_run(config, make_accelerator(config))
    run.repeat_batch()                      # one real batch on the device, repeated: the loader is not timed
    result = train_step(run)                # vsa_train.trainer.train_step (micro-steps, clip, AdamW, EMA)
    run.close()                             # frees model, optimizer and data before the next run is built
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import math
import os
import statistics
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from omegaconf import DictConfig
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .checkpoint import init_weights, load_checkpoint
from .config_schema import Config, ConfigError, typed
from .data import Data, build_data
from .evaluation import eval_groups, make_eval_set, shape_label
from .launcher import Precision, check_launch, cuda_device, resolve_precision
from .models import build_model, vsa_config
from .models.vsa import warm_up_kernels
from .ops import warm
from .parallel import (Layout, apply_fsdp, apply_sequence_parallel, compile_blocks, compile_model, make_layout,
                       sp_group)
from .schedules import LRSchedule, SparsitySchedule
from .sections import OptimConfig, TrainConfig

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainState:
    """Progress counters, saved as JSON in every checkpoint."""

    step: int = 0
    samples: int = 0          # samples in the optimizer steps taken (all ranks)
    position: int = 0         # samples drawn from the data stream: more than `samples` once a rollback skipped some
    flops: float = 0.0        # cumulative executed training FLOPs, all ranks
    flops_dense: float = 0.0  # the same samples with dense attention
    rollbacks: int = 0        # non-finite losses recovered from by reloading a healthy checkpoint


class LossHealth:
    """Recent step losses and, per step, whether it was healthy: finite and within `factor` of the reference, the
    lower of their median and the lowest median the run has had (`best`: a loss drifting up slowly drags the
    recent median along, the best one stays). A checkpoint's weights are judged by the step after it (the first
    loss they compute), not by the loss of their own step, which was computed before their last update (see
    `Checkpoints.last_healthy`)."""

    MIN_LOSSES = 5  # fewer recent losses than this judge nothing (the first steps of a run are all healthy)

    def __init__(self, factor: float, window: int = 100):
        self.factor, self.losses, self.verdicts = factor, deque(maxlen=window), deque(maxlen=window)
        self.step = 0  # the step of the newest loss
        self.best = math.inf  # the lowest median of MIN_LOSSES or more recent finite losses so far

    def add(self, loss: float, step: int) -> None:
        self.losses.append(loss)
        self.verdicts.append(self.healthy())
        if self.verdicts[-1] and len(self.losses) >= self.MIN_LOSSES:  # an exploding loss lowers no reference
            self.best = min(self.best, statistics.median(self.losses))
        self.step = step

    def verdict(self, step: int) -> bool | None:
        """Whether the loss of `step` was healthy; None: not known (not yet taken, or out of the window)."""
        back = self.step - step
        return self.verdicts[-1 - back] if 0 <= back < len(self.verdicts) else None

    def reset(self, losses: list, step: int, best: float = math.inf) -> None:
        """The window a checkpoint of `step` stored (its losses end at `step`) and its best median, verdicts
        replayed."""
        self.losses.clear()
        self.verdicts.clear()
        self.best = best
        for i, loss in enumerate(losses):
            self.add(loss, step - len(losses) + 1 + i)
        self.step = step

    def healthy(self) -> bool:
        if not self.losses or not math.isfinite(self.losses[-1]):
            return bool(not self.losses)
        return len(self.losses) < self.MIN_LOSSES or self.losses[-1] <= self.factor * self.reference()

    def reference(self) -> float:
        return min(statistics.median(self.losses), self.best)

    def describe(self) -> str:
        return (f"{self.losses[-1]:.4g}, recent median {statistics.median(self.losses):.4g}, lowest median of the "
                f"run {self.best:.4g}")


@dataclass
class Run:
    """Everything a training run is made of, built once by `build_run`."""

    config: Config
    accelerator: Accelerator
    layout: Layout
    precision: torch.dtype | None  # the 16-bit dtype of autocast (bf16, fp16), None without mixed precision
    model: torch.nn.Module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    sparsity: SparsitySchedule
    lr_schedule: LRSchedule
    global_batch: int
    state: TrainState
    health: LossHealth
    data: Data
    train_iter: object              # the stream's batches (`repeat_batch` replaces it)
    eval_set: dict | list[dict]     # one batch, or a bucketed run's single-bucket batches (evaluation.py)
    resumed_from: Path | None = None
    saved_step: int = -1  # the step whose checkpoint this run holds (saved or resumed from): not saved again
    skipped: set = field(default_factory=set)  # bad inputs this rank's data met (skipped, never trained on)
    code: str | None = None  # this launch's code (provenance.code_commit; the trainer sets it, once per launch)
    code_before: list = field(default_factory=list)  # the code the restored weights were trained with, oldest first
    lr_end: int | None = None  # the configured end of the learning-rate decay (a resume may keep its own instead)

    def finished(self) -> bool:
        """train.max_steps reached or train.flops_budget spent."""
        return run_finished(self.config.train, self.state.step, self.state.flops)

    def budget_spent(self) -> bool:
        return budget_spent(self.config.train, self.state.flops)

    def met_bad_inputs(self, entries) -> None:
        """A batch's bad inputs ("name: reason"): counted, and named once by the stream's record (a loader worker's
        are named here)."""
        for entry in entries:
            if entry not in self.skipped:
                self.skipped.add(entry)
                name, _, reason = entry.partition(": ")
                self.data.train.dataset.bad.name(name, reason)

    def restart_data(self) -> None:
        """(Re)starts the train stream at `state.position` (rollback); position is a global sample index."""
        self.data, self.train_iter = _start_data(self.config, self.layout, self.state.position)

    def repeat_batch(self) -> dict:
        """For benchmarks: one batch of the real stream, on the device; the stream (and its workers) is shut down
        and every later step trains on this batch, so its host-to-device copies are no-ops. Returns the batch."""
        device = self.accelerator.device
        batch = next(self.train_iter)
        # The stream positions stay on the host: the per-sample noise draws read them there.
        batch = {k: v.to(device) if k in ("video", "text", "text_mask") else v for k, v in batch.items()
                 if k != "skipped"}
        self.train_iter = self.data.train = None  # the last reference to the loader: its workers stop
        gc.collect()
        self.train_iter = itertools.repeat(batch)
        return batch

    def close(self) -> None:
        """Frees the model, optimizer, EMA and data (a benchmark builds the next run after this)."""
        warm.join()  # a kernel warm-up may still run
        self.accelerator.free_memory()
        self.model = self.optimizer = self.ema = self.train_iter = self.data = self.eval_set = None
        gc.collect()

    def counters(self) -> dict:
        """What a checkpoint stores besides tensors: counters, loss health, layout (checked at resume)."""
        return {**asdict(self.state), "healthy": self.health.healthy(), "recent_losses": list(self.health.losses),
                "recent_healthy": list(self.health.verdicts),
                "best_median": self.health.best if math.isfinite(self.health.best) else None,
                "global_batch": self.global_batch, "processes": self.accelerator.num_processes,
                "strategy": self.layout.strategy, "sp_size": self.layout.sp_size,
                "seed": self.config.train.seed, "ema_updates": int(self.ema.n_averaged) if self.ema is not None else 0,
                "lr_end_step": self.lr_schedule.end_step,
                "mixed_precision": self.accelerator.mixed_precision,  # resolved: a resume compares it (rundir.py)
                "data_commit": self.data.commit,  # a Hub dataset's: a resume compares it (rundir.py)
                "code_commits": self.code_commits()}

    def code_commits(self) -> list[str]:
        """The code these weights were trained with, oldest first: the restored checkpoint's, then this launch's."""
        return self.code_before + ([self.code] if self.code is not None and self.code_before[-1:] != [self.code]
                                   else [])

    def restore(self, counters: dict) -> None:
        self.state = TrainState(**{k: counters[k] for k in asdict(TrainState()) if k in counters})
        self.saved_step = self.state.step
        self.code_before = list(counters.get("code_commits", []))  # a rollback's too: its weights' history
        best = counters.get("best_median")  # None: not yet known, or a checkpoint from before it was stored
        self.health.reset(counters.get("recent_losses", []), self.state.step, math.inf if best is None else best)


def run_finished(train: TrainConfig, step: int, flops: float) -> bool:
    """Whether a run at `step` with `flops` executed is done: train.max_steps reached or train.flops_budget spent."""
    return step >= train.max_steps or budget_spent(train, flops)


def budget_spent(train: TrainConfig, flops: float) -> bool:
    """Whether `flops` executed reach train.flops_budget (never without one)."""
    return train.flops_budget is not None and flops >= train.flops_budget


# --------------------------------------------------------------------------------------------- building a run

def mixed_precision(train: TrainConfig) -> Precision:
    """train.mixed_precision resolved, with where it came from: as set, or (auto) the launcher's precision when it
    was asked for one, else bf16 on CUDA and no elsewhere (vsa_train/launcher.py)."""
    return resolve_precision(train.mixed_precision)


def make_accelerator(config: Config | DictConfig, precision: Precision | None = None) -> Accelerator:
    """accelerate for this machine in `precision` (default: `mixed_precision`), gloo DDP on CPUs, collectives that
    time out; launcher settings the trainer does not honour are refused first (launcher.LauncherError)."""
    config = config if isinstance(config, Config) else typed(config)
    check_launch(config.train)
    precision = precision or mixed_precision(config.train)
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=config.train.dist_timeout_s))
    # cpu=True without CUDA: only then does accelerate turn torchrun's environment into MULTI_CPU (gloo) DDP.
    return Accelerator(cpu=not cuda_device(), mixed_precision=precision.value,
                       log_with="wandb" if config.logger.name == "wandb" else None, kwargs_handlers=[timeout])


def build_run(config: Config | DictConfig, accelerator: Accelerator, resume_from: Path | None = None,
              layout: Layout | None = None, report=None, lr_end: int | None = None) -> Run:
    """The run, restored from `resume_from` if given; `layout` defaults to the one `parallel` gives this process;
    `report(done, total)` hears the eval set's inputs as they are loaded; `lr_end` is the configured end of the
    learning-rate decay where the caller has it already (summing a large budget's steps takes seconds; a bucketed
    run's needs the draw proportions of its built data: computed here). A composed
    DictConfig is read (and checked) by `typed` first. Writes no files."""
    config = config if isinstance(config, Config) else typed(config)
    train, device = config.train, accelerator.device
    layout = layout or make_layout(config.parallel, accelerator.num_processes, accelerator.process_index)
    if train.eval_samples % layout.dp_size:  # equal shards: under FSDP every rank must run the same forwards
        fit = -(-train.eval_samples // layout.dp_size) * layout.dp_size
        raise ConfigError([f"train.eval_samples={train.eval_samples} must be divisible by the {layout.dp_size} "
                           f"data-parallel ranks: use train.eval_samples={fit} (or another multiple of "
                           f"{layout.dp_size}), or launch fewer processes"])
    warn_tf32(config.attn)
    use_compile_cache(train.compile_cache)
    precision = HALF.get(accelerator.mixed_precision)
    model, ema = _model_and_ema(config, accelerator, resume_from)
    model, optimizer = _lay_out(model, config, layout, accelerator, precision)
    sparsity = SparsitySchedule(config.model, config.attn, config.spec)
    global_batch = config.global_batch(layout.dp_size)
    # Training noise, timesteps and caption dropout are drawn per sample (diffusion.sample_draws); the global RNG,
    # seeded per data-parallel rank here and restored on resume, only serves anything else that draws from it.
    set_seed(train.seed + layout.dp_rank)
    state, saved_step, counters = TrainState(), -1, {}
    if resume_from is not None:
        counters = load_checkpoint(accelerator, resume_from, model, optimizer, ema)
        accelerator.print(f"resumed from {resume_from} (step {counters['step']})")
    data, train_iter = _start_data(config, layout, counters.get("position", 0), report)
    eval_set = make_eval_set(data.eval, train.eval_timesteps, seed=config.data.seed)
    if bad := uneven_eval_buckets(eval_set, layout.dp_size):
        raise ConfigError(bad)
    if config.spec.buckets:  # the buckets' draw proportions, known now: the expected FLOPs of a step weigh them
        sparsity.draw(config.shapes, data.train.dataset.probs)
    if lr_end is None:  # the configured end of the decay (a bucketed run's: only computable now, once)
        lr_end = LRSchedule(config.optim, train, sparsity, global_batch).end_step
    # A resume keeps the run's end of the decay (raising train.max_steps goes on at the final rate) unless forced.
    kept_end = counters.get("lr_end_step") if train.resume != "force" else None
    lr_schedule = LRSchedule(config.optim, train, sparsity, global_batch, end=kept_end if kept_end is not None else lr_end)
    run = Run(config=config, accelerator=accelerator, layout=layout, precision=precision, model=model, ema=ema,
              optimizer=optimizer, sparsity=sparsity, lr_schedule=lr_schedule,
              global_batch=global_batch, state=state, health=LossHealth(train.explode_factor), data=data,
              train_iter=train_iter, eval_set=eval_set,
              resumed_from=resume_from, saved_step=saved_step, lr_end=lr_end)
    if counters:
        run.restore(counters)
    if train.compile and not run.finished():  # after the data workers forked (_start_data waits for it)
        warm_up_kernels(accelerator.unwrap_model(model), precision or torch.float32, device)
    return run


def uneven_eval_buckets(eval_set, dp_size: int) -> list[str]:
    """Why a bucketed eval set cannot be sharded equally (every rank must run the same forwards, under FSDP)."""
    sizes = {shape_label(g["video"].shape[2:]): g["video"].shape[0] for g in eval_groups(eval_set)}
    uneven = {label: n for label, n in sizes.items() if n % dp_size}
    return [f"the eval set's buckets {uneven} must each hold a multiple of the {dp_size} data-parallel ranks' "
            f"videos"] if uneven else []


def _model_and_ema(config: Config, accelerator: Accelerator, resume_from: Path | None):
    """The model (same seed on every rank: identical initial weights), `train.init_from` weights, its EMA."""
    set_seed(config.train.seed)
    # A VideoDiT is built and initialised on the device: dit_1b's 1.4B weights take seconds there, not ~10 s on the
    # host plus a copy. (A Wan folder is loaded by diffusers, which places its weights itself.)
    device = accelerator.device
    with contextlib.nullcontext() if config.is_wan else torch.device(device):
        model = build_model(config.model, config.attn, in_channels=config.spec.in_channels,
                            text_dim=config.spec.text_dim)
    if config.train.init_from is not None and resume_from is None:  # a resumed run has its own weights
        accelerator.print(init_weights(model, config.train.init_from))
    if config.train.ema is None:
        return model, None
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.train.ema), use_buffers=True)
    return model, ema.to(device)


def _start_data(config: Config, layout: Layout, position: int, report=None):
    """(data, its train iterator) starting at global sample `position` (resume, rollback)."""
    warm.join()  # no fork while the kernel warm-up's thread may hold a lock the workers need
    batch_size = config.train.batch_size
    per_batch = batch_size * layout.dp_size
    if position % per_batch:
        raise ValueError(f"data position {position} is not a whole number of batches of {per_batch}")
    data = build_data(config.data, batch_size=batch_size, eval_samples=config.train.eval_samples,
                      rank=layout.dp_rank, world_size=layout.dp_size, start_batch=position // per_batch,
                      report=report, grad_accum=config.train.grad_accum)
    return data, iter(data.train)


def warn_tf32(attn) -> None:
    """Warns when TF32 is on for fp32 matmuls under top-k VSA (accelerate turns it on for a dynamo backend without
    mixed precision): the coarse scores are fp32 so that selections do not flip, and TF32 flips them."""
    vsa = vsa_config(attn)
    # fp32_precision reads "tf32" whichever API set it; allow_tf32 raises once the newer API was used.
    if vsa is not None and vsa.selects_topk and torch.backends.cuda.matmul.fp32_precision == "tf32":
        warnings.warn("TF32 is on for fp32 matmuls: VSA's coarse tile scores lose bits and top-k selections flip "
                      "(docs/design.md, 'Coarse stage'); set torch.backends.cuda.matmul.fp32_precision = 'ieee'",
                      stacklevel=2)


def use_compile_cache(folder: str | None) -> None:
    """Points inductor's and Triton's kernel caches into `folder` (train.compile_cache), if set; the config wins over
    TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR already in the environment. Both read these variables when they
    look a kernel up, so this works as long as nothing has compiled yet in this process;
    their on-disk caches are safe for several processes writing at once (each entry lands by an atomic rename)."""
    if not folder:
        return
    root = Path(folder).expanduser().absolute()
    try:  # every rank: exist_ok makes the race harmless
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, a read-only disk, no permission
        raise ConfigError([f"train.compile_cache={folder}: cannot use it as a folder ({err.strerror})"]) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError([f"train.compile_cache={folder}: the folder is not writable by this user"])
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")  # our own kernels' and inductor's compiled Triton


def _lay_out(model: torch.nn.Module, config: Config, layout: Layout, accelerator: Accelerator, precision):
    """(model, optimizer) laid out for this process: sequence parallel, compiled, then DDP or FSDP2."""
    if layout.sp_size > 1:
        apply_sequence_parallel(model, layout, sp_group(layout))
    shapes = len(config.shapes)  # one graph per video shape (bucket)
    if config.train.compile in (True, "blocks"):
        compile_blocks(model, shapes)  # in place: parameter names, and so checkpoints, stay those of the plain model
    elif config.train.compile == "model":
        compile_model(model, shapes)
    fused = accelerator.device.type == "cuda"
    if layout.strategy == "fsdp":
        apply_fsdp(model.to(accelerator.device), layout, param_dtype=precision)
        return model, _optimizer(model, config.optim, fused=fused)  # over the sharded parameters
    return accelerator.prepare(model, _optimizer(model, config.optim, fused=fused))


def _optimizer(model: torch.nn.Module, optim: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm gains, biases and other vectors are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), fused=fused)
