"""Analytic FLOPs against torch's FlopCounterMode on a small dense model."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vsa_train.flops import training_flops_per_sample
from vsa_train.models import build_model

MODEL = {"name": "test", "hidden_size": 64, "depth": 2, "num_heads": 2}
DENSE = {"name": "dense"}


def counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # CPU fused SDPA counts 0
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("video_shape,text_len", [((2, 8, 8), 5), ((4, 4, 6), 1)])
def test_training_flops_match_flop_counter(video_shape, text_len):
    B, text_dim = 2, 24
    model = build_model(MODEL, DENSE, in_channels=3, text_dim=text_dim)
    x = torch.randn(B, 3, *video_shape)
    t, text = torch.rand(B), torch.randn(B, text_len, text_dim)
    mask = torch.ones(B, text_len, dtype=torch.bool)
    fwd = counted(lambda: model(x, t, text, mask)) / B
    train = counted(lambda: model(x, t, text, mask).square().mean().backward()) / B
    count = training_flops_per_sample(MODEL, DENSE, in_channels=3, text_dim=text_dim, video_shape=video_shape,
                                      text_len=text_len)
    assert count.executed == count.dense  # dense attention executes its dense count
    assert count.executed / 3 == pytest.approx(fwd, rel=0.01)
    assert count.executed == pytest.approx(train, rel=0.05)  # inputs need no grad: slightly under 3x forward


def test_attention_dominates_at_16k_tokens():
    """At the paper's 16,384 tokens self-attention is most of dit_120m's FLOPs: 6·N·D is far off."""
    cfg = {"name": "dit_120m", "hidden_size": 768, "depth": 12, "num_heads": 12}
    count = training_flops_per_sample(cfg, DENSE, in_channels=3, text_dim=256, video_shape=(16, 64, 64), text_len=32)
    self_attn = 3 * 12 * 4 * 16384**2 * 768
    assert 0.6 < self_attn / count.executed < 0.9
    with pytest.raises(ValueError, match="attn.name must be one of .*got 'sparse'"):
        training_flops_per_sample(cfg, {"name": "sparse"}, in_channels=3, text_dim=256, video_shape=(16, 64, 64),
                                  text_len=32)
    with pytest.raises(ValueError, match="not divisible"):
        training_flops_per_sample(cfg, DENSE, in_channels=3, text_dim=256, video_shape=(16, 63, 64), text_len=32)


DIT_120M = {"name": "dit_120m", "hidden_size": 768, "depth": 12, "num_heads": 12}
AT_16K = {"in_channels": 3, "text_dim": 64, "video_shape": (16, 64, 64), "text_len": 32}  # 256 tiles


def test_vsa_flops_follow_the_topk_in_force():
    """Executed FLOPs: fine stage at the topk in force + coarse stage + gates; the dense count beside them."""
    dense = training_flops_per_sample(DIT_120M, DENSE, **AT_16K).executed
    vsa = training_flops_per_sample(DIT_120M, {"name": "vsa"}, **AT_16K)
    assert vsa.dense == dense
    S, n, d, L = 16384, 256, 768, 12
    sparse_attn = 4 * S * 32 * 64 * d + 4 * n * n * d + 2 * S * d * d  # fine (top 32 of 256) + coarse + G_c
    assert vsa.executed == pytest.approx(dense - 3 * L * (4 * S * S * d - sparse_attn), rel=1e-12)
    assert 2.6 < dense / vsa.executed < 2.9  # the "VSA cuts the step's FLOPs about 2.75x"
    # Fine-only over all tiles with no gate is dense attention exactly (no coarse output, scores still counted).
    fine_all = training_flops_per_sample(DIT_120M, {"name": "vsa_fine_only", "coarse": False, "gate_coarse": False},
                                         topk=n, **AT_16K)
    assert fine_all.executed == pytest.approx(dense + 3 * L * 2 * n * n * d)
    # Blocks kept dense count dense; fewer tiles, fewer FLOPs; coarse-only has no fine stage at all.
    half = training_flops_per_sample(DIT_120M, {"name": "vsa", "dense_layers": list(range(6))}, **AT_16K)
    assert half.executed == pytest.approx((dense + vsa.executed) / 2)
    fewer = training_flops_per_sample(DIT_120M, {"name": "vsa"}, topk=16, **AT_16K)
    assert fewer.executed < vsa.executed
    coarse = training_flops_per_sample(DIT_120M, {"name": "vsa_coarse_only", "fine": False, "gate_coarse": False},
                                       **AT_16K)
    assert coarse.executed == pytest.approx(dense - 3 * L * (4 * S * S * d - 4 * n * n * d))
