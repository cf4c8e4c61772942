"""Parallelism beside the model (the model code stays single-device): the rank layout, FSDP2, Ulysses sequence
parallelism and regional compilation. The `parallel` config section is the one place that sets the layout:

    parallel.strategy  ddp | fsdp   data parallel by DDP (accelerate), or FSDP2 `fully_shard` per DiT block and
                                    the root (bf16 all-gathers, fp32 master weights and gradient reduction)
    parallel.sp_size   N            Ulysses: each rank of a group of N holds S/N tokens; around self-attention
                                    an all-to-all gives it all tokens of H/N heads (dense or VSA) and back
    parallel.reshard_after_forward  FSDP2: free gathered block weights after forward (less memory, one more
                                    all-gather in the backward)

Data parallelism runs over world / sp_size groups: ranks of one sequence-parallel group see the same batch and
draw the same noise. Every rank computes the same (gathered) loss, so each rank's parameter gradient is the
part of the full gradient that its tokens contribute; the trainer multiplies the loss by sp_size so that the
data-parallel mean over all ranks is the mean over data-parallel groups of full gradients.
"""
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.nn.functional import all_to_all_single

from .fields import ConfigError
from .sections import ParallelConfig


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: world size, sequence-parallel group size, data-parallel coordinates."""

    world: int = 1
    rank: int = 0
    sp_size: int = 1
    strategy: str = "ddp"
    reshard_after_forward: bool = True

    @property
    def dp_size(self) -> int:
        return self.world // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size


def make_layout(parallel: ParallelConfig, world: int, rank: int) -> Layout:
    """The layout from the (checked) `parallel` section and the process count, which sp_size must divide."""
    sp = parallel.sp_size
    if world % sp:
        raise ConfigError([f"parallel.sp_size={sp} must divide the {world} processes"])
    return Layout(world=world, rank=rank, sp_size=sp, strategy=parallel.strategy,
                  reshard_after_forward=parallel.reshard_after_forward)


def sp_group(layout: Layout):
    """This rank's sequence-parallel process group (ranks dp*N ... dp*N + N-1). Every rank must call it."""
    mine = None
    for dp in range(layout.dp_size):  # new_group is collective over all ranks, for every group
        group = dist.new_group(list(range(dp * layout.sp_size, (dp + 1) * layout.sp_size)))
        if dp == layout.dp_rank:
            mine = group
    return mine


# ------------------------------------------------------------------------------------------ sequence parallel

def _heads_to_tokens(x: torch.Tensor, n: int, group) -> torch.Tensor:
    """[B, s, H, D] (this rank's s tokens, all heads) -> [B, n*s, H/n, D] (all tokens, this rank's heads)."""
    B, s, H, D = x.shape
    send = x.reshape(B, s, n, H // n, D).permute(2, 0, 1, 3, 4).contiguous()  # [n, B, s, H/n, D]: chunk j to rank j
    recv = all_to_all_single(torch.empty_like(send), send, group=group)         # [n, B, s, H/n, D]: chunk j from j
    return recv.permute(1, 0, 2, 3, 4).reshape(B, n * s, H // n, D)            # tokens in rank order


def _tokens_to_heads(x: torch.Tensor, n: int, group) -> torch.Tensor:
    """Inverse of `_heads_to_tokens`: [B, n*s, H/n, D] -> [B, s, H, D]."""
    B, S, h, D = x.shape
    send = x.reshape(B, n, S // n, h, D).permute(1, 0, 2, 3, 4).contiguous()  # [n, B, s, H/n, D]: tokens of rank j
    recv = all_to_all_single(torch.empty_like(send), send, group=group)     # [n, B, s, H/n, D]: heads of rank j
    return recv.permute(1, 2, 0, 3, 4).reshape(B, S // n, n * h, D)


class Ulysses:
    """Runs a self-attention core on all tokens of H/N heads: gates on local tokens, all-to-all, attend, back.

    A plain object set on each SelfAttention (not a module): parameter names stay those of the plain model.
    """

    def __init__(self, shard: "TokenShard"):
        self.shard = shard

    def __call__(self, core: nn.Module, q, k, v, x, ctx):
        n, group, S = self.shard.n, self.shard.group, self.shard.seq_len
        gates = core.gates(x, q.shape[2])                                    # [B, s, H, D] each, or None
        full = [None if t is None else _heads_to_tokens(t, n, group)[:, :S] for t in (q, k, v, *gates)]
        out = core.attend(*full, ctx)                                        # [B, S, H/n, D] (padding dropped)
        out = F.pad(out, (0, 0, 0, 0, 0, self.shard.padded_len - S))        # [B, n*s, H/n, D]
        return _tokens_to_heads(out, n, group)                               # [B, s, H, D]


class _GatherTokens(torch.autograd.Function):
    """All-gather along tokens; backward keeps this rank's slice (every rank computes the same loss from the
    gathered tensor, so each already holds the whole gradient: summing the copies would count it n times)."""

    @staticmethod
    def forward(ctx, x, n, rank, group):
        ctx.n, ctx.rank = n, rank
        out = torch.empty((n * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)  # ranks along dim 0
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        out = out.view(n, *x.shape).transpose(0, 1)                                       # [B, n, s, C]
        return out.reshape(x.shape[0], n * x.shape[1], *x.shape[2:])                      # [B, n*s, C]

    @staticmethod
    def backward(ctx, grad):
        s = grad.shape[1] // ctx.n
        return grad[:, ctx.rank * s:(ctx.rank + 1) * s], None, None, None


class TokenShard:
    """Splits the token sequence over a sequence-parallel group (padded to a multiple of its size) and gathers it.

    Tokens are split after the model's permutation (tile order for VSA), so each rank holds a contiguous run of
    S/N tokens; pad tokens (zeros) only pass through per-token layers and are dropped before self-attention and
    after the gather.
    """

    def __init__(self, n: int, rank: int, group):
        self.n, self.rank, self.group = n, rank, group
        self.seq_len = self.padded_len = 0

    def split(self, x: torch.Tensor, ctx):
        """x [B, S, d] -> this rank's [B, S_pad/n, d]; ctx with the RoPE angles of those tokens."""
        S = x.shape[1]
        self.seq_len, self.padded_len = S, -(-S // self.n) * self.n
        s = self.padded_len // self.n
        mine = slice(self.rank * s, (self.rank + 1) * s)

        def local(t):  # [S, ...] or [B, S, ...] along dim `dim`: padded, this rank's slice
            dim = t.dim() - 2 if t.dim() == 2 else 1
            pad = [0, 0] * (t.dim() - dim - 1) + [0, self.padded_len - S]
            return F.pad(t, pad).narrow(dim, mine.start, s)

        return local(x), replace(ctx, cos=local(ctx.cos), sin=local(ctx.sin))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S_pad/n, C] -> [B, S, C] on every rank of the group."""
        return _GatherTokens.apply(x, self.n, self.rank, self.group)[:, :self.seq_len]


def apply_sequence_parallel(model: nn.Module, layout: Layout, group) -> None:
    """Makes `model` (a VideoDiT) sequence-parallel over `group`: token split/gather and Ulysses cores, in place."""
    shard = TokenShard(layout.sp_size, layout.sp_rank, group)
    model.token_shard = shard
    for block in model.blocks:
        block.attn.sequence_parallel = Ulysses(shard)


# ------------------------------------------------------------------------------------------------- FSDP2

def apply_fsdp(model: nn.Module, layout: Layout, param_dtype: torch.dtype | None) -> None:
    """FSDP2 in place: `fully_shard` per DiT block, then the root (embeddings, final layer). Gradients are
    reduced in fp32; weights are all-gathered in `param_dtype` (bf16 on GPUs), master weights stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp, reshard_after_forward=layout.reshard_after_forward)
    fully_shard(model, mp_policy=mp, reshard_after_forward=layout.reshard_after_forward)


def compile_blocks(model: nn.Module, shapes: int = 1, backend: str = "inductor") -> None:
    """Regional compilation: each DiT block compiled in place, for static shapes. The blocks share one code object,
    so dynamo compiles one block and reuses it for the others (parameters are graph inputs); names stay unchanged."""
    allow_graphs(shapes)
    for block in model.blocks:
        # Static: one graph per video shape (bucket), each specialised like a single-shape run's, instead of dynamo
        # turning to a dynamic-shape graph at the second shape (VSA's tile tables are per-shape constants anyway).
        block.compile(dynamic=False, backend=backend)


def compile_model(model: nn.Module, shapes: int = 1, backend: str = "inductor") -> None:
    """The whole model compiled in place (train.compile=model), for static shapes: one graph per video shape."""
    allow_graphs(shapes)
    model.compile(dynamic=False, backend=backend)


def allow_graphs(shapes: int) -> None:
    """Dynamo's recompile limit (graphs per code object) raised to its default for each video shape of the run, so
    that a bucketed run's shapes (times the ramp's topk values, dense and sparse blocks) never fall back to eager."""
    import torch._dynamo.config as dynamo

    dynamo.recompile_limit = max(dynamo.recompile_limit, 8 * shapes)


def is_fsdp(model: nn.Module) -> bool:
    """Whether the model is laid out by FSDP2 (`apply_fsdp` shards the root too). Asked of the module, not the
    parameters: after a no-grad forward under reshard_after_forward=false those are plain tensors for a while."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def weights_fingerprint(model: nn.Module) -> float:
    """The float64 sum of every weight of the whole model, the same number on every rank (a collective under FSDP)."""
    total = 0.0
    for p in model.parameters():
        local = p.detach().double().sum()
        # A sharded parameter's sum is a partial DTensor: full_tensor() all-reduces it over the shards, so that
        # FSDP ranks print the whole model's sum, not their own shard's (which would look like diverged replicas).
        total += (local.full_tensor() if hasattr(local, "full_tensor") else local).item()
    return total


def gradient_sync(model: nn.Module, accelerator, sync: bool):
    """Context for one micro-step's backward: gradients reduced across ranks only when `sync` (the last one)."""
    import contextlib

    if is_fsdp(model):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else accelerator.no_sync(model)


def clip_grad_norm(model: nn.Module, accelerator, max_norm: float) -> torch.Tensor:
    """Clips to `max_norm` and returns the global gradient norm (a plain tensor, also under FSDP's DTensors)."""
    if not is_fsdp(model):
        return accelerator.clip_grad_norm_(model.parameters(), max_norm)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
