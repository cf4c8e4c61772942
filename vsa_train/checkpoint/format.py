"""The checkpoint format: what a `step_<N>/` folder holds and how each file is written, read and verified.

    model.safetensors, ema.safetensors      weights (plain parameter names)
    optimizer.safetensors + optimizer.json  optimizer tensors keyed "<parameter name>/<key>"; groups and scalars
    state.json                              counters and loss health (STATE)
    rng_rank<r>.safetensors                 each rank's RNG state (optional at load: a rank reseeds without it)
    manifest.json                           format, step, byte size and block checksum of every other file, last

Nothing is ever unpickled: tensors are safetensors, everything else JSON. A checkpoint counts only if `verify`
passes. This module does files only (no collectives).
"""
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
STATE = "state.json"
FORMAT = 2  # checkpoint layout version, in every manifest (2: checksums of 64 MiB blocks, hashed in parallel)
READS = (1, 2)  # the formats this version loads
BLOCK_BYTES = 64 << 20
_READ_BYTES = 16 << 20
_HASH_THREADS = min(8, os.cpu_count() or 1)
_RNG_FILE = re.compile(r"^rng_rank\d+\.safetensors$")
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) quotes the errno of an I/O error


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, not ours, or none that verifies."""


# ------------------------------------------------------------------------------------------ checkpoint files

def save_tensors(tensors: dict, path: Path) -> None:
    """One safetensors file (CPU, contiguous copies: views of shared storage cannot be stored). A failed write is
    an OSError, as for any other file: safetensors raises its own SafetensorError, without the path and with the
    errno only in its text ("... (os error 28)")."""
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
    except SafetensorError as err:
        number = _OS_ERROR.search(str(err))
        if number is None:
            raise OSError(None, f"safetensors: {err}") from err
        raise OSError(int(number[1]), os.strerror(int(number[1]))) from err


def tensor_bytes(tree) -> int:
    """The bytes of the tensors in `tree` (dicts, lists, tuples): about what writing them takes on disk."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def load_tensors(path: Path) -> dict:
    """A safetensors file's tensors; a file that is not one is a CheckpointError naming it (never unpickled)."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error types for bad headers)
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from None


def write_json(obj: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, allow_nan=True))


def read_state(ckpt: Path) -> dict:
    """The counters and health record of a checkpoint (state.json)."""
    return read_json(Path(ckpt) / STATE)


def read_json(path: Path) -> dict:
    value = json.loads(Path(path).read_text())
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return value


def optimizer_to_files(state: dict, ckpt: Path) -> None:
    """An optimizer state dict keyed by parameter name (torch.distributed.checkpoint's portable form) as
    optimizer.safetensors (tensors, "<param>/<key>") + optimizer.json (numbers and param groups)."""
    tensors, scalars = {}, {}
    for name, per_param in state["state"].items():
        for key, value in per_param.items():
            (tensors if isinstance(value, torch.Tensor) else scalars)[f"{name}/{key}"] = value
    save_tensors(tensors, ckpt / "optimizer.safetensors")
    write_json({"param_groups": state["param_groups"], "scalars": scalars}, ckpt / "optimizer.json")


def optimizer_from_files(ckpt: Path) -> dict:
    """The optimizer state dict that `optimizer_to_files` wrote (no unpickling: safetensors and JSON)."""
    meta = read_json(ckpt / "optimizer.json")
    state: dict[str, dict] = {}
    for name, value in [*load_tensors(ckpt / "optimizer.safetensors").items(), *meta["scalars"].items()]:
        param, key = name.rsplit("/", 1)
        state.setdefault(param, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / f"rng_rank{rank}.safetensors"


def rng_problem(ckpt: Path, rank: int) -> str | None:
    """Why rank `rank`'s RNG file cannot be trusted (missing, or not the bytes the manifest recorded), else None."""
    path = rng_file(ckpt, rank)
    manifest = read_json(Path(ckpt) / MANIFEST)
    entry = manifest["files"].get(path.name)
    if not isinstance(entry, dict) or not path.is_file():
        return f"{path.name} is missing"
    return None if _entry_problem(path, entry, manifest) is None else f"{path.name} does not match the manifest"


def rng_state() -> dict:
    """This process's torch RNG states (CPU and, where present, the current CUDA device)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -------------------------------------------------------------------------------------------------- manifest

def digest(path: Path, block_bytes: int = BLOCK_BYTES) -> str:
    """SHA-256 of the SHA-256s of the file's `block_bytes` blocks: a checksum hashed by several threads at once
    (hashlib releases the GIL), since one SHA-256 stream runs at ~1.5 GB/s and dit_1b's checkpoint is 17.5 GB.
    Each thread reads its block 16 MiB at a time, so memory stays small whatever block size a manifest names."""
    size = Path(path).stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        def block(start: int) -> bytes:
            h, at, end = hashlib.sha256(), start, min(start + block_bytes, size)
            while at < end:
                chunk = os.pread(fd, min(_READ_BYTES, end - at), at)
                if not chunk:  # the file shrank while being read: the checksum cannot match
                    break
                h.update(chunk)
                at += len(chunk)  # a short read (network file systems) goes on where it stopped
            return h.digest()

        with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:
            blocks = b"".join(pool.map(block, range(0, size, block_bytes)))
    finally:
        os.close(fd)
    return hashlib.sha256(blocks).hexdigest()


def _block_bytes(manifest: dict) -> int | None:
    """A format-2 manifest's block size if it is one this version hashes with (64 KiB to 1 GiB), else None."""
    block = manifest.get("block_bytes")
    ok = isinstance(block, int) and not isinstance(block, bool) and 1 << 16 <= block <= 1 << 30
    return block if ok else None


def _whole_file_sha256(path: Path) -> str:
    """Format 1's checksum (checkpoints of earlier versions): one SHA-256 of the file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _entry_problem(path: Path, entry: dict, manifest: dict) -> str | None:
    """Why `path` is not the file its manifest entry describes (size, then checksum), else None."""
    if not path.is_file():
        return f"{path.name} is missing"
    if path.stat().st_size != entry.get("bytes"):
        return f"{path.name} has {path.stat().st_size} bytes, the manifest says {entry.get('bytes')}"
    if manifest.get("format") == 1:
        ok = _whole_file_sha256(path) == entry.get("sha256")
    else:
        block = _block_bytes(manifest)
        ok = block is not None and digest(path, block) == entry.get("blocks_sha256")
    return None if ok else f"{path.name} does not match its checksum"


def write_manifest(ckpt: Path, step: int) -> None:
    """manifest.json: format, step and the size and checksum (`digest`) of every other file; written last."""
    paths = [p for p in sorted(Path(ckpt).iterdir()) if p.is_file() and p.name != MANIFEST]
    files = {p.name: {"bytes": p.stat().st_size, "blocks_sha256": digest(p)} for p in paths}
    write_json({"format": FORMAT, "step": step, "block_bytes": BLOCK_BYTES, "files": files}, Path(ckpt) / MANIFEST)


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    ckpt = Path(ckpt)
    try:
        manifest = read_json(ckpt / MANIFEST)
    except FileNotFoundError:
        if (ckpt / "model.safetensors").is_file() and any(ckpt.glob("*.pkl")):
            return "written by an earlier vsa_train (accelerate pickles); not loaded, nothing is unpickled"
        return f"no {MANIFEST} (incomplete)"
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: JSON nested beyond the parser's depth
        return f"unreadable {MANIFEST}: {type(err).__name__}: {err}"
    if manifest.get("format") not in READS or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} has format {manifest.get('format')!r}, this vsa_train reads {' or '.join(map(str, READS))}"
    if manifest["format"] != 1 and _block_bytes(manifest) is None:
        return f"{MANIFEST} has block_bytes {manifest.get('block_bytes')!r}, not a block size between 64 KiB and 1 GiB"
    for name in ("model.safetensors", STATE):
        if name not in manifest["files"]:
            return f"{MANIFEST} lists no {name}"
    for name, entry in manifest["files"].items():
        if Path(name).name != name:
            return f"{MANIFEST} names a file outside the checkpoint: {name!r}"
        if _RNG_FILE.match(name):  # optional: without it the resume goes on, reseeded (checked when loaded)
            continue
        if not isinstance(entry, dict):
            return f"{MANIFEST} has no size and checksum for {name}"
        problem = _entry_problem(ckpt / name, entry, manifest)
        if problem is not None:
            return problem
    return None
