"""The code a process runs, as one string for a run's records: the git commit of the source tree vsa_train was
imported from ("+changes" when tracked files differ from it), $GRID_COMMIT where a tree was copied without its
.git, else the installed package's version. Read once per launch (config_history.jsonl, every checkpoint's
state.json, the study ledger's record.json, an export's model card); it never fails: no git, no repository or a
git that errs all fall back to the version."""
import os
import subprocess
from importlib import metadata
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1]  # the tree the package was imported from (a checkout when editable)
COMMIT_ENV = "GRID_COMMIT"  # set by whoever copies the tree without .git (scripts/gpu/grid.sh); it wins
CHANGED = "+changes"  # appended to the commit when tracked files differ from it
GIT_TIMEOUT_S = 20.0  # a git that hangs (a stale NFS mount) must not hold the launch


def code_commit(tree: Path = SOURCE) -> str:
    """The code's commit: $GRID_COMMIT, else git's HEAD of `tree` marked "+changes" when tracked files differ, else
    "vsa_train==<version>"."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    return _git_commit(Path(tree)) or f"vsa_train=={_version()}"


def _git_commit(tree: Path) -> str | None:
    """HEAD and whether tracked files differ, from one `git status` call; None where `tree` is no checkout of its
    own (a package installed into some other repository's folder would otherwise report that one) or git fails."""
    if not (tree / ".git").exists():  # a directory, or a file in a worktree or submodule
        return None
    # Optional locks off: a launch must not write the repository's index (nor wait on another process's lock).
    command = ["git", "-C", str(tree), "status", "--porcelain=v2", "--branch", "--untracked-files=no"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=GIT_TIMEOUT_S,
                             env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.splitlines()
    head = next((line.split()[2] for line in lines if line.startswith("# branch.oid ")), None)
    if head is None or head == "(initial)":  # a repository without commits
        return None
    return head + (CHANGED if any(not line.startswith("#") for line in lines) else "")


def _version() -> str:
    try:
        return metadata.version("vsa_train")
    except metadata.PackageNotFoundError:
        return "unknown"
