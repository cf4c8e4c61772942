"""model=wan runs exported as stock diffusers WanPipeline folders (vsa_train/integrations/wan_export.py): tiny random
Wan, AutoencoderKLWan and UMT5 encoder, latents written straight into shards, runs trained 2 steps on the CPU.

The folders are loaded in a subprocess where vsa_train (and omegaconf) cannot be imported, with stock diffusers calls
only: the dense one as WanPipeline, the VSA one through trust_remote_code=True; both write an mp4. That the shipped
code is the package's source is tests/test_diffusers.py's test_shipped_code_is_the_package_source, for every class
an export ships.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from vsa_train import trainer
from vsa_train.data import data_spec
from vsa_train.data.encoders import ModelSpec, get_text_encoder
from vsa_train.data.latents import decode, write_shard
from vsa_train.diffusion import euler_sample
from vsa_train.errors import MissingInput
from vsa_train.integrations.remote_code import flat_name, module_sources
from vsa_train.integrations.wan_export import CLASS, MODULE, components
from vsa_train.models.wan_vsa import VSAWanTransformer3DModel
from vsa_train.models.wan_vsa import DENSE_LOAD_NOTE
from vsa_train.sampling import load_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("wan_export")  # one worker: the module-scoped runs and exports built once
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
import export_diffusers  # noqa: E402

WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "circle", "blue", "square", "moving", "left", "right", "to"]
TEXT_LEN, TEXT_DIM = 8, 16
LATENT = [4, 2, 8, 8]  # C, T, h, w: 5 frames of 64 x 64 through the VAE; Wan's grid 2 x 4 x 4 = 4 tiles of 2 x 2 x 2
TINY_PIXELS = ["train.batch_size=2", "train.max_steps=1", "train.eval_every=1", "train.ckpt_every=1",
               "train.eval_samples=2", "train.eval_timesteps=1", "logger=none", "data.frames=4", "data.height=8",
               "data.width=8"]
PROMPTS = ["a red circle moving left to right", "blue square"]
WAN = ["model=wan", "model.num_layers=2", "model.num_attention_heads=2", "model.attention_head_dim=16",
       "model.ffn_dim=64", "model.freq_dim=32", "model.rope_max_seq_len=32"]
VSA = ["attn=vsa", "attn.tile=[2,2,2]", "attn.sparsity=0.5", "attn.backend=torch", "attn.schedule=ramp",
       "attn.ramp_rate=0.25", "attn.ramp_interval=1"]  # at step 2 the limit is 0.5: 3 of 4 tiles, the target 2
STEPS = ["train.batch_size=2", "train.max_steps=2", "train.eval_every=2", "train.ckpt_every=2", "train.ema=0.9",
         "train.eval_samples=2", "train.eval_timesteps=1", "train.log_every=1", "logger=none"]


def _run(run_dir, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return trainer.train(compose(config_name="train", overrides=[f"run_dir={run_dir}", *overrides]))


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """A Wan-repo-like folder (vae/, text_encoder/, tokenizer/) and latents "encoded" with it: random latents,
    the encoder's embeddings of the captions, index.json recording both models as encode_latents.py does."""
    from test_text_encoders import MAX_LEN, save_tiny_t5  # a word-level tokenizer and a tiny encoder, 16 wide

    assert (MAX_LEN, TEXT_DIM) == (TEXT_LEN, 16)
    repo = save_tiny_t5(tmp_path_factory.mktemp("repo"), WORDS, umt5=True)
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=[0.1, 0.2, -0.1, 0.0],
                     latents_std=[0.5, 1.0, 2.0, 1.0]).save_pretrained(repo / "vae")
    out = tmp_path_factory.mktemp("latents")
    vae = ModelSpec(str(repo), subfolder="vae")
    text = ModelSpec(str(repo), subfolder="text_encoder", tokenizer_subfolder="tokenizer")
    captions = PROMPTS * 2
    emb, mask = get_text_encoder(text, max_len=TEXT_LEN).encode(captions)
    write_shard(out / "shard_00000.safetensors", torch.randn(len(captions), *LATENT), emb, mask, captions, [])
    index = {"latent_shape": LATENT, "text_shape": [TEXT_LEN, TEXT_DIM], "count": len(captions),
             "shards": [{"file": "shard_00000.safetensors", "count": len(captions), "checksums": True}],
             "skipped": [], "vae": vae.to_dict(), "text_encoder": text.to_dict()}
    (out / "index.json").write_text(json.dumps(index))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, latents):
    """A dense and a VSA (ramping) Wan run on the latents, each exported with scripts/export_diffusers.py."""
    root = tmp_path_factory.mktemp("wan_export")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, attn in (("dense", []), ("vsa", VSA)):
            _run(root / name, *WAN, *attn, *STEPS, "data=latents", f"data.path={latents}")
            export_diffusers.main([str(root / name), str(root / f"{name}_out")])
    finally:
        torch.set_num_threads(threads)
    return root


# Stock diffusers only, vsa_train and omegaconf unimportable: loads both exports, samples, writes mp4s, reports.
LOADER = textwrap.dedent('''
    import importlib.abc, json, logging, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("vsa_train", "omegaconf", "hydra"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")

    sys.meta_path.insert(0, Block())
    try:
        import vsa_train  # noqa: F401
        importable = True
    except ImportError:
        importable = False

    import torch
    from diffusers import AutoModel, DiffusionPipeline, WanPipeline, WanTransformer3DModel
    from diffusers.utils import export_to_video
    from safetensors.torch import load_file, save_file

    root, noise = sys.argv[1], load_file(sys.argv[2])
    report = {"vsa_train_importable": importable}
    outputs = {}
    kwargs = dict(negative_prompt_embeds=torch.zeros(2, TEXT_LEN, TEXT_DIM), max_sequence_length=TEXT_LEN,
                  num_frames=5, height=64, width=64, guidance_scale=3.0)
    for name in ("dense", "vsa"):
        folder = f"{root}/{name}_out"
        try:
            DiffusionPipeline.from_pretrained(folder)
            report[f"{name}_plain_load"] = "ok"
        except Exception as e:
            report[f"{name}_plain_load"] = f"{type(e).__name__}: {e}"
        if name == "dense":
            pipe = WanPipeline.from_pretrained(folder)
        else:
            pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        t = pipe.transformer
        report[name] = {"pipeline": type(pipe).__name__, "transformer": type(t).__name__,
                        "processors": sorted({type(b.attn1.processor).__name__ for b in t.blocks}),
                        "limit": getattr(getattr(t, "_vsa_state", None), "limit", None)}
        for steps in (1, 2):
            outputs[f"{name}_latent_{steps}"] = pipe(PROMPTS, num_inference_steps=steps, latents=noise["noise"],
                                                     output_type="latent", **kwargs).frames
        frames = pipe(PROMPTS, num_inference_steps=1, latents=noise["noise"], output_type="np", **kwargs).frames
        outputs[f"{name}_np"] = torch.from_numpy(frames)
        with torch.no_grad():
            outputs[f"{name}_forward"] = t(noise["noise"], torch.tensor([300.0, 800.0]), noise["text"]).sample
        report[f"{name}_mp4"] = export_to_video(list(frames[0]), f"{root}/{name}.mp4", fps=4)

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    alone = AutoModel.from_pretrained(f"{root}/vsa_out/transformer", trust_remote_code=True)  # by its auto_map
    report["vsa_alone"] = [type(alone).__name__, alone._vsa_state.limit]
    dense = WanTransformer3DModel.from_pretrained(f"{root}/vsa_out/transformer")
    report["dense_load"] = {"class": type(dense).__name__,
                            "warnings": [r.getMessage() for r in records if r.levelno >= logging.WARNING]}
    save_file({k: v.contiguous() for k, v in outputs.items()}, f"{root}/outputs.safetensors")
    print(json.dumps(report))
''')


@pytest.fixture(scope="module")
def loaded(exported):
    """What the stock-diffusers subprocess reports, and its outputs (noise and text fixed here)."""
    g = torch.Generator().manual_seed(5)
    save_file({"noise": torch.randn(2, *LATENT, generator=g), "text": torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g)},
              str(exported / "inputs.safetensors"))
    code = f"TEXT_LEN, TEXT_DIM, PROMPTS = {TEXT_LEN}, {TEXT_DIM}, {PROMPTS!r}\n{LOADER}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(exported / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, str(exported), str(exported / "inputs.safetensors")],
                          capture_output=True, text=True, cwd=exported, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report, load_file(str(exported / "outputs.safetensors")), load_file(str(exported / "inputs.safetensors"))


def test_export_layout(exported, latents):
    for name in ("dense", "vsa"):
        out = exported / f"{name}_out"
        index = json.loads((out / "model_index.json").read_text())
        assert index["_class_name"] == "WanPipeline"
        assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
        assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
        assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        assert index["transformer"] == (["diffusers", "WanTransformer3DModel"] if name == "dense" else [MODULE, CLASS])
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
        assert (sched.config.shift, sched.config.num_train_timesteps) == (1.0, 1000)
        shipped = {p.name for p in (out / "transformer").glob("*.py")}  # what remote_code.ship generates
        assert shipped == ({f"{flat_name(m)}.py" for m in module_sources(VSAWanTransformer3DModel)}
                           if name == "vsa" else set())
        auto_map = json.loads((out / "transformer" / "config.json").read_text()).get("auto_map")
        assert auto_map == ({"AutoModel": f"{MODULE}.{CLASS}"} if name == "vsa" else None)
        card = ModelCard.load(out / "README.md")  # the model card of every export (model_card.py)
        assert (card.data.vsa_train["step"], card.data.vsa_train["attn"]) == (2, name)
        assert f"max_sequence_length={TEXT_LEN}" in card.text and "num_frames=5, height=64, width=64" in card.text
        assert "negative_prompt_embeds=torch.zeros(len(prompt), 8, 16)" in card.text
        assert ("trust_remote_code=True" in card.text) == (name == "vsa")
        assert json.loads((out / "vsa_train_export.json").read_text())["ema"] is True
    config = json.loads((exported / "vsa_out" / "transformer" / "config.json").read_text())
    assert (config["vsa_limit"], config["vsa_sparsity"], config["vsa_attention"]) == (0.5, 0.5, DENSE_LOAD_NOTE)


def test_stock_diffusers_loads_and_samples_both(loaded, exported):
    report, outputs, _ = loaded
    assert report["vsa_train_importable"] is False
    assert report["dense"] == {"pipeline": "WanPipeline", "transformer": "WanTransformer3DModel",
                               "processors": ["WanAttnProcessor"], "limit": None}
    assert report["vsa"] == {"pipeline": "WanPipeline", "transformer": CLASS, "processors": ["VSAWanAttnProcessor"],
                             "limit": 0.5}
    assert report["vsa_alone"] == [CLASS, 0.5]
    assert report["dense_plain_load"] == "ok"  # no remote code in a dense export
    assert "trust_remote_code=True" in report["vsa_plain_load"]  # a VSA export refuses to load without it
    for name in ("dense", "vsa"):
        mp4 = Path(report[f"{name}_mp4"])
        assert mp4.is_file() and mp4.read_bytes()[4:8] == b"ftyp"
        assert outputs[f"{name}_np"].shape == (2, 5, 64, 64, 3)


@pytest.mark.parametrize("name", ["dense", "vsa"])
def test_stock_sampling_is_ours(loaded, exported, name):
    """The time convention holds: with our null text and text length, one WanPipeline step is our Euler sampler's
    step; two steps are Euler on the scheduler's grid; pixels are our VAE decode. The VSA transformer loaded from
    remote code is the in-package model (no drift between the bundled source and the package)."""
    _, outputs, inputs = loaded
    model, cfg, _ = load_model(exported / name)
    if name == "vsa":
        assert model.transformer._vsa_state.limit == 0.5
    noise = inputs["noise"]
    text, mask = get_text_encoder(ModelSpec.parse(json.loads((Path(cfg.data.path) / "index.json").read_text())[
        "text_encoder"]), max_len=TEXT_LEN).encode(PROMPTS)
    with torch.no_grad():
        forward = model(noise, torch.tensor([0.3, 0.8]), inputs["text"])
        torch.testing.assert_close(outputs[f"{name}_forward"], forward, rtol=0, atol=1e-5)
        one = euler_sample(model, noise, text, mask, 1, 3.0)
        torch.testing.assert_close(outputs[f"{name}_latent_1"], one, rtol=0, atol=1e-5)
        sigmas = [1.0, 1 / 1000, 0.0]  # the scheduler's grid for 2 steps: linspace(1, 1/1000, 2), then 0
        x = noise
        for s, s_next in zip(sigmas, sigmas[1:]):
            t = torch.full((2,), s)
            v_text, v_null = model(x, t, text, mask), model(x, t, text, torch.zeros_like(mask))
            x = x + (s_next - s) * (v_null + 3.0 * (v_text - v_null))
        torch.testing.assert_close(outputs[f"{name}_latent_2"], x, rtol=0, atol=1e-5)
    pixels = (decode(cfg.data, one) + 1) / 2  # [B, 3, F, H, W] -> WanPipeline's "np": [B, F, H, W, 3] in [0, 1]
    torch.testing.assert_close(outputs[f"{name}_np"], pixels.permute(0, 2, 3, 4, 1), rtol=0, atol=1e-4)
    assert data_spec(cfg.data).video_shape == tuple(LATENT[1:])


def test_dense_load_of_a_vsa_export_warns_in_one_line(loaded):
    report, _, _ = loaded
    assert report["dense_load"]["class"] == "WanTransformer3DModel"
    said = [w for w in report["dense_load"]["warnings"] if DENSE_LOAD_NOTE in w]
    assert len(said) == 1 and "\n" not in said[0] and "runs dense attention" in said[0]


def test_what_cannot_be_a_wan_pipeline_is_one_line(tmp_path, latents):
    pixel = tmp_path / "pixel"
    _run(pixel, *WAN, *TINY_PIXELS)
    with pytest.raises(SystemExit) as e:
        export_diffusers.main([str(pixel), str(tmp_path / "out")])
    assert str(e.value) == ("export_diffusers: a model=wan run on pixel data (data=synthetic) generates pixels, not "
                            "VAE latents: it has no WanPipeline (train on data=latents), or export the transformer "
                            "alone (--transformer-only)")
    assert not (tmp_path / "out").exists()
    repo = json.loads((latents / "index.json").read_text())["vae"]["path"]
    with pytest.raises(SystemExit, match=r"^export_diffusers: the VAE .* has 4 latent channels; the transformer takes "
                                         r"3$"):
        export_diffusers.main([str(pixel), str(tmp_path / "x"), "--vae", repo, "--vae-subfolder", "vae",
                               "--text-encoder", repo, "--text-encoder-subfolder", "text_encoder"])
    out = export_diffusers.main([str(pixel), str(tmp_path / "alone"), "--transformer-only"])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "transformer", "vsa_train_export.json"]
    assert type(WanTransformer3DModel.from_pretrained(out / "transformer")) is WanTransformer3DModel
    dit = tmp_path / "dit"  # the Wan options are refused for a VideoDiT run
    _run(dit, *TINY_PIXELS)
    with pytest.raises(SystemExit, match="^export_diffusers: --vae, --text-encoder and --transformer-only are for "
                                         "model=wan runs, not model=dit_tiny$"):
        export_diffusers.main([str(dit), str(tmp_path / "y"), "--transformer-only"])
    # latents encoded with the built-in caption encoder: no transformers model for the pipeline
    builtin = tmp_path / "builtin"
    builtin.mkdir()
    index = json.loads((latents / "index.json").read_text())
    (builtin / "index.json").write_text(json.dumps(dict(index, text_encoder="builtin")))
    cfg = OmegaConf.create({"data": {"name": "latents", "source": "latents", "path": str(builtin)}})
    with pytest.raises(MissingInput) as e:
        components(cfg)
    assert str(e.value) == (f"cannot export a WanPipeline: no a transformers text encoder (--text-encoder; "
                            f"{builtin / 'index.json'} records the built-in caption encoder); or export the "
                            "transformer alone (--transformer-only)")
