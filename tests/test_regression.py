"""Loss-curve regression: a fixed tiny CPU run's eval-loss curve against the committed reference
tests/data/regression_eval_loss.json (dense dit_tiny on 4 x 8 x 8 videos and VSA on 4 x 16 x 16, 40 steps each,
eval every 5 steps: 9 points per curve).

Tolerance. Measured on the machine that wrote the reference (torch 2.13 CPU, 2 cores): runs with the same
thread count are bit-identical; between OMP_NUM_THREADS=1 and 2 (or 3) the curves differ by at most 1.5e-7
relative (dense; 9e-8 VSA: summation order). optim.lr 10% higher moves every point after step 0 by 1.2-6.6%
relative; even 1% higher moves the last point by 1.6%. Each point must match within RTOL = 1e-3: ~7000x the
thread noise, to leave room for other CPUs, BLAS builds and torch versions, and 12-66x below the effect of a 10%
learning-rate change (checked below: that run must miss by more than 10 x RTOL).

Refreshing the reference on purpose (a change meant to alter training: the model, the loss, the data, the
defaults, or a torch upgrade that moves the numbers more than RTOL):

    VSA_REFRESH_REGRESSION=1 pytest tests/test_regression.py

rewrites tests/data/regression_eval_loss.json from this machine's run (the test then passes); review the diff
of the JSON and say in the commit why the curve moved.
"""
import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from vsa_train import trainer
from vsa_train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "regression_eval_loss.json"
RTOL = 1e-3
COMMON = ["train.batch_size=4", "train.eval_samples=4", "train.eval_timesteps=2", "train.max_steps=40",
          "train.eval_every=5", "train.log_every=5", "train.ckpt_every=1000", "logger=none", "optim.lr=2e-3",
          "optim.warmup_steps=5", "train.seed=0", "data.seed=0"]
RUNS = {"dense": ["attn=dense", "data.frames=4", "data.height=8", "data.width=8"],
        "vsa": ["attn=vsa", "data.frames=4", "data.height=16", "data.width=16"]}


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread: the reference's setting, and the fastest on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def eval_curve(run_dir, *overrides) -> list[float]:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="train", overrides=[*COMMON, *overrides, f"run_dir={run_dir}"])
    with _one_thread():
        trainer.train(cfg)
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/loss" in r] == list(range(0, 41, 5))
    return [r["eval/loss"] for r in rows if "eval/loss" in r]


def worst_deviation(curve, reference) -> float:
    """The largest relative difference between two curves, point by point."""
    assert len(curve) == len(reference)
    return max(abs(a - b) / abs(b) for a, b in zip(curve, reference))


@pytest.fixture(scope="module")
def reference():
    if os.environ.get("VSA_REFRESH_REGRESSION") == "1":
        return {}
    if not REFERENCE.is_file():
        pytest.fail(f"{REFERENCE} is missing; write it with VSA_REFRESH_REGRESSION=1 pytest {__file__}")
    return json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("name", list(RUNS))
def test_eval_loss_curve_matches_the_reference(name, tmp_path, reference):
    curve = eval_curve(tmp_path, *RUNS[name])
    if os.environ.get("VSA_REFRESH_REGRESSION") == "1":
        data = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}
        data.update({"about": __doc__.split("\n\n")[0].replace("\n", " "), "torch": torch.__version__,
                     "rtol": RTOL, "common_overrides": COMMON, name + "_overrides": RUNS[name], name: curve})
        REFERENCE.write_text(json.dumps(data, indent=1) + "\n")
        return
    assert reference[name + "_overrides"] == RUNS[name] and reference["common_overrides"] == COMMON
    deviation = worst_deviation(curve, reference[name])
    assert deviation <= RTOL, (f"{name} eval-loss curve moved by {deviation:.2e} relative (tolerance {RTOL:g}): "
                               f"{curve} vs reference {reference[name]}; if intended, refresh (see the docstring)")


def test_a_ten_percent_learning_rate_change_fails_the_comparison(tmp_path, reference):
    if not reference:
        pytest.skip("refreshing the reference")
    curve = eval_curve(tmp_path, *RUNS["dense"], "optim.lr=2.2e-3")
    assert worst_deviation(curve, reference["dense"]) > 10 * RTOL
