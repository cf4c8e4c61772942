"""Saving and restoring the whole training state through the run directory's files (vsa_train/rundir.py).

Files are portable: full (unsharded) weights and optimizer state gathered on the main process, each rank's RNG
state in its own file. Saving is collective (every rank calls it); loading reads files on every rank.
"""
import shutil
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from .distributed import on_main
from .files import disk_error
from .models.vsa import WAN_GATE, VSAAttention
from .rundir import (STATE, RunDir, RunDirError, load_tensors, optimizer_from_files, optimizer_to_files, read_state,
                     resolve_checkpoint, rng_file, rng_problem, rng_state, save_tensors, set_rng_state, write_json)


def save_checkpoint(accelerator: Accelerator, run_dir: RunDir, model, optimizer, ema, counters: dict,
                    keep: int) -> Path:
    """Writes step `counters["step"]` as run_dir/checkpoints/step_<N> (atomic; manifest last); collective."""
    step = counters["step"]
    tmp = run_dir.tmp_dir(step)  # publish replaces a damaged step_<N> of the same step
    # Full (unsharded) states keyed by parameter name, on the main process: the same files from one process,
    # DDP or FSDP, so a checkpoint resumes under any strategy and world size. Collective under FSDP.
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=full)
    optim_state = get_optimizer_state_dict(model, optimizer, options=full)

    def write_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            save_tensors(model_state, tmp / "model.safetensors")
            if ema is not None:
                save_tensors(ema.module.state_dict(), tmp / "ema.safetensors")
            optimizer_to_files(optim_state, tmp)
            write_json(counters, tmp / STATE)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk_error(err, tmp) from err

    on_main(accelerator, write_main)
    error = None
    try:  # every rank its own RNG state
        save_tensors(rng_state(), rng_file(tmp, accelerator.process_index))
    except OSError as err:
        error = disk_error(err, tmp)
    failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum").item()
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"another rank could not write its RNG state into {tmp}")
    return on_main(accelerator, run_dir.publish, step, keep)


def load_checkpoint(accelerator: Accelerator, ckpt: Path, model, optimizer, ema) -> dict:
    """Restores weights, optimizer, EMA and this rank's RNG from a verified checkpoint; returns its counters."""
    # Every rank reads the full files; under FSDP each keeps its shard (full_state_dict) of them.
    options = StateDictOptions(full_state_dict=_is_sharded(model))
    set_model_state_dict(model, load_tensors(ckpt / "model.safetensors"), options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_from_files(ckpt), options=options)
    counters = read_state(ckpt)
    if ema is not None:
        if not (ckpt / "ema.safetensors").is_file():
            raise FileNotFoundError(f"{ckpt} has no ema.safetensors but train.ema is set")
        ema.module.load_state_dict(load_tensors(ckpt / "ema.safetensors"))
        ema.n_averaged.fill_(counters.get("ema_updates", counters["step"]))
    restore_rng(accelerator, ckpt, counters)
    return counters


def restore_rng(accelerator: Accelerator, ckpt: Path, counters: dict) -> None:
    """This rank's RNG from the checkpoint; missing, unreadable or from another world size: a warning and a
    deterministic reseed from (seed, rank, step): the resume continues, no longer bit-exact."""
    rank, world = accelerator.process_index, accelerator.num_processes
    path, reason = rng_file(ckpt, rank), None
    if counters.get("processes", world) != world:
        reason = f"it was saved by {counters['processes']} processes, this launch has {world}"
    elif (reason := rng_problem(ckpt, rank)) is None:
        try:
            set_rng_state(load_tensors(path))
            return
        except Exception as err:  # noqa: BLE001 (any unreadable file means the same: reseed and say so)
            reason = f"{path.name} is unreadable ({type(err).__name__})"
    torch.manual_seed(hash((counters.get("seed", 0), rank, counters["step"])) % 2**63)
    warnings.warn(f"rank {rank}: RNG state not restored from {ckpt}: {reason}; training noise is reseeded, "
                  f"so this resume is no longer bit-exact", stacklevel=2)


def load_weights(ckpt: Path, ema: bool) -> tuple[dict, dict]:
    """(state dict, counters) of a verified checkpoint: the EMA weights when asked for and present."""
    counters = read_state(ckpt)
    name = "ema.safetensors" if ema and (ckpt / "ema.safetensors").is_file() else "model.safetensors"
    return load_tensors(ckpt / name), counters


def init_weights(model: torch.nn.Module, source) -> str:
    """Loads weights only (no optimizer, step or RNG) from a run directory, a checkpoint or a .safetensors file.

    A run directory means its newest verified checkpoint. Parameters that the new model's attention adds (VSA
    gates) keep their initial values (a neutral start); any other missing or unexpected key is an error.
    """
    path = Path(source)
    if path.is_file() and path.suffix == ".safetensors":
        state = load_tensors(path)
    else:
        try:
            _, ckpt = resolve_checkpoint(path)
        except (FileNotFoundError, RunDirError) as err:
            raise type(err)(f"train.init_from={source}: {err}") from None
        path = ckpt / "model.safetensors"
        state, _ = load_weights(ckpt, ema=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    new = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, VSAAttention)
           for p, _ in m.named_parameters()}
    new |= {name for name, _ in model.named_parameters() if f".{WAN_GATE}." in name}  # model=wan's gates
    if unexpected or set(missing) - new:
        raise ValueError(f"train.init_from={source}: weights do not fit this model: missing "
                         f"{sorted(set(missing) - new)}, unexpected {sorted(unexpected)}")
    return f"initialised from {path} (weights only; {len(missing)} new attention tensors keep their initial values)"


def _is_sharded(model: torch.nn.Module) -> bool:
    """Whether parameters are DTensors (FSDP2): loading then shards the full state dicts."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
