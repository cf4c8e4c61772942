"""Checkpoints, one package: the format (format.py), the run's checkpoints folder (store.py: listing, verifying,
publishing), saving (save.py) and loading (load.py). vsa_train/rundir.py keeps the rest of the run directory.
"""
from .format import CheckpointError, read_state, verify
from .load import init_weights, load_checkpoint, load_weights, restore_rng
from .save import Checkpointer, HostBuffers
from .store import Checkpoints, resolve_checkpoint

__all__ = ["CheckpointError", "Checkpointer", "Checkpoints", "HostBuffers", "init_weights", "load_checkpoint",
           "load_weights", "read_state", "resolve_checkpoint", "restore_rng", "verify"]
