"""Triton block-sparse kernels against the float64 naive mask reference, on ops_utils.DEVICE: CUDA when there is
one (bf16 cases included), else the CPU under TRITON_INTERPRET=1.

Tests taking the `options` fixture (conftest.py) run both loop variants of the kernels: one 64-row tile per
iteration and two (KernelOptions.tile_pairs), whose odd counts leave an empty second slot in the last iteration.
Every Triton call poisons its outputs with NaN (KernelOptions.poison_outputs), so an unwritten element fails.
"""
import math

import pytest
import torch
from ops_utils import BF16_DOT, DEVICE, POISON, TOL

from vsa_train.ops import KernelOptions
from vsa_train.ops.block_sparse import block_sparse_attention
from vsa_train.ops.block_sparse import index as index_module
from vsa_train.ops.block_sparse.function import block_sparse_bwd_op, block_sparse_fwd_op
from vsa_train.ops.block_sparse.index import build_k2q_index
from vsa_train.ops.launch import BLOCK as TILE
from vsa_train.ops.naive import naive_block_sparse_attention


def make_problem(B, H, n_tiles, K, D, dtype, qk_mul=1.0, ragged=True, odd_sizes=True, strided=False, seed=0,
                 device=DEVICE):
    """Random q, k, v in padded tile order and a random (distinct) q2k selection, drawn on the CPU, on device."""
    g = torch.Generator().manual_seed(seed)
    S = n_tiles * TILE

    def rand(mul):
        if strided:  # [B, H, S, D] storage seen as [B, S, H, D]: non-contiguous, as after a head split
            return (torch.randn(B, H, S, D, generator=g) * mul).to(device, dtype).transpose(1, 2)
        return (torch.randn(B, S, H, D, generator=g) * mul).to(device, dtype)

    q, k, v = rand(qk_mul), rand(qk_mul), rand(1.0)
    q2k_index = torch.rand(B, H, n_tiles, n_tiles, generator=g).argsort(-1)[..., :K].to(torch.int32)
    if ragged:
        q2k_count = torch.randint(1, K + 1, (B, H, n_tiles), generator=g, dtype=torch.int32)
        q2k_index[torch.arange(K) >= q2k_count[..., None]] = -7  # garbage past the count is never read
    else:
        q2k_count = torch.full((B, H, n_tiles), K, dtype=torch.int32)
    if odd_sizes:
        kv_tile_sizes = torch.randint(1, TILE + 1, (n_tiles,), generator=g, dtype=torch.int32)
        kv_tile_sizes[0] = TILE
    else:
        kv_tile_sizes = torch.full((n_tiles,), TILE, dtype=torch.int32)
    return q, k, v, *(t.to(device) for t in (q2k_index, q2k_count, kv_tile_sizes))


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


CASES = [  # B, H, n_tiles, K, D, dtype, qk_mul, ragged, odd_sizes, strided
    (1, 2, 4, 2, 64, torch.float32, 1.0, True, True, False),
    (2, 1, 5, 5, 64, torch.float32, 4.0, False, True, True),   # K = all tiles, 16x logits
    (1, 1, 3, 2, 128, torch.float32, 1.0, True, True, True),
    (1, 2, 6, 3, 64, torch.float16, 4.0, True, True, False),
    (2, 2, 2, 1, 64, torch.float16, 1.0, False, False, True),  # one key tile per query tile
    pytest.param(1, 2, 6, 3, 64, torch.bfloat16, 4.0, True, True, False, marks=BF16_DOT),  # training's dtype
    pytest.param(2, 1, 5, 5, 128, torch.bfloat16, 4.0, False, True, True, marks=BF16_DOT),
]


@pytest.mark.parametrize("B,H,n_tiles,K,D,dtype,qk_mul,ragged,odd_sizes,strided", CASES)
def test_triton_matches_float64(B, H, n_tiles, K, D, dtype, qk_mul, ragged, odd_sizes, strided, options):
    q, k, v, index, count, sizes = make_problem(B, H, n_tiles, K, D, dtype, qk_mul, ragged, odd_sizes, strided)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    scale = 1 / math.sqrt(D)
    out, lse = block_sparse_attention(q, k, v, index, count, sizes, backend="triton", options=options)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == (B, H, n_tiles * TILE)
    g_out = torch.randn_like(out, dtype=torch.float64)
    g_lse = torch.randn_like(lse, dtype=torch.float64)
    ((out.double() * g_out).sum() + (lse.double() * g_lse).sum()).backward()

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = naive_block_sparse_attention(q64, k64, v64, index, count, sizes, scale)
    ((ref_out * g_out).sum() + (ref_lse * g_lse).sum()).backward()

    for got, ref in ((out, ref_out), (lse, ref_lse), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert torch.isfinite(got).all()  # also: every tile written (outputs start as NaN)
        assert rel_err(got, ref) < TOL[dtype]
    # Pad key rows receive no gradient at all.
    pad_key = (torch.arange(TILE, device=sizes.device)[None, :] >= sizes[:, None]).reshape(-1)
    assert (k.grad[:, pad_key] == 0).all() and (v.grad[:, pad_key] == 0).all()


def edge_problem(D, dtype, qk_mul=1.0, device=DEVICE):
    """A hand-made selection with every edge case of the tile loops, B = 1, H = 2, 5 tiles, K = 3.

    Query tiles choose 3, 2, 1, 2 and 3 key tiles (odd counts, even ones, one, and K = 3 in the last row, so a
    read past an odd count would pass the end of q2k_index). Key tile 0 is chosen by 3 query tiles, tile 1 by 2,
    tile 2 by all 5, tile 3 (1 real row) by exactly one, tile 4 by none. Head 1 takes each row in another order
    (which tiles share an iteration). Pad rows of k and v hold large finite values: any leak shows.
    """
    rows = ([0, 1, 2], [1, 2], [2], [2, 0], [3, 0, 2]), ([2, 1, 0], [2, 1], [2], [0, 2], [0, 3, 2])
    index = torch.full((1, 2, 5, 3), -7, dtype=torch.int32)  # garbage past the count is never read
    count = torch.zeros(1, 2, 5, dtype=torch.int32)
    for h, head in enumerate(rows):
        for i, row in enumerate(head):
            index[0, h, i, :len(row)] = torch.tensor(row)
            count[0, h, i] = len(row)
    sizes = torch.tensor([64, 17, 64, 1, 40], dtype=torch.int32)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 5 * TILE, 2, D, generator=g) * m for m in (qk_mul, qk_mul, 1.0))
    pad = (torch.arange(TILE)[None, :] >= sizes[:, None]).reshape(-1)
    k[:, pad], v[:, pad] = 1e4, -1e4
    return *(t.to(device, dtype) for t in (q, k, v)), *(t.to(device) for t in (index, count, sizes))


def triton_outputs_and_grads(q, k, v, index, count, sizes, options, seed=5):
    """Triton out, lse, dq, dk, dv (backpropagated through out and lse), and the cotangents used."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = block_sparse_attention(q, k, v, index, count, sizes, backend="triton", options=options)
    g = torch.Generator().manual_seed(seed)
    g_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)
    g_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.device)
    ((out.double() * g_out).sum() + (lse.double() * g_lse).sum()).backward()
    return [out.detach(), lse.detach(), q.grad, k.grad, v.grad], (g_out, g_lse)


@pytest.mark.parametrize("D,dtype,qk_mul", [(64, torch.float32, 4.0), (128, torch.float16, 1.0),
                                             pytest.param(64, torch.bfloat16, 4.0, marks=BF16_DOT)])
def test_edge_selection_matches_float64(D, dtype, qk_mul, options):
    q, k, v, index, count, sizes = edge_problem(D, dtype, qk_mul)
    got, (g_out, g_lse) = triton_outputs_and_grads(q, k, v, index, count, sizes, options)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = naive_block_sparse_attention(*ref_in, index, count, sizes, 1 / math.sqrt(D))
    ((ref_out * g_out).sum() + (ref_lse * g_lse).sum()).backward()
    for name, x, ref in zip(("out", "lse", "dq", "dk", "dv"), got, [ref_out, ref_lse] + [t.grad for t in ref_in]):
        assert torch.isfinite(x).all(), name  # also: every element written (outputs start as NaN)
        assert rel_err(x, ref) < TOL[dtype], (name, rel_err(x, ref))
    # Key tile 4 (chosen by no query tile) and every pad key row receive no gradient at all.
    no_grad = (torch.arange(TILE, device=sizes.device)[None, :] >= sizes[:, None]).reshape(-1)
    no_grad[4 * TILE:] = True
    assert (got[3][:, no_grad] == 0).all() and (got[4][:, no_grad] == 0).all()


@pytest.mark.parametrize("problem", ["edge", "random"])
def test_tile_pairs_equal_one_tile(problem):
    """fp32: the two loop variants differ by rounding only (another summation order, and exp arguments rounded
    against another running max: at 16x logits |scale * s - m| reaches ~50, so one rounding of it moves p by
    ~3e-6 relative; a wrong pairing is off by 1e-2 or more)."""
    if problem == "edge":
        inputs = edge_problem(64, torch.float32, qk_mul=4.0)
    else:
        inputs = make_problem(1, 1, 5, 5, 128, torch.float32, qk_mul=4.0, strided=True)  # odd counts, K = 5
    results = {}
    for pairs in (False, True):
        results[pairs] = triton_outputs_and_grads(*inputs, KernelOptions(tile_pairs=pairs, poison_outputs=True))[0]
    for name, got, ref in zip(("out", "lse", "dq", "dk", "dv"), results[True], results[False]):
        assert rel_err(got, ref.double()) < 5e-6, (name, rel_err(got, ref.double()))


def test_tile_pairs_auto_pairs_head_dim_64_only():
    """The default: pairs where they were measured faster (D=64), one tile where they spill (D=128)."""
    assert KernelOptions().tile_pairs is None
    assert KernelOptions().pairs(64) and not KernelOptions().pairs(128)
    assert not KernelOptions(tile_pairs=False).pairs(64)
    assert KernelOptions(tile_pairs=True).pairs(128)
    with pytest.raises(TypeError, match="tile_pairs"):
        KernelOptions(tile_pairs="auto")


def test_forward_without_grad():
    """Eval runs under no_grad: no k2q index is built, and the output is the same."""
    q, k, v, index, count, sizes = make_problem(1, 2, 4, 2, 64, torch.float32)
    with torch.no_grad():
        out, lse = block_sparse_attention(q, k, v, index, count, sizes, backend="triton", options=POISON)
    ref, ref_lse = block_sparse_attention(q.requires_grad_(), k, v, index, count, sizes, backend="triton",
                                          options=POISON)
    assert torch.equal(out, ref.detach()) and torch.equal(lse, ref_lse.detach())


def test_backward_is_deterministic():
    q, k, v, index, count, sizes = make_problem(1, 2, 6, 4, 64, torch.float32, ragged=True, odd_sizes=True)
    grads = []
    for _ in range(2):
        qkv = [t.detach().requires_grad_() for t in (q, k, v)]
        out, _ = block_sparse_attention(*qkv, index, count, sizes, backend="triton", options=POISON)
        out.backward(torch.ones_like(out))
        grads.append([t.grad for t in qkv])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_matches_torch_reference():
    q, k, v, index, count, sizes = make_problem(2, 2, 4, 3, 64, torch.float32, qk_mul=4.0, strided=True)
    results = []
    for backend in ("triton", "torch"):
        qkv = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse = block_sparse_attention(*qkv, index, count, sizes, backend=backend, options=POISON)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype, device=out.device)).view_as(out))
        results.append([out, lse] + [t.grad for t in qkv])
    for got, ref in zip(*results):
        assert rel_err(got, ref.double()) < 1e-5


@pytest.mark.parametrize("n,K,ragged,block", [(7, 4, True, None), (9, 9, False, 4), (11, 3, True, 4)])
def test_k2q_index_inverts_q2k(monkeypatch, n, K, ragged, block):
    if block is not None:  # small blocks: the kernels' loops run several times
        monkeypatch.setattr(index_module, "BLOCK_SLOTS", block)
        monkeypatch.setattr(index_module, "BLOCK_TILES", block)
    _, _, _, index, count, _ = make_problem(2, 3, n, K, 64, torch.float32, ragged=ragged, device="cpu")
    offsets, q_tiles = (t.cpu() for t in build_k2q_index(index.to(DEVICE), count.to(DEVICE), n))
    assert offsets.dtype == q_tiles.dtype == torch.int32
    assert offsets.shape == (2, 3, n + 1) and q_tiles.shape == (2, 3, n * K)
    for b in range(2):
        for h in range(3):
            expected = {j: sorted(i for i in range(n) if j in index[b, h, i, :count[b, h, i]].tolist()) for j in range(n)}
            got = {j: q_tiles[b, h, offsets[b, h, j]:offsets[b, h, j + 1]].tolist() for j in range(n)}
            assert got == expected
            assert offsets[b, h, 0] == 0 and offsets[b, h, n] == count[b, h].sum()


def test_compiles_without_graph_break():
    """torch.compile traces the same Function as eager mode (its bodies as opaque registered ops): same grads."""
    q, k, v, index, count, sizes = make_problem(1, 1, 3, 2, 64, torch.float32)
    qkv = [t.detach().requires_grad_() for t in (q, k, v)]

    def loss_fn(q, k, v):
        out, lse = block_sparse_attention(q, k, v, index, count, sizes, backend="triton", options=POISON)
        return out.square().sum() + lse.sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    compiled(*qkv).backward()
    expected = [t.detach().requires_grad_() for t in (q, k, v)]
    loss_fn(*expected).backward()
    for got, ref in zip(qkv, expected):
        assert torch.equal(got.grad, ref.grad)


def test_opcheck():
    """The registered forward and backward ops (what torch.compile sees): schema and fake shapes match the real ones."""
    q, k, v, index, count, sizes = make_problem(1, 1, 2, 2, 64, torch.float32)
    args = (q, k, v, index, count, sizes, 0.125, True, True, False)
    torch.library.opcheck(block_sparse_fwd_op, args, test_utils=("test_schema", "test_faketensor"))
    out, lse, offsets, q_tiles = block_sparse_fwd_op(*args)
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, index, count, offsets, q_tiles, sizes,
                0.125, torch.zeros(1, 1, 64, device=DEVICE), True, False)
    torch.library.opcheck(block_sparse_bwd_op, bwd_args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("mutate,error", [
    (lambda a: a.update(q=a["q"][..., :32], k=a["k"][..., :32], v=a["v"][..., :32]), "head dim"),
    (lambda a: a.update(q=a["q"][:, :100], k=a["k"][:, :100], v=a["v"][:, :100]), "multiple of 64"),
    (lambda a: a.update(q2k_index=a["q2k_index"].long()), "int32"),
    (lambda a: a.update(q2k_count=a["q2k_count"] * 0), r"\[1, K"),
    (lambda a: a.update(q2k_index=a["q2k_index"] + 100), "tile ids"),
    (lambda a: a.update(kv_tile_sizes=a["kv_tile_sizes"][:2]), "n_tiles"),
    (lambda a: a.update(v=a["v"].half()), "dtype"),
    (lambda a: a.update(backend="cuda"), "backend"),
    (lambda a: a.update(scale=-0.125), "positive finite"),  # the forward's max of unscaled logits needs c > 0
    (lambda a: a.update(scale=float("nan")), "positive finite"),
    (lambda a: a.update(scale=torch.tensor(0.1)), "positive finite"),
    (lambda a: a.update(scale="0.1"), "positive finite"),
])
def test_bad_input_raises(mutate, error):
    # CPU tensors on any machine: the index values are checked on CPU tensors only (on CUDA a check would sync).
    q, k, v, index, count, sizes = make_problem(1, 1, 3, 2, 64, torch.float32, ragged=False, device="cpu")
    args = {"q": q, "k": k, "v": v, "q2k_index": index, "q2k_count": count, "kv_tile_sizes": sizes}
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=error):
        block_sparse_attention(**args)


def test_triton_on_cpu_tensors_without_the_interpreter_says_so(monkeypatch):
    """CPU tensors run the kernels only in Triton's interpreter; without it backend="triton" says what to do (on a
    GPU machine as on a CPU one: resolve_backend reads TRITON_INTERPRET per call)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, index, count, sizes = make_problem(1, 1, 2, 1, 64, torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"):
        block_sparse_attention(q, k, v, index, count, sizes, backend="triton")


def test_poisoned_outputs_start_as_nan():
    """What the poisoning tests rely on: with poison_outputs, a kernel output no kernel writes stays NaN."""
    from vsa_train.ops.launch import new_output

    assert torch.isnan(new_output((2, 3), torch.float16, DEVICE, poison=True)).all()
    q, k, v, index, count, sizes = make_problem(1, 1, 2, 1, 64, torch.float32, ragged=False)
    out, _ = block_sparse_attention(q, k, v, index, count, sizes, backend="triton", options=POISON)
    assert torch.isfinite(out).all()
