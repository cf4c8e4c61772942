"""What a long job tells its user while it runs (issue #14, "honest progress"): the training-memory estimate and
the warning when the machine has less, the VSA-costs-more-than-dense note, the FLOPs budget's end line, and
progress lines for long work that has no bar of its own (issue 29: evaluation, the eval set's inputs, the first
step), so that it does not look hung.

Pure functions returning text (or None), which vsa_train/trainer.py prints on the main process; `Eta` and
`heartbeat` print through the `say` they are given.

Memory estimate (per process, a rough one, labelled so wherever it is printed):

- fp32 weights + gradients + AdamW's two states: 16 bytes per parameter (divided over the data-parallel ranks
  under parallel.strategy=fsdp, which shards all four);
- the EMA copy (train.ema): 4 bytes per parameter;
- activations kept for the backward: ~28 values per video token per hidden unit per block (norms and AdaLN
  modulations, q/k/v and attention output, cross-attention, the 4x-wide MLP before and after its activation;
  measured on an H200 at dit_1b, batch 2, bf16, no checkpointing: 26 dense, 30 VSA), times train.batch_size,
  times 2 bytes under bf16/fp16 autocast or 4 in fp32; tokens divided by parallel.sp_size. A block recomputed in
  the backward (model.grad_checkpointing: full = every block, selective = every other one) keeps only its input,
  the residual stream, which stays fp32 under autocast (4 bytes), plus one block's activations while it is
  recomputed. (dit_1b VSA, full, batch 13: estimate 77 GiB, measured peak 75.8.) Attention score matrices
  (materialised by non-fused attention paths), the eval batch, the allocator's slack and framework overhead are
  not counted.
"""
import contextlib
import math
import os
import threading
import time

import torch

from .models import is_wan, model_config
from .models.dit import checkpointing_policy

GiB = 2**30
LONG_S = 10.0   # work that looks longer than this (after its first unit) gets progress lines
EVERY_S = 30.0  # and then at most one line per this many seconds: a log file stays readable
VALUES_PER_TOKEN_DIM = 28  # activations kept per video token, per hidden unit, per block (see the docstring)


def memory_estimate(n_params: int, model_cfg, train, tokens: int, *, dp_size: int = 1, sp_size: int = 1,
                    strategy: str = "ddp", precision: str = "no") -> dict:
    """Bytes per process: {"states", "ema", "activations", "total"} (see the module docstring), from the `model`
    and `train` sections."""
    shard = dp_size if strategy == "fsdp" else 1
    states = 16 * n_params / shard
    ema = 4 * n_params if train.ema is not None else 0
    value_bytes = 2 if precision in ("bf16", "fp16") else 4
    shape = model_config(model_cfg) if is_wan(model_cfg) else model_cfg  # Wan: its folder's shape with a path
    d, depth = shape.hidden_size, shape.depth
    values = math.ceil(tokens / sp_size) * d * train.batch_size  # one [B, S/sp, d] tensor
    per_block = VALUES_PER_TOKEN_DIM * values * value_bytes
    ckpt = checkpointing_policy(shape.grad_checkpointing) or "none"
    recomputed = {"full": depth, "selective": math.ceil(depth / 2)}.get(ckpt, 0)  # blocks i % 2 == 0 for selective
    # A recomputed block keeps its fp32 input; while it is recomputed, one block's activations live again.
    activations = (depth - recomputed) * per_block + recomputed * (4 * values) + (per_block if recomputed else 0)
    return {"states": states, "ema": ema, "activations": activations, "total": states + ema + activations}


def size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def describe_memory(est: dict, scope: str = "per process") -> str:
    ema = f" + EMA {size(est['ema'])}" if est["ema"] else ""
    return (f"training memory estimate (rough, {scope}): {size(est['total'])} = weights+grads+AdamW "
            f"{size(est['states'])}{ema} + activations ~{size(est['activations'])} (how: vsa_train/progress.py)")


def total_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes, what) of the memory the run lives in: the GPU's, or the machine's RAM; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory, "GPU memory"
    try:
        import psutil

        return int(psutil.virtual_memory().total), "RAM"
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"
    except (ValueError, OSError, AttributeError):
        return None


def memory_warning(est: dict, device: torch.device, local_processes: int = 1) -> str | None:
    """A warning when the device (a GPU per process, or the RAM all of this node's processes share) holds less
    than the estimate."""
    have = total_memory(device)
    if have is None:
        return None
    total, what = have
    need = est["total"] * (1 if device.type == "cuda" else max(1, local_processes))
    if need <= total:
        return None
    who = "per process" if device.type == "cuda" or local_processes <= 1 else f"for {local_processes} processes"
    return (f"warning: this machine has {size(total)} of {what}, less than the {size(need)} "
            f"estimated {who}: the run may run out of memory (lower train.batch_size, set "
            f"model.grad_checkpointing=full, or shard with parallel.strategy=fsdp)")


def vsa_flops_note(sparsity) -> str | None:
    """One line when VSA at this size executes more FLOPs per sample than dense attention (few tiles: the top-k
    fine stage plus the coarse stage and the gates), at the target topk or, for a ramp, at its first step."""
    if sparsity.vsa is None:
        return None
    target = sparsity.vsa.topk_in_force(sparsity.tiles)
    at_target = sparsity.flops_per_sample(sparsity.steady_from())  # the target topk, once any ramp is done
    first = sparsity.flops_per_sample(0)
    if at_target.executed > at_target.dense:
        return (f"note: VSA here executes more FLOPs than dense: {at_target.executed:.4e} vs {at_target.dense:.4e} "
                f"per sample (+{100 * (at_target.executed / at_target.dense - 1):.1f}%; topk {target} of "
                f"{sparsity.tiles} tiles, plus the coarse stage and gates)")
    if first.executed > first.dense:
        return (f"note: VSA's ramp starts above dense: {first.executed:.4e} vs {first.dense:.4e} FLOPs per sample "
                f"at step 0 (topk {sparsity.topk(0)} of {sparsity.tiles} tiles), {at_target.executed:.4e} at the "
                f"target topk {target}")
    return None


def bucket_lines(sparsity, shapes, tokens_of, step: int = 0) -> list[str]:
    """One line per shape of a bucketed run: its tokens, executed (and dense) FLOPs per sample at step `step` and,
    with VSA, its topk of its own tiles; with the buckets' draws known (after the data is built), each one's share
    of the steps and the expected FLOPs per sample over them."""
    draws = sparsity.draws if len(sparsity.draws) > 1 else {}
    lines = []
    for shape in shapes:
        flops, share = sparsity.flops_per_sample(step, shape), draws.get(tuple(shape))
        topk = sparsity.topk(step, shape)
        lines.append(f"  bucket {'x'.join(map(str, shape))}: {tokens_of(shape)} tokens, flops_per_sample "
                     f"{flops.executed:.4e} (dense {flops.dense:.4e})"
                     + (f", topk {topk} of {sparsity.tiles_of(shape)} tiles" if topk is not None else "")
                     + (f", {share:.1%} of the steps" if share is not None else ""))
    if draws:
        lines.append(f"  expected over the draws: flops_per_sample {sparsity.expected_flops(step):.4e}")
    return lines


def budget_line(budget: float, step: int, executed: float) -> str:
    """The end of a run stopped by train.flops_budget: met exactly, or by how much the last step overshot it."""
    over = executed - budget
    if over <= 0:
        return f"flops budget {budget:.3e} reached exactly at step {step}: {executed:.3e} executed"
    return (f"flops budget {budget:.3e} reached at step {step}: {executed:.3e} executed "
            f"({100 * over / budget:+.3g}%, the last step crosses it)")


def seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f} min"


class Eta:
    """Progress lines for long work of known size, `say`'s "eval: 1/32 batches in 1.6 min, ~49.3 min left": the
    first once the first unit is done and the whole looks longer than LONG_S, then at most every EVERY_S seconds;
    none for short work, none at the last unit (its caller's own line ends the work). Called as
    `eta(done, total)`; `clock` is the time source (tests give their own)."""

    def __init__(self, what: str, unit: str, say, clock=time.perf_counter):
        self.what, self.unit, self.say, self.clock = what, unit, say, clock
        self.start, self.last = clock(), None

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        elapsed = now - self.start
        if not 0 < done < total:
            return
        left = elapsed / done * (total - done)
        if (elapsed + left >= LONG_S) if self.last is None else (now - self.last >= EVERY_S):
            self.last = now
            self.say(f"{self.what}: {done}/{total} {self.unit} in {seconds(elapsed)}, ~{seconds(left)} left")


@contextlib.contextmanager
def heartbeat(say, what: str, every_s: float = EVERY_S):
    """While the block runs, `say`s "<what>: 1.0 min so far" every `every_s` seconds: long work of unknown length
    (the first step, compilation included), from a daemon thread."""
    done, start = threading.Event(), time.perf_counter()

    def beat() -> None:
        while not done.wait(every_s):
            say(f"{what}: {seconds(time.perf_counter() - start)} so far")

    thread = threading.Thread(target=beat, name=f"heartbeat: {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
