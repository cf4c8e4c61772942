"""The video DiT: shapes, init, parameter targets, checkpointing, text masking, RoPE, token order, compile."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vsa_train.models import ATTENTION, DiTConfig, build_model
from vsa_train.models.attention import DenseAttention
from vsa_train.models.rope import apply_rope, grid_positions, rope_cos_sin

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DENSE = {"name": "dense"}
TINY = {"name": "test", "hidden_size": 64, "depth": 2, "num_heads": 2}
TEXT_DIM = 16
CAPTION_DIM = 64  # width of the built-in caption encoder (configs/data/synthetic.yaml text_dim); ~0.1% of params


def make(model_cfg=TINY, attn_cfg=DENSE, seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_model({**model_cfg, **overrides}, attn_cfg, in_channels=3, text_dim=TEXT_DIM)
    torch.nn.init.normal_(model.final.linear.weight, std=0.02)  # a trained-looking head, so outputs are non-zero
    return model


def inputs(B=2, T=2, H=4, W=6, L=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, T, H, W, generator=g)
    t = torch.rand(B, generator=g)
    text = torch.randn(B, L, TEXT_DIM, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False
    return x, t, text, mask


def test_output_shape_and_fresh_model_predicts_zero():
    x, t, text, mask = inputs()
    fresh = build_model(TINY, DENSE, in_channels=3, text_dim=TEXT_DIM)
    assert torch.equal(fresh(x, t, text, mask), torch.zeros_like(x))
    out = make()(x, t, text, mask)
    assert out.shape == x.shape and out.abs().max() > 0


@pytest.mark.parametrize("name,target", [("dit_60m", 60e6), ("dit_120m", 120e6), ("dit_410m", 410e6), ("dit_1b", 1.4e9)])
def test_param_targets_on_meta(name, target):
    cfg = OmegaConf.load(CONFIGS / "model" / f"{name}.yaml")
    with torch.device("meta"):
        model = build_model(cfg, OmegaConf.load(CONFIGS / "attn" / "dense.yaml"), in_channels=3, text_dim=CAPTION_DIM)
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / target - 1) <= 0.10, f"{name}: {n:,} params, target {target:,.0f}"


@pytest.mark.parametrize("policy", ["full", "selective", True])
def test_grad_checkpointing_gives_same_grads(policy):
    x, t, text, mask = inputs()
    grads = []
    for ckpt in ("none", policy):
        model = make(grad_checkpointing=ckpt).train()
        model(x, t, text, mask).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, msg=n)
    recomputed = [model._recompute(i) for i in range(len(model.blocks))]
    assert recomputed == ([True, False] * 4)[:len(recomputed)] if policy == "selective" else all(recomputed)
    with pytest.raises(ValueError, match="model.grad_checkpointing must be one of none, full, selective"):
        make(grad_checkpointing="some")


def test_regional_compile_compiles_one_block_for_all():
    """train.compile=true compiles DiT blocks in place: one graph serves every block; names and outputs unchanged."""
    from torch._dynamo.utils import counters

    from vsa_train.parallel import compile_blocks

    model, plain = make(depth=3).eval(), make(depth=3).eval()
    plain.load_state_dict(model.state_dict())
    compile_blocks(model)
    counters.clear()
    x, t, text, mask = inputs()
    with torch.no_grad(), torch._dynamo.config.patch(cache_size_limit=8):
        out = model(x, t, text, mask)
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(out, plain(x, t, text, mask))
    assert list(model.state_dict()) == list(plain.state_dict())


def test_padding_text_tokens_do_not_change_output():
    model = make()
    x, t, text, _ = inputs(L=3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    padded = torch.cat([text, 100 * torch.randn(2, 4, TEXT_DIM)], dim=1)  # garbage behind the mask
    pad_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(x, t, padded, pad_mask), model(x, t, text, mask))
    # ...while the text itself does matter, and an empty caption gives finite outputs
    assert not torch.allclose(model(x, t, text + 1, mask), model(x, t, text, mask))
    assert model(x, t, text, torch.zeros_like(mask)).isfinite().all()


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 3, 64, generator=g, dtype=torch.float64).unbind(0)  # [1, 3, 64] each
    pos = torch.tensor([[1, 2, 3], [0, 5, 1]])
    shift = torch.tensor([4, -2, 7])

    def score(pq, pk):
        cos, sin = rope_cos_sin(torch.stack([pq, pk]), 64)
        rq = apply_rope(q[:, None], cos[:1].double(), sin[:1].double())
        rk = apply_rope(k[:, None], cos[1:].double(), sin[1:].double())
        return (rq * rk).sum(-1)  # [1, 1, 3]: one score per head

    s = score(pos[0], pos[1])
    torch.testing.assert_close(score(pos[0] + shift, pos[1] + shift), s)
    assert not torch.allclose(score(pos[0], pos[1] + shift), s)  # but absolute offsets between them matter
    cos, sin = rope_cos_sin(pos, 64)
    torch.testing.assert_close(apply_rope(q[:, None].expand(1, 2, 3, 64), cos.double(), sin.double()).norm(dim=-1),
                               q[:, None].expand(1, 2, 3, 64).norm(dim=-1))  # a rotation keeps norms


class ReversedDense(DenseAttention):
    """Dense attention that asks the model to keep tokens in reverse raster order (stand-in for VSA's tile order)."""

    @staticmethod
    def token_order(grid, device=None):
        return torch.arange(grid[0] * grid[1] * grid[2] - 1, -1, -1, device=device)


def test_token_order_seam(monkeypatch):
    """A core that wants another token order gets it once per forward; RoPE follows, so dense output is unchanged."""
    monkeypatch.setitem(ATTENTION, "reversed", ReversedDense)
    x, t, text, mask = inputs()
    dense, reordered = make(), make(attn_cfg={"name": "reversed"})
    reordered.load_state_dict(dense.state_dict())
    ctx = reordered.context((2, 2, 3), "cpu")
    assert torch.equal(ctx.positions, grid_positions((2, 2, 3)).flip(0))
    torch.testing.assert_close(reordered(x, t, text, mask), dense(x, t, text, mask))


def test_compile_fullgraph():
    """No graph breaks: forward, and forward + backward through checkpointed blocks."""
    model = make().eval()
    x, t, text, mask = inputs()
    with torch.no_grad():
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, t, text, mask), model(x, t, text, mask))
    model = make(grad_checkpointing=True).train()
    torch.compile(model, backend="aot_eager", fullgraph=True)(x, t, text, mask).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_configs_and_inputs_fail_clearly():
    with pytest.raises(ValueError, match="attn.name must be one of dense, .*got 'nope'"):
        build_model(TINY, {"name": "nope"}, in_channels=3, text_dim=8)
    with pytest.raises(ValueError, match="unknown key model.widht"):
        build_model({**TINY, "widht": 3}, DENSE, in_channels=3, text_dim=8)
    with pytest.raises(ValueError, match="must be divisible by model.num_heads=3"):
        build_model({**TINY, "num_heads": 3}, DENSE, in_channels=3, text_dim=8)
    x, t, text, mask = inputs(W=5)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        make()(x, t, text, mask)
    assert DiTConfig.from_cfg(OmegaConf.create(TINY)).patch_size == (1, 2, 2)
