"""The training loop on the CPU: outputs, exact resume, atomic checkpoints, NaN stop, FLOPs budget, dry run, DDP.

The run-lifecycle cases (config checks, signals, integrity, locks, rollback, hostile files) are in test_lifecycle.py.
"""
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from vsa_train import periodic, trainer, training_run
from vsa_train.checkpoint import save as checkpoint  # the module that writes (patched below)
from vsa_train.config_schema import typed
from vsa_train.metrics import read_metrics
from vsa_train.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
# 4 frames x 8 x 8 pixels -> 64 tokens: a step takes milliseconds
TINY = ["data.frames=4", "data.height=8", "data.width=8", "train.batch_size=2", "train.eval_samples=4",
        "train.eval_timesteps=2", "train.log_every=1", "logger=none"]


def latest_checkpoint(run_dir):
    good = RunDir(run_dir).checkpoints.verified()
    return good[-1] if good else None


def list_checkpoints(run_dir):
    return RunDir(run_dir).checkpoints.dirs()


def _cfg(run_dir, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=[*TINY, f"run_dir={run_dir}", *overrides])


def _run(run_dir, *overrides):
    return trainer.train(_cfg(run_dir, *overrides))


def _losses(run_dir, key="train/loss"):
    return {r["step"]: r[key] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if key in r}


def _weights(run_dir):
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def test_short_run_writes_metrics_checkpoint_and_plot(tmp_path):
    last = _run(tmp_path, "train.max_steps=4", "train.eval_every=2", "train.ckpt_every=2", "train.ema=0.9",
                "logger=wandb")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 2, 4]
    assert all("eval/loss_ema" in r for r in rows if "eval/loss" in r)
    per_step = rows[1]["flops"]
    assert per_step > 0 and rows[1]["flops_dense"] == per_step
    for r in rows[1:]:  # cumulative FLOPs grow by the same amount every step
        assert r["flops"] == pytest.approx(r["step"] * per_step)
        assert {"train/loss", "lr", "samples/s", "tokens/s", "TFLOP/s"} <= r.keys()
        assert "MFU" not in r  # only on GPUs
    assert rows[1]["lr"] == pytest.approx(6e-4 / 100)  # warm-up from the first step
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]
    assert (latest_checkpoint(tmp_path) / "model.safetensors").is_file()
    assert (tmp_path / "loss_vs_flops.png").stat().st_size > 10_000
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert last["step"] == 4 and last["eval/loss"] == rows[-1]["eval/loss"]


def test_resume_continues_exactly(tmp_path):
    split, straight = tmp_path / "split", tmp_path / "straight"
    _run(split, "train.max_steps=3", "train.eval_every=3", "train.ckpt_every=100")
    _run(split, "train.max_steps=6", "train.eval_every=3", "train.ckpt_every=100")  # resumes at step 3
    _run(straight, "train.max_steps=6", "train.eval_every=3", "train.ckpt_every=100")
    assert list(_losses(split)) == [1, 2, 3, 4, 5, 6]
    assert _losses(split) == _losses(straight)  # exact: same data, same noise, same weights
    assert _losses(split, "eval/loss") == _losses(straight, "eval/loss")
    a, b = _weights(split), _weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _run(tmp_path, "train.max_steps=2", "train.eval_every=100")
    good = latest_checkpoint(tmp_path)

    real_save = checkpoint.save_tensors

    def crash(tensors, path):
        if path.name == "model.safetensors":  # half the weights are written, then the process dies
            Path(path).write_bytes(b"half a file")
            raise KeyboardInterrupt("killed while saving")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint, "save_tensors", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "train.max_steps=3", "train.eval_every=100")
    assert latest_checkpoint(tmp_path) == good
    assert (tmp_path / "checkpoints" / ".tmp-step_00000003").is_dir()
    monkeypatch.undo()
    _run(tmp_path, "train.max_steps=4", "train.eval_every=100", "train.ckpt_every=2")  # resumes from step 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert list(_losses(tmp_path)) == [1, 2, 3, 4]  # the crashed run's step-3 row was replaced


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = []

    def poisoned(*args, **kwargs):
        calls.extend([1] if torch.is_grad_enabled() else [])  # training calls only, not eval
        loss = trainer_flow_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    trainer_flow_loss = trainer.flow_loss
    monkeypatch.setattr(trainer, "flow_loss", poisoned)
    # step 2's weights computed the non-finite loss: the last checkpoint whose weights are healthy is step 1
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .* at step 3.*Last healthy checkpoint: .*step_00000001"):
        _run(tmp_path, "train.max_steps=5", "train.eval_every=100", "train.ckpt_every=1")
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    assert all(torch.isfinite(w).all() for w in _weights(tmp_path).values())


def test_flops_budget_stops_the_run(tmp_path):
    first = read_metrics(_run(tmp_path / "probe", "train.max_steps=1") and tmp_path / "probe" / "metrics.jsonl")
    per_step = first[-1]["flops"]
    last = _run(tmp_path / "budget", "train.max_steps=100", f"train.flops_budget={2.5 * per_step}")
    assert last["step"] == 3 and last["flops"] >= 2.5 * per_step
    assert latest_checkpoint(tmp_path / "budget").name == "step_00000003"


def test_the_progress_bars_rate_leaves_evaluation_out(tmp_path, monkeypatch):
    """Issue 29, item 5f: the bar's rate (tqdm's time-left estimate) after an evaluation is the training rate. One
    fake clock for the bar and the loop: each step takes 0.1 s, each evaluation 10 s."""
    import tqdm.std

    clock = types.SimpleNamespace(now=1000.0)
    real_step, real_into, real_add, rates = trainer.train_step, periodic.Evaluator.into, periodic.MetricsLogger.add, []

    def step(run, *args, **kwargs):
        clock.now += 0.1
        return real_step(run, *args, **kwargs)

    def slow_into(self, row):
        done = real_into(self, row)  # False: a stop ended it
        clock.now += 10.0
        return done

    def add(self, flops, loss, tokens):
        real_add(self, flops, loss, tokens)
        rates.append(self.bar.format_dict["rate"])

    monkeypatch.setattr(tqdm.std, "time", lambda: clock.now)  # the bar's clock (read when a bar is made)
    monkeypatch.setattr(periodic, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(trainer, "train_step", step)
    monkeypatch.setattr(periodic.Evaluator, "into", slow_into)
    monkeypatch.setattr(periodic.MetricsLogger, "add", add)
    _run(tmp_path, "train.max_steps=8", "train.eval_every=4", "train.ckpt_every=100")
    assert rates == pytest.approx([10.0] * 8), rates  # 1 step per 0.1 s, the step-0 and step-4 evals left out


def test_compile_cache_points_inductor_and_triton_at_the_folder(tmp_path, monkeypatch):
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # restored after the test, whatever it sets
        monkeypatch.setenv(var, str(tmp_path / "elsewhere"))
    cfg = _cfg(tmp_path / "run", f"train.compile_cache={tmp_path / 'cache'}")
    trainer.build_run(cfg, trainer.make_accelerator(cfg))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")
    # Where inductor and Triton look kernels up and write them (each asks at every lookup).
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    from triton import knobs

    assert cache_dir() == str(tmp_path / "cache" / "inductor")
    assert knobs.cache.dir == str(tmp_path / "cache" / "triton")
    assert not (tmp_path / "elsewhere").exists()


def test_compile_cache_that_is_a_file_fails_early(tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(ValueError, match=r"train.compile_cache=.*cache: cannot use it as a folder"):
        _run(tmp_path / "run", f"train.compile_cache={tmp_path / 'cache'}")
    assert not list_checkpoints(tmp_path / "run")


def test_bad_values_fail_early(tmp_path):
    with pytest.raises(ValueError, match="train.batch_size must be a positive integer"):
        _run(tmp_path, "train.batch_size=0")
    with pytest.raises(ValueError, match="divisible by model.patch_size"):
        _run(tmp_path, "data.height=9")


def _train_py(*args, tmp_path, launcher=(sys.executable,)):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([*launcher, str(ROOT / "train.py"), *args, f"hydra.run.dir={tmp_path}"],
                          check=False, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


# `python -c` with triton unimportable (`import triton` raises ImportError), as on a CPU install without it
WITHOUT_TRITON = ("import runpy, sys; sys.modules['triton'] = None; sys.argv = sys.argv[1:]; "
                  "runpy.run_path(sys.argv[0], run_name='__main__')")


def test_cpu_install_without_triton_trains_dense_and_vsa(tmp_path):
    """triton is no dependency (pyproject.toml: ~1 GB that torch's CPU build does not need): without it dense and VSA
    (its PyTorch path, attn.backend=auto on CPU) train, and attn.backend=triton is refused at launch in one line."""
    launcher = (sys.executable, "-c", WITHOUT_TRITON)
    for attn in ("dense", "vsa"):
        (tmp_path / attn).mkdir()
        proc = _train_py(*TINY, f"attn={attn}", "train.max_steps=1", tmp_path=tmp_path / attn, launcher=launcher)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "rank 0/1: finished at step 1" in proc.stdout
    (tmp_path / "triton").mkdir()
    proc = _train_py(*TINY, "attn=vsa", "attn.backend=triton", tmp_path=tmp_path / "triton", launcher=launcher)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "invalid config: attn.backend=triton needs the triton package, which is not installed: "
        "`pip install triton` (torch's CUDA build brings it); or attn.backend=auto (PyTorch on CPU)"]


def test_dry_run_dit_1b_allocates_no_weights(tmp_path):
    # A wrapper process reports the peak RSS of its one child (this process's children include other tests').
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
               "print('child_peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    proc = _train_py("model=dit_1b", "data=synthetic_16k", "train.dry_run=true", tmp_path=tmp_path,
                     launcher=(sys.executable, "-c", wrapper, sys.executable))
    assert proc.returncode == 0, proc.stderr
    params = int(re.search(r"^params: (\d+)$", proc.stdout, re.MULTILINE).group(1))
    flops = float(re.search(r"^flops_per_sample: (\S+)$", proc.stdout, re.MULTILINE).group(1))
    assert 1.26e9 <= params <= 1.54e9  # 1.4B +-10%
    assert flops > 6 * params * 16384  # at 16K tokens attention adds to 6 N D
    assert proc.stdout.startswith("dry run: model=dit_1b attn=dense data=synthetic_16k")  # a summary, not the config
    peak_rss_gb = int(re.search(r"^child_peak_kb (\d+)$", proc.stdout, re.MULTILINE).group(1)) / 2**20
    assert peak_rss_gb < 2.0  # 1.4B fp32 weights alone would be 5.6 GB
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree(tmp_path):
    args = [*TINY, "train.max_steps=3", "train.eval_every=3"]
    proc = _train_py(*args, tmp_path=tmp_path,
                     launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    fingerprints = dict(re.findall(r"rank (\d)/2: finished at step 3, weights fingerprint (\S+)", proc.stdout))
    assert set(fingerprints) == {"0", "1"} and fingerprints["0"] == fingerprints["1"]
    ckpt = latest_checkpoint(tmp_path)
    assert (ckpt / "rng_rank0.safetensors").is_file() and (ckpt / "rng_rank1.safetensors").is_file()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # one writer
    assert rows[-1]["samples"] == 3 * 2 * 2  # steps x per-rank batch x ranks
    # the eval loss of the same initial weights does not depend on how the eval set is sharded
    _run(tmp_path / "single", "train.max_steps=0")
    assert rows[0]["eval/loss"] == pytest.approx(_losses(tmp_path / "single", "eval/loss")[0], rel=1e-5)


@pytest.mark.slow
def test_accelerate_config_takes_the_process_count_and_an_uneven_eval_set_says_what_to_do(tmp_path):
    """accelerate_configs/ddp.yaml names no process count (accelerate asks for --num_processes) and starts as many
    as asked, CPUs too; an eval set the ranks cannot share equally stops the launch naming the multiple to use."""
    launch = (sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "accelerate_configs" / "ddp.yaml"))
    proc = _train_py(*TINY, tmp_path=tmp_path, launcher=launch)
    assert proc.returncode != 0 and "pass in `--num_processes`" in proc.stderr, proc.stderr[-2000:]
    proc = _train_py(*TINY, "train.eval_samples=3", tmp_path=tmp_path, launcher=(*launch, "--num_processes", "2"))
    assert proc.returncode != 0
    assert ("train.eval_samples=3 must be divisible by the 2 data-parallel ranks: use train.eval_samples=4 (or "
            "another multiple of 2), or launch fewer processes") in proc.stderr, proc.stderr[-2000:]


def test_compiled_run_warms_up_vsa_kernels_after_forking_and_joins_before_forking_again(tmp_path, monkeypatch):
    """train.compile starts the VSA kernel warm-up once the data workers exist (not for a run with nothing left to
    do); restarting the data (a rollback) waits for it first, as forking while another thread runs can deadlock the
    children."""
    events = []
    monkeypatch.setattr(training_run, "warm_up_kernels",
                        lambda model, dtype, device: events.append(("warm up", type(model).__name__, dtype, device.type)))
    monkeypatch.setattr(training_run.warm, "join", lambda: events.append("join"))
    build_data = training_run.build_data  # where the data-loader workers come from
    monkeypatch.setattr(training_run, "build_data", lambda *a, **k: (events.append("fork"), build_data(*a, **k))[1])
    cfg = _cfg(tmp_path / "eager", "attn=vsa")
    trainer.build_run(cfg, trainer.make_accelerator(cfg))
    assert events == ["join", "fork"]  # no warm-up without train.compile
    events.clear()
    cfg = _cfg(tmp_path / "compiled", "attn=vsa", "train.compile=true")
    run = trainer.build_run(cfg, trainer.make_accelerator(cfg))
    assert events == ["join", "fork", ("warm up", "VideoDiT", torch.float32, "cpu")]  # CPU: no mixed precision
    run.restart_data()
    assert events[3:] == ["join", "fork"]
    events.clear()
    cfg = _cfg(tmp_path / "done", "attn=vsa", "train.compile=true", "train.max_steps=0")
    trainer.build_run(cfg, trainer.make_accelerator(cfg))
    assert events == ["join", "fork"]  # nothing will run: nothing to compile


@pytest.mark.parametrize("attn,warns", [("vsa", True), ("vsa_fine_only", True), ("vsa_coarse_only", False),
                                         ("tile_window", False), ("dense", False)])
@pytest.mark.parametrize("api", ["legacy", "fp32_precision"])
def test_tf32_warning_for_topk_vsa(attn, warns, api, recwarn, tmp_path):
    """TF32 flips VSA's top-k selections (fp32 coarse scores by design): a top-k run says so, whichever API turned
    TF32 on; runs without a top-k selection do not."""
    cfg = _cfg(tmp_path, f"attn={attn}")
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        training_run.warn_tf32(cfg.attn)
        if api == "legacy":
            matmul.allow_tf32 = True
        else:
            matmul.fp32_precision = "tf32"
        training_run.warn_tf32(cfg.attn)
    finally:
        matmul.fp32_precision = before
    tf32 = [w for w in recwarn if "TF32 is on" in str(w.message)]
    assert len(tf32) == (1 if warns else 0)


def test_a_benchmark_builds_a_run_and_times_its_step_on_one_repeated_batch(tmp_path):
    """The benchmark API (vsa_train/training_run.py): build_run, repeat_batch, train_step, close."""
    config = typed(_cfg(tmp_path, "train.max_steps=100"))
    run = trainer.build_run(config, trainer.make_accelerator(config))
    assert run.config is config and run.state.step == 0 and run.global_batch == config.train.batch_size
    batch = run.repeat_batch()
    assert run.data.train is None  # the loader (and its workers) is gone: only the step is timed
    assert batch["video"].device == run.accelerator.device and "position" in batch
    for _ in range(2):
        assert trainer.train_step(run).ok
    assert next(run.train_iter) is batch and run.state.step == 2 and run.state.samples == 2 * run.global_batch
    run.close()
    assert run.model is None and run.optimizer is None
