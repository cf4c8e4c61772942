"""2 gloo processes, FSDP2 (tests/test_checkpointing.py): a checkpoint saved right after a no-grad forward under
reshard_after_forward=False (parameters are plain tensors then), and a host copy that fails on rank 0 halfway
through the gather. Each case prints one line per rank; a hang prints HUNG and exits 3."""
import os
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard

from vsa_train.checkpoint import Checkpointer, HostBuffers
from vsa_train.checkpoint.format import load_tensors, verify
from vsa_train.rundir import RunDir

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
run_dir = RunDir(Path(sys.argv[1]))
threading.Timer(60, lambda: (print(f"rank {rank} HUNG", flush=True), os._exit(3))).start()


def build(reshard: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    for layer in model:
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


model, optimizer = build(reshard=False)
with torch.no_grad():
    model(torch.randn(2, 4))  # an eval: the parameters stay unsharded, plain tensors
ckpt = Checkpointer(accelerator, run_dir.checkpoints, keep=2).save(model, optimizer, None, {"step": 1})
full = {k: v.full_tensor() for k, v in model.state_dict().items()}
saved = load_tensors(ckpt / "model.safetensors")
same = all(torch.equal(saved[k], full[k]) for k in full)
print(f"rank {rank} unsharded save: verified {verify(ckpt) is None}, weights equal {same}", flush=True)

copies, real = [], HostBuffers._copy


def fails_third(self, key, t):
    copies.append(key)
    if len(copies) == 3:
        raise RuntimeError("no host memory left")
    return real(self, key, t)


HostBuffers._copy = fails_third
try:
    Checkpointer(accelerator, run_dir.checkpoints, keep=2).save(model, optimizer, None, {"step": 2})
    print(f"rank {rank} failed copy: saved", flush=True)
except RuntimeError as err:
    print(f"rank {rank} failed copy: raised {err}", flush=True)
print(f"rank {rank} step 2 published {(run_dir.checkpoints.path / 'step_00000002').exists()}", flush=True)
dist.destroy_process_group()
os._exit(0)
