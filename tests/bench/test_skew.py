"""vsa_train.bench.skew: uses per key tile from a q2k selection, their load-balance figures, and a CPU run."""
import pytest
import torch

from vsa_train.bench import op as bench_op
from vsa_train.bench import skew
from vsa_train.ops import coarse


def test_uses_and_row():
    # 4 query tiles x 2 choices over 5 key tiles: tile 0 chosen by all 4, tile 4 by none.
    index = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]], dtype=torch.int32)[None, None]  # [1, 1, 4, 2]
    uses = skew.uses_per_key_tile(index, 5)
    assert uses.tolist() == [[[4.0, 2.0, 1.0, 1.0, 0.0]]]
    row = skew.skew_row(uses)
    assert row["mean"] == pytest.approx(8 / 5) and row["max/mean"] == pytest.approx(4 / 1.6)
    assert row["unused"] == pytest.approx(0.2) and row["top 10% share"] == pytest.approx(0.5)  # top 1 of 5: 4 of 8
    # Neighbours (0, 1) pick {0, 1, 2}, (2, 3) pick {0, 1, 3}: 3 distinct of topk 2 each.
    assert skew.pair_union(index, 5) == pytest.approx(1.5)
    assert skew.pair_union(torch.tensor([[0, 1], [1, 0], [2, 3]], dtype=torch.int32)[None, None], 5) == 1.0  # odd n


def test_cpu_run_prints_a_row_per_layer(capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    skew.main(["--model", "dit_tiny", "--data", "synthetic", "attn.backend=torch"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) >= 2 and all(len(r.split("|")) == 9 for r in rows)
    assert all(1.0 <= float(r.split("|")[7]) <= 2.0 for r in rows)  # neighbours' union / topk
    assert coarse._OBSERVERS == []  # the observer is gone after the run


def test_records_both_backends_selections():
    """The observer hook sees the op's selections on the PyTorch backend and the Triton one (the Function a GPU
    forward runs), and nothing once the recording ends."""
    from vsa_train.ops import TileLayout, video_sparse_attention

    layout = TileLayout((4, 8, 12))  # 6 tiles
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.seq_len, 2, 64, generator=g) for _ in range(3))
    with skew.record_selections() as layers:
        for backend in ("torch", "triton"):
            video_sparse_attention(q, k, v, layout.video_shape, 2, backend=backend)
    assert len(layers) == 2 and all(u.sum().item() == 2 * 6 * 2 and 1.0 <= union <= 2.0 for u, union in layers)
    assert torch.equal(layers[0][0], layers[1][0])  # the same selection on both backends
    video_sparse_attention(q, k, v, layout.video_shape, 2, backend="torch")
    assert len(layers) == 2


def test_op_skew_option_makes_some_tiles_win_everywhere():
    """`op --skew`: the same top-k code picks some key tiles far more often than near-uniform inputs do."""
    from vsa_train.ops import TileLayout, tile_mean
    from vsa_train.ops.coarse import coarse_attention, topk_tiles

    layout = TileLayout((8, 16, 32))  # 64 tiles
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, layout.seq_len, 2, 64, generator=g) for _ in range(2))
    sizes = layout.kv_tile_sizes(q.device)

    def max_over_mean(q, k):
        q_c, k_c = (tile_mean(layout.to_tiles(t), sizes) for t in (q, k))
        index, _ = topk_tiles(coarse_attention(q_c, k_c, k_c, 64 ** -0.5)[1], 8)
        return skew.skew_row(skew.uses_per_key_tile(index, layout.n_tiles))["max/mean"]

    sq, sk = bench_op.skewed(q, k, layout, 0.3, g)
    assert sq.shape == q.shape and sk.dtype == k.dtype
    assert max_over_mean(sq, sk) > 1.5 * max_over_mean(q, k)
