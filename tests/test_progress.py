"""Honest progress (issue #14): status lines before the long phases, the memory estimate and its warning, a bar in
FLOPs when the budget ends the run, the budget's overshoot, the VSA-costs-more-than-dense note. CPU, tiny runs."""
import re
from pathlib import Path

import pytest
from tqdm.auto import tqdm

from vsa_train import periodic, progress, trainer, training_run
from vsa_train.metrics import read_metrics

from test_lifecycle import _cfg, _run


@pytest.fixture
def bars(monkeypatch):
    """The trainer's tqdm bars, kept for inspection."""
    made = []

    class Kept(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(periodic, "tqdm", Kept)
    return made


def test_status_lines_before_long_phases(tmp_path, capsys, bars):
    _run(tmp_path / "run", "train.max_steps=2", "train.ema=0.9", "train.ckpt_every=1")
    out = capsys.readouterr().out
    lines = out.splitlines()

    def first(pattern):
        return next(i for i, line in enumerate(lines) if re.search(pattern, line))

    assert re.search(r"^building the model: dit_tiny, [\d,]+ parameters", out, re.M)
    assert re.search(r"^training memory estimate \(rough, per process\): .* \+ EMA .* \+ activations ~", out, re.M)
    assert first("^run_dir:") < first("^building the model") < first("^params: ")  # the directory first
    assert first(r"^evaluating 4 videos x 2 timesteps \(weights and EMA\) \.\.\.$") < first("^step 0: eval/loss ")
    for step in (1, 2):
        assert first(f"^saving checkpoint step {step} \\.\\.\\.$") < first(f"^saved checkpoint step {step} in ")
    assert out.count("saving checkpoint step 2") == 1  # the final save of a saved step says nothing
    assert "compiling" not in out and "flops budget" not in out
    assert re.search(r"^first step: \d+\.\d s \(compilation and the first batch included\)$", out, re.M)
    assert out.count("first step:") == 1  # once per launch
    assert first("^step 0: eval/loss ") < first("^first step: ") < first("^saving checkpoint step 1 ")
    assert bars[0].total == 2 and bars[0].unit == "it"  # no budget: a bar in steps


def test_compile_is_announced(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(training_run, "compile_blocks", lambda model, *shapes: None)  # the line, not the compiler, is tested
    _run(tmp_path / "run", "train.max_steps=1", "train.compile=blocks")
    out = capsys.readouterr().out
    assert "compiling (train.compile=blocks): the first step takes longer (and the step-0 eval)" in out
    assert out.index("compiling") < out.index("step 0: eval/loss")


def test_flops_budget_bar_and_overshoot(tmp_path, capsys, bars):
    budget = 1e9  # dense tiny model: 2.14e8 FLOPs per sample, batch 2 -> 4.29e8 per step: crossed at step 3
    _run(tmp_path / "run", "train.max_steps=100000000", f"train.flops_budget={budget}")
    out = capsys.readouterr().out
    bar = bars[0]
    assert (bar.total, bar.unit, bar.unit_scale) == (budget, "FLOP", True)
    assert bar.n == budget  # full at the end; the line below tells the overshoot
    last = [r for r in read_metrics(Path(tmp_path / "run") / "metrics.jsonl") if "flops" in r][-1]
    step, flops = last["step"], last["flops"]
    assert flops >= budget and flops - 4.3e8 < budget
    m = re.search(r"^flops budget (\S+) reached at step (\d+): (\S+) executed \(\+(\S+)%, the last step crosses it\)$",
                  out, re.M)
    assert m, out
    assert float(m[1]) == budget and int(m[2]) == step
    assert float(m[3]) == pytest.approx(flops, rel=1e-3)
    assert float(m[4]) == pytest.approx(100 * (flops - budget) / budget, rel=1e-2)


def test_budget_met_exactly_and_not_reached():
    assert progress.budget_line(1e15, 7, 1e15) == "flops budget 1.000e+15 reached exactly at step 7: 1.000e+15 executed"
    assert progress.budget_line(1e15, 7, 1.012e15).endswith("(+1.2%, the last step crosses it)")


def test_max_steps_before_budget_keeps_a_step_bar(tmp_path, capsys, bars):
    _run(tmp_path / "run", "train.max_steps=2", "train.flops_budget=1e15")
    out = capsys.readouterr().out
    assert bars[0].total == 2 and bars[0].unit == "it"
    assert "train.max_steps=2 ended the run before the flops budget 1.000e+15" in out


def test_vsa_more_flops_than_dense_note(tmp_path, capsys):
    # the default data (512 tokens = 8 tiles of 64): all 8 tiles plus the coarse stage and gates exceed dense
    result = trainer.dry_run(_cfg(tmp_path / "dry", "data.frames=8", "data.height=16", "data.width=16", "attn=vsa",
                                  "attn.topk=8", "train.dry_run=true"))
    out = capsys.readouterr().out
    m = re.search(r"^note: VSA here executes more FLOPs than dense: (\S+) vs (\S+) per sample", out, re.M)
    assert m, out
    assert float(m[1]) == pytest.approx(result["flops_per_sample"], rel=1e-4)
    assert float(m[2]) == pytest.approx(result["flops_per_sample_dense"], rel=1e-4)
    # the default sparsity (topk 1 of 8) is cheaper than dense: no note
    trainer.dry_run(_cfg(tmp_path / "dry", "data.frames=8", "data.height=16", "data.width=16", "attn=vsa"))
    assert "note: VSA" not in capsys.readouterr().out
    # a ramp starts dense: said too
    trainer.dry_run(_cfg(tmp_path / "dry", "data.frames=8", "data.height=16", "data.width=16", "attn=vsa",
                         "attn.schedule=ramp"))
    assert "note: VSA's ramp starts above dense" in capsys.readouterr().out
    # a training run says it once at start (TINY: 64 tokens, one tile)
    _run(tmp_path / "run", "train.max_steps=1", "attn=vsa")
    out = capsys.readouterr().out
    assert out.count("note: VSA here executes more FLOPs than dense") == 1
    assert out.index("note: VSA") < out.index("step 0: eval/loss")


def test_memory_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "total_memory", lambda device: (2**20, "RAM"))  # a 1 MiB machine
    _run(tmp_path / "run", "train.max_steps=1")
    out = capsys.readouterr().out
    m = re.search(r"^warning: this machine has 1\.0 MiB of RAM, less than the (\S+) MiB estimated per process", out,
                  re.M)
    assert m, out
    assert out.index("warning: this machine") < out.index("params:")  # before the model is built
    monkeypatch.setattr(progress, "total_memory", lambda device: (2**50, "RAM"))
    _run(tmp_path / "run2", "train.max_steps=1")
    assert "warning: this machine" not in capsys.readouterr().out


def test_memory_estimate_terms():
    from omegaconf import OmegaConf
    cfg = OmegaConf.create({"train": {"ema": 0.999, "batch_size": 2},
                            "model": {"hidden_size": 128, "depth": 2, "grad_checkpointing": "none"}})

    def estimate(*args, **kwargs):
        return progress.memory_estimate(1000, cfg.model, cfg.train, *args, **kwargs)

    est = estimate(tokens=64)
    assert est["states"] == 16_000 and est["ema"] == 4_000
    assert est["activations"] == progress.VALUES_PER_TOKEN_DIM * 64 * 128 * 4 * 2 * 2  # fp32, batch 2, 2 blocks
    assert estimate(64, precision="bf16")["activations"] == est["activations"] / 2
    assert estimate(64, dp_size=4, strategy="fsdp")["states"] == 4_000
    cfg.model.grad_checkpointing = "full"  # 2 fp32 block inputs + one block's activations (bf16 or not)
    per_block, inputs = progress.VALUES_PER_TOKEN_DIM * 64 * 128 * 2, 2 * 64 * 128 * 2 * 4
    assert estimate(64)["activations"] == inputs + per_block * 4
    assert estimate(64, precision="bf16")["activations"] == inputs + per_block * 2
    full = estimate(64)["activations"]
    cfg.model.grad_checkpointing = True  # older configs' spelling of full
    assert estimate(64)["activations"] == full
    cfg.model.grad_checkpointing = "selective"  # block 0 recomputed (its input kept), block 1 kept whole
    assert estimate(64)["activations"] == 64 * 128 * 2 * 4 + 2 * per_block * 4
    assert progress.total_memory(__import__("torch").device("cpu"))[0] > 0
