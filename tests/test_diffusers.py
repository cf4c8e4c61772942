"""diffusers interop (vsa_train/integrations/): a trained run exported as a diffusers pipeline samples exactly what
vsa_train.sampling.generate (sample.py) does; VSA installed in a tiny random WanTransformer3DModel."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from safetensors.torch import load_file

from vsa_train.data import build_text_encoder, data_spec
from vsa_train.diffusion import euler_sample
from vsa_train.integrations.diffusers import (CaptionTextEncoder, VideoDiTTransformer, VSAVideoPipeline,
                                              VSAWanAttnProcessor, VSAWanTransformer3DModel, apply_vsa,
                                              set_sparsity_limit)
from vsa_train.models.vsa import VSAAttention
from vsa_train.rundir import RunDir
from vsa_train.sampling import generate, load_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("diffusers")  # one xdist worker: the module-scoped exported built once
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
import export_diffusers  # noqa: E402
from test_trainer import _run  # noqa: E402  (TINY config: 4 frames x 8 x 8 pixels)

PROMPTS = ["a red circle moving left to right", "blue square on a striped background"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny VSA run (ramping sparsity, EMA) trained 2 steps, exported with and without EMA."""
    root = tmp_path_factory.mktemp("diffusers")
    run = root / "run"
    _run(run, "train.max_steps=2", "train.eval_every=2", "train.ckpt_every=2", "train.ema=0.9", "attn=vsa",
         "attn.tile=[2,2,2]", "attn.backend=torch", "attn.schedule=ramp", "attn.ramp_rate=0.25",
         "attn.ramp_interval=1")
    export_diffusers.main([str(run), str(root / "out")])
    export_diffusers.main([str(run), str(root / "raw"), "--no-ema"])
    return run, root / "out", root / "raw"


def _pipe(path):
    pipe = VSAVideoPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_export_layout_and_weights(exported):
    run, out, raw = exported
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "VSAVideoPipeline"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["transformer"] == ["vsa_train.integrations.diffusers", "VideoDiTTransformer"]
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
    assert sched.config.shift == 1.0 and sched.config.num_train_timesteps == 1000
    ckpt = RunDir(run).checkpoints.verified()[-1]
    for folder, name in ((out, "ema.safetensors"), (raw, "model.safetensors")):
        saved = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
        expected = load_file(str(ckpt / name))
        assert saved.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(saved[key], expected[key], rtol=0, atol=0)
    assert json.loads((out / "vsa_train_export.json").read_text())["ema"] is True
    assert json.loads((raw / "vsa_train_export.json").read_text())["ema"] is False
    model = VideoDiTTransformer.from_pretrained(out / "transformer")
    assert model.config.sparsity_limit == 0.5  # ramp 0.25 per step, checkpoint at step 2
    assert {m.limit for m in model.modules() if isinstance(m, VSAAttention)} == {0.5}
    assert model._no_split_modules == ["DiTBlock"]


def test_caption_encoder_rebuilds(exported):
    run, out, _ = exported
    _, cfg, _ = load_model(run)
    reference = build_text_encoder(cfg.data).encode(PROMPTS)
    config = json.loads((out / "text_encoder" / "config.json").read_text())
    assert {"vocab", "dim", "max_len", "seed"} <= config.keys()
    rebuilt = CaptionTextEncoder.from_config(config).encode(PROMPTS)  # from the JSON alone
    loaded = CaptionTextEncoder.from_pretrained(out / "text_encoder").encode(PROMPTS)
    for got in (rebuilt, loaded):
        torch.testing.assert_close(got[0], reference[0], rtol=0, atol=0)
        assert torch.equal(got[1], reference[1])


@pytest.mark.parametrize("ema", [True, False])
def test_pipeline_matches_generate(exported, ema):
    run, out, raw = exported
    pipe = _pipe(out if ema else raw)
    model, cfg, _ = load_model(run, ema=ema)
    for steps, scale, seed in ((3, 4.0, 1), (2, 1.0, 0))[: 2 if ema else 1]:
        expected = generate(model, cfg.data, PROMPTS, steps, scale, seed=seed)
        got = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=scale, seed=seed).frames
        assert got.shape == (2, 3, 4, 8, 8)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # before the clamp: the raw Euler result of vsa_train.diffusion.euler_sample with the same noise
    spec = data_spec(cfg.data)
    noise = torch.randn((2, spec.in_channels, *spec.video_shape), generator=torch.Generator().manual_seed(3))
    text, mask = build_text_encoder(cfg.data).encode(PROMPTS)
    expected = euler_sample(model, noise, text, mask, 4, 2.5)
    got = pipe(PROMPTS, num_inference_steps=4, guidance_scale=2.5, generator=torch.Generator().manual_seed(3),
               output_type="latent").frames
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    frames = pipe(PROMPTS[0], num_inference_steps=1, seed=0, output_type="np").frames
    assert isinstance(frames, np.ndarray) and frames.shape == (1, 4, 8, 8, 3)
    assert frames.min() >= 0 and frames.max() <= 1


# ------------------------------------------------------------------------------------------------ Wan + VSA

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
           text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)


def _wan(seed=0):
    torch.manual_seed(seed)
    return WanTransformer3DModel(**WAN).eval()


def _inputs(frames=4, height=8, width=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, frames, height, width, generator=g), torch.tensor([300.0, 800.0]),
            torch.randn(2, 5, 32, generator=g))


@pytest.mark.parametrize("shape, tile, kwargs", [((4, 8, 8), (2, 2, 2), {"sparsity": 0.0}),
                                                 ((3, 8, 12), (2, 2, 4), {"topk": 8}),  # edge tiles: all 2 x 2 x 2
                                                 ((4, 8, 8), (2, 2, 2), {"sparsity": 0.75, "limit": 0.0})])
def test_wan_vsa_dense_equivalent_at_all_tiles(shape, tile, kwargs):
    model = _wan()
    x, t, text = _inputs(*shape)
    with torch.no_grad():
        dense = model(x, t, text).sample
    limit = kwargs.pop("limit", None)
    assert apply_vsa(model, tile=tile, backend="torch", **kwargs) is model
    if limit is not None:
        set_sparsity_limit(model, limit)  # a ramp at its start: all tiles whatever the target
    assert isinstance(model, VSAWanTransformer3DModel)
    assert all(isinstance(b.attn1.processor, VSAWanAttnProcessor) for b in model.blocks)
    assert not any(isinstance(b.attn2.processor, VSAWanAttnProcessor) for b in model.blocks)
    with torch.no_grad():
        sparse = model(x, t, text).sample
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-5)
    if limit is not None:  # the target sparsity (2 of 8 tiles) is no longer dense
        set_sparsity_limit(model, 1.0)
        with torch.no_grad():
            assert (model(x, t, text).sample - dense).abs().max() > 1e-4


def test_wan_vsa_trains_and_round_trips(tmp_path):
    model = apply_vsa(_wan(), sparsity=0.5, tile=(2, 2, 2), backend="torch").train()
    gates = {n: p for n, p in model.named_parameters() if "vsa_gate_coarse" in n}
    assert len(gates) == 2 * WAN["num_layers"] and all(float(p.detach().abs().sum()) == 0 for p in gates.values())
    x0, t, text = _inputs()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    s = (t / 1000).view(-1, 1, 1, 1, 1)
    x_t, target = (1 - s) * x0 + s * noise, noise - x0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(3):
        loss = torch.nn.functional.mse_loss(model(x_t, t, text).sample, target)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in gates.items() if "weight" in n)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] != losses[0]
    assert all(p.abs().sum() > 0 for p in gates.values())  # the gates trained

    model.eval()
    with torch.no_grad():
        expected = model(x_t, t, text).sample
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "VSAWanTransformer3DModel"
    assert (config["vsa_sparsity"], config["vsa_topk"], config["vsa_tile"]) == (0.5, None, [2, 2, 2])
    loaded = VSAWanTransformer3DModel.from_pretrained(tmp_path).eval()
    state = loaded.state_dict()
    for name, p in gates.items():
        torch.testing.assert_close(state[name], p.detach(), rtol=0, atol=0)
    assert all(isinstance(b.attn1.processor, VSAWanAttnProcessor) for b in loaded.blocks)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_t, t, text).sample, expected, rtol=0, atol=1e-5)


def test_plain_wan_folder_loads_as_vsa(tmp_path):
    """A pretrained (dense) Wan folder loads straight into the VSA class: zero gates, the same model at all tiles."""
    model = _wan()
    x, t, text = _inputs()
    with torch.no_grad():
        dense = model(x, t, text).sample
    model.save_pretrained(tmp_path)
    loaded = VSAWanTransformer3DModel.from_pretrained(tmp_path, vsa_sparsity=0.0, vsa_tile=(2, 2, 2),
                                                      vsa_backend="torch").eval()
    assert loaded.config.vsa_sparsity == 0.0
    gates = [b.attn1.vsa_gate_coarse for b in loaded.blocks]
    assert all(not g.weight.is_meta and g.weight.abs().sum() == 0 and g.bias.abs().sum() == 0 for g in gates)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, text).sample, dense, rtol=0, atol=1e-5)
