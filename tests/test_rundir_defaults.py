"""A key a release adds at its default changes nothing of a run: not its directory's name (the hash leaves defaults
out), not its resume (`config_diff` takes a key an older config.yaml lacks at its default); runs named under the
older rule (defaults hashed) are found by the same command. CPU; one short run, the rest composes configs."""
import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vsa_train import rundir, trainer
from vsa_train.rundir import CONFIG, HISTORY, Launch, RunDir, RunDirError, config_diff, default_value, settings_hash

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.frames=4", "data.height=8", "data.width=8", "train.batch_size=2", "train.eval_samples=2",
        "train.eval_timesteps=1", "train.log_every=1", "train.eval_every=100", "logger=none"]
HF = ["data=hf", "data.path=clips.parquet"]
# Keys with non-null defaults, as if the run's release had not had them yet (data.max_upscale, data.streaming: the
# hf keys that came late); optim and train keys too.
DROPPED = ["data.max_upscale", "data.streaming", "data.max_caption_bytes", "optim.warmup_steps", "train.eval_samples"]
OLDER = "0badc0de"  # the hash part of an older-named run directory


def _compose(*overrides, hydra_cfg=False):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra_cfg)


def _default_dir(*overrides) -> str:
    """hydra.run.dir as a launch in the current directory resolves it."""
    return _compose(*overrides, hydra_cfg=True).hydra.run.dir


def _older(cfg, drop=DROPPED) -> dict:
    """The run's config.yaml as written (resolved), without the keys `drop`: an older release's."""
    tree = yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))
    for key in drop:
        section, name = key.split(".")
        assert tree[section].get(name) is not None, key  # a key with a non-null default: the case at hand
        del tree[section][name]
    return tree


def _write(run_dir: Path, tree) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / CONFIG).write_text(tree if isinstance(tree, str) else yaml.safe_dump(tree))
    return run_dir


def _launch(cfg) -> Launch:
    return Launch(cfg=cfg, processes=1, global_batch=cfg.train.batch_size, resume="auto")


def test_default_value_is_the_schema_default_of_the_class_the_config_selects():
    cfg = _compose(*HF, "attn=vsa", "run_dir=x")
    assert default_value("data.max_upscale", cfg) == 1.0 and default_value("data.streaming", cfg) is False
    assert default_value("attn.tile", cfg) == [4, 4, 4] and default_value("model.patch_size", cfg) == [1, 2, 2]
    assert default_value("train.eval_samples", cfg) == 16 and default_value("optim.warmup_steps", cfg) == 100
    for none in ("data.path", "data.no_such_key", "train.flops_budget", "exp_name", "data"):
        assert default_value(none, cfg) is None, none  # required, unknown, null by default, no section
    synthetic = _compose("run_dir=x")  # another data.source: another class, without hf's keys
    assert default_value("data.streaming", synthetic) is None and default_value("data.max_shapes", synthetic) == 2
    assert default_value("attn.sparsity", _compose("attn.name=nonesuch", "run_dir=x")) is None


@pytest.mark.parametrize("choice", [HF, ["attn=vsa"]], ids=["hf", "vsa"])
def test_keys_an_older_config_lacks_at_their_defaults_change_neither_name_nor_resume(tmp_path, choice):
    cfg = _compose(*choice, f"run_dir={tmp_path / 'run'}")
    drop = DROPPED if choice == HF else ["attn.backend", "attn.window", *DROPPED[3:]]
    old = OmegaConf.create(_older(cfg, drop))
    assert settings_hash(old) == settings_hash(cfg)
    assert config_diff(old, cfg) == [] and config_diff(cfg, old) == []
    run = RunDir(_write(tmp_path / "run", _older(cfg, drop)))
    assert run.check_launch(_launch(cfg)) is None  # accepted under auto (no checkpoint yet: a fresh start)
    run.record_launch(_launch(cfg), None)
    assert '"changed": {}' in (run.path / HISTORY).read_text()


def test_a_key_the_older_config_lacks_at_another_value_is_still_a_change(tmp_path):
    old = _older(_compose(*HF, "run_dir=x"))
    cfg = _compose(*HF, "data.max_upscale=2.0", f"run_dir={tmp_path / 'run'}")
    assert config_diff(OmegaConf.create(old), cfg) == [("data.max_upscale", 1.0, 2.0)]
    assert settings_hash(OmegaConf.create(old)) != settings_hash(cfg)
    run = RunDir(_write(tmp_path / "run", old))
    with pytest.raises(RunDirError, match=r"data.max_upscale: run has 1.0, this launch 2.0"):
        run.check_launch(_launch(cfg))


def test_a_hostile_config_yaml_runs_no_code_and_refuses_or_is_passed_over(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    bomb = f"model: !!python/object/apply:os.system ['touch {marker}']\n"
    run = RunDir(_write(tmp_path / "run", bomb))
    with pytest.raises(RunDirError, match=r"does not load as a run's config: could not determine a constructor"):
        run.check_launch(_launch(_compose(f"run_dir={run.path}")))
    monkeypatch.chdir(tmp_path)  # siblings of the default directory: passed over, the launch gets its own
    default = _default_dir()
    stem = default[:-rundir.HASH_DIGITS]
    _write(tmp_path / f"{stem}{OLDER}", bomb)
    _write(tmp_path / f"{stem}1badc0de", "model: ${oc.env:HOME}\n")  # a resolver named by the file: not run
    _write(tmp_path / f"{stem}2badc0de", "train: [1]\nmodel: 5\n")  # junk sections: no match, no crash
    with pytest.warns(UserWarning, match=r"passing over") as warned:
        assert _default_dir() == default
    lines = sorted(str(w.message) for w in warned)
    assert len(lines) == 2 and "0badc0de/config.yaml does not load" in lines[0] and "interpolation" in lines[1]
    assert not marker.exists()


def test_the_older_named_directory_of_these_settings_is_chosen_once_and_said(tmp_path, monkeypatch, capsys):
    """The one-time migration: the default directory holds no run; a sibling with the same stem holds one whose
    config matches (an older release's, keys missing) and the same budget: that one, in one note line."""
    monkeypatch.chdir(tmp_path)
    default = _default_dir(*HF)
    stem = default[:-rundir.HASH_DIGITS]
    older = _older(_compose(*HF, "run_dir=x"))
    _write(tmp_path / f"{stem}{OLDER}", older)
    _write(tmp_path / f"{stem}1badc0de", {**older, "train": {**older["train"], "flops_budget": 1e9}})
    _write(tmp_path / f"{stem}2badc0de", {**older, "optim": {**older["optim"], "lr": 1e-3}})
    capsys.readouterr()
    assert _default_dir(*HF) == f"{stem}{OLDER}" == _default_dir(*HF)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: going on in {stem}{OLDER}, this run's directory under the older naming of run "
                     f"directories (these settings now name {default}; vsa_train/rundir.py, settings_hash)"]
    assert _default_dir(*HF, "train.flops_budget=1e9") == f"{stem}1badc0de"  # its budget's run
    assert _default_dir(*HF, "optim.lr=3e-4") != f"{stem}2badc0de"  # another config: its own directory
    _write(Path(default), older)  # a run in the default directory itself wins
    assert _default_dir(*HF) == default


def test_an_older_named_run_is_resumed_by_the_same_command(tmp_path, monkeypatch, capsys):
    """End to end: a run made by an older release (an older name, a config.yaml without keys added since) goes on
    where it stopped when the same command is launched again."""
    monkeypatch.chdir(tmp_path)
    stem = _default_dir(*TINY)[:-rundir.HASH_DIGITS]
    run = tmp_path / f"{stem}{OLDER}"
    trainer.train(_compose(*TINY, "train.max_steps=1", f"run_dir={run}"))
    config = yaml.safe_load((run / CONFIG).read_text())
    for key in ("max_shapes", "text_len"):
        del config["data"][key]
    del config["optim"]["warmup_steps"]
    (run / CONFIG).write_text(yaml.safe_dump(config))
    chosen = _default_dir(*TINY, "train.max_steps=2")
    assert chosen == str(run.relative_to(tmp_path))
    capsys.readouterr()
    last = trainer.train(_compose(*TINY, "train.max_steps=2", f"run_dir={chosen}"))
    assert last["step"] == 2 and "(step 1)" in capsys.readouterr().out  # "resumed from .../step_... (step 1)"
    launches = [json.loads(line) for line in (run / HISTORY).read_text().splitlines()]
    assert launches[-1]["resumed_from"] and launches[-1]["changed"] == {} and not launches[-1]["forced"]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]
