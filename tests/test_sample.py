"""Video out: sample.py from a checkpoint (EMA, guidance, seeds), VAE decoding for latent runs, the trainer's sample hook."""
import importlib.util
import json
import shutil
from pathlib import Path

import av
import pytest
import torch
from hydra import compose, initialize_config_dir

from vsa_train import sampling, trainer
from vsa_train.data.latents import write_shard
from vsa_train.data.text import CaptionEncoder
from vsa_train.sampling import generate, load_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("sample")  # one xdist worker: the module-scoped run_dir built once
PIXELS = ["data.frames=4", "data.height=8", "data.width=8"]
TINY = ["train.batch_size=2", "train.eval_samples=2", "train.eval_timesteps=1", "logger=none"]


def _load_sample_py():
    spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sample_cli = _load_sample_py()


def _train(run_dir, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="train", overrides=[*TINY, f"run_dir={run_dir}", *overrides])
    return trainer.train(cfg)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A synthetic run with EMA and the sample hook every 2 steps."""
    run = tmp_path_factory.mktemp("run")
    _train(run, *PIXELS, "train.max_steps=4", "train.ema=0.5", "train.sample_every=2", "train.sample_steps=2",
           "train.sample_count=1", "optim.lr=1e-2", "optim.warmup_steps=1", "logger=wandb")
    return run


def _frames(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_sample_cli_writes_mp4_and_gif(run_dir, tmp_path):
    written = sample_cli.main([f"checkpoint={run_dir}", "prompt=a red circle bouncing upwards slowly", "steps=3",
                               "cfg_scale=4", f"out={tmp_path / 'a.mp4'}", "num=2"])
    assert [p.name for p in written] == ["a_0.mp4", "a_0.gif", "a_1.mp4", "a_1.gif"]
    frames = _frames(tmp_path / "a_0.mp4")
    assert len(frames) == 4 and frames[0].shape == (8, 8, 3)
    assert not (frames[0] == _frames(tmp_path / "a_1.mp4")[0]).all()  # two samples, two noises


def test_sample_cli_writes_into_the_run_directory_by_default(run_dir, tmp_path, monkeypatch):
    """Issue 29, item 5c: not into the current folder, but beside the run's own samples."""
    run = shutil.copytree(run_dir, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    written = sample_cli.main([f"checkpoint={run}", "prompt=A red circle, bouncing!", "steps=2"])
    assert written == [run / "samples" / "step_00000004_a_red_circle_bouncing.mp4",
                       run / "samples" / "step_00000004_a_red_circle_bouncing.gif"]
    assert all(p.is_file() for p in written) and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_sample_hook_writes_videos_during_training(run_dir):
    """One folder per prompt (train.sample_count=1: the first eval caption), named by its first words, its videos by
    step; samples/prompts.json holds the whole prompt and its seed."""
    (entry,) = json.loads((run_dir / "samples" / "prompts.json").read_text())
    assert entry["seed"] == 0 and entry["folder"] == f"0_{sampling.slug(entry['prompt'])}"
    folder = run_dir / "samples" / entry["folder"]
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["step_00000002.gif", "step_00000002.mp4", "step_00000004.gif", "step_00000004.mp4"]
    assert len(_frames(folder / "step_00000004.mp4")) == 4
    logged = sorted(p.suffix for p in (run_dir / "wandb").glob("offline-run-*/files/media/videos/media/samples_*"))
    assert logged == [".mp4", ".mp4"]  # wandb.Video rows (offline), one per sampling


def test_ema_guidance_and_seed_change_the_sample(run_dir):
    ema, cfg, ckpt = load_model(run_dir, ema=True)
    raw, _, _ = load_model(ckpt, ema=False)  # a checkpoint directory works too
    assert ckpt.name == "step_00000004"
    prompt = ["a green square bouncing left to right quickly on a plain red background"]
    a = generate(ema, cfg.data, prompt, steps=2, cfg_scale=3.0, seed=0)
    assert a.shape == (1, 3, 4, 8, 8) and a.abs().max() <= 1
    torch.testing.assert_close(generate(ema, cfg.data, prompt, steps=2, cfg_scale=3.0, seed=0), a)  # deterministic
    assert not torch.allclose(generate(raw, cfg.data, prompt, steps=2, cfg_scale=3.0, seed=0), a)
    assert not torch.allclose(generate(ema, cfg.data, prompt, steps=2, cfg_scale=1.0, seed=0), a)
    assert not torch.allclose(generate(ema, cfg.data, prompt, steps=2, cfg_scale=3.0, seed=1), a)


def test_bad_arguments_fail_clearly(run_dir, tmp_path):
    with pytest.raises(SystemExit, match="prompt=... is required"):
        sample_cli.main([f"checkpoint={run_dir}"])
    with pytest.raises(SystemExit, match="unknown keys"):
        sample_cli.main([f"checkpoint={run_dir}", "prompt=x", "guidance=3"])
    with pytest.raises(SystemExit, match="key=value"):
        sample_cli.main([str(run_dir)])
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        sample_cli.main([f"checkpoint={tmp_path}", "prompt=x"])


def test_latent_run_samples_through_the_vae(tmp_path):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=[0.0] * 4,
                     latents_std=[1.0] * 4).save_pretrained(tmp_path / "vae")
    captions = ["a man in a car", "a rabbit in a meadow"]
    encoder = CaptionEncoder(["a", "car", "in", "man", "meadow", "rabbit"], dim=16, max_len=6, seed=0)
    text, mask = encoder.encode(captions)
    (tmp_path / "lat").mkdir()
    write_shard(tmp_path / "lat" / "shard_00000.safetensors", torch.randn(2, 4, 2, 2, 2), text, mask, captions, [])
    (tmp_path / "lat" / "index.json").write_text(json.dumps({
        "latent_shape": [4, 2, 2, 2], "text_shape": [6, 16], "shards": [{"file": "shard_00000.safetensors",
                                                                          "count": 2}],
        "vae": str(tmp_path / "vae"), "text_encoder": "builtin", "vocab": sorted(encoder.index), "text_seed": 0}))
    _train(tmp_path / "run", "data=latents", f"data.path={tmp_path / 'lat'}", "train.max_steps=1")
    sample_cli.main([f"checkpoint={tmp_path / 'run'}", "prompt=a man in a car", "steps=2", f"out={tmp_path / 'l.mp4'}"])
    frames = _frames(tmp_path / "l.mp4")
    assert len(frames) == 5 and frames[0].shape == (16, 16, 3)  # decoded: 4x temporal (1 + 4k), 8x spatial


def test_vsa_run_samples_at_the_sparsity_it_reached(tmp_path):
    from vsa_train.models.vsa import VSAAttention

    _train(tmp_path, *PIXELS, "attn=vsa", "attn.schedule=ramp", "attn.ramp_rate=0.25", "attn.ramp_interval=1",
           "train.max_steps=2")
    model, cfg, _ = load_model(tmp_path)
    limits = {m.limit for m in model.modules() if isinstance(m, VSAAttention)}
    assert limits == {0.5}  # 2 steps of a 0.25-per-step ramp, not the final target
    assert generate(model, cfg.data, ["a red circle"], steps=1, cfg_scale=2.0).shape == (1, 3, 4, 8, 8)
