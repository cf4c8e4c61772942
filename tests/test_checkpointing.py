"""Checkpoint writing: block checksums (parallel, format 2; format 1 still read), hostile manifests, and saves in the
background: the files hold the state of the step saved, not of the steps that ran while they were written; an
error reaches the run; a kill mid-write leaves the previous checkpoint as the resume point."""
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file

from vsa_train import trainer
from vsa_train.checkpoint import Checkpointer
from vsa_train.checkpoint import format as checkpoint_format  # the module that calls safetensors (patched)
from vsa_train.checkpoint import save as checkpoint  # the module that writes (patched below)
from vsa_train.checkpoint.format import digest, optimizer_from_files, read_json, verify, write_json
from vsa_train.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_lifecycle import TINY, _cfg  # noqa: E402  (the lifecycle tests' tiny run: 4 frames x 8 x 8 pixels)


def _linear(lr: float = 1e-3):
    """(accelerator, model, optimizer) of a one-layer model: a Checkpointer without a trainer around it."""
    model = torch.nn.Linear(4, 3)
    return Accelerator(cpu=True), model, torch.optim.AdamW(model.parameters(), lr=lr)


def _failing_model_file(monkeypatch, error: OSError, once: bool = False) -> list:
    """checkpoint.save_tensors raises `error` for model.safetensors (with `once`: only while the returned list of
    failures is empty; clear it to fail again)."""
    real, failures = checkpoint.save_tensors, []

    def save(tensors, path):
        if Path(path).name == "model.safetensors" and not (once and failures):
            failures.append(path)
            raise error
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_tensors", save)
    return failures


# ------------------------------------------------------------------------------------------------ checksums

@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 * 65536 + 7])
def test_digest_is_the_sha256_of_the_block_sha256s(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    blocks = b"".join(hashlib.sha256(data[i:i + 65536]).digest() for i in range(0, size, 65536))
    assert digest(path, 65536) == hashlib.sha256(blocks).hexdigest()
    if size:
        flipped = bytearray(data)
        flipped[size // 2] ^= 1
        path.write_bytes(bytes(flipped))
        assert digest(path, 65536) != hashlib.sha256(blocks).hexdigest()


def _tiny_checkpoint(tmp_path) -> Path:
    trainer.train(_cfg(tmp_path / "run", "train.max_steps=1"))
    return RunDir(tmp_path / "run").checkpoints.dirs()[-1]


def test_format_1_checkpoints_still_verify_and_hostile_block_sizes_are_refused(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path)
    manifest = read_json(ckpt / "manifest.json")
    assert manifest["format"] == 2 and verify(ckpt) is None
    # What an earlier vsa_train wrote: one SHA-256 per file.
    old = {"format": 1, "step": manifest["step"],
           "files": {name: {"bytes": e["bytes"], "sha256": hashlib.sha256((ckpt / name).read_bytes()).hexdigest()}
                     for name, e in manifest["files"].items()}}
    write_json(old, ckpt / "manifest.json")
    assert verify(ckpt) is None
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, one bit off
    weights.write_bytes(bytes(data))
    assert verify(ckpt) == "model.safetensors does not match its checksum"
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    for block in (0, -1, 1 << 40, "64", None):
        write_json({**manifest, "block_bytes": block}, ckpt / "manifest.json")
        assert "block_bytes" in verify(ckpt)
    write_json({**manifest, "files": {**manifest["files"], "state.json": "junk"}}, ckpt / "manifest.json")
    assert "no size and checksum for state.json" in verify(ckpt)
    write_json({**manifest, "format": 3}, ckpt / "manifest.json")
    assert "this vsa_train reads 1 or 2" in verify(ckpt)


# ------------------------------------------------------------------------------------------------ full disks

FULL = (r"cannot write .*\.tmp-step_00000002: disk full .*\((\d[\d,]*) bytes free on that file system; "
        r"writing it needs about (\d[\d,]*) bytes\)")


@pytest.mark.parametrize("message", ["Error while serializing: I/O error: No space left on device (os error 28)",
                                     "Error while serializing: something went wrong"])
def test_a_full_disk_in_safetensors_names_the_sizes_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                                      message):
    """safetensors reports a full disk as its own SafetensorError, without the path; without an errno in it, free
    space below the checkpoint's size tells a full disk."""
    accelerator, model, optimizer = _linear()
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()  # the optimizer holds state: its file counts toward the size
    ckpts = Checkpointer(accelerator, RunDir(tmp_path).checkpoints, keep=2)
    first = ckpts.save(model, optimizer, None, {"step": 1})
    real = checkpoint_format.save_file

    def full(tensors, path, *args, **kwargs):
        if Path(path).name == "model.safetensors":
            Path(path).write_bytes(b"x" * 100)  # what a real write leaves behind in the folder
            raise SafetensorError(message)
        real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_format, "save_file", full)
    if "os error" not in message:
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 10, 10))
    with pytest.raises(OSError, match=FULL) as raised:
        ckpts.save(model, optimizer, None, {"step": 2})
    free, needed = (int(n.replace(",", "")) for n in re.search(FULL, str(raised.value)).groups())
    assert needed == 3 * (12 + 3) * 4 + 2 * 4  # weight and bias; AdamW's two moments of each, two step counts
    assert free > 0
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert RunDir(tmp_path).checkpoints.dirs() == [first] and verify(first) is None


FILE_SIZE_LIMIT = """
import resource, signal, sys, torch
from accelerate import Accelerator
from vsa_train.checkpoint import Checkpointer
from vsa_train.rundir import RunDir
model = torch.nn.Linear(256, 256)
ckpts = Checkpointer(Accelerator(cpu=True), RunDir(sys.argv[1]).checkpoints, keep=2)
optimizer = torch.optim.AdamW(model.parameters())
ckpts.save(model, optimizer, None, {"step": 1})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as a full disk fails
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    ckpts.save(model, optimizer, None, {"step": 2})
except Exception as err:
    print(f"{type(err).__name__}: {err}")
"""


def test_a_real_failed_write_names_the_sizes_and_keeps_the_previous_checkpoint(tmp_path):
    """A real write error from safetensors (not a stand-in): a process whose file size limit (RLIMIT_FSIZE) is
    below the size of its model file (256 x 257 float32 weights; with AdamW's moments and steps 789,512 B)."""
    out = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(tmp_path)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert re.search(r"^OSError: .*cannot write .*\.tmp-step_00000002: File too large .*\(\d[\d,]* bytes free on "
                     r"that file system; writing it needs about 789,512 bytes\)", out.stdout, re.M), out
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    (first,) = RunDir(tmp_path).checkpoints.dirs()
    assert first.name == "step_00000001" and verify(first) is None


# ---------------------------------------------------------------------------------------- background saves

class _Held:
    """Holds checkpoint._write_files until released, so that the test can change the state meanwhile."""

    def __init__(self, monkeypatch):
        self.started, self.release, real = threading.Event(), threading.Event(), checkpoint._write_files

        def held(state, tmp):
            self.started.set()
            assert self.release.wait(30)
            real(state, tmp)

        monkeypatch.setattr(checkpoint, "_write_files", held)


def _state(model, optimizer):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()})


def test_a_background_save_holds_the_state_of_its_step(tmp_path, monkeypatch):
    accelerator, model, optimizer = _linear(lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    weights, moments = _state(model, optimizer)
    held = _Held(monkeypatch)
    ckpts = Checkpointer(accelerator, RunDir(tmp_path).checkpoints, keep=2)
    counters = {"step": 1, "note": ["kept"]}
    assert ckpts.save(model, optimizer, None, counters, background=True) is None
    assert held.started.wait(30)
    for _ in range(3):  # training goes on while the files are written
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
    optimizer.param_groups[0]["lr"] = 0.5
    counters["note"].append("changed later")
    held.release.set()
    ckpt = ckpts.wait()
    assert ckpt == RunDir(tmp_path).checkpoints.step_dir(1) and verify(ckpt) is None
    saved = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.equal(saved[k], weights[k]) for k in weights)
    assert not torch.equal(saved["weight"], model.weight.detach())
    optim = optimizer_from_files(ckpt)
    assert torch.equal(optim["state"]["weight"]["exp_avg"], moments["exp_avg"])
    assert optim["param_groups"][0]["lr"] == 0.1
    assert read_json(ckpt / "state.json")["note"] == ["kept"]
    assert ckpts.wait() is None  # nothing in flight


def test_a_background_error_reaches_the_run_and_publishes_nothing(tmp_path, monkeypatch):
    accelerator, model, optimizer = _linear()
    _failing_model_file(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    said = []
    ckpts = Checkpointer(accelerator, RunDir(tmp_path).checkpoints, keep=2, announce=said.append)
    ckpts.save(model, optimizer, None, {"step": 3}, background=True)
    with pytest.raises(OSError, match=r"cannot write .*tmp-step_00000003.*disk full"):
        ckpts.wait()
    assert any("checkpoint step 3 failed" in line for line in said)
    assert RunDir(tmp_path).checkpoints.dirs() == [] and not list((tmp_path / "checkpoints").glob(".tmp-*"))
    ckpts.save(model, optimizer, None, {"step": 3}, background=True)  # the next save also fails...
    ckpts.close()  # ...and on a crash path its error is printed, not raised


def test_a_stop_still_saves_after_a_failed_background_save(tmp_path, monkeypatch):
    accelerator, model, optimizer = _linear()
    failures = _failing_model_file(monkeypatch, OSError(errno.EIO, "Input/output error"), once=True)
    said = []
    ckpts = Checkpointer(accelerator, RunDir(tmp_path).checkpoints, keep=2, announce=said.append)
    ckpts.save(model, optimizer, None, {"step": 2}, background=True)
    ckpt = ckpts.save(model, optimizer, None, {"step": 3}, stop=True)  # SIGTERM at step 3: saved all the same
    assert ckpt == RunDir(tmp_path).checkpoints.step_dir(3) and verify(ckpt) is None
    assert any("previous checkpoint failed" in line and "Input/output error" in line for line in said)
    failures.clear()
    ckpts.save(model, optimizer, None, {"step": 4}, background=True)  # fails in its thread
    with pytest.raises(OSError, match="Input/output error"):  # a periodic save after a failure: the run stops
        ckpts.save(model, optimizer, None, {"step": 5}, background=True)  # (step 4's failure, raised here)


def test_a_failed_host_copy_or_an_interrupted_writer_is_an_error_of_the_run(tmp_path, monkeypatch):
    accelerator, model, optimizer = _linear()
    ckpts = Checkpointer(accelerator, RunDir(tmp_path).checkpoints, keep=2)

    def no_memory(*args):
        raise RuntimeError("out of host memory")

    monkeypatch.setattr(Checkpointer, "_snapshot", no_memory)
    with pytest.raises(RuntimeError, match="out of host memory"):
        ckpts.save(model, optimizer, None, {"step": 1}, background=True)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())
    monkeypatch.undo()

    def interrupted(state, tmp):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_write_files", interrupted)
    ckpts.save(model, optimizer, None, {"step": 1}, background=True)
    with pytest.raises(RuntimeError, match="interrupted: KeyboardInterrupt"):  # an Exception: shared by all ranks
        ckpts.wait()


def test_fsdp_background_save_does_not_share_the_optimizer_step(tmp_path, monkeypatch):
    """Under FSDP (here one gloo process), plain CPU tensors come back from torch.distributed.checkpoint as they
    are (AdamW's step off CUDA; a shard that is the whole tensor): they must be copied like the rest."""
    from torch.distributed.fsdp import fully_shard

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=False, foreach=False)

        def step():
            model(torch.randn(2, 4)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()

        step()
        weight = model[0].weight.full_tensor().clone()
        held = _Held(monkeypatch)
        ckpts = Checkpointer(Accelerator(cpu=True), RunDir(tmp_path / "run").checkpoints, keep=2)
        ckpts.save(model, optimizer, None, {"step": 1}, background=True)
        assert held.started.wait(30)
        for _ in range(3):
            step()
        held.release.set()
        ckpt = ckpts.wait()
        optim = optimizer_from_files(ckpt)
        assert {float(v["step"]) for v in optim["state"].values()} == {1.0}
        assert torch.equal(load_file(str(ckpt / "model.safetensors"))["0.weight"], weight)
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_saves_agree_across_ranks_after_an_unsharded_eval_and_on_a_failed_copy(tmp_path):
    """2 gloo processes (tests/workers/fsdp_save.py): no rank may hang in the other's gathers."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "workers" / "fsdp_save.py"), str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "HUNG" not in proc.stdout, proc.stdout + proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} unsharded save: verified True, weights equal True" in proc.stdout
        assert f"rank {rank} step 2 published False" in proc.stdout
    assert "rank 0 failed copy: raised no host memory left" in proc.stdout
    assert "rank 1 failed copy: raised another rank could not copy the state" in proc.stdout


def test_hostile_manifest_depth_and_short_reads(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "unreadable manifest.json" in verify(ckpt)
    data = os.urandom(300_000)
    (tmp_path / "f").write_bytes(data)
    whole = digest(tmp_path / "f", 65536)
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: real(fd, min(n, 1000), at))  # a network file system
    assert digest(tmp_path / "f", 65536) == whole


def _files(ckpt: Path) -> dict:
    return {name: load_file(str(ckpt / name)) for name in ("model.safetensors", "ema.safetensors",
                                                           "optimizer.safetensors")}


def test_background_and_foreground_saves_write_the_same_run(tmp_path, capsys):
    runs = {}
    for background in (True, False):
        run_dir = tmp_path / str(background)
        trainer.train(_cfg(run_dir, "train.max_steps=4", "train.ckpt_every=1", "train.keep_checkpoints=4",
                           "train.ema=0.9", f"train.ckpt_background={str(background).lower()}"))
        ckpts = RunDir(run_dir).checkpoints.dirs()
        assert [verify(c) for c in ckpts] == [None] * 4
        runs[background] = [_files(c) for c in ckpts]
    for a, b in zip(runs[True], runs[False]):
        assert all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    out = capsys.readouterr().out
    # The first run's periodic saves only: its last save is in the foreground, where a SIGTERM cannot cut it.
    assert out.count("(training held for") == 3


WRITER = """
import sys, time
from pathlib import Path
from vsa_train.checkpoint import save as checkpoint
real, marker = checkpoint._write_files, Path(sys.argv[1])
def slow(state, tmp):
    if state["counters"]["step"] == 4:  # the second save: the kill comes while its files are written
        marker.write_text("writing")
        time.sleep(120)
    real(state, tmp)
checkpoint._write_files = slow
sys.argv = ["train.py", *sys.argv[2:]]
import runpy
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_kill_during_a_background_write_resumes_from_the_previous_checkpoint(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "writing"
    script = tmp_path / "slow_writer.py"
    script.write_text(WRITER)
    args = [*TINY, f"run_dir={run_dir}", "train.ckpt_every=2", "train.max_steps=8"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(marker), *args], cwd=ROOT, env=env,
                            stdout=open(tmp_path / "out.txt", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(600):
            if marker.exists() or proc.poll() is not None:
                break
            threading.Event().wait(0.1)
        assert marker.exists(), "the second save never started"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [p.name for p in RunDir(run_dir).checkpoints.dirs()] == ["step_00000002"]
    assert list((run_dir / "checkpoints").glob(".tmp-step_00000004"))  # the torn one, never published
    with pytest.warns(UserWarning, match="taking over the stale lock"):  # the killed process's
        trainer.train(_cfg(run_dir, "train.ckpt_every=2", "train.max_steps=4"))
    assert [p.name for p in RunDir(run_dir).checkpoints.dirs()] == ["step_00000002", "step_00000004"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert json.loads((RunDir(run_dir).checkpoints.dirs()[-1] / "state.json").read_text())["step"] == 4
