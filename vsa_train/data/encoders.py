"""Pretrained models by Hub id or local folder (VAE, T5/UMT5-style text encoders) and the on-disk caption cache.

A model is named by a `ModelSpec`: the Hub id or local (diffusers / transformers) folder as the user gave it,
plus `subfolder`, `revision` and `dtype` (fp32 | bf16 | fp16), passed to `from_pretrained(path, subfolder=...,
revision=..., torch_dtype=...)`. Written into index.json as a small dict (`to_dict`); `ModelSpec.parse` also
reads the old form, a bare path string. A local folder is recorded as an absolute path, a Hub id as given.

Text encoders are loaded once per process: `get_text_encoder(spec, ...)` returns one shared instance per
(spec, max_len, device), and the weights live in one process-wide cache keyed by the spec. `release()` moves
them to the CPU; `release(drop=True)` / `release_text_encoders()` frees them (reloaded on next use).

Pixel data (`data=videos`, `data=hf`) with `data.text_encoder=<id or folder>` encodes captions through
`CachedTextEncoder`: each caption's embedding is computed once and stored beside the data in
`<manifest folder | data.folder | dataset folder>/.text_cache/<hash of the encoder spec>/<sha1 of caption>.safetensors`
(written under a temporary name and renamed; read with safetensors, never unpickled; a corrupt file is
recomputed with a warning). The text width and length of the DataSpec are the encoder's hidden size and
the tokenizer's `model_max_length` (data.text_len when the tokenizer sets none).
"""
import hashlib
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
_NO_MAX_LEN = 100_000  # tokenizers without a model_max_length report a huge sentinel (1e30)


def dtype_name(value) -> str:
    """'fp32' | 'bf16' | 'fp16' from a name ('bfloat16', 'torch.float16', ...) or a torch dtype; None -> fp32."""
    if value is None:
        return "fp32"
    if isinstance(value, torch.dtype):
        value = str(value)
    name = str(value).lower().removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or float32 / bfloat16 / float16), got {value!r}")
    return name


def given_path(path) -> str:
    """The path or id as recorded: an existing local folder made absolute (it must not depend on the working
    directory), anything else (a Hub id) kept exactly as given."""
    path = str(path)
    local = os.path.expanduser(path)
    return os.path.abspath(local) if os.path.isdir(local) else path


@dataclass(frozen=True)
class ModelSpec:
    """A pretrained model: Hub id or local folder, subfolder, revision, dtype (and for text encoders the
    tokenizer's subfolder; None: the model's subfolder)."""

    path: str
    subfolder: str | None = None
    revision: str | None = None
    dtype: str = "fp32"
    tokenizer_subfolder: str | None = None

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"a model path or Hub id must be a non-empty string, got {self.path!r}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))

    @classmethod
    def parse(cls, value) -> "ModelSpec":
        """From a ModelSpec, a dict (index.json, new form) or a bare path string (old form: fp32, no subfolder)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls(path=str(value))
        if isinstance(value, dict) or hasattr(value, "items"):
            value = dict(value.items())
            unknown = set(value) - {"path", "subfolder", "revision", "dtype", "tokenizer_subfolder"}
            if unknown or "path" not in value:
                raise ValueError(f"a model spec needs 'path' and at most subfolder/revision/dtype/"
                                 f"tokenizer_subfolder, got {value}")
            return cls(**value)
        raise ValueError(f"a model spec is a path / Hub id or a dict, got {value!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        """For index.json: path, subfolder, revision, dtype (+ tokenizer_subfolder when set)."""
        d = asdict(self)
        if d["tokenizer_subfolder"] is None:
            del d["tokenizer_subfolder"]
        return d

    def kwargs(self, tokenizer: bool = False) -> dict:
        """subfolder / revision keyword arguments for from_pretrained (those set)."""
        sub = (self.tokenizer_subfolder or self.subfolder) if tokenizer else self.subfolder
        return {k: v for k, v in (("subfolder", sub), ("revision", self.revision)) if v}

    def key(self, *extra) -> str:
        """A short stable hash of the spec (and `extra`), e.g. for cache folders."""
        blob = json.dumps([asdict(self), *extra], sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------ VAE

def load_vae(spec, device="cpu"):
    """A diffusers AutoencoderKLWan (Hub id or local folder, subfolder, revision, dtype), in eval mode."""
    from diffusers import AutoencoderKLWan

    spec = ModelSpec.parse(spec)
    vae = AutoencoderKLWan.from_pretrained(spec.path, torch_dtype=spec.torch_dtype, **spec.kwargs())
    return vae.to(device).eval()


# -------------------------------------------------------------------------------------------- text encoders

_LOCK = threading.RLock()
_MODELS: dict = {}      # ModelSpec -> loaded transformers model (one per process)
_TOKENIZERS: dict = {}  # ModelSpec -> tokenizer
_CONFIGS: dict = {}     # ModelSpec -> transformers config
_ENCODERS: dict = {}    # (spec, max_len, device, offload) -> PretrainedTextEncoder
_PIXEL: dict = {}       # (spec, max_len, cache dir) -> CachedTextEncoder


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def text_config(spec: ModelSpec):
    """The encoder's transformers config (config.json only, no weights)."""
    with _LOCK:
        if spec not in _CONFIGS:
            from transformers import AutoConfig

            _CONFIGS[spec] = AutoConfig.from_pretrained(spec.path, **spec.kwargs())
        return _CONFIGS[spec]


def tokenizer_for(spec: ModelSpec):
    """The encoder's tokenizer (from tokenizer_subfolder, else the model's subfolder), padding on the right."""
    with _LOCK:
        if spec not in _TOKENIZERS:
            from transformers import AutoTokenizer

            # the encoder's config: a tokenizer subfolder has none, and a cached Hub repo offline would fail on it
            tok = AutoTokenizer.from_pretrained(spec.path, config=text_config(spec), **spec.kwargs(tokenizer=True))
            tok.padding_side = "right"  # cached embeddings keep the valid tokens as a prefix
            _TOKENIZERS[spec] = tok
        return _TOKENIZERS[spec]


def _load_model(spec: ModelSpec):
    with _LOCK:
        if spec not in _MODELS:
            from transformers import AutoModel, T5EncoderModel, UMT5EncoderModel

            model_cls = {"t5": T5EncoderModel, "umt5": UMT5EncoderModel}.get(text_config(spec).model_type, AutoModel)
            log.info("loading text encoder %s (%s)", spec.path, spec.dtype)
            model = model_cls.from_pretrained(spec.path, **spec.kwargs(), **_dtype_kwarg(spec.torch_dtype))
            _MODELS[spec] = model.eval().requires_grad_(False)
        return _MODELS[spec]


def encoder_max_len(spec: ModelSpec, fallback: int | None = None) -> int:
    """The tokenizer's model_max_length (512 for T5 / UMT5), else `fallback`."""
    n = getattr(tokenizer_for(spec), "model_max_length", None)
    if isinstance(n, int) and 0 < n < _NO_MAX_LEN:
        return n
    if fallback is None:
        raise ValueError(f"the tokenizer of {spec.path} sets no model_max_length: give a maximum length")
    return int(fallback)


class PretrainedTextEncoder:
    """A transformers encoder (T5 / UMT5 encoder, BERT, ...) and its tokenizer, by Hub id or local folder.

    Same interface as the built-in CaptionEncoder: `encode(captions) -> (emb [B, max_len, dim] float32,
    mask [B, max_len] bool)`, padded positions zeroed. The weights are shared by all encoders of one spec in
    the process and loaded on first use in the spec's dtype; `offload=True` moves them back to the CPU after
    each `encode` (`release()` does so by hand). `calls` counts model forwards.
    """

    def __init__(self, spec, max_len: int | None = None, device="cpu", offload: bool = False):
        self.spec = ModelSpec.parse(spec)
        self.tokenizer = tokenizer_for(self.spec)
        config = text_config(self.spec)
        self.dim = getattr(config, "d_model", None) or config.hidden_size
        self.max_len = int(max_len) if max_len is not None else encoder_max_len(self.spec)
        self.device, self.offload, self.calls = str(device), offload, 0

    @property
    def model(self):
        return _load_model(self.spec)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_len,
                                return_tensors="pt")
        mask = tokens["attention_mask"].bool()
        with _LOCK:
            model = self.model
            if str(next(model.parameters()).device) != str(torch.device(self.device)):
                model.to(self.device)
            ids, att = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            emb = model(input_ids=ids, attention_mask=att).last_hidden_state.cpu()
            self.calls += 1
            if self.offload and torch.device(self.device).type != "cpu":
                self.release()
        return emb.float() * mask[..., None], mask

    def release(self, drop: bool = False) -> None:
        """Moves the weights to the CPU (drop=True: frees them; the next encode reloads)."""
        with _LOCK:
            if drop:
                _MODELS.pop(self.spec, None)
            elif self.spec in _MODELS:
                _MODELS[self.spec].to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def get_text_encoder(spec, max_len: int | None = None, device="cpu", offload: bool = False) -> PretrainedTextEncoder:
    """The process's one PretrainedTextEncoder for (spec, max_len, device, offload)."""
    spec = ModelSpec.parse(spec)
    key = (spec, max_len, str(device), offload)
    with _LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = PretrainedTextEncoder(spec, max_len=max_len, device=device, offload=offload)
        return _ENCODERS[key]


def release_text_encoders() -> None:
    """Frees every loaded text encoder's weights and the shared instances (they are rebuilt on next use)."""
    with _LOCK:
        _MODELS.clear()
        _ENCODERS.clear()
        _PIXEL.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def default_device() -> str:
    """This process's GPU (LOCAL_RANK under torchrun / accelerate), or the CPU; the CPU in DataLoader workers."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is not None or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', torch.cuda.current_device()))}"


# -------------------------------------------------------------------------------- caption cache (pixel data)

CACHE_DIR = ".text_cache"


class CachedTextEncoder:
    """`encode(captions)` like PretrainedTextEncoder, each caption's embedding computed once and kept on disk.

    `<root>/.text_cache/<spec hash>/<sha1 of caption>.safetensors` holds `emb` [n, dim] (the n valid tokens,
    in the encoder's dtype) and the caption in its metadata. Files are written under a temporary name and
    renamed; a file that cannot be read or does not match (caption, width, length) is recomputed with a
    warning. Where the folder is not writable the embeddings are computed each time (one warning).
    """

    def __init__(self, spec: ModelSpec, root, max_len: int | None = None, fallback_len: int | None = None):
        self.spec = spec
        self.max_len = int(max_len) if max_len is not None else encoder_max_len(spec, fallback_len)
        config = text_config(spec)
        self.dim = getattr(config, "d_model", None) or config.hidden_size
        self.dir = Path(root) / CACHE_DIR / spec.key(self.max_len)
        self.writable = True

    def _encoder(self) -> PretrainedTextEncoder:
        return get_text_encoder(self.spec, self.max_len, device=default_device(), offload=True)

    @property
    def calls(self) -> int:
        """Model forwards made by this process's encoder for this spec (cache hits make none)."""
        return sum(e.calls for k, e in list(_ENCODERS.items()) if k[0] == self.spec and k[1] == self.max_len)

    def path(self, caption: str) -> Path:
        return self.dir / f"{hashlib.sha1(caption.encode('utf-8', 'surrogatepass')).hexdigest()}.safetensors"

    def _read(self, caption: str) -> torch.Tensor | None:
        """The cached valid-token embedding [n, dim], or None (missing, or corrupt: warned, to be recomputed)."""
        path = self.path(caption)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                stored = (f.metadata() or {}).get("caption")
                emb = f.get_tensor("emb")
            if stored != caption:
                raise ValueError("written for another caption")
            if emb.dim() != 2 or emb.shape[1] != self.dim or not 0 < emb.shape[0] <= self.max_len:
                raise ValueError(f"emb of shape {list(emb.shape)}, expected [1..{self.max_len}, {self.dim}]")
            if not torch.isfinite(emb).all():
                raise ValueError("non-finite values")
        except Exception as e:  # noqa: BLE001 -- safetensors raises its own error type on damaged files
            log.warning("text cache %s is corrupt (%s: %s); recomputing it", path, type(e).__name__, str(e)[:200])
            return None
        return emb

    def _write(self, caption: str, emb: torch.Tensor) -> None:
        if not self.writable:
            return
        from safetensors.torch import save_file

        path = self.path(caption)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            if not self.dir.is_dir():
                self.dir.mkdir(parents=True, exist_ok=True)
                spec_file = self.dir / "spec.json"
                spec_file.with_suffix(f".{os.getpid()}.tmp").write_text(
                    json.dumps(dict(self.spec.to_dict(), max_len=self.max_len), indent=1))
                spec_file.with_suffix(f".{os.getpid()}.tmp").replace(spec_file)
            save_file({"emb": emb.contiguous()}, str(tmp), metadata={"caption": caption})
            tmp.replace(path)
        except OSError as e:
            self.writable = False
            tmp.unlink(missing_ok=True)
            log.warning("cannot write the text cache in %s (%s); embeddings are recomputed each time", self.dir, e)

    def _compute(self, captions: list[str], encoder=None) -> dict[str, torch.Tensor]:
        """Encodes `captions`, stores each one's valid tokens; {caption: emb [n, dim] float32}."""
        emb, mask = (encoder or self._encoder()).encode(captions)
        out = {}
        for c, e, m in zip(captions, emb, mask):
            valid = e[: int(m.sum())]
            self._write(c, valid.to(self.spec.torch_dtype))  # exact: the model's outputs are in its dtype
            out[c] = valid
        return out

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(emb [B, max_len, dim] float32, mask [B, max_len] bool) from the cache, computing the missing ones."""
        found = {}
        for c in dict.fromkeys(captions):
            e = self._read(c)
            if e is not None:
                found[c] = e.float()
        missing = [c for c in dict.fromkeys(captions) if c not in found]
        if missing:
            found.update(self._compute(missing))
        emb = torch.zeros(len(captions), self.max_len, self.dim)
        mask = torch.zeros(len(captions), self.max_len, dtype=torch.bool)
        for b, c in enumerate(captions):
            n = found[c].shape[0]
            emb[b, :n], mask[b, :n] = found[c], True
        return emb, mask

    def precompute(self, captions, batch_size: int = 32) -> int:
        """Encodes the captions not yet cached (in batches, on this process's GPU), then frees the weights.

        Ranks (RANK / WORLD_SIZE) start at different offsets and skip what another rank has written, so
        several processes share the work without waiting on each other. Returns the captions encoded.
        """
        todo = [c for c in dict.fromkeys(captions) if c and self._read(c) is None]
        if not todo or not self.writable:
            return 0
        rank, world = int(os.environ.get("RANK", 0)), max(1, int(os.environ.get("WORLD_SIZE", 1)))
        start = len(todo) * rank // world
        todo = todo[start:] + todo[:start]
        log.info("encoding %d captions into %s", len(todo), self.dir)
        encoder = get_text_encoder(self.spec, self.max_len, device=default_device())  # stays on the GPU meanwhile
        done = 0
        for i in range(0, len(todo), batch_size):
            batch = [c for c in todo[i: i + batch_size] if not self.path(c).is_file()]
            if batch:
                self._compute(batch, encoder)
                done += len(batch)
            if not self.writable:
                break
        encoder.release(drop=True)  # training needs the memory; a later miss reloads
        return done


def text_spec_from_cfg(cfg) -> ModelSpec:
    """data.text_encoder (+ data.text_encoder_subfolder, data.tokenizer_subfolder, data.text_encoder_revision,
    data.text_encoder_dtype: default bf16) as a ModelSpec."""
    return ModelSpec(path=given_path(cfg.text_encoder), subfolder=cfg.get("text_encoder_subfolder"),
                     revision=cfg.get("text_encoder_revision"),
                     dtype=cfg.get("text_encoder_dtype") or "bf16",
                     tokenizer_subfolder=cfg.get("tokenizer_subfolder"))


def pixel_text_encoder(cfg, cache_root: Path, captions=None) -> CachedTextEncoder:
    """The process's one CachedTextEncoder for data.text_encoder (pixel data), caching embeddings under
    `cache_root` (the data's folder: videos.text_cache_root); `captions`: precompute these."""
    spec = text_spec_from_cfg(cfg)
    root = Path(cache_root).resolve()
    max_len = encoder_max_len(spec, cfg.get("text_len"))
    key = (spec, max_len, str(root))
    with _LOCK:
        if key not in _PIXEL:
            _PIXEL[key] = CachedTextEncoder(spec, root, max_len=max_len)
        encoder = _PIXEL[key]
    if captions is not None:
        encoder.precompute(captions)
    return encoder
