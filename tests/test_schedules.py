"""Learning-rate schedules (constant, cosine, wsd) to the run's end (max_steps or the FLOPs budget, summed over a
sparsity ramp), exact resume, and an eval set that is the same for every run of a sweep."""
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vsa_train import trainer
from vsa_train.data import data_spec
from vsa_train.metrics import read_metrics
from vsa_train.config_schema import problems
from vsa_train.schedules import SparsitySchedule, end_step, lr_at

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.frames=4", "data.height=8", "data.width=8", "train.batch_size=2", "train.eval_samples=2",
        "train.eval_timesteps=2", "train.log_every=1", "train.eval_every=100", "logger=none"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=list(overrides))


def _optim(**kw):
    base = dict(lr=1.0, warmup_steps=10, schedule="constant", min_lr_ratio=0.1, decay_fraction=0.2)
    return OmegaConf.create({**base, **kw})


def test_constant_is_the_papers_warmup_then_flat():
    o = _optim()
    assert [lr_at(s, o) for s in (0, 4, 9, 10, 10_000)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert _cfg().optim.schedule == "constant"  # the default keeps existing runs' trajectories


def test_cosine_decays_to_the_floor_at_the_last_step():
    o, end = _optim(schedule="cosine"), 111
    lrs = [lr_at(s, o, end) for s in range(end + 5)]
    assert lrs[9] == 1.0 and lrs[10] == 1.0  # warm-up ends at the peak, decay starts there
    assert lrs[60] == pytest.approx(0.55)  # halfway (step 60 of 10..110): the mean of peak and floor
    assert lrs[end - 1] == pytest.approx(0.1) and lrs[end + 4] == pytest.approx(0.1)  # floor, and it stays
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_wsd_is_stable_then_decays_linearly_over_the_last_fraction():
    o, end = _optim(schedule="wsd"), 100
    lrs = [lr_at(s, o, end) for s in range(end)]
    assert all(v == 1.0 for v in lrs[10:81])  # stable until 80 = 100 - 20% of the run
    steps = [lrs[s] - lrs[s + 1] for s in range(80, 99)]
    assert all(d == pytest.approx(0.9 / 19) for d in steps)  # linear: equal decrements
    assert lrs[99] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="needs end_step"):
        lr_at(50, o)
    assert problems(_cfg("optim.schedule=linear")) == [
        "optim.schedule must be one of constant, cosine, wsd, got 'linear'"]
    assert problems(_cfg("optim.schedule=wsd", "optim.decay_fraction=0")) == [
        "optim.decay_fraction must be a number in (0, 1], got 0"]


def test_budget_end_sums_the_flops_of_a_sparsity_ramp():
    """VSA ramping from dense: per-step FLOPs fall as the ramp proceeds, so the budget's step is found by summing
    them; dividing the budget by the step-0 or the final cost would be off by many steps."""
    cfg = _cfg("attn=vsa", "data.frames=8", "data.height=32", "data.width=32", "attn.schedule=ramp",
               "attn.ramp_interval=5", "attn.ramp_rate=0.25", "attn.sparsity=0.75")
    sparsity = SparsitySchedule(cfg.model, cfg.attn, data_spec(cfg.data))
    per_step = [sparsity.flops_per_sample(s).executed * 4 for s in range(100)]
    assert per_step[0] > per_step[10] > per_step[99] == per_step[20]  # ramp, then steady
    budget = sum(per_step[:37]) - 1.0  # reached during step 37 (index 36)
    assert end_step(10**9, budget, sparsity, global_batch=4) == 37
    assert end_step(30, budget, sparsity, global_batch=4) == 30  # max_steps first
    assert end_step(50, None, sparsity, global_batch=4) == 50
    naive = [math.ceil(budget / per_step[0]), math.ceil(budget / per_step[99])]
    assert all(abs(n - 37) > 3 for n in naive)


def test_run_decays_to_its_budget_and_resumes_exactly(tmp_path, die_in_step):
    """A cosine run to a FLOPs budget: its last step is the one that reaches the budget and gets the floor rate;
    a crash and resume gives the same rates and losses as the uninterrupted run."""
    cfg = [*TINY, "optim.schedule=cosine", "optim.warmup_steps=2", "optim.min_lr_ratio=0.25",
           "train.max_steps=1000", "train.ckpt_every=3"]
    straight = tmp_path / "straight"
    per_step = trainer.dry_run(_cfg(*cfg, f"run_dir={straight}"))["flops_per_sample"] * 2  # global batch 2
    budget = 6.5 * per_step  # reached by step 7
    run = [*cfg, f"train.flops_budget={budget}"]
    trainer.train(_cfg(*run, f"run_dir={straight}"))
    rows = [r for r in read_metrics(straight / "metrics.jsonl") if "lr" in r]
    assert [r["step"] for r in rows][-1] == 7 and rows[-1]["flops"] >= budget > rows[-2]["flops"]
    assert rows[-1]["lr"] == pytest.approx(6e-4 * 0.25) and rows[1]["lr"] == pytest.approx(6e-4)
    assert rows[2]["lr"] == rows[1]["lr"] and all(a["lr"] > b["lr"] for a, b in zip(rows[2:], rows[3:]))

    split = tmp_path / "split"
    restore = die_in_step(5)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(_cfg(*run, f"run_dir={split}"))
    restore()
    trainer.train(_cfg(*run, f"run_dir={split}"))  # resumes from step 3
    again = [r for r in read_metrics(split / "metrics.jsonl") if "lr" in r]
    straight_rows = [r for r in read_metrics(straight / "metrics.jsonl") if "lr" in r]
    for key in ("step", "lr", "train/loss"):
        assert [r[key] for r in again] == [r[key] for r in straight_rows]


def test_eval_set_is_the_same_for_every_model_attention_and_batch():
    """The eval videos, captions, noise and timesteps depend on data + eval_samples + eval_timesteps + data seed
    only: two runs of a sweep with different model, attention, batch and training seed get bit-identical sets."""
    common = ["data.frames=4", "data.height=16", "data.width=16", "train.eval_samples=3", "train.eval_timesteps=4",
              "logger=none", "run_dir=unused"]
    a = _cfg(*common, "attn=dense", "train.batch_size=2")
    b = _cfg(*common, "attn=vsa", "model.depth=1", "model.hidden_size=64", "model.num_heads=1",
             "train.batch_size=3", "train.grad_accum=2", "train.seed=5", "optim.schedule=wsd")
    sets = [trainer.build_run(cfg, trainer.make_accelerator(cfg)).eval_set for cfg in (a, b)]
    assert sets[0].keys() == sets[1].keys() and {"video", "noise", "timesteps", "text"} <= sets[0].keys()
    for key, value in sets[0].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, sets[1][key]), key
        else:
            assert value == sets[1][key], key
    assert sets[0]["timesteps"].tolist() == [0.125, 0.375, 0.625, 0.875]
    other = _cfg(*common, "data.seed=1")  # the data seed does change it
    changed = trainer.build_run(other, trainer.make_accelerator(other)).eval_set
    assert not torch.equal(changed["noise"], sets[0]["noise"])
