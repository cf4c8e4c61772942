"""The loop's periodic work, one component each: metrics rows and status lines (`MetricsLogger`), the eval loss
(`Evaluator`), checkpoints (`Checkpointing`) and sample videos (`Sampler`). After every step each one answers "is
it time?" (`due`, from the run's counters: every N steps, at FLOPs multiples, at the end; a stop signal's step
only logs and saves) and does its own work; vsa_train/trainer.py calls them in order.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from .checkpoint import Checkpointer
from .evaluation import eval_captions, eval_groups, evaluate
from .metrics import MetricsLog, define_flops_axis, wandb_init_kwargs, wandb_project
from .progress import Eta
from .rundir import RunDir
from .sampling import save_samples
from .schedules import end_step
from .training_run import Run


def every(step: int, n: int | None) -> bool:
    return bool(n) and step % n == 0


class Window:
    """Throughput and mean loss since the last logged row."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.samples, self.tokens, self.flops, self.losses = time.perf_counter(), 0, 0, 0.0, []

    def add(self, samples: int, flops: float, loss: float, tokens: int) -> None:
        self.samples, self.tokens, self.flops = self.samples + samples, self.tokens + tokens, self.flops + flops
        self.losses.append(loss)

    def row(self) -> dict:
        elapsed = time.perf_counter() - self.start
        return {"train/loss": sum(self.losses) / max(len(self.losses), 1), "samples/s": self.samples / elapsed,
                "tokens/s": self.tokens / elapsed, "TFLOP/s": self.flops / elapsed / 1e12}


class MetricsLogger:
    """metrics.jsonl and the trackers (wandb), the progress bar and the run's status lines (`say`)."""

    def __init__(self, run: Run, run_dir: RunDir):
        self.run, self.run_dir, self.main = run, run_dir, run.accelerator.is_main_process
        config, accelerator, state = run.config, run.accelerator, run.state
        accelerator.init_trackers(wandb_project(config), config=OmegaConf.to_container(config.source, resolve=True),
                                  init_kwargs={"wandb": wandb_init_kwargs(config, run_dir.path)})
        define_flops_axis(accelerator)
        self.rewind(state.step if run.resumed_from is not None else -1)
        train = config.train
        # A run the FLOPs budget ends gets a bar in FLOPs (total = the budget), not in steps of train.max_steps.
        self.by_flops = train.flops_budget is not None and end_step(
            train.max_steps, train.flops_budget, run.sparsity, run.global_batch, exact_steps=100_000) < train.max_steps
        if self.by_flops:
            self.bar = tqdm(total=train.flops_budget, initial=state.flops, unit="FLOP", unit_scale=True,
                            disable=not self.main, desc="train", dynamic_ncols=True)
        else:
            self.bar = tqdm(total=train.max_steps, initial=state.step, disable=not self.main, desc="train",
                            dynamic_ncols=True)
        self.last = {"step": state.step}
        self.stepped = time.perf_counter()  # when the last step ended (its bar update)

    def say(self, message: str) -> None:
        """A status line from the main process (tqdm.write: it stays above the bar, also once closed)."""
        if self.main:
            self.bar.write(message)

    def rewind(self, resume_step: int) -> None:
        """metrics.jsonl from the row of `resume_step` on (-1: a fresh file); the window starts over."""
        self.file = MetricsLog(self.run_dir.metrics, self.run.accelerator, resume_step=resume_step)
        self.window = Window()

    def add(self, flops: float, loss: float, tokens: int) -> None:
        """A step taken: its FLOPs, loss and video tokens count into the next row; the bar moves."""
        self.window.add(self.run.global_batch, flops, loss, tokens)
        # In FLOPs the bar stops at the budget; the end line says by how much the last step overshot it.
        self.bar.update(min(flops, max(0.0, self.bar.total - self.bar.n)) if self.by_flops else 1)
        self.stepped = time.perf_counter()

    def skip_pause(self) -> None:
        """Eval, saving or sampling ran since the last step: the next row's throughput starts now, and the bar's
        rate, from which tqdm estimates the time left, leaves their time out (the ETA would jump after each)."""
        self.window.reset()
        if not self.bar.disable:  # tqdm's rate: progress over the time since its last refresh (a step's end)
            self.bar.last_print_t += time.perf_counter() - self.stepped

    def due(self, stopping: bool) -> bool:
        return every(self.run.state.step, self.run.config.train.log_every) or self.run.finished() or stopping

    def train_row(self, result) -> dict:
        """Loss, throughput, lr, gradient norm, selection, skipped inputs (a collective), MFU and memory on GPUs."""
        run, accelerator = self.run, self.run.accelerator
        row = dict(self.window.row(), lr=result.lr, grad_norm=result.grad_norm, **run.sparsity.row(run.state.step - 1))
        row["train/rollbacks"] = run.state.rollbacks
        row["data/skipped"] = accelerator.reduce(torch.tensor(len(run.skipped), device=accelerator.device),
                                                 reduction="sum").item()
        row["TFLOP/s/device"] = row["TFLOP/s"] / accelerator.num_processes  # sharded or not: per sample / devices
        if accelerator.device.type == "cuda":  # utilisation per device against its dense bf16 peak
            row["MFU"] = row["TFLOP/s/device"] / run.config.train.peak_tflops
            row["mem/peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        self.bar.set_postfix(**({"step": run.state.step} if self.by_flops else {}), loss=f"{row['train/loss']:.4f}",
                             refresh=False)
        return row

    def write(self, row: dict) -> None:
        """Logs a row (if any) with the run's counters."""
        if not row:
            return
        state = self.run.state
        row = dict(step=state.step, flops=state.flops, flops_dense=state.flops_dense, samples=state.samples, **row)
        self.file.log(row)
        self.last.update(row)

    def close(self) -> None:
        self.bar.close()


class Evaluator:
    """The fixed eval set's loss (and the EMA weights'): every train.eval_every steps, each time cumulative FLOPs
    pass a multiple of train.eval_every_flops, and at the end; never at a stop. A long one prints its progress
    (progress.Eta) and gives up at a stop signal (`stop`, asked after each batch)."""

    def __init__(self, run: Run, say, stop=None):
        self.run, self.say, self.stop = run, say, stop

    def due(self, flops_before: float, stopping: bool) -> bool:
        train, state = self.run.config.train, self.run.state
        crossed = train.eval_every_flops is not None and (
            math.floor(state.flops / train.eval_every_flops) > math.floor(flops_before / train.eval_every_flops))
        return (every(state.step, train.eval_every) or self.run.finished() or crossed) and not stopping

    def into(self, row: dict) -> bool:
        """eval/loss (mean) and eval/loss_t<t> per timestep; the same under eval/loss_ema for the EMA weights.
        False (the row untouched): a stop signal ended the evaluation."""
        run = self.run
        models = [(run.model, "eval/loss", "eval")] + ([(run.ema.module, "eval/loss_ema", "eval (EMA)")]
                                                       if run.ema is not None else [])
        values = {}
        for model, key, what in models:
            loss = evaluate(model, run.eval_set, run.accelerator, run.config.train.eval_batch_size, run.layout,
                            stop=self.stop, report=Eta(what, "batches", self.say))
            if loss is None:
                return False
            values.update(loss.row(key))
        row.update(values)
        self.say(f"step {run.state.step}: eval/loss {row['eval/loss']:.5f}")
        return True

    def first_row(self) -> dict | None:
        """The untrained model's row at step 0, which anchors the curve (None: a stop signal ended it)."""
        run, train = self.run, self.run.config.train
        run.sparsity.apply(0, run.accelerator.unwrap_model(run.model), run.ema and run.ema.module)
        groups = eval_groups(run.eval_set)  # a bucketed eval set: eval_samples videos per bucket
        videos = sum(len(g["caption"]) for g in groups)
        buckets = f" in {len(groups)} buckets" if len(groups) > 1 else ""
        self.say(f"evaluating {videos} videos{buckets} x {train.eval_timesteps} timesteps"
                 f"{' (weights and EMA)' if run.ema is not None else ''} ...")
        row = {"step": 0, "flops": 0.0, "flops_dense": 0.0, **run.sparsity.row(0)}
        return row if self.into(row) else None


class Sampler:
    """Sample videos every train.sample_every steps and at the end (after saving: a failure here cannot cost the
    weights); never at a stop. The prompts are train.sample_prompts (else the first train.sample_count eval
    captions), each from the noise of its train.sample_seeds seed: the same in every run of a sweep."""

    def __init__(self, run: Run):
        self.run = run

    def due(self, stopping: bool) -> bool:
        n = self.run.config.train.sample_every
        return (every(self.run.state.step, n) or (self.run.finished() and bool(n))) and not stopping

    def sample(self) -> None:
        run = self.run
        model = run.ema.module if run.ema is not None else run.accelerator.unwrap_model(run.model)
        train = run.config.train
        prompts = list(train.sample_prompts or eval_captions(run.eval_set)[: train.sample_count])
        save_samples(model, run.config, prompts, train.prompt_seeds(), run.state.step, run.accelerator)


class Checkpointing:
    """Checkpoints every train.ckpt_every steps, at a stop and at the end (vsa_train/checkpoint.py writes them):
    a periodic one in the background (train.ckpt_background), a stop's and the last one in the foreground."""

    def __init__(self, run: Run, run_dir: RunDir):
        self.run, self.say = run, None
        self.writer = Checkpointer(run.accelerator, run_dir.checkpoints, run.config.train.keep_checkpoints)

    def announce_with(self, say) -> None:
        """Status lines (saving, saved in N s) go to `say`, the main process's printer."""
        self.say = self.writer.announce = say

    def due(self, stopping: bool) -> bool:
        return every(self.run.state.step, self.run.config.train.ckpt_every) or self.run.finished() or stopping

    def save(self, stop: bool = False) -> Path | None:
        """Saves the current step (its directory, or None while written in the background)."""
        run = self.run
        last_one = stop or run.finished()  # inside StopSignals: a SIGTERM cannot cut it
        if self.say is not None and run.accelerator.is_main_process:
            self.say(f"saving checkpoint step {run.state.step} ...")
        if not run.health.healthy():
            run.accelerator.print(f"warning: saving step {run.state.step} while the loss is not healthy "
                                  f"({run.health.describe()}); it will not be used as a rollback point")
        path = self.writer.save(run.model, run.optimizer, run.ema, run.counters(),
                                background=run.config.train.ckpt_background and not last_one, stop=stop)
        run.saved_step = run.state.step
        return path

    def finish(self) -> None:
        """The end of the loop: the last step saved (a no-op if it is), nothing left in flight."""
        if self.run.saved_step != self.run.state.step:  # a run with nothing left to do
            self.save()
        self.writer.wait()
