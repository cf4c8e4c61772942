"""Loading a checkpoint: the whole training state (`load_checkpoint`, every rank), the weights alone
(`load_weights` for sampling and export, `init_weights` for train.init_from).
"""
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

from ..models.vsa import WAN_GATE, VSAAttention
from ..parallel import is_fsdp
from .format import (CheckpointError, load_tensors, optimizer_from_files, read_state, rng_file, rng_problem,
                     set_rng_state)
from .store import resolve_checkpoint


def load_checkpoint(accelerator: Accelerator, ckpt: Path, model, optimizer, ema) -> dict:
    """Restores weights, optimizer, EMA and this rank's RNG from a verified checkpoint; returns its counters."""
    # Every rank reads the full files; under FSDP each keeps its shard (full_state_dict) of them.
    options = StateDictOptions(full_state_dict=is_fsdp(model))
    set_model_state_dict(model, load_tensors(ckpt / "model.safetensors"), options=options)
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    set_optimizer_state_dict(model, optimizer, optimizer_from_files(ckpt), options=options)
    # Loading brings back the checkpoint's hyper-parameters (betas, weight decay, ...); this launch's config wins
    # (they differ only under train.resume=force, which config_history.jsonl records).
    for group, settings in zip(optimizer.param_groups, configured, strict=True):
        group.update(settings)
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
        except (FileNotFoundError, CheckpointError) as err:
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
