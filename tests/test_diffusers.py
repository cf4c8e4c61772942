"""diffusers interop (vsa_train/integrations/): a trained run exported as a diffusers folder that stock diffusers loads
where vsa_train is not installed, sampling exactly what vsa_train.sampling.generate (sample.py) does; its model card;
VSA installed in a tiny random WanTransformer3DModel."""
import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from vsa_train.data import build_text_encoder, data_spec
from vsa_train.diffusion import euler_sample
from vsa_train.integrations.diffusers import (CaptionTextEncoder, VideoDiTTransformer, VSAVideoPipeline,
                                              VSAWanAttnProcessor, VSAWanTransformer3DModel, apply_vsa,
                                              set_sparsity_limit)
from vsa_train.integrations.model_card import _commit_line, trained_commits
from vsa_train.integrations.remote_code import module_sources
from vsa_train.models.vsa import VSAAttention
from vsa_train.provenance import code_commit
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


@pytest.fixture(scope="module")
def dense_exported(tmp_path_factory):
    """A tiny dense run trained 1 step, exported."""
    root = tmp_path_factory.mktemp("dense")
    _run(root / "run", "train.max_steps=1", "train.eval_every=1", "train.ckpt_every=1")
    export_diffusers.main([str(root / "run"), str(root / "out")])
    return root / "run", root / "out"


def _pipe(path):
    pipe = VSAVideoPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _frames(pixels: torch.Tensor) -> torch.Tensor:
    """generate's pixels [B, 3, T, H, W] in [-1, 1] as the pipeline's "pt" frames [B, T, 3, H, W] in [0, 1]."""
    return (pixels * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)


def test_export_layout_and_weights(exported):
    run, out, raw = exported
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["vsa_train_integrations_pipeline", "VSAVideoPipeline"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["transformer"] == ["vsa_train_integrations_dit_model", "VideoDiTTransformer"]
    assert index["text_encoder"] == ["vsa_train_integrations_caption_model", "CaptionTextEncoder"]
    assert (out / "vsa_train_integrations_pipeline.py").is_file()
    for name, module in (("transformer", "vsa_train_integrations_dit_model"),
                         ("text_encoder", "vsa_train_integrations_caption_model")):
        config = json.loads((out / name / "config.json").read_text())
        assert config["auto_map"]["AutoModel"] == f"{module}.{index[name][1]}"
        assert (out / name / f"{module}.py").is_file()
    shipped = {p.name for p in (out / "transformer").glob("*.py")}
    assert {"vsa_train_models_dit.py", "vsa_train_models_vsa.py", "vsa_train_ops_reference.py"} <= shipped
    assert not any("function" in n or "pool" in n or "gating" in n for n in shipped)  # no Triton kernels
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


class _NoImports(ast.NodeTransformer):
    """Drops what an export rewrites: imports, the ImportError raised for `import triton`, `if HAVE_TRITON:` blocks."""

    def visit_Import(self, node):
        return None

    visit_ImportFrom = visit_Import

    def visit_Raise(self, node):
        return None if "ImportError" in ast.unparse(node) else node

    def visit_If(self, node):
        return None if ast.unparse(node.test) == "HAVE_TRITON" else self.generic_visit(node)


@pytest.mark.parametrize("cls", [VideoDiTTransformer, CaptionTextEncoder, VSAWanTransformer3DModel])
def test_shipped_code_is_the_package_source(cls):
    """Each file an export ships for `cls` (VideoDiT's, its caption encoder's, a VSA Wan's: tests/test_wan_export.py)
    is its package module but for what the export rewrites (imports, Triton)."""
    sources = module_sources(cls)
    assert list(sources)[0] == cls.__module__
    if cls is not CaptionTextEncoder:
        assert {"vsa_train.models.vsa", "vsa_train.ops.tiling", "vsa_train.models.auto_map"} <= sources.keys()
    for module, source in sources.items():
        path = (ROOT / Path(*module.split("."))).with_suffix(".py")
        path = path if path.is_file() else path.with_suffix("") / "__init__.py"
        imports = [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.Import, ast.ImportFrom))]
        roots = {name.split(".")[0] for n in imports if not getattr(n, "level", 0)
                 for name in ([n.module] if isinstance(n, ast.ImportFrom) else [a.name for a in n.names])}
        assert not roots & {"vsa_train", "triton"}, module  # the shipped files import each other relatively
        shipped, original = (ast.dump(_NoImports().visit(ast.parse(text))) for text in (source, path.read_text()))
        assert shipped == original, module


def test_model_card(exported):
    run, out, raw = exported
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-video"
    facts = card.data.vsa_train
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert facts["step"] == 2 and facts["training_flops"] == rows[-1]["flops"] > 0
    assert facts["eval_loss"] == rows[-1]["eval/loss_ema"] and facts["ema"] is True
    assert ModelCard.load(raw / "README.md").data.vsa_train["eval_loss"] == rows[-1]["eval/loss"]
    # the trainer recorded the code it ran in the checkpoint (one launch: one commit); the export names its own
    assert facts["commit"] == facts["export_commit"] == code_commit() and facts["commits"] == [code_commit()]
    assert f"| trained at commit | {code_commit()} |" in card.text and facts["data_commit"] is None
    assert 'DiffusionPipeline.from_pretrained("' in card.text and "trust_remote_code=True" in card.text
    assert "attn:\n  name: vsa" in card.text and "ramp_rate: 0.25" in card.text  # the training config


def test_the_card_names_every_commit_the_weights_were_trained_at(tmp_path):
    """state.json's commits (a resumed run's, oldest first), else a grid run's record.json, else none."""
    assert trained_commits(tmp_path, {"code_commits": ["a1", "b2+changes"]}) == ["a1", "b2+changes"]
    assert _commit_line(["a1", "b2+changes"]) == "b2+changes (resumed from weights trained at a1)"
    assert trained_commits(tmp_path, {}) == [] and _commit_line([]).startswith("not recorded")
    (tmp_path / "record.json").write_text(json.dumps({"commit": "0123abc"}))  # a grid run's, older checkpoints
    assert trained_commits(tmp_path, {}) == ["0123abc"]


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
        got = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=scale, seed=seed, output_type="pt").frames
        assert got.shape == (2, 4, 3, 8, 8)
        torch.testing.assert_close(got, _frames(expected), rtol=0, atol=0)
        np.testing.assert_array_equal(  # the default: np frames [B, T, H, W, 3], from the same generator
            pipe(PROMPTS, num_inference_steps=steps, guidance_scale=scale,
                 generator=torch.Generator().manual_seed(seed)).frames, got.permute(0, 1, 3, 4, 2).numpy())
    # before the clamp: the raw Euler result of vsa_train.diffusion.euler_sample with the same noise
    spec = data_spec(cfg.data)
    noise = torch.randn((2, spec.in_channels, *spec.video_shape), generator=torch.Generator().manual_seed(3))
    text, mask = build_text_encoder(cfg.data).encode(PROMPTS)
    expected = euler_sample(model, noise, text, mask, 4, 2.5)
    got = pipe(PROMPTS, num_inference_steps=4, guidance_scale=2.5, generator=torch.Generator().manual_seed(3),
               output_type="latent").frames
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # a negative prompt replaces the all-masked caption of guidance
    negative = "striped background"
    neg, neg_mask = build_text_encoder(cfg.data).encode([negative, negative])
    expected = euler_sample(model, noise, text, mask, 2, 3.0, null_text=neg, null_mask=neg_mask)
    got = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(3), output_type="latent").frames
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, euler_sample(model, noise, text, mask, 2, 3.0))


def test_pipeline_outputs_and_generators(exported):
    _, out, _ = exported
    pipe = _pipe(out)
    run = dict(num_inference_steps=1, guidance_scale=2.0)
    frames = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **run).frames
    assert isinstance(frames, np.ndarray) and frames.shape == (1, 4, 8, 8, 3) and frames.dtype == np.float32
    assert frames.min() >= 0 and frames.max() <= 1
    pil = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="pil", **run).frames
    assert len(pil) == 1 and len(pil[0]) == 4 and all(isinstance(f, PIL.Image.Image) for f in pil[0])
    assert pil[0][0].size == (8, 8)
    np.testing.assert_array_equal(np.asarray(pil[0][2]), (frames[0, 2] * 255).round().astype(np.uint8))
    # one generator per video: each video's noise from its own
    both = pipe(PROMPTS, generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(0)],
                output_type="latent", **run).frames
    alone = pipe(PROMPTS[1], generator=torch.Generator().manual_seed(0), output_type="latent", **run).frames
    torch.testing.assert_close(both[1:], alone)
    # a negative prompt's embeddings, one row for both prompts, act as the negative prompt itself
    neg, neg_mask = pipe.text_encoder.encode(["striped"])
    by_text, by_embeds = (pipe(PROMPTS, generator=torch.Generator().manual_seed(2), output_type="latent", **run,
                               **kw).frames
                          for kw in (dict(negative_prompt="striped"),
                                     dict(negative_prompt_embeds=neg, negative_prompt_mask=neg_mask)))
    torch.testing.assert_close(by_embeds, by_text, rtol=0, atol=0)
    for bad, match in ((dict(output_type="mp4"), "output_type must be one of np, pil, pt, latent, got 'mp4'"),
                       (dict(negative_prompt=["a", "b", "c"]), "negative_prompt has 3 entries for 2 prompts"),
                       (dict(generator=[torch.Generator()]), "generator is a list of 1 for 2 videos")):
        with pytest.raises(ValueError, match=match) as err:
            pipe(PROMPTS, **run, **bad)
        assert "\n" not in str(err.value)


# A process where vsa_train (and omegaconf, its config library) cannot be imported (it refuses the import, whatever
# the path): stock diffusers loads each export with its own code, writes an mp4 and saves the frames and a
# transformer output for the test to compare.
STOCK = textwrap.dedent("""
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("vsa_train", "omegaconf"):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, Refuse())
    try:
        import vsa_train  # noqa: F401
        sys.exit("vsa_train was importable")
    except ModuleNotFoundError:
        print("vsa_train not importable")

    import numpy as np
    import torch
    from diffusers import AutoModel, DiffusionPipeline
    from diffusers.utils import export_to_video
    from safetensors.torch import load_file

    for folder, prompts in zip(sys.argv[1::2], sys.argv[2::2]):
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        frames = pipe(prompts.split("|"), negative_prompt="striped", num_inference_steps=3, guidance_scale=4.0,
                      generator=torch.Generator().manual_seed(1)).frames
        np.save(f"{folder}.frames.npy", frames)
        export_to_video(frames[0], f"{folder}.mp4", fps=8, macro_block_size=1)
        model = AutoModel.from_pretrained(f"{folder}/transformer", trust_remote_code=True)
        inputs = load_file(f"{folder}.inputs.safetensors")
        with torch.no_grad():
            np.save(f"{folder}.v.npy", model(*(inputs[k] for k in ("x", "t", "text", "mask"))).numpy())
        print(type(pipe).__module__, type(model).__module__)
""")


def test_stock_diffusers_loads_the_export_without_vsa_train(exported, dense_exported, tmp_path):
    folders = [exported[1], dense_exported[1]]
    g = torch.Generator().manual_seed(4)
    inputs = {f: (torch.randn(2, 3, 4, 8, 8, generator=g), torch.tensor([0.3, 0.9]),
                  *build_text_encoder(load_model(f.parent / "run")[1].data).encode(PROMPTS)) for f in folders}
    for folder, x in inputs.items():
        save_file(dict(zip(("x", "t", "text", "mask"), x)), f"{folder}.inputs.safetensors")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    args = [a for f in folders for a in (str(f), "|".join(PROMPTS))]
    done = subprocess.run([sys.executable, "-c", STOCK, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vsa_train not importable" in done.stdout
    assert "diffusers_modules.local.vsa_train_integrations_pipeline" in done.stdout
    for folder in folders:
        pipe = _pipe(folder)
        expected = pipe(PROMPTS, negative_prompt="striped", num_inference_steps=3, guidance_scale=4.0,
                        generator=torch.Generator().manual_seed(1)).frames
        np.testing.assert_array_equal(np.load(f"{folder}.frames.npy"), expected)  # [2, 4, 8, 8, 3]
        video = iio.imread(f"{folder}.mp4")
        assert video.shape == (4, 8, 8, 3)
        with torch.no_grad():  # the shipped model computes what the package's does
            v = pipe.transformer(*inputs[folder]).numpy()
        np.testing.assert_array_equal(np.load(f"{folder}.v.npy"), v)
        assert np.abs(v).max() > 0


def test_only_trusted_code_runs(exported, tmp_path):
    """The folder's code runs only under trust_remote_code=True: VSAVideoPipeline.from_pretrained never runs it."""
    from diffusers import DiffusionPipeline

    folder = tmp_path / "trapped"
    shutil.copytree(exported[1], folder)
    for path in folder.rglob("*.py"):  # code that must not run
        path.write_text(path.read_text() + "\nraise SystemExit('code of the folder ran')\n")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(folder)
    pipe = _pipe(folder)
    assert type(pipe) is VSAVideoPipeline and type(pipe.transformer) is VideoDiTTransformer
    frames = pipe(PROMPTS[0], num_inference_steps=1, seed=0).frames
    np.testing.assert_array_equal(frames, _pipe(exported[1])(PROMPTS[0], num_inference_steps=1, seed=0).frames)


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
