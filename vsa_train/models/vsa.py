"""Video Sparse Attention as a self-attention core of the DiT, and its config: sparsity, schedule, selection rules.

The model keeps its tokens in tile order for the whole forward (`VSAAttention.token_order`, applied once by
VideoDiT; RoPE positions follow). The core pads to whole tiles only when the grid has edge tiles. One
fine-stage kernel (`vsa_train.ops.block_sparse_attention`) serves every variant; they differ in how key
tiles are selected and whether the coarse output is added:

    vsa               coarse + fine, top-k tiles by coarse score  (the op `video_sparse_attention_tiled`)
    vsa_fine_only     fine only, top-k tiles by coarse score (no coarse output)
    vsa_coarse_only   coarse output only (no fine stage)
    tile_window       fine only, a fixed window of neighbouring tiles (the paper's fixed-pattern baseline)
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..fields import Section, choice, flag, int_list, integer, is_int, number, positive, read_or_raise, setting, text
from ..ops import (
    TileLayout,
    block_sparse_attention,
    coarse_attention,
    local_tile_mask,
    q2k_from_mask,
    tile_mean,
    topk_tiles,
    video_sparse_attention_tiled,
)
from ..ops import warm
from ..ops.launch import HAVE_TRITON, NO_TRITON
from ..ops.vsa import warm_up

SCHEDULES = ("constant", "ramp")
# Attribute (and state-dict name) of the coarse gate VSA adds to each self-attention of a diffusers Wan
# (models/wan_vsa.py). Here, without diffusers, so that init_from (checkpoint.py) knows such gates are new.
WAN_GATE = "vsa_gate_coarse"
SELECTIONS = ("topk", "window")


def backend_where_loaded(backend: str) -> str:
    """The VSA backend of a saved model where it is loaded: its own, or the PyTorch path without Triton (an export
    carries no kernels: integrations/remote_code.py)."""
    return backend if HAVE_TRITON else "torch"


@dataclass(frozen=True)
class VSAConfig(Section):
    """The keys of a VSA `attn` config (configs/attn/vsa.yaml documents each), each with its rule."""

    name: str = text()
    sparsity: float = number(0.875, lambda v: 0 <= v < 1, "a number in [0, 1)")
    topk: int | None = integer(None, optional=True)
    tile: tuple[int, int, int] = int_list(3, 1, (4, 4, 4), "3 positive integers [t, h, w]")
    gate_coarse: bool = flag(True)
    gate_fine: bool = flag(False)
    # within model.depth: the root config's rule (vsa_train/config_schema.py)
    dense_layers: tuple[int, ...] = setting([], ok=lambda v: isinstance(v, (list, tuple)) and all(
        is_int(i) and i >= 0 for i in v), allowed="a list of block indices", convert=tuple)
    schedule: str = choice("constant", SCHEDULES)
    ramp_rate: float = positive(0.125)
    ramp_interval: int = integer(100)
    coarse: bool = flag(True)
    fine: bool = flag(True)
    select: str = choice("topk", SELECTIONS)
    window: tuple[int, int, int] = int_list(3, 0, (1, 1, 1), "3 integers >= 0 [t, h, w]")
    backend: str = choice("auto", ("auto", "triton", "torch"))

    @classmethod
    def from_cfg(cls, attn_cfg) -> VSAConfig:
        """The config from a dict or DictConfig (or itself); ConfigError listing every bad key or value."""
        return read_or_raise(cls, attn_cfg, "attn")

    def validate(self) -> list[str]:
        if self.backend == "triton" and not HAVE_TRITON:  # at launch, not at the first forward
            return [f"attn.backend=triton needs {NO_TRITON}; or attn.backend=auto (PyTorch on CPU)"]
        if not (self.coarse or self.fine):
            return ["attn.coarse=false and attn.fine=false: at least one of them must be true"]
        if self.select == "window" and self.coarse:
            return ["attn.coarse=true with attn.select=window: a fixed window takes no coarse stage "
                    "(set attn.coarse=false)"]
        return []

    @property
    def uses_op(self) -> bool:
        """Coarse + fine with top-k selection: exactly the op `video_sparse_attention`."""
        return self.coarse and self.fine and self.select == "topk"

    @property
    def selects_topk(self) -> bool:
        """Whether the fine stage's key tiles are the top-k by coarse score (data-dependent, fp32 scores)."""
        return self.fine and self.select == "topk"

    def sparsity_limit(self, step: int) -> float:
        """The most sparsity allowed at optimizer step `step`: 1 (no limit) when constant; a ramp from dense."""
        if self.schedule == "constant":
            return 1.0
        return min(1.0, self.ramp_rate * (step // self.ramp_interval))

    def topk_in_force(self, n_tiles: int, limit: float = 1.0) -> int:
        """Key tiles per query tile: the target (topk, or round((1 - sparsity) * tiles), at least 1), or more
        while a ramp's `limit` is below the target sparsity."""
        target = self.topk if self.topk is not None else max(1, round((1 - self.sparsity) * n_tiles))
        ramp = max(1, round((1 - limit) * n_tiles))
        return min(n_tiles, max(target, ramp))

    def keys_per_query(self, grid, topk: int) -> float:
        """Mean number of real keys a query attends to in the fine stage (S_att of the FLOPs count)."""
        if not self.fine:
            return 0.0
        layout = TileLayout(tuple(grid), self.tile)
        if self.select == "topk":  # data-dependent tiles: count them at the mean tile size
            return min(topk, layout.n_tiles) * layout.seq_len / layout.n_tiles
        sizes = layout.kv_tile_sizes().double()
        pairs = sizes[:, None] * local_tile_mask(layout, self.window).double() * sizes[None, :]  # [n, n]
        return float(pairs.sum()) / layout.seq_len

    def coarse_matmuls(self) -> int:
        """Tile-level matmuls (of 2·tiles²·d FLOPs each): the scores when needed, and P·V_c for the output."""
        return int(self.coarse or self.select == "topk") + int(self.coarse)


@torch.compiler.assume_constant_result
def _tile_order(grid, tile, device):
    """(raster index of each token in tile order [S], its row in padded tile order [S]), cached per layout."""
    rows = TileLayout(grid, tile).padded_rows(device)  # [S] padded row of each raster token
    sorted_rows, order = rows.sort()
    return order, sorted_rows


_WINDOWS: dict = {}


@torch.compiler.assume_constant_result
def _window_selection(grid, tile, window, device):
    """(q2k_index [1, 1, n, K], q2k_count [1, 1, n]) of the fixed window, built once per layout (reads the host)."""
    key = (grid, tile, window, device)
    if key not in _WINDOWS:
        index, count = q2k_from_mask(local_tile_mask(TileLayout(grid, tile), window, device))
        _WINDOWS[key] = index[None, None], count[None, None]
    return _WINDOWS[key]


class VSAAttention(nn.Module):
    """VSA core: tokens in tile order, gates from the block input, selection rule and topk from the config."""

    def __init__(self, attn_cfg, dim: int, num_heads: int):
        super().__init__()
        self.cfg = VSAConfig.from_cfg(attn_cfg)
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.limit = 1.0  # the schedule's sparsity limit in force (set_sparsity_limit); 1 = the target
        self.gate_coarse = nn.Linear(dim, dim) if self.cfg.gate_coarse and self.cfg.coarse else None
        self.gate_fine = nn.Linear(dim, dim) if self.cfg.gate_fine and self.cfg.fine else None
        self.reset_gates()

    def reset_gates(self):
        """G_c = 0 and G_f = 1 at start: with all tiles selected the layer then equals dense attention."""
        for gate, bias in ((self.gate_coarse, 0.0), (self.gate_fine, 1.0)):
            if gate is not None:
                nn.init.zeros_(gate.weight)
                nn.init.constant_(gate.bias, bias)

    def token_order(self, grid: tuple[int, int, int], device=None) -> torch.Tensor:
        """Tile order (tiles in raster order, raster order inside each tile), kept for the whole network."""
        return _tile_order(tuple(grid), self.cfg.tile, torch.device(device or "cpu"))[0]

    def forward(self, q, k, v, x: torch.Tensor, ctx) -> torch.Tensor:
        return self.attend(q, k, v, *self.gates(x, q.shape[2]), ctx)  # [B, S, H, D]

    def gates(self, x: torch.Tensor, num_heads: int):
        """Per-token, per-channel gates (G_c, G_f) [B, S, H, D] from the block input x [B, S, d] (None: absent)."""
        B, S, d = x.shape
        gc = None if self.gate_coarse is None else self.gate_coarse(x).view(B, S, num_heads, d // num_heads)
        gf = None if self.gate_fine is None else self.gate_fine(x).view(B, S, num_heads, d // num_heads)
        return gc, gf

    def attend(self, q, k, v, gc, gf, ctx) -> torch.Tensor:
        """VSA over all tokens of the heads given: q, k, v, gates [B, S, H, D] in tile order -> [B, S, H, D]."""
        B, S, H, D = q.shape
        layout = TileLayout(ctx.grid, self.cfg.tile)
        if ctx.order is None:
            raise ValueError("VSAAttention needs the tokens in its token_order (the model applies it per forward)")
        # Under CUDA autocast, RMSNorm runs in fp32 (q, k fp32) while v and the gates come out of bf16 linears;
        # SDPA casts by itself, the VSA op (a custom op) takes one dtype: that of autocast, as SDPA would.
        dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
        q, k, v, gc, gf = (None if t is None else t.to(dtype) for t in (q, k, v, gc, gf))
        padded = layout.padded_len != S  # edge tiles: pad each tile to whole rows for the kernel
        if padded:
            rows = _tile_order(ctx.grid, self.cfg.tile, q.device)[1]  # [S]
            q, k, v, gc, gf = (None if t is None else _pad(t, rows, layout.padded_len) for t in (q, k, v, gc, gf))
        topk = self.cfg.topk_in_force(layout.n_tiles, self.limit)
        if self.cfg.uses_op:
            out = video_sparse_attention_tiled(q, k, v, layout, topk, gc, gf, backend=self.cfg.backend)
        else:
            out = self._variant(q, k, v, layout, topk, gc, gf)  # [B, S_pad, H, D]
        return out.index_select(1, rows) if padded else out  # [B, S, H, D]

    def _variant(self, q, k, v, layout, topk, gc, gf):
        """Ablations on padded tile order [B, S_pad, H, D]: the same fine kernel, other selections."""
        B, _, H, D = q.shape
        sizes = layout.kv_tile_sizes(q.device)  # [n] int32
        scale = D**-0.5
        out = None
        if self.cfg.coarse or self.cfg.select == "topk":
            q_c, k_c, v_c = tile_mean(q, sizes), tile_mean(k, sizes), tile_mean(v, sizes)  # [B, n, H, D] each
            o_c, scores = coarse_attention(q_c, k_c, v_c, scale)  # [B, n, H, D], [B, H, n, n]
        if self.cfg.coarse:
            out = o_c.to(q.dtype).repeat_interleave(layout.block, dim=1)  # [B, S_pad, H, D]
            out = out if gc is None else out * gc
        if self.cfg.fine:
            if self.cfg.select == "topk":
                index, count = topk_tiles(scores, topk)  # [B, H, n, K], [B, H, n]
            else:
                index, count = _window_selection(layout.video_shape, layout.tile, self.cfg.window, q.device)
                index, count = index.expand(B, H, -1, -1).contiguous(), count.expand(B, H, -1).contiguous()
            o_f, _ = block_sparse_attention(q, k, v, index, count, sizes, scale, backend=self.cfg.backend)
            o_f = o_f if gf is None else o_f * gf  # [B, S_pad, H, D]
            out = o_f if out is None else out + o_f
        return out


def warm_up_kernels(model: nn.Module, dtype: torch.dtype, device: torch.device) -> threading.Thread | None:
    """Start compiling the Triton kernels of `model`'s VSA layers in a background thread; None if none will run them.

    For torch.compile (train.compile): the compiled blocks launch these kernels only once inductor is done, so
    their compiles (seconds) were serial in the first step; here they overlap with tracing
    (Triton's compiler and ptxas release the GIL). Per (head dim, op or fine stage only, gates) of the sparse
    layers, in `dtype`: first a forward without gradient (an eval's kernels), then forward and backward
    (ops.vsa.warm_up); the kernels serve every video size. Other threads' launches wait for it (ops/warm.py). A
    failure only warns: the kernels then compile at their first use. VideoDiT layers only (diffusers Wan's attention
    processors compile theirs at first use).
    """
    if torch.device(device).type != "cuda":
        return None
    keys = sorted({(m.head_dim, m.cfg.uses_op, m.gate_coarse is not None, m.gate_fine is not None)
                   for m in model.modules()
                   if isinstance(m, VSAAttention) and m.cfg.fine and m.cfg.backend in ("auto", "triton")})
    if not keys:
        return None

    def compile_all(forward_ready):
        try:
            # The backward in this thread, not on the autograd engine's device thread, which may be waiting for it.
            with torch.cuda.device(device), torch.autograd.set_multithreading_enabled(False):
                for head_dim, op, gate_coarse, gate_fine in keys:
                    warm_up(head_dim, dtype, device, gate_coarse, gate_fine, op=op, grad=False)
                forward_ready()  # an eval may run
                for head_dim, op, gate_coarse, gate_fine in keys:
                    warm_up(head_dim, dtype, device, gate_coarse, gate_fine, op=op, grad=True).backward()
        except Exception as err:  # noqa: BLE001 - a warm-up must never stop training
            warnings.warn(f"VSA kernel warm-up failed ({type(err).__name__}: {err}); they compile at first use",
                          stacklevel=1)

    return warm.start(compile_all)


def _pad(x: torch.Tensor, rows: torch.Tensor, padded_len: int) -> torch.Tensor:
    """[B, S, ...] in (unpadded) tile order -> [B, S_pad, ...] in padded tile order, pad rows zero."""
    return x.new_zeros((x.shape[0], padded_len, *x.shape[2:])).index_copy(1, rows, x)
