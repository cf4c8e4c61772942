"""The training loop, read top to bottom (`train`):

    check the launch against the run directory (a run its checkpoint already finished says so and returns), take
        its lock, build the run whole (`build_run`, vsa_train/training_run.py), resumed from the newest verified
        checkpoint; long work that has no progress bar (the build, the eval set's inputs, an evaluation, the first
        step) prints its progress (progress.py);
    then `train_step` (micro-steps, clipping, non-finite check, optimizer, EMA) until `train.max_steps` or
        `train.flops_budget`; after each step the loop's components (vsa_train/periodic.py: metrics logger,
        evaluator, checkpointing, sampler) each decide whether it is their time and do their work;
    a stop signal (SIGTERM, SIGUSR1, SIGINT) ends the step, saves and exits for requeue; one during the build or
        an evaluation ends it there (an evaluation after its current batch), saving the step if this launch
        trained one; a non-finite loss stops the run or rolls back to the last healthy checkpoint
        (`train.on_nonfinite`).

The run directory's files belong to vsa_train/rundir.py; the checkpoint format to vsa_train/checkpoint/.
"""
import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from omegaconf import DictConfig

from . import progress
from .checkpoint import load_checkpoint
from .checkpoint.format import read_state
from .config_schema import Config, typed
from .data import data_commit
from .diffusion import flow_loss, sample_draws
from .distributed import leave_together, on_main
from .flops import training_flops_per_sample
from .launcher import check_launch
from .metrics import read_metrics
from .models import build_model
from .parallel import Layout, clip_grad_norm, gradient_sync, make_layout, weights_fingerprint
from .periodic import Checkpointing, Evaluator, MetricsLogger, Sampler
from .preemption import StopSignals, agreed, slots
from .provenance import code_commit
from .rundir import Launch, RunDir
from .schedules import LRSchedule, SparsitySchedule
from .training_run import Run, build_run, make_accelerator, mixed_precision, run_finished

__all__ = ["Run", "StepResult", "build_run", "dry_run", "make_accelerator", "train", "train_step"]


@dataclass
class StepResult:
    ok: bool            # loss and gradient norm finite on every rank (else nothing was updated)
    loss: float         # mean over ranks and micro-steps
    grad_norm: float
    lr: float
    stop: bool          # some rank received a stop signal: every rank stops after this step
    stop_signal: int = 0  # which one (the first of preemption.SIGNALS that any rank received), for every rank
    save_failed: bool = False  # rank 0's background checkpoint failed: every rank raises its error now
    tokens: int = 0     # video tokens the step trained on, over all ranks (its buckets' shapes)


# ------------------------------------------------------------------------------------------------- one step

def train_step(run: Run, stop_signal: int | None = None, save_failed: bool = False) -> StepResult:
    """One optimizer step: grad_accum micro-batches, backward, clip; the ranks agree (one all-reduce) on the
    loss, its finiteness, any stop signal (this rank's in `stop_signal`) and any failed background save; then
    AdamW and EMA. A non-finite step updates nothing."""
    config, accelerator, model, state = run.config, run.accelerator, run.model, run.state
    device = accelerator.device
    lr = run.lr_schedule(state.step)
    run.sparsity.apply(state.step, accelerator.unwrap_model(model), run.ema and run.ema.module)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    accum, dropout = config.train.grad_accum, config.data.get("caption_dropout", 0.0)
    step_loss = torch.zeros((), device=device)
    shapes = {}  # micro-steps per video shape: each bucket's samples are counted at its own FLOPs
    for micro in range(accum):
        batch = next(run.train_iter)
        video = batch["video"].to(device, non_blocking=True)          # [B, C, T, H, W], (T, H, W) the batch's bucket
        shapes[tuple(video.shape[2:])] = shapes.get(tuple(video.shape[2:]), 0) + 1
        text = batch["text"].to(device, non_blocking=True)            # [B, L, text_dim]
        text_mask = batch["text_mask"].to(device, non_blocking=True)  # [B, L]
        run.met_bad_inputs(batch.get("skipped", ()))
        t, noise, u = sample_draws(config.train.seed, batch["position"], video.shape[1:], device)  # per sample
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
    grad_norm = clip_grad_norm(model, accelerator, config.optim.grad_clip or float("inf"))
    # One slot per stop signal: a rank that received none learns which one stops it (submitit's handler for it).
    stops = torch.tensor(slots(stop_signal), device=device)
    flags = torch.cat([torch.stack([(~torch.isfinite(step_loss)).float(), (~torch.isfinite(grad_norm)).float(),
                                    step_loss.float(), torch.tensor(float(save_failed), device=device)]), stops])
    bad_loss, bad_grad, loss_sum, failed, *received = accelerator.reduce(flags, reduction="sum").tolist()
    stop_signal = agreed(received)
    state.position += run.global_batch  # consumed either way: a rollback skips them
    result = StepResult(ok=not (bad_loss or bad_grad), loss=loss_sum / accelerator.num_processes,  # sp ranks agree
                        grad_norm=float(grad_norm), lr=lr, stop=bool(stop_signal), stop_signal=stop_signal,
                        save_failed=failed > 0)
    if not result.ok:  # stopping before optimizer.step keeps the weights as the last step left them
        run.optimizer.zero_grad(set_to_none=True)
        return result
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update_parameters(accelerator.unwrap_model(model))
    result.tokens = add_flops(run, state.step, shapes)
    state.step += 1
    state.samples += run.global_batch
    run.health.add(result.loss, state.step)
    return result


def add_flops(run: Run, step: int, shapes: dict) -> int:
    """Adds the executed (and dense) FLOPs of step `step` to the counters: each shape's samples at its own count;
    returns the step's video tokens. Every rank draws the same bucket at each micro-step, so each computes the same
    sums without a collective."""
    per_micro = run.global_batch // run.config.train.grad_accum  # samples of one micro-step over all ranks
    tokens = 0
    for shape, micros in shapes.items():
        per_sample, samples = run.sparsity.flops_per_sample(step, shape), per_micro * micros
        run.state.flops += per_sample.executed * samples
        run.state.flops_dense += per_sample.dense * samples
        tokens += run.config.tokens_of(shape) * samples
    return tokens


# ------------------------------------------------------------------------------------------------- the loop

def train(cfg: Config | DictConfig) -> dict:
    """Runs (or resumes) the run in run_dir; returns the last logged values. A composed DictConfig is read (and
    checked) by `typed` first; train.py hands over the typed config it read."""
    config = cfg if isinstance(cfg, Config) else typed(cfg)
    check_launch(config.train)  # train.py's ConfigCheck refused these before Hydra made a directory; a library call
    if config.train.dry_run:
        return dry_run(config)
    # From here a stop signal ends the launch at its next safe point: the end of the build, an eval batch, a step.
    with StopSignals() as signals:
        return _launch(config, signals)


def _launch(config: Config, signals: StopSignals) -> dict:
    """The launch checked against the run directory, the run built under its lock, then trained."""
    precision = mixed_precision(config.train)
    accelerator = make_accelerator(config, precision)
    signals.announce = accelerator.print  # the main process says it, once
    run_dir = RunDir(config.run_dir)
    layout = make_layout(config.parallel, accelerator.num_processes, accelerator.process_index)
    global_batch = config.global_batch(layout.dp_size)
    # A bucketed run's end of the decay weighs the buckets' FLOPs by their draw proportions, known once the data is
    # built: build_run computes it then (the launch records it before it is recorded, below).
    lr_end = None if config.spec.buckets else LRSchedule(
        config.optim, config.train, SparsitySchedule(config.model, config.attn, config.spec), global_batch).end_step
    launch = Launch(cfg=config.source, processes=accelerator.num_processes, global_batch=global_batch,
                    resume=config.train.resume, data_parallel=layout.dp_size, lr_end_step=lr_end,
                    precision=precision.value, precision_source=precision.source,
                    code_commit=on_main(accelerator, code_commit),  # one git call per launch, on rank 0
                    data_commit=data_commit(config.data))  # resolved with the config check: no second call
    # Checked before anything is written: a launch that does not fit the run leaves its directory untouched (its
    # error names the directory).
    resume_from = on_main(accelerator, run_dir.check_launch, launch)
    accelerator.print(f"run_dir: {run_dir.path}\nprecision: {precision}")
    done = on_main(accelerator, _finished, config, run_dir, resume_from)
    if done is not None:  # nothing to train: no lock, no record, no tracker run
        accelerator.print(done["line"])
        _end_training(accelerator)
        return done["row"]
    note = on_main(accelerator, run_dir.budget_note, config.source) if resume_from is None else None
    if note:
        accelerator.print(note)
    with contextlib.ExitStack() as held:
        on_main(accelerator, lambda: held.enter_context(run_dir.lock(config.train.lock_stale_s)))
        _announce_build(config, accelerator, layout)
        with progress.heartbeat(accelerator.print, "building the run (model, data, eval set)"):
            run = build_run(config, accelerator, resume_from, layout,
                            report=progress.Eta("eval set", "inputs loaded", accelerator.print), lr_end=lr_end)
        launch = dataclasses.replace(launch, lr_end_step=run.lr_end)  # (a bucketed run's: known only now)
        run.code = launch.code_commit  # each checkpoint's state.json lists the code its weights were trained with
        stop = _agreed_stop(accelerator, signals)
        if stop:  # before the launch is recorded: the directory stays as it was
            _stop_before_training(run, signals, stop)
        on_main(accelerator, run_dir.record_launch, launch, resume_from)
        saver = Checkpointing(run, run_dir)
        _announce_start(run, run_dir)
        try:
            last = _loop(run, run_dir, saver, signals)
        finally:  # a crash still lets a checkpoint being written in the background finish, inside the lock
            saver.writer.close()
    return last


def _loop(run: Run, run_dir: RunDir, saver: Checkpointing, signals: StopSignals) -> dict:
    logger = MetricsLogger(run, run_dir)
    say = signals.announce = logger.say
    saver.announce_with(say)
    evaluator, sampler = Evaluator(run, say, stop=signals.requested), Sampler(run)
    _announce_compile(run, say)
    if run.state.step == 0 and run.resumed_from is None:  # the untrained model's eval loss anchors the curve
        row = evaluator.first_row()
        if row is None:  # a stop signal during it: nothing trained yet
            _stop_before_training(run, signals, signals.received or 0, logger)
        logger.file.log(row)
        logger.skip_pause()
    run.model.train()
    first_step = True  # of this launch: its time, compilation included, is worth a line
    while not run.finished():
        flops_before, started = run.state.flops, time.perf_counter()
        with progress.heartbeat(say, "first step") if first_step else contextlib.nullcontext():
            result = train_step(run, stop_signal=signals.received, save_failed=saver.writer.failed())
        if result.save_failed and not result.stop:  # (a stop's save is tried anyway and prints the error)
            saver.writer.wait()  # raises its error on every rank: the run stops now, not at the next save
        if first_step:
            first_step = False
            say(f"first step: {time.perf_counter() - started:.1f} s (compilation and the first batch included)")
        if not result.ok:
            _on_nonfinite(run, run_dir, saver, result)
            logger.rewind(run.state.step)
            continue
        logger.add(run.state.flops - flops_before, result.loss, result.tokens)
        row = logger.train_row(result) if logger.due(result.stop) else {}
        if evaluator.due(flops_before, result.stop) and not evaluator.into(row):
            # A stop signal ended the eval: the step is saved as a stop's (without its eval row).
            result.stop, result.stop_signal = True, signals.received or 0
        logger.write(row)
        saving, sampling = saver.due(result.stop), sampler.due(result.stop)
        ckpt = saver.save(stop=result.stop) if saving else None
        if sampling:
            sampler.sample()
        if result.stop:
            logger.close()
            _end_training(run.accelerator)
            signals.exit_for_requeue(ckpt, result.stop_signal)
        if row or saving or sampling:  # eval, saving and sampling are not throughput
            logger.skip_pause()
    logger.close()
    saver.finish()  # nothing should be in flight here (the last save is in the foreground); if it is, it ends now
    _finish(run, run_dir)
    return logger.last


def _agreed_stop(accelerator: Accelerator, signals: StopSignals) -> int:
    """The stop signal of any rank at a safe point outside a step (0: none), the same on every rank (a collective)."""
    counts = torch.tensor(slots(signals.received), device=accelerator.device)
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    return agreed(counts.tolist())


def _stop_before_training(run: Run, signals: StopSignals, signum: int, logger: MetricsLogger | None = None) -> None:
    """Stop signal `signum` before this launch's first step: nothing new to save; the run resumes (or starts) from
    where it was."""
    if logger is not None:
        logger.close()
    _end_training(run.accelerator)
    signals.exit_for_requeue(run.resumed_from, signum)


def _announce_build(config: Config, accelerator: Accelerator, layout: Layout) -> None:
    """Before the model is built (main process): its size, a rough training-memory estimate (vsa_train/progress.py)
    and a warning when this machine has less memory than that."""
    if not accelerator.is_main_process:
        return
    n_params = _count_params(config)
    est = progress.memory_estimate(n_params, config.model, config.train, config.peak_tokens, dp_size=layout.dp_size,
                                   sp_size=layout.sp_size, strategy=layout.strategy,
                                   precision=accelerator.mixed_precision)
    print(f"building the model: {config.model.name}, {n_params:,} parameters, {accelerator.device.type} ...\n"
          f"{progress.describe_memory(est)}", flush=True)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or 1)
    warning = progress.memory_warning(est, accelerator.device, local_processes=local)
    if warning:
        print(warning, flush=True)


def _finished(config: Config, run_dir: RunDir, resume_from) -> dict | None:
    """When the checkpoint to resume already ends the run under this launch's train.max_steps and
    train.flops_budget: {"line": one line saying so, with the final eval loss and where the metrics are, "row": the
    last metrics row}; else None."""
    state = read_state(resume_from) if resume_from is not None else None
    if state is None or not run_finished(config.train, state["step"], state["flops"]):
        return None
    rows = read_metrics(run_dir.metrics) if run_dir.metrics.is_file() else []
    evals = [r for r in rows if "eval/loss" in r]
    train, step = config.train, state["step"]
    why = (f"train.max_steps={train.max_steps}" if step >= train.max_steps else
           f"train.flops_budget={train.flops_budget:.3e} spent")
    loss = f"final eval/loss {evals[-1]['eval/loss']:.5f} (step {evals[-1]['step']})" if evals else "no eval loss"
    further = ("raise train.max_steps" if step >= train.max_steps else
               f"name it with run_dir={run_dir.path} and a larger train.flops_budget")
    return {"line": f"{run_dir.path} is finished at step {step} ({why}): {loss}; metrics in {run_dir.metrics}. "
                    f"To train it further, {further}.", "row": rows[-1] if rows else {"step": step}}


def _announce_start(run: Run, run_dir: RunDir) -> None:
    """What the run is: its size, FLOPs per sample, global batch and precision (its directory is said first)."""
    accelerator, per_sample, shapes = run.accelerator, run.sparsity.flops_per_sample(0), run.config.shapes
    accelerator.print(f"params: {sum(p.numel() for p in run.model.parameters())}\n"
                      + (f"flops_per_sample: {per_sample.executed:.4e} (dense {per_sample.dense:.4e})" if len(shapes) == 1
                         else "\n".join([f"{len(shapes)} buckets:",
                                         *progress.bucket_lines(run.sparsity, shapes, run.config.tokens_of)]))
                      + f"\nglobal batch: {run.global_batch} ({accelerator.num_processes} processes, "
                      f"{accelerator.mixed_precision} precision)")
    note = progress.vsa_flops_note(run.sparsity)
    if note:
        accelerator.print(note)


def _announce_compile(run: Run, say) -> None:
    train = run.config.train
    if train.compile and not run.finished():  # torch.compile compiles at the first call
        say(f"compiling (train.compile={train.compile}): the first step takes longer"
            f"{' (and the step-0 eval)' if run.state.step == 0 and run.resumed_from is None else ''}")


def _on_nonfinite(run: Run, run_dir: RunDir, saver: Checkpointing, result: StepResult) -> None:
    """train.on_nonfinite: stop (the weights stay as the last finite step left them), or roll back to the last
    healthy checkpoint, skip the batches that led here and go on (at most train.max_rollbacks times)."""
    train, accelerator = run.config.train, run.accelerator
    saver.writer.wait()  # a checkpoint still being written may be the one to roll back to
    run.health.add(float("nan"), run.state.step + 1)  # evidence against the weights of this step
    good = on_main(accelerator, run_dir.checkpoints.last_healthy, evidence=run.health.verdict)
    what = (f"non-finite training loss ({result.loss}) or gradient norm ({result.grad_norm}) at step "
            f"{run.state.step + 1}; this update was not applied")
    if train.on_nonfinite == "stop" or run.state.rollbacks >= train.max_rollbacks or good is None:
        _end_training(accelerator)
        why = ("train.on_nonfinite=stop" if train.on_nonfinite == "stop" else
               f"{run.state.rollbacks} rollbacks of train.max_rollbacks={train.max_rollbacks} used"
               if good is not None else "no healthy checkpoint to roll back to")
        raise FloatingPointError(
            f"{what}. Stopped ({why}). Last healthy checkpoint: {good}. Try train.on_nonfinite=rollback, a lower "
            f"optim.lr, or check the data.")
    skip_to, rollbacks = run.state.position, run.state.rollbacks + 1
    run.restore(load_checkpoint(accelerator, good, run.model, run.optimizer, run.ema))
    # The diverged trajectory's checkpoints go before training goes on: a crash must not resume from one of them
    # (the caller rewinds metrics.jsonl to this step).
    dropped = on_main(accelerator, run_dir.checkpoints.discard_after, run.state.step)
    run.state.position, run.state.rollbacks = skip_to, rollbacks
    run.restart_data()
    accelerator.print(f"{what}. Rolled back to {good} (step {run.state.step}); skipping the batches up to sample "
                      f"{skip_to} (rollback {rollbacks} of {train.max_rollbacks}); "
                      f"{dropped} checkpoints of the abandoned trajectory removed")


def _end_training(accelerator: Accelerator) -> None:
    """Trackers finished and the ranks' process group left together, kept alive (distributed.leave_together says
    why accelerate's end_training must not free it first)."""
    leave_together(accelerator)
    accelerator.end_training()


def _finish(run: Run, run_dir: RunDir) -> None:
    accelerator = run.accelerator
    if run.skipped:  # each was named once when met
        print(f"rank {accelerator.process_index}: skipped {len(run.skipped)} bad inputs (named in the warnings above "
              f"and in train.log; data/skipped in metrics.jsonl)", flush=True)
    budget = run.config.train.flops_budget
    if run.budget_spent():
        accelerator.print(progress.budget_line(budget, run.state.step, run.state.flops))
    elif budget is not None:
        accelerator.print(f"train.max_steps={run.config.train.max_steps} ended the run before the flops budget "
                          f"{budget:.3e}: {run.state.flops:.3e} executed ({100 * run.state.flops / budget:.3g}%)")
    # One line per rank: equal fingerprints mean the replicas ended with the same weights. Before the process group
    # is left: under FSDP it sums the shards of all ranks.
    fingerprint = weights_fingerprint(accelerator.unwrap_model(run.model))
    _end_training(accelerator)
    if accelerator.is_main_process:
        from .analysis.plot import plot_loss_vs_flops  # here: matplotlib costs every launch ~0.5 s of start-up

        plot_loss_vs_flops(run_dir.metrics, run_dir.path / "loss_vs_flops.png", title=run_dir.path.name)
    print(f"rank {accelerator.process_index}/{accelerator.num_processes}: finished at step {run.state.step}, "
          f"weights fingerprint {fingerprint:.10e}", flush=True)


# ------------------------------------------------------------------------------------------ checks, dry run

def _count_params(config: Config) -> int:
    with torch.device("meta"):  # counts parameters without allocating them
        model = build_model(config.model, config.attn, in_channels=config.spec.in_channels,
                            text_dim=config.spec.text_dim)
    return sum(p.numel() for p in model.parameters())


def dry_run(cfg: Config | DictConfig) -> dict:
    """Builds the model on the meta device (no weights allocated) and prints a short summary: the choices, the
    parameters, FLOPs per sample, a memory estimate and the run directory it would use. Writes nothing (under Hydra
    its directory is a temporary one: vsa_train.rundir.HydraRunDir); `--cfg job` prints the whole config."""
    config = cfg if isinstance(cfg, Config) else typed(cfg)
    n_params = _count_params(config)
    spec = config.spec
    flops = training_flops_per_sample(config.model, config.attn, in_channels=spec.in_channels, text_dim=spec.text_dim,
                                      video_shape=spec.video_shape, text_len=spec.text_len)
    print(f"dry run: model={config.model.name} attn={config.attn.name} data={config.data.name} "
          f"({'x'.join(map(str, spec.video_shape))} -> {config.tokens} tokens per sample); nothing is written")
    if config.run_dir is not None:
        print(f"run_dir (not created): {config.run_dir}")
    precision = mixed_precision(config.train)
    print(f"precision: {precision}")
    print(f"params: {n_params}")
    print(f"flops_per_sample: {flops.executed:.6e}")
    print(f"flops_per_sample_dense: {flops.dense:.6e}")
    schedule = SparsitySchedule(config.model, config.attn, spec)
    if len(config.shapes) > 1:  # at the target topk, as the lines above
        print(f"{len(config.shapes)} buckets (the lines above: the first; memory: the largest):")
        print("\n".join(progress.bucket_lines(schedule, config.shapes, config.tokens_of, schedule.steady_from())))
    estimate = progress.memory_estimate(n_params, config.model, config.train, config.peak_tokens,
                                        precision=precision.value)
    print(progress.describe_memory(estimate, "one process, unsharded"))
    result = {"params": n_params, "flops_per_sample": flops.executed, "flops_per_sample_dense": flops.dense}
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
