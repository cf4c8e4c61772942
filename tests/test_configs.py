"""Every config group option and experiment composes; bad choices fail with the list of choices."""
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from vsa_train.data import data_spec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GROUPS = ("model", "attn", "data", "optim", "logger")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _compose(*overrides, hydra_cfg=False):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra_cfg)


def _resolved(cfg) -> dict:
    """The config with every interpolation resolved (run_dir needs Hydra's runtime, so it is set here)."""
    cfg.run_dir = "/tmp/unused"
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option):
    cfg = _resolved(_compose(f"{group}={option}"))
    assert cfg[group]["name"] == option
    for key in ("max_steps", "batch_size", "grad_accum", "eval_every", "ckpt_every", "log_every", "dry_run",
                "flops_budget", "compile", "mixed_precision", "ema", "seed", "eval_samples", "eval_timesteps"):
        assert key in cfg["train"]


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_as_a_delta(experiment):
    base, cfg = _resolved(_compose()), _resolved(_compose(f"experiment={experiment}"))
    assert cfg != base
    assert cfg["exp_name"] != base["exp_name"]
    spec = data_spec(OmegaConf.create(cfg["data"]))
    assert all(n % p == 0 for n, p in zip(spec.video_shape, cfg["model"]["patch_size"]))


def test_paper_shapes_and_recipe():
    cfg = _resolved(_compose("experiment=dit120m_16k"))
    assert cfg["model"]["name"] == "dit_120m" and cfg["data"]["name"] == "synthetic_16k"
    tokens = (cfg["data"]["frames"] // 1) * (cfg["data"]["height"] // 2) * (cfg["data"]["width"] // 2)
    assert tokens == 16384
    optim = cfg["optim"]
    assert optim["betas"] == [0.9, 0.95] and optim["weight_decay"] == 0.01 and optim["lr"] == 6e-4
    assert optim["warmup_steps"] == 100 and optim["grad_clip"] == 1.0


def test_run_dir_is_deterministic_from_choices():
    cfg = _compose("attn=dense", "train.seed=3", hydra_cfg=True)
    assert cfg.hydra.run.dir == "runs/dit_tiny_dense_synthetic_s3"
    cfg = _compose("experiment=dit120m_16k", hydra_cfg=True)
    assert cfg.hydra.run.dir == "runs/dit120m_16k_dense_synthetic_16k_s0"
    assert cfg.hydra.sweep.dir == "runs/multirun/dit120m_16k_synthetic_16k"
    # the run length is not part of a sweep job's directory, so extending a run resumes it
    assert "train.max_steps" in cfg.hydra.job.config.override_dirname.exclude_keys


def test_slurm_launcher_preset_composes():
    cfg = _compose("hydra/launcher=slurm", hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.max_num_timeout > 0 and launcher.timeout_min > 0
    assert launcher.tasks_per_node == launcher.gpus_per_node


@pytest.mark.parametrize("group", ["model", "attn", "data"])
def test_unknown_choice_lists_the_choices(group):
    with pytest.raises(MissingConfigException) as err:
        _compose(f"{group}=no_such_{group}")
    message = str(err.value)
    assert f"no_such_{group}" in message
    for option in _options(group):
        assert option in message


def test_unknown_model_on_the_command_line_lists_the_choices(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=dit_huge", f"hydra.run.dir={tmp_path}"],
                          check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "dit_huge" in proc.stderr and all(option in proc.stderr for option in _options("model"))


def test_unknown_data_source_lists_the_sources():
    cfg = _compose("data.source=webvid")
    sources = r"\['hf', 'latents', 'synthetic', 'videos'\]"
    with pytest.raises(ValueError, match=r"unknown data.source='webvid'; choices: " + sources):
        data_spec(cfg.data)
