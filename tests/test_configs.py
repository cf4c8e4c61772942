"""Every config group option and experiment composes; bad choices fail with the list of choices."""
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

import vsa_train.rundir  # noqa: F401 (the default_run_dir resolver that configs/train.yaml's hydra.run.dir uses)
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


def _run_dir(*overrides) -> str:
    return _compose(*overrides, hydra_cfg=True).hydra.run.dir


def test_run_dir_is_deterministic_from_choices():
    assert re.fullmatch(r"runs/dit_tiny_dense_synthetic_s3_[0-9a-f]{8}", _run_dir("attn=dense", "train.seed=3"))
    cfg = _compose("experiment=dit120m_16k", hydra_cfg=True)
    assert re.fullmatch(r"runs/dit120m_16k_dense_synthetic_16k_s0_[0-9a-f]{8}", cfg.hydra.run.dir)
    assert cfg.hydra.sweep.dir == "runs/multirun/dit120m_16k_synthetic_16k"
    # the run length is not part of a sweep job's directory, so extending a run resumes it
    assert "train.max_steps" in cfg.hydra.job.config.override_dirname.exclude_keys
    # where compiled kernels are cached moves no run either (a relaunch with or without it resumes)
    assert "train.compile_cache" in cfg.hydra.job.config.override_dirname.exclude_keys


def test_other_settings_get_their_own_run_dir_and_the_same_command_resumes():
    """Issue 29, item 1: the hash in the name covers what a resume must match (rundir.FIXED) and the FLOPs budget;
    the run length, cadence, logger and speed-only keys keep the directory."""
    from vsa_train.rundir import settings_hash

    base = _run_dir()
    assert base == _run_dir() and base.endswith("_" + settings_hash(_compose()))
    for same in (["train.max_steps=300"], ["train.log_every=3", "logger=none"], ["data.num_workers=0"],
                 ["model.grad_checkpointing=full"], ["train.resume=force"], ["train.eval_batch_size=4"]):
        assert _run_dir(*same) == base, same
    vsa = _run_dir("attn=vsa")
    others = [vsa, _run_dir("attn=vsa", "attn.topk=4", "attn.dense_layers=[0]"), _run_dir("train.flops_budget=1e9"),
              _run_dir("optim.lr=3e-4"), _run_dir("train.ema=0.999"), _run_dir("train.eval_samples=8"),
              _run_dir("train.init_from=runs/x"), _run_dir("data.frames=4")]
    assert len({base, *others}) == 1 + len(others)
    # the name train.py --help gives the quick start's run is the one it gets
    help_text = _compose(hydra_cfg=True).hydra.help.template
    assert re.findall(r"runs/dit_tiny_dense_synthetic_s0\w*", help_text) == [base]


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
    with pytest.raises(ValueError, match=r"data.source must be one of hf, latents, synthetic, videos, got 'webvid'"):
        data_spec(cfg.data)


# ------------------------------------------------------------------------------------ the schema (config_schema)

from vsa_train import config_schema  # noqa: E402
from vsa_train.config_schema import ConfigError  # noqa: E402
from vsa_train.data import listing  # noqa: E402


def _problems(*overrides) -> list[str]:
    return config_schema.problems(_compose(*overrides))


@pytest.mark.parametrize("overrides,line", [
    (["attn=vsa", "attn.sparsity=1.5"], "attn.sparsity must be a number in [0, 1), got 1.5"),
    (["data.frames=0"], "data.frames must be a positive integer, got 0"),
    (["data.frames=-4"], "data.frames must be a positive integer, got -4"),
    (["optim.lr=-1"], "optim.lr must be a positive number, got -1"),
    (["train.batch_size=-1"], "train.batch_size must be a positive integer, got -1"),
    (["attn=vsa", "attn.topk=1000"], "attn.topk must be at most the 8 tiles of the 8x8x8 token grid"),
    (["+train.max_step=5"], "unknown key train.max_step; did you mean train.max_steps?"),
    (["+model.hiden_size=5"], "unknown key model.hiden_size; did you mean model.hidden_size?"),
    (["attn=vsa", "+attn.sparsty=0.5"], "unknown key attn.sparsty; did you mean attn.sparsity?"),
    (["+data.folder=x"], "unknown key data.folder"),  # synthetic data has no folder
    (["+optim.betas2=1"], "unknown key optim.betas2; did you mean optim.betas?"),
    (["+parallel.sp=2"], "unknown key parallel.sp"),
    (["parallel.sp_size=3"], "parallel.sp_size=3 must divide model.num_heads=2"),
    (["train.compile_cache=3"], "train.compile_cache must be a non-empty string or null, got 3"),
    (["train.mixed_precision=fp8"], "train.mixed_precision must be one of auto, no, bf16, fp16, got 'fp8'"),
    (["data.height=9"], "must be divisible by model.patch_size"),
    (["data=videos", "data.manifest=a.csv", "data.folder=b"], "set only one of them"),
    (["data=hf"], "data.path is required"),
    (["train.ema=0.99", "parallel.strategy=fsdp"], "train.ema is not supported with parallel.strategy=fsdp"),
    (["logger.mode=loud"], "logger.mode must be one of offline, online, disabled, got 'loud'"),
    (["train.max_steps=${oc.env:NO_SUCH_VARIABLE_HERE}"], "train.max_steps does not resolve"),
])
def test_each_bad_value_gets_one_line_naming_key_value_and_allowed(overrides, line):
    found = _problems(*overrides)
    assert len(found) == 1 and line in found[0], found


def test_a_value_the_job_resolves_is_left_to_the_job_by_hydras_launching_process():
    cfg = _compose("train.max_steps=${oc.env:NO_SUCH_VARIABLE_HERE}", "optim.lr=-1")
    assert config_schema.problems(cfg, defer_unresolved=True) == ["optim.lr must be a positive number, got -1"]


def test_all_problems_are_collected_into_one_error():
    cfg = _compose("attn=vsa", "attn.sparsity=1.5", "data.frames=-4", "optim.lr=-1", "train.batch_size=-1",
                   "+train.max_step=5")
    with pytest.raises(ConfigError) as err:
        config_schema.check(cfg)
    assert len(err.value.problems) == 5
    assert str(err.value).startswith("invalid config (5 problems):\n  ")
    assert isinstance(err.value, ValueError)  # the trainer's callers catch ValueError


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_shipped_option_passes_the_check(group, option):
    extra = [f"data.path={ROOT / 'data' / 'sample_clips.csv'}"] if (group, option) == ("data", "hf") else []
    if (group, option) == ("data", "latents"):  # reading the index is the check: a missing one is named
        assert any("data.path=" in p and "index" in p for p in _problems("data=latents", "data.path=/nonexistent"))
        return
    assert _problems(f"{group}={option}", *extra) == []


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_passes_the_check(experiment):
    assert _problems(f"experiment={experiment}") == []


def _train_py(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], check=False, capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_a_bad_launch_stops_before_the_run_directory_is_made(tmp_path):
    run_dir = tmp_path / "run"
    proc = _train_py("data.frames=0", "+train.max_step=5", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "data.frames must be a positive integer, got 0" in proc.stderr
    assert "unknown key train.max_step; did you mean train.max_steps?" in proc.stderr
    assert not run_dir.exists() and not (tmp_path / "runs").exists()


def test_a_bad_multirun_job_leaves_no_job_directory(tmp_path):
    """The base config is fine (checked before the sweep); the job's swept value is checked in train.py's main."""
    sweep = tmp_path / "sweep"
    proc = _train_py("-m", "data.frames=0,8", "train.dry_run=true", "logger=none", f"hydra.sweep.dir={sweep}",
                     cwd=tmp_path)
    assert proc.returncode != 0
    assert "data.frames must be a positive integer, got 0" in proc.stderr
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["data.frames=8"]  # the good job still ran
    # a bad value that is not swept is in the base config: refused before the sweep directory is made
    proc = _train_py("-m", "optim.lr=-1", "logger=none", f"hydra.sweep.dir={tmp_path / 'other'}", cwd=tmp_path)
    assert proc.returncode != 0 and "optim.lr must be a positive number, got -1" in proc.stderr
    assert not (tmp_path / "other").exists()


def test_remove_if_empty_keeps_a_real_run(tmp_path):
    (tmp_path / "a" / ".hydra").mkdir(parents=True)
    (tmp_path / "a" / "train.log").write_text("")
    assert config_schema.remove_if_empty(tmp_path / "a") and not (tmp_path / "a").exists()
    (tmp_path / "b" / ".hydra").mkdir(parents=True)
    (tmp_path / "b" / "metrics.jsonl").write_text("{}\n")
    assert not config_schema.remove_if_empty(tmp_path / "b") and (tmp_path / "b").exists()
    (tmp_path / "c").mkdir()  # a launch that failed while building: its log lines go with it
    (tmp_path / "c" / "train.log").write_text("building the model: ...\n")
    assert config_schema.remove_if_empty(tmp_path / "c") and not (tmp_path / "c").exists()
    (tmp_path / "d").mkdir()  # a live launch that has not written config.yaml yet holds the lock
    (tmp_path / "d" / "train.log").write_text("")
    (tmp_path / "d" / "run.lock").write_text("{}")
    assert not config_schema.remove_if_empty(tmp_path / "d") and (tmp_path / "d").exists()


def test_help_shows_the_projects_usage(tmp_path):
    proc = _train_py("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for text in ("Usage: python train.py", "attn: dense", "model: dit_120m", "Examples:", "Launching",
                 "hydra/launcher=slurm", "accelerate launch", "torchrun"):
        assert text in proc.stdout
    assert "accelerate: " not in proc.stdout  # accelerate's launch files are no Hydra group (accelerate_configs/)
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--help"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "Usage: python sample.py" in proc.stdout and "cfg_scale" in proc.stdout


# ---------------------------------------------------------------------------------- data=videos: folder, manifest

def test_videos_folder_wins_and_default_manifest_is_the_projects(tmp_path, monkeypatch):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a_man_in_a_car.mp4").write_bytes(b"")  # listing only: not decoded here
    cfg = _compose("data=videos", f"data.folder={tmp_path / 'clips'}")
    assert config_schema.problems(cfg) == []
    clips = listing.list_clips(cfg.data)
    assert [c.caption for c in clips] == ["a man in a car"]
    # neither manifest nor folder: the project's data/sample_clips.csv, wherever the command runs from
    monkeypatch.chdir(tmp_path)
    cfg = _compose("data=videos")
    assert cfg.data.manifest is None and config_schema.problems(cfg) == []
    assert listing.SAMPLE_MANIFEST == ROOT / "data" / "sample_clips.csv" and listing.SAMPLE_MANIFEST.is_file()
    assert listing.source_name(cfg.data) == str(ROOT / "data" / "sample_clips.csv")
    assert len(listing.list_clips(cfg.data)) == len((ROOT / "data" / "sample_clips.csv").read_text().splitlines()) - 1


def test_run_log_holds_the_runs_lines_and_the_console_no_library_info(tmp_path):
    cfg = _compose(hydra_cfg=True)
    assert cfg.hydra.job_logging.handlers.console.level == "WARNING"
    assert "level" not in cfg.hydra.job_logging.handlers.file  # the file keeps INFO
    run_dir = tmp_path / "run"
    proc = _train_py("train.max_steps=1", "data.frames=4", "data.height=8", "data.width=8", "train.batch_size=2",
                     "train.eval_samples=2", "train.eval_timesteps=1", "train.eval_batch_size=2", "logger=none",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (run_dir / "train.log").read_text()
    for line in (f"run_dir: {run_dir}", "step 0: eval/loss", "step 1: eval/loss", "finished at step 1"):
        assert line in log and line in proc.stdout


TINY_RUN = ("train.max_steps=1", "data.frames=4", "data.height=8", "data.width=8", "train.batch_size=2",
            "train.eval_samples=2", "train.eval_timesteps=1", "train.eval_batch_size=2", "logger=none",
            "data.num_workers=0")


def test_run_dir_given_holds_everything_the_launch_writes(tmp_path):
    """Issue 29, item 5a: run_dir=X puts Hydra's train.log and .hydra/ in X too, and nothing in the default one."""
    proc = _train_py(*TINY_RUN, "run_dir=X", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X"]  # no runs/<default name>/
    assert (tmp_path / "X" / ".hydra" / "overrides.yaml").is_file()
    log = (tmp_path / "X" / "train.log").read_text()
    assert "run_dir: X" in log and "finished at step 1" in log and proc.stdout.startswith("run_dir: X\n")


def test_a_dry_run_prints_a_summary_and_writes_nothing(tmp_path):
    """Issue 29, item 5b: a few lines (choices, parameters, FLOPs, the run directory it would use), no directory."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch))  # where Hydra's own directory of a dry run goes, and is removed
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "attn=vsa", "train.dry_run=true"], check=False,
                          capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"] and not list(scratch.iterdir())
    lines = proc.stdout.splitlines()
    assert len(lines) <= 8, proc.stdout  # not the whole config
    assert f"run_dir (not created): {_run_dir('attn=vsa')}" in lines
    assert lines[0].startswith("dry run: model=dit_tiny attn=vsa data=synthetic")
    assert any(re.fullmatch(r"params: \d+", line) for line in lines)
    assert any(line.startswith("flops_per_sample: ") for line in lines)


# ---------------------------------------------------------------------------------- typed sections (ConfigStore)

@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_each_section_is_a_registered_dataclass_that_takes_the_shipped_presets(group, option):
    """Every section's class is in Hydra's ConfigStore (schema/<section>/<class>), and OmegaConf's structured merge
    of the composed section into it succeeds: the YAML keys and types agree with the dataclass fields."""
    from hydra.core.config_store import ConfigStore

    config_schema.register()
    cfg = _compose(f"{group}={option}")
    for section, section_class in config_schema.SECTIONS.items():
        cls = section_class(cfg[section])
        assert f"{cls.__name__}.yaml" in ConfigStore.instance().list(f"schema/{section}")
        merged = OmegaConf.merge(OmegaConf.structured(cls), cfg[section])
        assert set(merged) == {f.name for f in dataclasses.fields(cls)}


def test_the_typed_config_gives_each_component_its_section():
    config = config_schema.typed(_compose("attn=vsa", "model=dit_60m", "parallel.sp_size=2"))
    assert type(config.model).__name__ == "DiTConfig" and config.model.patch_size == (1, 2, 2)
    assert type(config.attn).__name__ == "VSAConfig" and config.attn.tile == (4, 4, 4)
    assert config.parallel.sp_size == 2 and config.grid == (8, 8, 8) and config.tokens == 512
    assert config.global_batch(dp_size=3) == config.train.batch_size * config.train.grad_accum * 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.max_steps = 5
