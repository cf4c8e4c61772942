"""Fixed validation prompts (issue 30, item 5): train.sample_prompts and train.sample_seeds come from the config, so
every run of a sweep samples the same prompts from the same initial noise; the videos go to run_dir/samples, one
folder per prompt, and to wandb captioned by their prompt."""
import json
from pathlib import Path

import pytest
import torch
import wandb
from hydra import compose, initialize_config_dir

from vsa_train import sampling, trainer
from vsa_train.config_schema import ConfigError, typed
from vsa_train.data import data_spec
from vsa_train.sampling import prompt_noise, sample_path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.frames=4", "data.height=8", "data.width=8", "train.batch_size=2", "train.eval_samples=2",
        "train.eval_timesteps=1", "train.eval_batch_size=2", "train.eval_every=100", "logger=none"]
PROMPTS = ["a plain red circle bouncing upwards slowly on a plain blue background", "a striped green square"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=[*TINY, *overrides])


@pytest.mark.parametrize("overrides,seeds", [
    ([], [0, 1]),                                                          # today's prompts, seeds 0 and 1
    (["train.sample_count=3", "train.sample_seeds=10"], [10, 11, 12]),
    ([f"train.sample_prompts={json.dumps(PROMPTS)}", "train.sample_seeds=[7,3]"], [7, 3]),
    ([f"train.sample_prompts={json.dumps(PROMPTS[:1])}", "train.seed=5"], [0]),  # not the training seed
])
def test_each_prompt_gets_its_seed_from_the_config(overrides, seeds):
    assert typed(_compose(*overrides)).train.prompt_seeds() == seeds


@pytest.mark.parametrize("overrides,line", [
    (["train.sample_prompts=[]"], "train.sample_prompts must be a list of non-empty strings or null, got []"),
    (['train.sample_prompts=["a red circle", " "]'], "train.sample_prompts must be a list of non-empty strings or "
                                                     "null, got ['a red circle', ' ']"),
    (["train.sample_prompts=a red circle"], "train.sample_prompts must be a list of non-empty strings or null, got "
                                            "'a red circle'"),
    (["train.sample_seeds=[1,x]"], "train.sample_seeds must be an integer >= 0 (prompt k gets seed + k) or a list "
                                   "of them, one per prompt, got [1, 'x']"),
    ([f"train.sample_prompts={json.dumps(PROMPTS)}", "train.sample_seeds=[1,2,3]"],
     "train.sample_seeds must have one seed per prompt, 2 for the 2 train.sample_prompts, got 3: [1, 2, 3] (or one "
     "integer: prompt k gets seed + k)"),
])
def test_bad_prompts_and_seeds_are_named_once_in_the_config(overrides, line):
    with pytest.raises(ConfigError) as err:
        typed(_compose(*overrides))
    assert err.value.problems == [line]


def test_a_prompts_noise_depends_on_its_seed_alone():
    spec = data_spec(typed(_compose()).data)
    a, b = prompt_noise(spec, [7, 3]), prompt_noise(spec, [3, 7, 9])
    assert a.shape == (2, spec.in_channels, *spec.video_shape)
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])


@pytest.fixture
def logged(monkeypatch):
    """What reaches wandb (each log call's row) and the initial noise of each sampled video."""
    record = {"rows": [], "noise": []}
    real_log, real_euler = wandb.Run.log, sampling.euler_sample

    def log(self, data, step=None, **kwargs):
        record["rows"].append(dict(data))
        return real_log(self, data, step=step, **kwargs)

    def euler(model, noise, *args, **kwargs):
        record["noise"].append(noise.clone())
        return real_euler(model, noise, *args, **kwargs)

    monkeypatch.setattr(wandb.Run, "log", log)
    monkeypatch.setattr(sampling, "euler_sample", euler)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # logger.mode=offline decides
    yield record
    if wandb.run is not None:
        wandb.run.finish()


def test_runs_with_other_training_seeds_sample_the_same_prompts_from_the_same_noise(tmp_path, logged):
    sampled = {}
    for seed in (0, 1):
        run_dir = tmp_path / f"s{seed}"
        logged["rows"].clear()
        logged["noise"].clear()
        trainer.train(_compose(f"run_dir={run_dir}", f"train.seed={seed}", "train.max_steps=1", "logger=wandb",
                               "logger.mode=offline", "train.sample_every=1", "train.sample_steps=1",
                               f"train.sample_prompts={json.dumps(PROMPTS)}", "train.sample_seeds=[7,3]"))
        videos = [v for row in logged["rows"] for v in row.get("media/samples", [])]
        files = [sample_path(run_dir, k, p, 1) for k, p in enumerate(PROMPTS)]
        sampled[seed] = {"captions": [v._caption for v in videos], "noise": list(logged["noise"]),
                         "mp4": [f.read_bytes() for f in files]}
        assert all(f.with_suffix(".gif").is_file() for f in files)
        assert files[0].parent.name.startswith("0_a_plain_red_circle")
        assert files[1].parent.name == "1_a_striped_green_square"
        assert json.loads((run_dir / "samples" / "prompts.json").read_text()) == [
            {"folder": f.parent.name, "prompt": p, "seed": s} for f, p, s in zip(files, PROMPTS, (7, 3))]
        # wandb's offline run holds one video per prompt
        media = list(run_dir.glob("wandb/offline-run-*/files/media/videos/media/samples_1_*.mp4"))
        assert len(media) == len(PROMPTS), media
    assert sampled[0]["captions"] == sampled[1]["captions"] == PROMPTS
    spec = data_spec(typed(_compose()).data)
    expected = prompt_noise(spec, [7, 3])
    for seed in (0, 1):
        assert len(sampled[seed]["noise"]) == 2 and all(
            torch.equal(n[0].cpu(), e) for n, e in zip(sampled[seed]["noise"], expected))
    assert sampled[0]["mp4"] != sampled[1]["mp4"]  # the weights differ: the same noise gives other videos
