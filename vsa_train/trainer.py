"""The training loop: accelerate (CPU, GPU, DDP, FSDP), flow-matching loss, eval, checkpoints, FLOPs-axis logging.

Reads top to bottom: build everything, resume if a checkpoint exists, then step until `train.max_steps` or
`train.flops_budget`, logging every `log_every`, evaluating every `eval_every` steps (and, with
`eval_every_flops`, each time cumulative FLOPs pass a multiple of it) and checkpointing every `ckpt_every`
steps (and all three at the end).
"""
import contextlib
import functools
import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .analysis.plot import plot_loss_vs_flops
from .checkpoint import latest_checkpoint, save_checkpoint
from .data import build_data, build_text_encoder, data_spec
from .data.videos import write_video
from .diffusion import flow_loss
from .flops import training_flops_per_sample
from .metrics import MetricsLog, define_flops_axis
from .models import build_model, vsa_config
from .models.vsa import VSAAttention
from .sampling import CONFIG, generate


@dataclass
class TrainState:
    """Progress counters, saved in every checkpoint (the data position is step * grad_accum batches)."""

    step: int = 0
    samples: int = 0
    flops: float = 0.0        # cumulative executed training FLOPs, all ranks
    flops_dense: float = 0.0  # the same samples with dense attention

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def train(cfg: DictConfig) -> dict:
    """Runs (or resumes) the run in cfg.run_dir; returns the last logged values."""
    if cfg.train.dry_run:
        return dry_run(cfg)
    tcfg = cfg.train
    spec = data_spec(cfg.data)  # for latents this reads the shards' index file: once
    _check(cfg, spec)
    run_dir = Path(cfg.run_dir)
    mixed_precision = tcfg.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    # cpu=True without CUDA: only then does accelerate turn torchrun's environment into MULTI_CPU (gloo) DDP.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision,
                              log_with="wandb" if cfg.logger.name == "wandb" else None)
    if tcfg.ema is not None and accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("train.ema is not supported with FSDP (the EMA copy would hold full, unsharded weights)")
    main = accelerator.is_main_process
    device = accelerator.device
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / CONFIG, resolve=True)  # what sample.py rebuilds the model and data from

    # The same seed on every rank gives identical initial weights; the noise seed below differs per rank.
    set_seed(tcfg.seed)
    model = build_model(cfg.model, cfg.attn, in_channels=spec.in_channels, text_dim=spec.text_dim)
    if tcfg.init_from is not None and latest_checkpoint(run_dir) is None:  # a resumed run has its own weights
        accelerator.print(load_init_weights(model, tcfg.init_from))
    sparsity = SparsitySchedule(cfg, spec)
    per_sample = sparsity.flops_per_sample(0)
    patch = cfg.model.patch_size
    tokens_per_sample = math.prod(n // p for n, p in zip(spec.video_shape, patch))
    n_params = sum(p.numel() for p in model.parameters())
    ema = None
    if tcfg.ema is not None:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tcfg.ema), use_buffers=True).to(device)
    optimizer = _optimizer(model, cfg.optim, fused=device.type == "cuda")
    if tcfg.compile:
        model.compile()  # in place: parameter names, and so checkpoints, stay those of the plain model
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    # Training noise and timesteps come from the global RNG, seeded per rank here and restored by load_state
    # on resume, so a resumed run draws exactly what an uninterrupted one would have.
    set_seed(tcfg.seed, device_specific=True)
    resume_from = latest_checkpoint(run_dir)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        accelerator.print(f"resumed from {resume_from} (step {state.step})")

    world = accelerator.num_processes
    if tcfg.eval_samples % world:  # equal shards: under FSDP every rank must run the same number of forwards
        raise ValueError(f"train.eval_samples={tcfg.eval_samples} must be divisible by the {world} processes")
    global_batch = tcfg.batch_size * tcfg.grad_accum * world
    data = build_data(cfg.data, batch_size=tcfg.batch_size, eval_samples=tcfg.eval_samples,
                      rank=accelerator.process_index, world_size=world, start_batch=state.step * tcfg.grad_accum)
    eval_set = _eval_set(data.eval, tcfg.eval_timesteps, seed=cfg.data.seed)

    accelerator.init_trackers(cfg.logger.get("project", "vsa_train"),
                              config=OmegaConf.to_container(cfg, resolve=True),
                              init_kwargs={"wandb": _wandb_kwargs(cfg, run_dir)})
    define_flops_axis(accelerator)
    metrics = MetricsLog(run_dir / "metrics.jsonl", accelerator, resume_step=state.step if resume_from else -1)
    accelerator.print(f"run_dir: {run_dir}\nparams: {n_params}\nflops_per_sample: {per_sample.executed:.4e} "
                      f"(dense {per_sample.dense:.4e})\nglobal batch: {global_batch} ({world} processes, "
                      f"{mixed_precision} precision)")

    def evaluate_and_log(row: dict) -> None:
        row["eval/loss"] = evaluate(model, eval_set, accelerator, tcfg.eval_batch_size)
        if ema is not None:
            row["eval/loss_ema"] = evaluate(ema.module, eval_set, accelerator, tcfg.eval_batch_size)
        if main:
            pbar.write(f"step {state.step}: eval/loss {row['eval/loss']:.5f}")

    pbar = tqdm(total=tcfg.max_steps, initial=state.step, disable=not main, desc="train", dynamic_ncols=True)
    if state.step == 0:  # the untrained model's eval loss anchors the curve
        sparsity.apply(0, accelerator.unwrap_model(model), ema)
        row = {"step": 0, "flops": 0.0, "flops_dense": 0.0, **sparsity.row(0)}
        evaluate_and_log(row)
        metrics.log(row)

    train_iter = iter(data.train)
    model.train()
    last = {"step": state.step}
    window_start, window_samples, loss_sum, loss_count = time.perf_counter(), 0, torch.zeros((), device=device), 0
    window_flops = 0.0
    skipped: set[str] = set()  # bad inputs this rank's data met (each skipped, never trained on)
    caption_dropout = cfg.data.get("caption_dropout", 0.0)
    while state.step < tcfg.max_steps and not _budget_spent(state, tcfg):
        lr = _lr_at(state.step, cfg.optim)
        per_sample = sparsity.apply(state.step, accelerator.unwrap_model(model), ema)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Gradient accumulation: gradients are all-reduced only on the last micro-step.
        step_loss = torch.zeros((), device=device)
        for micro in range(tcfg.grad_accum):
            batch = next(train_iter)
            video = batch["video"].to(device, non_blocking=True)
            text = batch["text"].to(device, non_blocking=True)
            text_mask = batch["text_mask"].to(device, non_blocking=True)
            skipped.update(batch.get("skipped", ()))
            if caption_dropout:  # an all-False mask is the empty caption that guidance samples against
                text_mask = text_mask & (torch.rand(len(text_mask), device=device) >= caption_dropout)[:, None]
            sync = micro == tcfg.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss = flow_loss(model, video, text, text_mask)
                accelerator.backward(loss / tcfg.grad_accum)
            step_loss += loss.detach() / tcfg.grad_accum
        # Without clipping, max_norm=inf still returns the global norm, which the NaN check needs.
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))

        # The grad norm is all-reduced, hence equal on every rank; the loss flag is summed so that all ranks
        # stop together. Stopping before optimizer.step keeps the weights and the last checkpoint intact.
        bad = (~torch.isfinite(step_loss)).float() + (~torch.isfinite(grad_norm)).float()
        if accelerator.reduce(bad, reduction="sum").item() > 0:
            pbar.close()
            accelerator.end_training()
            raise FloatingPointError(
                f"non-finite training loss ({step_loss.item()}) or gradient norm ({grad_norm.item()}) at step "
                f"{state.step + 1}; the run is stopped before this update. Last good checkpoint: "
                f"{latest_checkpoint(run_dir)}. Lower optim.lr or check the data, then re-run to resume.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(accelerator.unwrap_model(model))

        state.step += 1
        state.samples += global_batch
        flops_before = state.flops
        state.flops += per_sample.executed * global_batch
        state.flops_dense += per_sample.dense * global_batch
        window_samples += global_batch
        window_flops += per_sample.executed * global_batch  # the topk in force may change within a window
        loss_sum += step_loss
        loss_count += 1
        pbar.update(1)

        done = state.step >= tcfg.max_steps or _budget_spent(state, tcfg)
        row = {}
        if state.step % tcfg.log_every == 0 or done:
            elapsed = time.perf_counter() - window_start
            train_loss = accelerator.reduce(loss_sum / loss_count, reduction="mean").item()
            samples_per_s = window_samples / elapsed
            row.update({"train/loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                        "samples/s": samples_per_s, "tokens/s": samples_per_s * tokens_per_sample,
                        "TFLOP/s": window_flops / elapsed / 1e12, **sparsity.row(state.step - 1),
                        "data/skipped": accelerator.reduce(torch.tensor(len(skipped), device=device),
                                                           reduction="sum").item()})
            if device.type == "cuda":  # model FLOPs utilisation per device against its dense bf16 peak
                row["MFU"] = row["TFLOP/s"] / (world * tcfg.peak_tflops)
                row["mem/peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            pbar.set_postfix(loss=f"{train_loss:.4f}", refresh=False)
            loss_sum, loss_count = torch.zeros((), device=device), 0
        if state.step % tcfg.eval_every == 0 or done or _crossed(flops_before, state.flops, tcfg.eval_every_flops):
            evaluate_and_log(row)
        if row:
            row = dict(step=state.step, flops=state.flops, flops_dense=state.flops_dense, samples=state.samples,
                       **row)
            metrics.log(row)
            last.update(row)
        if state.step % tcfg.ckpt_every == 0 or done:
            save_checkpoint(accelerator, run_dir, state.step, tcfg.keep_checkpoints)
        sampled = bool(tcfg.sample_every) and (state.step % tcfg.sample_every == 0 or done)
        if sampled:  # after saving: a failure here cannot cost the weights
            save_samples(ema.module if ema is not None else accelerator.unwrap_model(model), cfg,
                         data.eval["caption"][: tcfg.sample_count], state.step, accelerator)
        if row or sampled or state.step % tcfg.ckpt_every == 0:  # eval, saving, sampling are not throughput
            window_start, window_samples, window_flops = time.perf_counter(), 0, 0.0
    pbar.close()

    save_checkpoint(accelerator, run_dir, state.step, tcfg.keep_checkpoints)  # no-op if this step is saved
    if skipped:
        print(f"rank {accelerator.process_index}: skipped {len(skipped)} bad inputs:\n  " + "\n  ".join(sorted(skipped)),
              flush=True)
    if _budget_spent(state, tcfg):
        accelerator.print(f"flops budget {tcfg.flops_budget:.3e} reached at step {state.step}")
    accelerator.end_training()
    if main:
        plot_loss_vs_flops(run_dir / "metrics.jsonl", run_dir / "loss_vs_flops.png", title=run_dir.name)
    # One line per rank: equal fingerprints mean the replicas ended with the same weights.
    fingerprint = sum(p.detach().double().sum().item() for p in accelerator.unwrap_model(model).parameters())
    print(f"rank {accelerator.process_index}/{world}: finished at step {state.step}, "
          f"weights fingerprint {fingerprint:.10e}", flush=True)
    return last


@torch.no_grad()
def evaluate(model, eval_set: dict, accelerator: Accelerator, batch_size: int) -> float:
    """Eval loss (DESIGN.md §6): mean flow loss over the fixed videos x fixed timesteps x fixed noise.

    Each rank takes every world-th video (equal shards); the sums are all-reduced, so the value does not
    depend on the number of processes.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device
    n = eval_set["video"].shape[0]
    mine = torch.arange(accelerator.process_index, n, accelerator.num_processes)
    total = torch.zeros((), device=device, dtype=torch.float64)
    # Eval runs eagerly under train.compile: compiling a second (no-grad, eval-batch) graph cost minutes on
    # dit_120m, and the extra shape would make dynamo recompile the training graph with dynamic shapes.
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


@torch.no_grad()
def save_samples(model, cfg: DictConfig, captions: list[str], step: int, accelerator: Accelerator) -> None:
    """Generates videos for `captions` (fixed noise) into run_dir/samples/step_<step>_<k>.mp4/.gif and to wandb.

    Every rank generates (an FSDP forward is collective); the main process writes and logs.
    """
    tcfg = cfg.train
    was_training = model.training
    model.eval()
    with accelerator.autocast(), torch.compiler.set_stance("force_eager"):
        videos = generate(model, cfg.data, list(captions), tcfg.sample_steps, tcfg.sample_cfg_scale,
                          seed=tcfg.seed, encoder=build_text_encoder(cfg.data))
    model.train(was_training)
    if not accelerator.is_main_process:
        return
    files = [write_video(v, Path(cfg.run_dir) / "samples" / f"step_{step:08d}_{k}.mp4")[0] for k, v in enumerate(videos)]
    if any(t.name == "wandb" for t in accelerator.trackers):
        import wandb

        accelerator.log({"samples": [wandb.Video(str(f), caption=c) for f, c in zip(files, captions)]}, step=step)


def _eval_set(batch: dict, num_timesteps: int, seed: int) -> dict:
    """The fixed eval protocol: held-out videos, evenly spaced t = (j + 0.5) / n, one fixed noise per (t, video)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_timesteps, *batch["video"].shape), generator=g)  # [n_t, N, C, T, H, W]
    timesteps = (torch.arange(num_timesteps, dtype=torch.float32) + 0.5) / num_timesteps
    return dict(batch, noise=noise, timesteps=timesteps)


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

    def apply(self, step: int, model, ema=None):
        """Puts the schedule's limit of `step` in force in the model (and its EMA copy); returns its FLOPs."""
        if self.vsa is not None:
            for m in (model, None if ema is None else ema.module):
                if m is not None:
                    m.set_sparsity_limit(self.vsa.sparsity_limit(step))
        return self.flops_per_sample(step)

    def row(self, step: int) -> dict:
        """Metrics of the selection in force at `step`: topk and sparsity = 1 - topk / tiles (none for dense)."""
        if self.vsa is None:
            return {}
        topk = self.topk(step)
        return {"topk": topk, "sparsity": 1 - topk / self.tiles}


def load_init_weights(model: torch.nn.Module, source) -> str:
    """Loads weights only (no optimizer, step or RNG) from a run directory, a checkpoint or a .safetensors file.

    A run directory means its newest checkpoint. Parameters that the new model's attention adds (VSA gates)
    keep their initial values (a neutral start); any other missing or unexpected key is an error.
    """
    path = Path(source)
    if (path / "checkpoints").is_dir():
        if (ckpt := latest_checkpoint(path)) is None:
            raise FileNotFoundError(f"train.init_from={source}: the run has no complete checkpoint")
        path = ckpt
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"train.init_from={source}: need a run directory, a checkpoint directory or a "
                                f".safetensors file; {path} does not exist")
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    new = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, VSAAttention)
           for p, _ in m.named_parameters()}
    if unexpected or set(missing) - new:
        raise ValueError(f"train.init_from={source}: weights do not fit this model: missing "
                         f"{sorted(set(missing) - new)}, unexpected {sorted(unexpected)}")
    return f"initialised from {path} (weights only; {len(missing)} new attention tensors keep their initial values)"


def _optimizer(model: torch.nn.Module, optim_cfg, fused: bool) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm gains, biases and other vectors are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim_cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), fused=fused)


def _lr_at(step: int, optim_cfg) -> float:
    """Linear warm-up over `warmup_steps` optimizer steps, then constant (the paper's schedule)."""
    if step < optim_cfg.warmup_steps:
        return optim_cfg.lr * (step + 1) / optim_cfg.warmup_steps
    return optim_cfg.lr


def _budget_spent(state: TrainState, tcfg) -> bool:
    return tcfg.flops_budget is not None and state.flops >= tcfg.flops_budget


def _crossed(before: float, after: float, interval: float | None) -> bool:
    """Whether a multiple of `interval` FLOPs lies in (before, after]: evals at fixed FLOPs across run sizes."""
    return interval is not None and math.floor(after / interval) > math.floor(before / interval)


def _wandb_kwargs(cfg: DictConfig, run_dir: Path) -> dict:
    """A run id derived from run_dir, so that a resumed (or requeued) run continues the same wandb run."""
    run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return {"name": run_dir.name, "id": run_id, "resume": "allow", "dir": str(run_dir),
            "mode": cfg.logger.get("mode"), "entity": cfg.logger.get("entity"),
            "tags": list(cfg.logger.get("tags") or [])}


def _check(cfg: DictConfig, spec) -> None:
    """Fails early, with the offending key, on values that would otherwise break deep inside the loop."""
    t = cfg.train
    for key in ("max_steps", "batch_size", "grad_accum", "log_every", "eval_every", "ckpt_every",
                "keep_checkpoints", "eval_samples", "eval_timesteps", "eval_batch_size"):
        if not isinstance(t[key], int) or t[key] < (0 if key == "max_steps" else 1):
            raise ValueError(f"train.{key} must be a positive integer, got {t[key]!r}")
    if t.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"train.mixed_precision must be auto, no, bf16 or fp16, got {t.mixed_precision!r}")
    if t.eval_every_flops is not None and not t.eval_every_flops > 0:
        raise ValueError(f"train.eval_every_flops must be a positive number of FLOPs or null, got {t.eval_every_flops!r}")
    if t.ema is not None and not 0.0 < t.ema < 1.0:
        raise ValueError(f"train.ema must be a decay in (0, 1) or null, got {t.ema!r}")
    if any(n % p for n, p in zip(spec.video_shape, cfg.model.patch_size)):
        raise ValueError(f"data (frames, height, width) = {tuple(spec.video_shape)} must be "
                         f"divisible by model.patch_size = {list(cfg.model.patch_size)}")


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
    result = {"params": n_params, "flops_per_sample": flops.executed, "flops_per_sample_dense": flops.dense}
    schedule = SparsitySchedule(cfg, spec)
    if schedule.vsa is not None:  # executed FLOPs above are at the target topk; a ramp starts denser
        target = schedule.vsa.topk_in_force(schedule.tiles)
        print(f"topk: {target} of {schedule.tiles} tiles (sparsity {1 - target / schedule.tiles:.4f}); "
              f"schedule {schedule.vsa.schedule}, step 0: topk {schedule.topk(0)}, "
              f"flops_per_sample {schedule.flops_per_sample(0).executed:.6e}")
        result.update(topk=target, tiles=schedule.tiles)
    return result
