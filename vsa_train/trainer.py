"""The training loop, read top to bottom (`train`):

    build the run once: accelerator, model, EMA, optimizer, data, schedules, counters (`build_run`), resumed from
        the newest verified checkpoint of the run directory after the launch was checked against it;
    then `train_step` (micro-steps, clipping, non-finite check, optimizer, EMA) until `train.max_steps` or
        `train.flops_budget`, with `Cadence` deciding when to log, evaluate, checkpoint and sample;
    a stop signal (SIGTERM, SIGUSR1, SIGINT) ends the step, saves and exits for requeue; a non-finite loss
        stops the run or rolls back to the last healthy checkpoint (`train.on_nonfinite`).

The run directory's files belong to vsa_train/rundir.py; saving and restoring the state to vsa_train/checkpoint.py.
"""
import contextlib
import math
import os
import statistics
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from omegaconf import DictConfig, OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from . import config_schema, progress
from .checkpoint import Checkpointer, init_weights, load_checkpoint
from .data import Data, build_data, data_spec
from .diffusion import flow_loss, sample_draws
from .distributed import on_main
from .evaluation import evaluate, make_eval_set
from .flops import training_flops_per_sample
from .metrics import MetricsLog, define_flops_axis, wandb_init_kwargs, wandb_project
from .models import build_model, is_wan, vsa_config
from .models.vsa import warm_up_kernels
from .ops import warm
from .parallel import (Layout, apply_fsdp, apply_sequence_parallel, clip_grad_norm, compile_blocks, gradient_sync,
                       make_layout, sp_group)
from .preemption import StopSignals
from .rundir import Launch, RunDir
from .sampling import save_samples
from .schedules import LRSchedule, SparsitySchedule, end_step


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
    """Recent step losses; healthy = finite and within `factor` of their median (a checkpoint may be "last good")."""

    def __init__(self, factor: float, window: int = 100):
        self.factor, self.losses = factor, deque(maxlen=window)

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def healthy(self) -> bool:
        if not self.losses or not math.isfinite(self.losses[-1]):
            return bool(not self.losses)
        return len(self.losses) < 5 or self.losses[-1] <= self.factor * statistics.median(self.losses)


@dataclass
class Run:
    """Everything a training run is made of, built once by `build_run`."""

    cfg: DictConfig
    accelerator: Accelerator
    model: torch.nn.Module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    data: Data
    eval_set: dict
    sparsity: SparsitySchedule
    state: TrainState
    health: LossHealth
    global_batch: int
    layout: Layout = Layout()
    lr_schedule: LRSchedule = None  # optim.schedule; its end step is fixed once, in build_run
    train_iter: object = None
    saved_step: int = -1  # the step whose checkpoint this run holds (saved or resumed from): not saved again
    skipped: set = field(default_factory=set)  # bad inputs this rank's data met (skipped, never trained on)

    def restart_data(self) -> None:
        """(Re)starts the train stream at `state.position` (resume, rollback); position is a global sample index."""
        warm.join()  # no fork while the kernel warm-up's thread may hold a lock the workers need
        per_batch = self.cfg.train.batch_size * self.layout.dp_size
        if self.state.position % per_batch:
            raise ValueError(f"data position {self.state.position} is not a whole number of batches of {per_batch}")
        self.data = build_data(self.cfg.data, batch_size=self.cfg.train.batch_size,
                               eval_samples=self.cfg.train.eval_samples, rank=self.layout.dp_rank,
                               world_size=self.layout.dp_size, start_batch=self.state.position // per_batch)
        self.train_iter = iter(self.data.train)

    def counters(self) -> dict:
        """What a checkpoint stores besides tensors: counters, loss health, layout (checked at resume)."""
        return {**asdict(self.state), "healthy": self.health.healthy(), "recent_losses": list(self.health.losses),
                "global_batch": self.global_batch, "processes": self.accelerator.num_processes,
                "strategy": self.layout.strategy, "sp_size": self.layout.sp_size,
                "seed": self.cfg.train.seed, "ema_updates": int(self.ema.n_averaged) if self.ema is not None else 0}

    def restore(self, counters: dict) -> None:
        self.state = TrainState(**{k: counters[k] for k in asdict(TrainState()) if k in counters})
        self.saved_step = self.state.step
        self.health.losses.clear()
        self.health.losses.extend(counters.get("recent_losses", []))


@dataclass
class StepResult:
    ok: bool            # loss and gradient norm finite on every rank (else nothing was updated)
    loss: float         # mean over ranks and micro-steps
    grad_norm: float
    lr: float
    stop: bool          # some rank received a stop signal: every rank stops after this step


# --------------------------------------------------------------------------------------------- building a run

def make_accelerator(cfg: DictConfig) -> Accelerator:
    """accelerate for this machine: bf16 on CUDA (auto), gloo DDP on CPUs, collectives that time out."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise ValueError("accelerate's FSDP plugin is not used: launch with a multi-GPU accelerate config "
                         "(configs/accelerate/fsdp.yaml) and set parallel.strategy=fsdp")
    mixed_precision = cfg.train.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))
    # cpu=True without CUDA: only then does accelerate turn torchrun's environment into MULTI_CPU (gloo) DDP.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision,
                       log_with="wandb" if cfg.logger.name == "wandb" else None, kwargs_handlers=[timeout])


def build_run(cfg: DictConfig, accelerator: Accelerator, resume_from: Path | None = None) -> Run:
    """Model (laid out by `parallel`), EMA, optimizer, data and counters, restored from `resume_from` if given.
    Writes no files."""
    tcfg = cfg.train
    layout = make_layout(cfg.parallel, cfg.model, accelerator.num_processes, accelerator.process_index)
    if tcfg.eval_samples % layout.dp_size:  # equal shards: under FSDP every rank must run the same forwards
        raise ValueError(f"train.eval_samples={tcfg.eval_samples} must be divisible by the {layout.dp_size} "
                         f"data-parallel ranks")
    if tcfg.ema is not None and layout.strategy == "fsdp":
        raise ValueError("train.ema is not supported with parallel.strategy=fsdp (the EMA copy would hold full, "
                         "unsharded weights)")
    spec = data_spec(cfg.data)
    warn_tf32(cfg.attn)
    use_compile_cache(tcfg.get("compile_cache"))
    set_seed(tcfg.seed)  # the same seed on every rank: identical initial weights
    # A VideoDiT is built and initialised on the device: dit_1b's 1.4B weights take seconds there, not ~10 s on the
    # host plus a copy. (A Wan folder is loaded by diffusers, which places its weights itself.)
    with contextlib.nullcontext() if is_wan(cfg.model) else torch.device(accelerator.device):
        model = build_model(cfg.model, cfg.attn, in_channels=spec.in_channels, text_dim=spec.text_dim)
    if tcfg.init_from is not None and resume_from is None:  # a resumed run has its own weights
        accelerator.print(init_weights(model, tcfg.init_from))
    ema = None
    if tcfg.ema is not None:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tcfg.ema), use_buffers=True)
        ema = ema.to(accelerator.device)
    model, optimizer = _lay_out(model, cfg, layout, accelerator)
    run = Run(cfg=cfg, accelerator=accelerator, model=model, ema=ema, optimizer=optimizer, data=None, eval_set=None,
              sparsity=SparsitySchedule(cfg, spec), state=TrainState(), health=LossHealth(tcfg.explode_factor),
              global_batch=tcfg.batch_size * tcfg.grad_accum * layout.dp_size, layout=layout)
    run.lr_schedule = LRSchedule(cfg, run.sparsity, run.global_batch)
    # Training noise, timesteps and caption dropout are drawn per sample (diffusion.sample_draws); the global RNG,
    # seeded per data-parallel rank here and restored on resume, only serves anything else that draws from it.
    set_seed(tcfg.seed + layout.dp_rank)
    if resume_from is not None:
        run.restore(load_checkpoint(accelerator, resume_from, model, optimizer, ema))
        accelerator.print(f"resumed from {resume_from} (step {run.state.step})")
    run.restart_data()
    if tcfg.compile and not Cadence(tcfg).finished(run.state):  # after the data workers forked (restart_data waits)
        warm_up_kernels(accelerator.unwrap_model(model), half_dtype(accelerator) or torch.float32, accelerator.device)
    run.eval_set = make_eval_set(run.data.eval, tcfg.eval_timesteps, seed=cfg.data.seed)
    return run


def warn_tf32(attn: DictConfig) -> None:
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
        raise ValueError(f"train.compile_cache={folder}: cannot use it as a folder ({err.strerror})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ValueError(f"train.compile_cache={folder}: the folder is not writable by this user")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")  # our own kernels' and inductor's compiled Triton


def _lay_out(model: torch.nn.Module, cfg: DictConfig, layout: Layout, accelerator: Accelerator):
    """(model, optimizer) laid out for this process: sequence parallel, compiled, then DDP or FSDP2."""
    if layout.sp_size > 1:
        apply_sequence_parallel(model, layout, sp_group(layout))
    if cfg.train.compile in (True, "blocks"):
        compile_blocks(model)  # in place: parameter names, and so checkpoints, stay those of the plain model
    elif cfg.train.compile == "model":
        model.compile()
    fused = accelerator.device.type == "cuda"
    if layout.strategy == "fsdp":
        apply_fsdp(model.to(accelerator.device), layout, param_dtype=half_dtype(accelerator))
        return model, _optimizer(model, cfg.optim, fused=fused)  # over the sharded parameters
    return accelerator.prepare(model, _optimizer(model, cfg.optim, fused=fused))


def half_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """The 16-bit dtype of accelerate's mixed precision (bf16, fp16), None without it."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def _optimizer(model: torch.nn.Module, optim_cfg, fused: bool) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm gains, biases and other vectors are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim_cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), fused=fused)


# ------------------------------------------------------------------------------------------------- one step

def train_step(run: Run, stop_requested: bool = False) -> StepResult:
    """One optimizer step: grad_accum micro-batches, backward, clip; the ranks agree (one all-reduce) on the
    loss, its finiteness and any stop request; then AdamW and EMA. A non-finite step updates nothing."""
    cfg, accelerator, model, state = run.cfg, run.accelerator, run.model, run.state
    device = accelerator.device
    lr = run.lr_schedule(state.step)
    per_sample = run.sparsity.apply(state.step, accelerator.unwrap_model(model), run.ema and run.ema.module)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    accum, dropout = cfg.train.grad_accum, cfg.data.get("caption_dropout", 0.0)
    step_loss = torch.zeros((), device=device)
    for micro in range(accum):
        batch = next(run.train_iter)
        video = batch["video"].to(device, non_blocking=True)          # [B, C, T, H, W]
        text = batch["text"].to(device, non_blocking=True)            # [B, L, text_dim]
        text_mask = batch["text_mask"].to(device, non_blocking=True)  # [B, L]
        run.skipped.update(batch.get("skipped", ()))
        t, noise, u = sample_draws(cfg.train.seed, batch["position"], video.shape[1:], device)  # per sample
        if dropout:  # an all-False mask is the empty caption that guidance samples against
            text_mask = text_mask & (u >= dropout)[:, None]
        # Gradients are reduced only on the last micro-step. Under sequence parallelism each rank's gradient is its
        # tokens' part of the group's: x sp_size makes the mean over all ranks the data-parallel mean.
        with gradient_sync(model, accelerator, micro == accum - 1):
            with accelerator.autocast():  # the forward only: backward ops keep the dtypes the forward saved
                loss = flow_loss(model, video, text, text_mask, t=t, noise=noise)
            accelerator.backward(loss * run.layout.sp_size / accum)
        step_loss += loss.detach() / accum
    # Without clipping, max_norm=inf still returns the global norm, which the finiteness check needs.
    grad_norm = clip_grad_norm(model, accelerator, cfg.optim.grad_clip or float("inf"))
    flags = torch.stack([(~torch.isfinite(step_loss)).float(), (~torch.isfinite(grad_norm)).float(),
                         torch.tensor(float(stop_requested), device=device), step_loss.float()])
    bad_loss, bad_grad, stop, loss_sum = accelerator.reduce(flags, reduction="sum").tolist()
    state.position += run.global_batch  # consumed either way: a rollback skips them
    result = StepResult(ok=not (bad_loss or bad_grad), loss=loss_sum / accelerator.num_processes,  # sp ranks agree
                        grad_norm=float(grad_norm), lr=lr, stop=stop > 0)
    if not result.ok:  # stopping before optimizer.step keeps the weights as the last step left them
        run.optimizer.zero_grad(set_to_none=True)
        return result
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update_parameters(accelerator.unwrap_model(model))
    state.step += 1
    state.samples += run.global_batch
    state.flops += per_sample.executed * run.global_batch
    state.flops_dense += per_sample.dense * run.global_batch
    run.health.add(result.loss)
    return result


# ------------------------------------------------------------------------------------------------ cadence

@dataclass
class Due:
    log: bool
    eval: bool
    ckpt: bool
    sample: bool


class Cadence:
    """When to stop, log, evaluate, checkpoint and sample (every N steps, at FLOPs multiples, and at the end)."""

    def __init__(self, tcfg):
        self.t = tcfg

    def finished(self, state: TrainState) -> bool:
        return state.step >= self.t.max_steps or self.budget_spent(state)

    def budget_spent(self, state: TrainState) -> bool:
        return self.t.flops_budget is not None and state.flops >= self.t.flops_budget

    def due(self, state: TrainState, flops_before: float, stopping: bool) -> Due:
        """What runs after the step that took the counters from `flops_before` to `state`."""
        end = self.finished(state)
        every = lambda n: bool(n) and state.step % n == 0  # noqa: E731
        crossed = self.t.eval_every_flops is not None and (
            math.floor(state.flops / self.t.eval_every_flops) > math.floor(flops_before / self.t.eval_every_flops))
        return Due(log=every(self.t.log_every) or end or stopping,
                   eval=(every(self.t.eval_every) or end or crossed) and not stopping,
                   ckpt=every(self.t.ckpt_every) or end or stopping,
                   sample=(every(self.t.sample_every) or (end and bool(self.t.sample_every))) and not stopping)


class Window:
    """Throughput and mean loss since the last logged row."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.samples, self.flops, self.losses = time.perf_counter(), 0, 0.0, []

    def add(self, samples: int, flops: float, loss: float) -> None:
        self.samples, self.flops = self.samples + samples, self.flops + flops
        self.losses.append(loss)

    def row(self) -> dict:
        elapsed = time.perf_counter() - self.start
        return {"train/loss": sum(self.losses) / max(len(self.losses), 1), "samples/s": self.samples / elapsed,
                "TFLOP/s": self.flops / elapsed / 1e12}


# ------------------------------------------------------------------------------------------------- the loop

def train(cfg: DictConfig) -> dict:
    """Runs (or resumes) the run in cfg.run_dir; returns the last logged values."""
    if cfg.train.dry_run:
        return dry_run(cfg)
    spec = data_spec(cfg.data)  # for latents this reads the shards' index file: once
    check_config(cfg, spec)
    tcfg = cfg.train
    accelerator = make_accelerator(cfg)
    world = accelerator.num_processes
    run_dir = RunDir(cfg.run_dir)
    layout = make_layout(cfg.parallel, cfg.model, world, accelerator.process_index)
    dp_size = layout.dp_size
    launch = Launch(cfg=cfg, processes=world, global_batch=tcfg.batch_size * tcfg.grad_accum * dp_size,
                    resume=tcfg.resume, data_parallel=dp_size)
    # Checked before anything is written: a launch that does not fit the run leaves its directory untouched.
    resume_from = on_main(accelerator, run_dir.check_launch, launch)
    with contextlib.ExitStack() as held:
        on_main(accelerator, lambda: held.enter_context(run_dir.lock(tcfg.lock_stale_s)))
        _announce_build(cfg, spec, accelerator, layout)
        run = build_run(cfg, accelerator, resume_from)
        on_main(accelerator, run_dir.record_launch, launch, resume_from)
        ckpts = Checkpointer(accelerator, run_dir, tcfg.keep_checkpoints)
        try:
            last = _loop(run, run_dir, ckpts, spec, resumed=resume_from is not None)
        finally:  # a crash still lets a checkpoint being written in the background finish, inside the lock
            ckpts.close()
    if torch.distributed.is_initialized():  # leave together: under srun, rank 0 hosts the rendezvous store
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()
    return last


def _announce_build(cfg: DictConfig, spec, accelerator: Accelerator, layout: Layout) -> None:
    """Before the model is built (main process): its size, a rough training-memory estimate (vsa_train/progress.py)
    and a warning when this machine has less memory than that."""
    if not accelerator.is_main_process:
        return
    with torch.device("meta"):  # counts parameters without allocating them
        n_params = sum(p.numel() for p in build_model(cfg.model, cfg.attn, in_channels=spec.in_channels,
                                                      text_dim=spec.text_dim).parameters())
    tokens = math.prod(n // p for n, p in zip(spec.video_shape, cfg.model.patch_size))
    est = progress.memory_estimate(n_params, cfg, tokens, dp_size=layout.dp_size, sp_size=layout.sp_size,
                                   strategy=layout.strategy, precision=accelerator.mixed_precision)
    print(f"building the model: {cfg.model.name}, {n_params:,} parameters, {accelerator.device.type} ...\n"
          f"{progress.describe_memory(est)}", flush=True)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or 1)
    warning = progress.memory_warning(est, accelerator.device, local_processes=local)
    if warning:
        print(warning, flush=True)


def _loop(run: Run, run_dir: RunDir, ckpts: Checkpointer, spec, resumed: bool) -> dict:
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    tcfg, main = cfg.train, accelerator.is_main_process
    accelerator.init_trackers(wandb_project(cfg), config=OmegaConf.to_container(cfg, resolve=True),
                              init_kwargs={"wandb": _wandb_kwargs(cfg, run_dir.path)})
    define_flops_axis(accelerator)
    metrics = MetricsLog(run_dir.metrics, accelerator, resume_step=state.step if resumed else -1)
    per_sample = run.sparsity.flops_per_sample(0)
    tokens = math.prod(n // p for n, p in zip(spec.video_shape, cfg.model.patch_size))
    accelerator.print(f"run_dir: {run_dir.path}\nparams: {sum(p.numel() for p in run.model.parameters())}\n"
                      f"flops_per_sample: {per_sample.executed:.4e} (dense {per_sample.dense:.4e})\nglobal batch: "
                      f"{run.global_batch} ({accelerator.num_processes} processes, {accelerator.mixed_precision} "
                      f"precision)")
    note = progress.vsa_flops_note(run.sparsity)
    if note:
        accelerator.print(note)
    # A run the FLOPs budget ends gets a bar in FLOPs (total = the budget), not in steps of train.max_steps.
    by_flops = tcfg.flops_budget is not None and end_step(tcfg.max_steps, tcfg.flops_budget, run.sparsity,
                                                          run.global_batch, exact_steps=100_000) < tcfg.max_steps
    if by_flops:
        pbar = tqdm(total=tcfg.flops_budget, initial=state.flops, unit="FLOP", unit_scale=True, disable=not main,
                    desc="train", dynamic_ncols=True)
    else:
        pbar = tqdm(total=tcfg.max_steps, initial=state.step, disable=not main, desc="train", dynamic_ncols=True)
    say = lambda message: pbar.write(message) if main else None  # noqa: E731  (tqdm.write: also once closed)
    ckpts.announce = say
    if tcfg.compile and not Cadence(tcfg).finished(state):  # torch.compile compiles at the first call
        say(f"compiling (train.compile={tcfg.compile}): the first step takes longer"
            f"{' (and the step-0 eval)' if state.step == 0 and not resumed else ''}")

    def evaluate_into(row: dict) -> None:
        # eval/loss (mean) and eval/loss_t<t> per timestep; the same under eval/loss_ema for the EMA weights
        row.update(evaluate(run.model, run.eval_set, accelerator, tcfg.eval_batch_size, run.layout).row())
        if run.ema is not None:
            row.update(evaluate(run.ema.module, run.eval_set, accelerator, tcfg.eval_batch_size,
                                run.layout).row("eval/loss_ema"))
        say(f"step {run.state.step}: eval/loss {row['eval/loss']:.5f}")

    if state.step == 0 and not resumed:  # the untrained model's eval loss anchors the curve
        run.sparsity.apply(0, accelerator.unwrap_model(run.model), run.ema and run.ema.module)
        say(f"evaluating {tcfg.eval_samples} videos x {tcfg.eval_timesteps} timesteps"
            f"{' (weights and EMA)' if run.ema is not None else ''} ...")
        row = {"step": 0, "flops": 0.0, "flops_dense": 0.0, **run.sparsity.row(0)}
        evaluate_into(row)
        metrics.log(row)

    cadence, window, last = Cadence(tcfg), Window(), {"step": state.step}
    run.model.train()
    first_step = True  # of this launch: its time, compilation included, is worth a line
    with StopSignals(announce=say) as signals:
        while not cadence.finished(run.state):
            flops_before, started = run.state.flops, time.perf_counter()
            result = train_step(run, stop_requested=signals.requested())
            if first_step:
                first_step = False
                say(f"first step: {time.perf_counter() - started:.1f} s (compilation and the first batch included)")
            if not result.ok:
                metrics = _on_nonfinite(run, run_dir, ckpts, result, metrics)
                window.reset()
                continue
            state = run.state
            window.add(run.global_batch, state.flops - flops_before, result.loss)
            # In FLOPs the bar stops at the budget; the end line says by how much the last step overshot it.
            pbar.update(min(state.flops - flops_before, max(0.0, pbar.total - pbar.n)) if by_flops else 1)
            due = cadence.due(state, flops_before, stopping=result.stop)
            row = {}
            if due.log:
                row.update(window.row(), lr=result.lr, grad_norm=result.grad_norm, **run.sparsity.row(state.step - 1))
                row["tokens/s"] = row["samples/s"] * tokens
                row["train/rollbacks"] = state.rollbacks
                row["data/skipped"] = accelerator.reduce(torch.tensor(len(run.skipped), device=accelerator.device),
                                                         reduction="sum").item()
                row["TFLOP/s/device"] = row["TFLOP/s"] / accelerator.num_processes  # sharded or not: per sample / devices
                if accelerator.device.type == "cuda":  # utilisation per device against its dense bf16 peak
                    row["MFU"] = row["TFLOP/s/device"] / tcfg.peak_tflops
                    row["mem/peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
                pbar.set_postfix(**({"step": state.step} if by_flops else {}), loss=f"{row['train/loss']:.4f}",
                                 refresh=False)
            if due.eval:
                evaluate_into(row)
            if row:
                row = dict(step=state.step, flops=state.flops, flops_dense=state.flops_dense, samples=state.samples,
                           **row)
                metrics.log(row)
                last.update(row)
                if main:  # a file time stamp: no collective needed
                    run_dir.touch_lock()
            if due.ckpt:  # a periodic save writes its files while training goes on; a stop's and the last do not
                last_one = result.stop or cadence.finished(state)  # inside StopSignals: a SIGTERM cannot cut it
                ckpt = _save(run, ckpts, say, background=tcfg.ckpt_background and not last_one, stop=result.stop)
            if due.sample:  # after saving: a failure here cannot cost the weights
                model = run.ema.module if run.ema is not None else accelerator.unwrap_model(run.model)
                save_samples(model, cfg, run.eval_set["caption"][: tcfg.sample_count], state.step, accelerator)
            if result.stop:
                pbar.close()
                accelerator.end_training()
                signals.exit_for_requeue(ckpt)
            if row or due.ckpt or due.sample:  # eval, saving and sampling are not throughput
                window.reset()
    pbar.close()
    if run.saved_step != run.state.step:  # the loop saves its last step; this covers a run with nothing left to do
        _save(run, ckpts, say)
    ckpts.wait()  # nothing should be in flight here (the last save is in the foreground); if it is, it ends now
    _finish(run, run_dir, cadence)
    return last


def _save(run: Run, ckpts: Checkpointer, say=None, background: bool = False, stop: bool = False) -> Path | None:
    """Saves the current step (its directory, or None while written in the background); `say` (the main process's
    printer) announces it, and the checkpointer its end and duration."""
    say = say if run.accelerator.is_main_process and say is not None else None
    if say is not None:
        say(f"saving checkpoint step {run.state.step} ...")
    if not run.health.healthy():
        run.accelerator.print(f"warning: saving step {run.state.step} while the loss is not healthy "
                              f"({run.health.losses[-1]:.4g}, recent median {statistics.median(run.health.losses):.4g}); "
                              f"it will not be used as a rollback point")
    path = ckpts.save(run.model, run.optimizer, run.ema, run.counters(), background=background, stop=stop)
    run.saved_step = run.state.step
    return path


def _on_nonfinite(run: Run, run_dir: RunDir, ckpts: Checkpointer, result: StepResult,
                  metrics: MetricsLog) -> MetricsLog:
    """train.on_nonfinite: stop (the weights stay as the last finite step left them), or roll back to the last
    healthy checkpoint, skip the batches that led here and go on (at most train.max_rollbacks times)."""
    tcfg, accelerator = run.cfg.train, run.accelerator
    ckpts.wait()  # a checkpoint still being written may be the one to roll back to
    good = on_main(accelerator, run_dir.last_healthy)
    what = (f"non-finite training loss ({result.loss}) or gradient norm ({result.grad_norm}) at step "
            f"{run.state.step + 1}; this update was not applied")
    if tcfg.on_nonfinite == "stop" or run.state.rollbacks >= tcfg.max_rollbacks or good is None:
        accelerator.end_training()
        why = ("train.on_nonfinite=stop" if tcfg.on_nonfinite == "stop" else
               f"{run.state.rollbacks} rollbacks of train.max_rollbacks={tcfg.max_rollbacks} used"
               if good is not None else "no healthy checkpoint to roll back to")
        raise FloatingPointError(
            f"{what}. Stopped ({why}). Last healthy checkpoint: {good}. Try train.on_nonfinite=rollback, a lower "
            f"optim.lr, or check the data.")
    skip_to, rollbacks = run.state.position, run.state.rollbacks + 1
    run.restore(load_checkpoint(accelerator, good, run.model, run.optimizer, run.ema))
    run.state.position, run.state.rollbacks = skip_to, rollbacks
    run.restart_data()
    accelerator.print(f"{what}. Rolled back to {good} (step {run.state.step}); skipping the batches up to sample "
                      f"{skip_to} (rollback {rollbacks} of {tcfg.max_rollbacks})")
    return MetricsLog(run_dir.metrics, accelerator, resume_step=run.state.step)


def _finish(run: Run, run_dir: RunDir, cadence: Cadence) -> None:
    accelerator = run.accelerator
    if run.skipped:
        print(f"rank {accelerator.process_index}: skipped {len(run.skipped)} bad inputs:\n  "
              + "\n  ".join(sorted(run.skipped)), flush=True)
    budget = run.cfg.train.flops_budget
    if cadence.budget_spent(run.state):
        accelerator.print(progress.budget_line(budget, run.state.step, run.state.flops))
    elif budget is not None:
        accelerator.print(f"train.max_steps={run.cfg.train.max_steps} ended the run before the flops budget "
                          f"{budget:.3e}: {run.state.flops:.3e} executed ({100 * run.state.flops / budget:.3g}%)")
    accelerator.end_training()
    if accelerator.is_main_process:
        from .analysis.plot import plot_loss_vs_flops  # here: matplotlib costs every launch ~0.5 s of start-up

        plot_loss_vs_flops(run_dir.metrics, run_dir.path / "loss_vs_flops.png", title=run_dir.path.name)
    # One line per rank: equal fingerprints mean the replicas ended with the same weights.
    fingerprint = sum(p.detach().double().sum().item() for p in accelerator.unwrap_model(run.model).parameters())
    print(f"rank {accelerator.process_index}/{accelerator.num_processes}: finished at step {run.state.step}, "
          f"weights fingerprint {fingerprint:.10e}", flush=True)


def _wandb_kwargs(cfg: DictConfig, run_dir: Path) -> dict:
    """The sweep as group, name and tags from the task overrides, one wandb run per launch whose rows restart
    from the checkpoint, env over config (vsa_train/metrics.py, `wandb_init_kwargs`)."""
    return wandb_init_kwargs(cfg, run_dir)


# ------------------------------------------------------------------------------------------ checks, dry run

def check_config(cfg: DictConfig, spec=None) -> None:
    """Fails early, listing every bad value with its key (vsa_train/config_schema.py, the one place for the rules;
    `spec` is accepted for older callers and not needed)."""
    config_schema.check(cfg)


def dry_run(cfg: DictConfig) -> dict:
    """Builds the model on the meta device (no weights allocated), prints config, parameters and FLOPs."""
    spec = data_spec(cfg.data)
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.attn, in_channels=spec.in_channels, text_dim=spec.text_dim)
    n_params = sum(p.numel() for p in model.parameters())
    flops = training_flops_per_sample(cfg.model, cfg.attn, in_channels=spec.in_channels, text_dim=spec.text_dim,
                                      video_shape=spec.video_shape, text_len=spec.text_len)
    print(OmegaConf.to_yaml(cfg, resolve=True))
    print(f"params: {n_params}")
    print(f"flops_per_sample: {flops.executed:.6e}")
    print(f"flops_per_sample_dense: {flops.dense:.6e}")
    precision = cfg.train.mixed_precision
    precision = ("bf16" if torch.cuda.is_available() else "no") if precision == "auto" else precision
    tokens = math.prod(n // p for n, p in zip(spec.video_shape, cfg.model.patch_size))
    print(progress.describe_memory(progress.memory_estimate(n_params, cfg, tokens, precision=precision),
                                   "one process, unsharded"))
    result = {"params": n_params, "flops_per_sample": flops.executed, "flops_per_sample_dense": flops.dense}
    schedule = SparsitySchedule(cfg, spec)
    if schedule.vsa is not None:  # executed FLOPs above are at the target topk; a ramp starts denser
        target = schedule.vsa.topk_in_force(schedule.tiles)
        print(f"topk: {target} of {schedule.tiles} tiles (sparsity {1 - target / schedule.tiles:.4f}); "
              f"schedule {schedule.vsa.schedule}, step 0: topk {schedule.topk(0)}, "
              f"flops_per_sample {schedule.flops_per_sample(0).executed:.6e}")
        result.update(topk=target, tiles=schedule.tiles)
        note = progress.vsa_flops_note(schedule)
        if note:
            print(note)
    return result
