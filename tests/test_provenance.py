"""The code a run ran (vsa_train/provenance.py): git's HEAD of the package's source tree, marked when tracked files
differ, $GRID_COMMIT, else the package's version; read once per launch, never failing it, and recorded in
config_history.jsonl and in every checkpoint's state.json (oldest first across resumes)."""
import json
import subprocess
from pathlib import Path

import pytest

from vsa_train import provenance
from vsa_train.checkpoint.format import read_state
from vsa_train.grid import runner
from vsa_train.provenance import code_commit
from vsa_train.rundir import RunDir

VERSION = f"vsa_train=={provenance._version()}"


def _git(repo: Path, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository with one commit of one tracked file; $GRID_COMMIT unset."""
    monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
    tree = tmp_path / "tree"
    tree.mkdir()
    _git(tree, "init", "-q")
    (tree / "a.py").write_text("x = 1\n")
    _git(tree, "add", "a.py")
    _git(tree, "commit", "-q", "-m", "one")
    return tree


def test_head_of_the_tree_marked_when_tracked_files_differ(repo):
    head = _git(repo, "rev-parse", "HEAD")
    assert code_commit(repo) == head
    (repo / "new.py").write_text("untracked\n")  # untracked files are not the code that ran
    assert code_commit(repo) == head
    (repo / "a.py").write_text("x = 2\n")
    assert code_commit(repo) == head + "+changes"


def test_grid_commit_wins_and_no_repository_gives_the_version(repo, tmp_path, monkeypatch):
    inner = repo / "site-packages"  # a folder inside another repository: not its code
    inner.mkdir()
    assert code_commit(inner) == VERSION
    assert code_commit(tmp_path / "nowhere") == VERSION
    monkeypatch.setenv(provenance.COMMIT_ENV, "abc123")  # a tree copied without .git (scripts/gpu/grid.sh)
    assert code_commit(repo) == code_commit(inner) == "abc123"


def test_no_git_or_a_failing_git_never_fails(repo, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git binary
    assert code_commit(repo) == VERSION
    monkeypatch.undo()
    monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ".git").write_text("gitdir: /nonexistent\n")  # a worktree whose repository is gone
    assert code_commit(broken) == VERSION
    empty = tmp_path / "empty_repo"
    empty.mkdir()
    _git(empty, "init", "-q")  # no commit yet
    assert code_commit(empty) == VERSION


def test_one_function_for_the_grid_runner_and_the_trainer():
    assert runner.code_commit is code_commit and not hasattr(runner, "commit_of")
    assert provenance.SOURCE == Path(__file__).resolve().parents[1]  # this checkout's tree


def _calls(monkeypatch, commit):
    """Counts the git calls; each answers `commit`."""
    calls = []
    monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
    monkeypatch.setattr(provenance, "_git_commit", lambda tree: calls.append(tree) or commit)
    return calls


def test_each_launch_records_its_commit_once_in_history_and_checkpoints(tmp_path, monkeypatch):
    from test_trainer import _run

    run = tmp_path / "run"
    calls = _calls(monkeypatch, "aaa")
    _run(run, "train.max_steps=3", "train.ckpt_every=1", "train.keep_checkpoints=5")
    assert calls == [provenance.SOURCE]  # one git call for the launch, none per step or checkpoint
    steps = RunDir(run).checkpoints.dirs()
    assert len(steps) == 3 and all(read_state(s)["code_commits"] == ["aaa"] for s in steps)
    assert read_state(steps[-1])["data_commit"] is None  # no Hub dataset
    _calls(monkeypatch, "bbb+changes")
    _run(run, "train.max_steps=4", "train.ckpt_every=1", "train.keep_checkpoints=5")
    assert read_state(RunDir(run).checkpoints.dirs()[-1])["code_commits"] == ["aaa", "bbb+changes"]
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert [h["code_commit"] for h in history] == ["aaa", "bbb+changes"]
    assert all(h["changed"] == {} for h in history)  # other code is recorded, never refused


def test_a_launch_without_git_records_the_version(tmp_path, monkeypatch):
    from test_trainer import _run

    monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(provenance.subprocess, "run", no_git)
    _run(tmp_path / "run", "train.max_steps=1")
    history = json.loads((tmp_path / "run" / "config_history.jsonl").read_text())
    assert history["code_commit"] == VERSION
    assert read_state(RunDir(tmp_path / "run").checkpoints.dirs()[-1])["code_commits"] == [VERSION]
